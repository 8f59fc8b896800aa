"""docs/quickstart.md's examples hold: the complete domain for the software platform validates clean
with `sevhook validate --strict`, its sevhook.toml example loads, and the docs this developer keeps use
policies `validate` does not warn about."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sevhook import config

ROOT = Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "docs" / "quickstart.md"


def block(marker: str, language: str) -> str:
    text = QUICKSTART.read_text()
    match = re.search(rf"{re.escape(marker)}.*?```{language}\n(.*?)```", text, re.DOTALL)
    assert match, f"{QUICKSTART}: no ```{language} block after {marker!r}"
    return match.group(1)


def test_the_software_platform_domain_validates_clean(tmp_path: Path) -> None:
    domain = tmp_path / "web1.xml"
    domain.write_text(block("<!-- sevhook-example: software-platform-domain -->", "xml"))
    result = subprocess.run([sys.executable, "-m", "sevhook", "validate", "--strict", str(domain)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == f"{domain}: valid" and result.stderr == ""
    text = domain.read_text()
    for part in ("<domain type='qemu'>", "<loader readonly='yes' type='pflash'>/var/lib/sevhook/OVMF.sim.fd",
                 "<nvram ", "<emulator>/usr/local/bin/sevhook-sim-qemu</emulator>"):
        assert part in text


def test_the_configuration_example_loads(tmp_path: Path) -> None:
    path = tmp_path / "sevhook.toml"
    path.write_text(block("## The configuration file", "toml"))
    loaded = config.load(path)
    assert loaded.get("host.broker-url") == "https://kbs.example.org:8700"
    assert loaded.source("broker.listen") == f"{path}: broker.listen"


def test_examples_use_policies_that_validate_clean() -> None:
    for name in ("README.md", "docs/quickstart.md", "docs/troubleshooting.md"):
        text = (ROOT / name).read_text()
        assert not re.search(r"--policy 0x0*1\b|<policy>0x0*1</policy>", text), f"{name}: policy 0x1 in an example"
