"""The same launch API through real libvirtd: libvirt's own calls (state, resume, launchSecurityInfo,
setLaunchSecurityState, getSEVInfo) and qemuMonitorCommand for what libvirt does not wrap. A plain
TCG guest shows the error mapping; an SEV guest on the QEMU stand-in shows a real launch state."""

from __future__ import annotations

import shutil
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.monitor.errors import MonitorError
from sevhook.monitor.libvirt_monitor import LibvirtMonitor, host_capabilities
from sevhook.virt import libvirt_module, open_connection

pytestmark = [pytest.mark.libvirt, pytest.mark.timeout(120)]
SIM_QEMU = str(Path(sys.executable).with_name("sevhook-sim-qemu"))


@pytest.fixture(scope="module")
def conn(libvirt_uri: str) -> Iterator[object]:
    connection = open_connection(libvirt_uri)
    yield connection
    connection.close()


@pytest.fixture
def start_paused(conn: object) -> Iterator[object]:
    domains: list[object] = []

    def start(xml: str) -> object:
        libvirt = libvirt_module()
        domain = conn.createXML(xml, libvirt.VIR_DOMAIN_START_PAUSED)  # type: ignore[attr-defined]
        domains.append(domain)
        return domain

    yield start
    libvirt = libvirt_module()
    for domain in domains:
        try:
            domain.destroy()  # type: ignore[attr-defined]
        except libvirt.libvirtError:
            pass


def _plain(name: str) -> str:
    return f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>64</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"""


def test_plain_guest_through_libvirt(start_paused):
    monitor = LibvirtMonitor(start_paused(_plain(f"shm-plain-{uuid.uuid4().hex[:8]}")))
    assert monitor.status().status == "paused"
    info = monitor.query_sev()  # via qemuMonitorCommand: QEMU 7.2's flat answer
    assert (info.enabled, info.state, info.sev_type) == (False, "uninit", "sev")
    with pytest.raises(MonitorError) as caught:
        monitor.inject_secret("AAAA", "AAAA")
    assert "SEV" in caught.value.message and caught.value.command == "setLaunchSecurityState"
    with pytest.raises(MonitorError) as caught:
        monitor.attestation_report(bytes(16))
    assert (caught.value.qmp_class, caught.value.desc) == ("GenericError", "SEV is not enabled")
    with pytest.raises(MonitorError):
        monitor.launch_measurement()
    with pytest.raises(MonitorError, match="is this an SEV guest"):
        monitor.launch_info()
    monitor.cont()
    assert monitor.status().running
    monitor.stop()
    assert monitor.status().status == "paused"


def test_host_without_sev_is_reported(conn):
    with pytest.raises(MonitorError, match="getSEVInfo"):
        host_capabilities(conn)


def test_sev_guest_on_the_stand_in(start_paused, shared, tmp_path):
    firmware = tmp_path / "OVMF.amdsev.fd"
    shutil.copy(shared / "vectors/sevctl/OVMF.amdsev.trimmed.fd", firmware)
    name = f"shm-sev-{uuid.uuid4().hex[:8]}"
    xml = f"""<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type>
    <loader readonly='yes' type='pflash'>{firmware}</loader>
    <nvram template='/usr/share/OVMF/OVMF_VARS_4M.fd'>{tmp_path / 'VARS.fd'}</nvram></os>
  <features><acpi/></features>
  <devices><emulator>{SIM_QEMU}</emulator></devices>
  <launchSecurity type='sev'><policy>0x0001</policy></launchSecurity></domain>"""
    monitor = LibvirtMonitor(start_paused(xml))
    info = monitor.query_sev()
    assert (info.enabled, info.state, info.policy) == (True, "launch-secret", 1)
    measurement = monitor.launch_measurement()
    assert len(measurement.measurement) == 32 and len(measurement.mnonce) == 16
    launch = monitor.launch_info()  # what `sevhook start` reads: the measurement with the firmware's version
    assert launch.measurement_b64 == measurement.b64 and launch.policy == 1
    assert (launch.api_major, launch.api_minor) >= (0, 17) and launch.build_id >= 0
    monitor.cont()
    assert monitor.status().running
    assert monitor.query_sev().state == "running"
