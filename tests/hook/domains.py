"""Domain XML for the hook tests: SEV guests with sevhook metadata, as prepare-domain writes them."""

from __future__ import annotations


def domain_xml(name: str, *, socket: str | None, broker_url: str = "http://127.0.0.1:9", launch_id: str | None = "L1",
               policy: int = 1, godh_b64: str = "", session_b64: str = "", timeout: float = 5, resume: bool = True,
               declare_monitor: bool = True, emulator: str = "/usr/bin/qemu-system-x86_64",
               metadata: bool = True, extra_devices: str = "") -> str:
    """A TCG domain with <launchSecurity type='sev'> and sevhook metadata, as prepare-domain writes it
    (socket=None: without <sevhook:monitor>, a domain for `sevhook start`)."""
    launch = f" launch='{launch_id}'" if launch_id else ""
    attestation = (
        f"<sevhook:attestation xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0' timeout='{timeout:g}'"
        f" resume='{'yes' if resume else 'no'}'>"
        f"<sevhook:broker url='{broker_url}'/><sevhook:guest id='{name}'{launch}/>"
        + (f"<sevhook:monitor socket='{socket}'/>" if socket else "") + "</sevhook:attestation>"
    ) if metadata else ""
    monitor = (f"<qemu:commandline><qemu:arg value='-qmp'/>"
               f"<qemu:arg value='unix:{socket},server=on,wait=off'/></qemu:commandline>") if declare_monitor else ""
    blobs = (f"<dhCert>{godh_b64}</dhCert><session>{session_b64}</session>") if godh_b64 else ""
    return f"""<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>{name}</name>
  <metadata>{attestation}</metadata>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os firmware='efi'><type arch='x86_64' machine='q35'>hvm</type></os>
  <features><acpi/></features>
  <devices><emulator>{emulator}</emulator>{extra_devices}</devices>
  <launchSecurity type='sev'><cbitpos>47</cbitpos><reducedPhysBits>1</reducedPhysBits>
    <policy>0x{policy:04x}</policy>{blobs}</launchSecurity>
  {monitor}
</domain>
"""
