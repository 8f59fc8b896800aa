"""The CPU table against the real QEMU: every EPYC model this QEMU knows must be in it with the
family/model/stepping QEMU gives the guest (QMP query-cpu-model-expansion, TCG, no guest started)."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path

import pytest
from qemu.qmp import QMPClient

from sevhook.sev.cpu_types import CPU_TYPES, CpuModel

QEMU = "/usr/bin/qemu-system-x86_64"


async def _qemu_epyc_models(socket: Path) -> dict[str, CpuModel]:
    process = subprocess.Popen([QEMU, "-machine", "none", "-accel", "tcg", "-nodefaults", "-display", "none",
                                "-qmp", f"unix:{socket},server=on,wait=off"], stderr=subprocess.DEVNULL)
    client = QMPClient("sevhook-cpu-test")
    try:
        for _ in range(200):
            if socket.exists():
                break
            await asyncio.sleep(0.05)
        await client.connect(str(socket))
        definitions = await client.execute("query-cpu-definitions")
        models = {}
        for definition in definitions:  # type: ignore[union-attr]
            name = definition["name"]
            if name.startswith("EPYC"):
                expansion = await client.execute("query-cpu-model-expansion",
                                                 {"type": "full", "model": {"name": name}})
                props = expansion["model"]["props"]  # type: ignore[index]
                models[name] = CpuModel(props["family"], props["model"], props["stepping"])
        await client.disconnect()
        return models
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.qemu
def test_cpu_table_matches_qemu(tmp_path: Path) -> None:
    models = asyncio.run(_qemu_epyc_models(tmp_path / "qmp.sock"))
    assert "EPYC" in models and "EPYC-Milan" in models
    for name, model in models.items():
        assert CPU_TYPES.get(name) == model, f"{name}: QEMU says {model}, the table {CPU_TYPES.get(name)}"
