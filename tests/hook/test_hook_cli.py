"""`sevhook hook install|uninstall` and `sevhook prepare-domain` (against a real broker process and
the software platform's export), run as the command line runs them."""

from __future__ import annotations

import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from lxml import etree

from sevhook.sim.world import GUEST_ID, SimWorld, free_port
from sevhook.xml import load_domain
from tests.hook.domains import domain_xml

pytestmark = pytest.mark.timeout(120)
SEVHOOK = [sys.executable, "-m", "sevhook.cli"]
NS = {"s": "http://sevhook.org/xmlns/libvirt/1.0", "q": "http://libvirt.org/schemas/domain/qemu/1.0"}


def cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*SEVHOOK, *args], input=stdin, capture_output=True, text=True, timeout=60)


def test_install_and_uninstall(tmp_path):
    hooks = tmp_path / "hooks"
    result = cli("hook", "install", "--hooks-dir", str(hooks), "--log", "syslog")
    assert result.returncode == 0
    script = hooks / "qemu.d" / "50-sevhook"
    assert "restart" in result.stdout and str(script) in result.stdout
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    text = script.read_text()
    assert text.startswith(f"#!{sys.executable} -IS\n") and "'syslog'" in text
    assert cli("hook", "install", "--hooks-dir", str(hooks)).returncode == 0  # reinstalling is fine
    result = cli("hook", "uninstall", "--hooks-dir", str(hooks))
    assert result.returncode == 0 and not script.exists() and "restart libvirtd" in result.stdout
    result = cli("hook", "uninstall", "--hooks-dir", str(hooks))
    assert result.returncode == 0 and "nothing to do" in result.stdout


def test_foreign_hooks_are_left_alone(tmp_path):
    script = tmp_path / "qemu.d" / "50-sevhook"
    script.parent.mkdir()
    script.write_text("#!/bin/sh\nexit 0\n")
    for action in ("install", "uninstall"):
        result = cli("hook", action, "--hooks-dir", str(tmp_path))
        assert result.returncode == 2 and "not written by sevhook" in result.stderr
    assert script.read_text() == "#!/bin/sh\nexit 0\n"


@pytest.fixture(scope="module")
def world(shared: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimWorld]:
    created = SimWorld.create(tmp_path_factory.mktemp("cliworld"), shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd")
    yield created
    created.close()


def _plain_sev_domain(path: Path) -> Path:
    path.write_text(domain_xml("web1", socket=None, metadata=False, declare_monitor=False))
    return path


def test_prepare_domain_writes_launch_metadata_and_monitor(world, tmp_path):
    source = _plain_sev_domain(tmp_path / "web1.xml")
    out = tmp_path / "web1.prepared.xml"
    args = ["prepare-domain", str(source), "--mode", "hook", "--broker", world.broker_url, "--guest", GUEST_ID,
            "--platform-export",
            str(world.export), "--token-file", str(world.token), "--timeout", "12", "-o", str(out)]
    result = cli(*args)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    document = load_domain(out)
    assert document.valid
    domain = document.domain
    assert domain.launch_security.dh_cert and domain.launch_security.session
    attestation = domain.attestation
    assert (attestation.guest_id, attestation.socket, attestation.timeout) == (
        GUEST_ID, "/run/sevhook/web1/qmp.sock", 12)
    assert attestation.broker.url == world.broker_url and attestation.broker.token_file == str(world.token)
    assert attestation.launch_id
    root = etree.parse(str(out)).getroot()
    assert root.xpath("q:commandline/q:arg/@value", namespaces=NS) == [
        "-qmp", "unix:/run/sevhook/web1/qmp.sock,server=on,wait=off"]
    first_launch = attestation.launch_id
    again = cli("prepare-domain", str(out), *args[2:-2], "--socket", "/run/sevhook/other.qmp", "-o", str(out))
    assert again.returncode == 0, again.stderr
    reprepared = load_domain(out).domain
    assert reprepared.attestation.launch_id != first_launch  # a fresh launch each time
    values = etree.parse(str(out)).getroot().xpath("q:commandline/q:arg/@value", namespaces=NS)
    assert values == ["-qmp", "unix:/run/sevhook/other.qmp,server=on,wait=off"]  # the old monitor is gone
    assert len(etree.parse(str(out)).getroot().xpath("metadata/s:attestation", namespaces=NS)) == 1


def test_prepare_domain_reads_stdin_and_writes_stdout(world, tmp_path):
    source = _plain_sev_domain(tmp_path / "web1.xml").read_text()
    result = cli("prepare-domain", "-", "--mode", "hook", "--broker", world.broker_url, "--guest", GUEST_ID,
                 "--platform-export",
                 str(world.export), "--token-file", str(world.token), "--socket", "/run/sv/w.qmp", stdin=source)
    assert result.returncode == 0, result.stderr
    assert "unix:/run/sv/w.qmp,server=on,wait=off" in result.stdout
    assert load_domain(result.stdout.encode()).valid


@pytest.mark.parametrize(
    ("change", "words", "status"),
    [
        ("no-sev", "needs <launchSecurity type='sev'>", 2),
        ("broker-down", "unavailable", 1),
        ("bad-export", "platform export", 2),
        ("unknown-guest", "refused", 1),
        ("bad-timeout", "--timeout", 2),
    ],
)
def test_prepare_domain_errors_are_one_clear_line(world, tmp_path, change, words, status):
    source = _plain_sev_domain(tmp_path / "web1.xml")
    broker, export, guest, timeout = world.broker_url, str(world.export), GUEST_ID, "30"
    if change == "no-sev":
        source.write_text(source.read_text().replace("<launchSecurity", "<!--").replace("</launchSecurity>", "-->"))
    elif change == "broker-down":
        broker = f"http://127.0.0.1:{free_port()}"
    elif change == "bad-export":
        export = str(tmp_path / "missing.bin")
    elif change == "unknown-guest":
        guest = "nobody"
    elif change == "bad-timeout":
        timeout = "0"
    result = cli("prepare-domain", str(source), "--mode", "hook", "--broker", broker, "--guest", guest,
                 "--platform-export", export,
                 "--token-file", str(world.token), "--timeout", timeout, "-o", str(tmp_path / "out.xml"))
    assert result.returncode == status, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out.xml").exists()


@pytest.mark.libvirt
def test_prepare_domain_reads_the_platform_from_libvirt(libvirt_uri, tmp_path):
    """-c asks libvirt's getSEVInfo (which needs a read-write connection); this host's QEMU has no
    SEV, so libvirt's own refusal must come through as one clear line, and nothing is written."""
    out = tmp_path / "prepared.xml"
    result = cli("prepare-domain", "-", "--mode", "hook", "--broker", "http://127.0.0.1:9", "--guest", GUEST_ID,
                 "-c", libvirt_uri, "-o", str(out), stdin=domain_xml("plain-sev", socket=None))
    assert result.returncode == 1
    assert "getSEVInfo" in result.stderr and "QEMU does not support SEV" in result.stderr
    assert "read only" not in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not out.exists()

