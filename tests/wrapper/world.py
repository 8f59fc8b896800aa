"""The emulator-mode test world, in one place for the end-to-end tests (and a later libvirt demo):
the hook tests' SimWorld (software SEV platform in the stand-in's default state, a real broker
process on loopback, the guest registered), the platform export cache the wrapper reads, the host's
emulator.conf naming the stand-in as the real QEMU, and emulator-mode domains made by
`prepare-domain --mode emulator`."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from sevhook.hook.prepare import prepare_domain_file
from sevhook.sim.world import GUEST_ID, PASSPHRASE, SIM_QEMU, SimWorld, free_port, sevhook  # noqa: F401
from sevhook.wrapper.config import CONFIG_FILE
from tests.hook.domains import domain_xml

LIBVIRT_LOG_DIR = Path("/var/log/libvirt/qemu")
LAUNCH_LINE = re.compile(r"sevhook-qemu: (\S+): launch (\S+) from the key broker")


def write_platform_cache(world: SimWorld, directory: Path) -> Path:
    """The cache `sevhook platform export` writes: the world's export of the stand-in's platform (the
    firmware's unsigned CEK and the chip id, which the broker resolves at its simulated KDS)."""
    if directory != world.export:
        shutil.copytree(world.export, directory)
    directory.chmod(0o700)
    return directory


class EmulatorConf:
    """/etc/sevhook/emulator.conf for the test: the stand-in answers libvirt's probes (so libvirt sees
    SEV support) and runs the guests; removed afterwards unless somebody else's was there."""

    def __init__(self, cache: Path) -> None:
        self.text = f"# written by sevhook's tests/wrapper\nqemu = {SIM_QEMU}\nplatform-cache = {cache}\n"
        self.previous = CONFIG_FILE.read_text() if CONFIG_FILE.exists() else None

    def install(self) -> None:
        CONFIG_FILE.parent.mkdir(parents=True, exist_ok=True)
        CONFIG_FILE.write_text(self.text)

    def remove(self) -> None:
        if self.previous is not None:
            CONFIG_FILE.write_text(self.previous)
        elif CONFIG_FILE.exists() and CONFIG_FILE.read_text() == self.text:
            CONFIG_FILE.unlink()


def plain_sev_domain(world: SimWorld, name: str, *, firmware: Path | None = None,
                     emulator: str = "/usr/bin/qemu-system-x86_64") -> str:
    """An SEV domain with the world's firmware and no sevhook metadata (nothing attests it)."""
    loader = (f"<loader readonly='yes' type='pflash'>{firmware or world.firmware}</loader>"
              f"<nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{world.root / name}_VARS.fd</nvram>")
    xml = domain_xml(name, socket=None, metadata=False, declare_monitor=False, emulator=emulator)
    return xml.replace("<os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>",
                       f"<os><type arch='x86_64' machine='q35'>hvm</type>{loader}</os>")


def emulator_domain(world: SimWorld, name: str, *, firmware: Path | None = None, broker_url: str | None = None,
                    token: Path | None = None, timeout: float = 30) -> str:
    """A plain SEV domain made emulator-mode by prepare-domain (no broker call: every start makes its launch)."""
    source = world.root / f"{name}.xml"
    source.write_text(plain_sev_domain(world, name, firmware=firmware))
    prepared = world.root / f"{name}.emulator.xml"
    prepare_domain_file(source, broker_url=broker_url or world.broker_url, guest_id=GUEST_ID,
                        token_file=token or world.token, timeout=timeout, output=prepared, mode="emulator",
                        qemu=SIM_QEMU)
    return prepared.read_text()


def launch_ids(name: str) -> list[str]:
    """The launch ids the wrapper reported in libvirt's log of the domain, oldest first."""
    path = LIBVIRT_LOG_DIR / f"{name}.log"
    text = path.read_text(errors="replace") if path.exists() else ""
    return [match.group(2) for match in LAUNCH_LINE.finditer(text) if match.group(1) == name]
