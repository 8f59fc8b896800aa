"""Real libvirtd 9.0 driving `sevhook-sim-qemu` as <emulator>: capability probe, a native
<launchSecurity type='sev'> domain started paused, the measurement checked by the owner, a secret injected
with virsh and received by the software processor, resume; a bad session fails the start cleanly."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sevhook.sev.certs import AmdCertificate
from sevhook.sev.chain import CertificateChain
from sevhook.sev.launch_digest import sev_launch_digest
from sevhook.sev.measurement import LaunchMeasurement, verify_measurement
from sevhook.sev.roots import TrustAnchor
from sevhook.sev.secret import DISK_PASSPHRASE_GUID, SecretTable, wrap_secret
from sevhook.sev.session import create_session
from sevhook.sim.platform import SoftwarePlatform, load_or_init
from sevhook.sim.state import DEFAULT_STATE_DIR, StateDir
from tests.sim.sim_support import OVMF, SIM_QEMU, children_of, pid_alive

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(180)]


def virsh(uri: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True, timeout=120)
    if check and result.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {result.stderr.strip()}")
    return result


@pytest.fixture(scope="module")
def default_platform() -> SoftwarePlatform:
    """libvirt starts QEMU with a clean environment, so the stand-in uses the default state directory."""
    return load_or_init(StateDir(DEFAULT_STATE_DIR))


def domain_xml(name: str, godh_b64: str, session_b64: str) -> str:
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{OVMF}</loader></os>
  <features><acpi/></features>
  <devices><emulator>{SIM_QEMU}</emulator></devices>
  <launchSecurity type='sev'>
    <policy>0x0001</policy>
    <dhCert>{godh_b64}</dhCert>
    <session>{session_b64}</session>
  </launchSecurity>
</domain>"""


@pytest.fixture()
def domain_name(libvirt_uri: str) -> str:
    name = f"sevhook-sim-{os.getpid()}-{time.monotonic_ns() % 100000}"
    yield name
    virsh(libvirt_uri, "destroy", name, check=False)
    virsh(libvirt_uri, "undefine", name, "--nvram", check=False)


def test_capability_probe_sees_sev(libvirt_uri: str, default_platform: SoftwarePlatform) -> None:
    caps = virsh(libvirt_uri, "domcapabilities", "--emulatorbin", SIM_QEMU, "--virttype", "qemu",
                 "--machine", "q35").stdout
    match = re.search(r"<sev supported='yes'>(.*?)</sev>", caps, re.S)
    assert match, "libvirt reports no SEV for the stand-in (a stale capability cache? touch the binary)"
    assert f"<cbitpos>{default_platform.config.cbitpos}</cbitpos>" in match.group(1)
    assert f"<reducedPhysBits>{default_platform.config.reduced_phys_bits}</reducedPhysBits>" in match.group(1)


def test_owner_flow_through_libvirt(libvirt_uri: str, default_platform: SoftwarePlatform, domain_name: str,
                                   tmp_path: Path) -> None:
    chain = CertificateChain.from_full(default_platform.full_chain())
    chain.verify([TrustAnchor("sevhook-sim", AmdCertificate.parse(default_platform.cert("ark")))])
    session = create_session(chain.pdh, 0x1)
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(domain_name, session.godh_b64, session.session_b64))
    virsh(libvirt_uri, "define", str(xml))
    virsh(libvirt_uri, "start", domain_name, "--paused")
    assert virsh(libvirt_uri, "domstate", domain_name).stdout.strip() == "paused"

    info = dict(re.findall(r"^(\S+)\s*:\s*(\S+)$", virsh(libvirt_uri, "domlaunchsecinfo", domain_name).stdout, re.M))
    api_major, api_minor, build = int(info["sev-api-major"]), int(info["sev-api-minor"]), int(info["sev-build-id"])
    assert int(info["sev-policy"]) == 1
    blob = LaunchMeasurement.parse(info["sev-measurement"])
    assert verify_measurement(blob, session.tik, api_major, api_minor, build, 1, sev_launch_digest(OVMF))

    table = SecretTable(((DISK_PASSPHRASE_GUID, b"correct horse\0"),)).build()
    header, ciphertext = wrap_secret(session.tek, session.tik, blob.measurement, table, api_major=api_major,
                                     api_minor=api_minor)
    (tmp_path / "hdr.b64").write_text(base64.b64encode(header.to_bytes()).decode())
    (tmp_path / "secret.b64").write_text(base64.b64encode(ciphertext).decode())
    virsh(libvirt_uri, "domsetlaunchsecstate", domain_name, "--secrethdr", str(tmp_path / "hdr.b64"),
          "--secret", str(tmp_path / "secret.b64"))
    virsh(libvirt_uri, "resume", domain_name)
    assert virsh(libvirt_uri, "domstate", domain_name).stdout.strip() == "running"

    out = subprocess.run([str(Path(sys.executable).with_name("sevhook")), "sim", "secrets", "--state-dir",
                          str(DEFAULT_STATE_DIR), "--domain", domain_name, "--json", "--show-values"],
                         capture_output=True, text=True, check=True).stdout
    [record] = json.loads(out)
    assert record["state"] == "running" and record["alive"]
    [entry] = record["secrets"][0]["table"]
    assert entry["guid"] == str(DISK_PASSPHRASE_GUID)
    assert base64.b64decode(entry["value_b64"]) == b"correct horse\0"

    pid = int(Path(f"/run/libvirt/qemu/{domain_name}.pid").read_text())
    qemu_children = children_of(pid)
    assert qemu_children, "the wrapper runs the real QEMU as its child"
    virsh(libvirt_uri, "destroy", domain_name)
    deadline = time.monotonic() + 15
    while any(pid_alive(p) for p in [pid, *qemu_children]):
        assert time.monotonic() < deadline, "the stand-in or its QEMU outlived `virsh destroy`"
        time.sleep(0.05)


def test_bad_session_fails_the_start(libvirt_uri: str, default_platform: SoftwarePlatform, domain_name: str,
                                     tmp_path: Path) -> None:
    chain = CertificateChain.from_full(default_platform.full_chain())
    session = create_session(chain.pdh, 0x1)
    tampered = bytearray(session.session)
    tampered[0x40] ^= 0xFF  # wrap_mac
    xml = tmp_path / "domain.xml"
    xml.write_text(domain_xml(domain_name, session.godh_b64, base64.b64encode(bytes(tampered)).decode()))
    virsh(libvirt_uri, "define", str(xml))
    result = virsh(libvirt_uri, "start", domain_name, "--paused", check=False)
    assert result.returncode != 0
    assert "fw_error=10 'Bad signature'" in result.stderr
    assert virsh(libvirt_uri, "domstate", domain_name).stdout.strip() == "shut off"


def test_nodesevinfo_shows_the_simulated_platform(default_platform: SoftwarePlatform, short_dir: Path) -> None:
    """virNodeGetSEVInfo asks the host's default emulator (qemu-system-x86_64 in the driver's PATH): with
    the stand-in first in PATH, libvirt's own QEMU driver (embedded in virsh, so no shared daemon is
    touched) reports the simulated PDH and chain."""
    bin_dir = short_dir / "bin"
    bin_dir.mkdir()
    (bin_dir / "qemu-system-x86_64").symlink_to(SIM_QEMU)
    env = {"PATH": f"{bin_dir}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(short_dir)}
    result = subprocess.run(["virsh", "-c", f"qemu:///embed?root={short_dir / 'embed'}", "nodesevinfo"],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode == 0, result.stderr
    info = dict(re.findall(r"^(\S+)\s*:\s*(\S+)$", result.stdout, re.M))
    export = default_platform.pdh_cert_export()
    assert base64.b64decode(info["pdh"]) == export.pdh
    assert base64.b64decode(info["cert-chain"]) == export.cert_chain
    assert base64.b64decode(info["cpu0-id"]) == default_platform.get_id()
    assert int(info["cbitpos"]) == default_platform.config.cbitpos
