"""libvirt's status file as sevhook-qemu reads it: only this start's (its pid), and in two steps (a first
look at the metadata before QEMU's spawn, the full checks while QEMU starts) that must never disagree."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sevhook.hook.plan import HookFailure
from sevhook.wrapper.domain_source import emulator_qemu, guest_from_status, managed_guest, read_status
from tests.hook.domains import domain_xml

QEMU = "/opt/qemu/bin/qemu-system-x86_64"
EMULATOR = f"<sevhook:emulator qemu='{QEMU}'/>"


def _domain(metadata_edit: tuple[str, str] | None = None, *, socket: str | None = None) -> str:
    """An emulator-mode domain (as prepare-domain writes it), optionally with one edit of its text."""
    text = domain_xml("web1", socket=socket, launch_id=None, declare_monitor=False)
    if socket is None:
        text = text.replace("</sevhook:attestation>", f"{EMULATOR}</sevhook:attestation>")
    if metadata_edit:
        old, new = metadata_edit
        assert old in text
        text = text.replace(old, new, 1)
    return text


def _status(state: Path, domain: str, pid: int | None = None) -> None:
    owner = os.getpid() if pid is None else pid
    (state / "web1.xml").write_text(f"<domstatus state='paused' reason='starting up' pid='{owner}'>\n{domain}"
                                    "</domstatus>\n")


def test_no_status_file_means_libvirt_is_not_starting_this_qemu(tmp_path):
    assert read_status("web1", os.getpid(), tmp_path) is None
    assert guest_from_status("web1", os.getpid(), tmp_path) is None


@pytest.mark.parametrize(("content", "words"), [
    (None, "belongs to pid 1, not to this QEMU"),
    ("<domain><name>web1</name></domain>", "is not a libvirt domain status file"),
    ("<domstatus pid='@'><domain", "libvirt's status file is not XML"),
])
def test_a_status_file_not_of_this_start_is_refused(tmp_path, content, words):
    if content is None:
        _status(tmp_path, _domain(), pid=1)
    else:
        (tmp_path / "web1.xml").write_text(content.replace("@", str(os.getpid())))
    with pytest.raises(HookFailure, match=words) as caught:
        read_status("web1", os.getpid(), tmp_path)
    assert caught.value.step == "metadata"


SEVHOOK_NS = "xmlns:sevhook='http://sevhook.org/xmlns/libvirt/1.0'"
CASES = {
    "emulator mode": (None, None),
    "hook mode": (None, "/run/sevhook/web1.qmp"),
    "no metadata": (("<sevhook:attestation", "<!--"), None),  # completed into a comment below
    "a second attestation element": (("</metadata>", f"<sevhook:attestation {SEVHOOK_NS}><sevhook:broker "
                                      "url='http://127.0.0.1:9'/><sevhook:guest id='x'/></sevhook:attestation>"
                                      "</metadata>"), None),
    "an attestation without its broker": (("<sevhook:broker url='http://127.0.0.1:9'/>", ""), None),
    "an unknown sevhook element first": (("<metadata>", f"<metadata><sevhook:extra {SEVHOOK_NS}/>"), None),
    "emulator and monitor at once": (("</sevhook:attestation>",
                                      "<sevhook:monitor socket='/run/x.qmp'/></sevhook:attestation>"), None),
    "no launchSecurity": (("<launchSecurity type='sev'>", "<launchSecurityX type='sev'>"), None),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_first_look_and_the_full_checks_agree(tmp_path, case):
    """Emulator mode at first look (QEMU is spawned) only where the full checks find emulator mode or refuse
    the metadata; no emulator mode at first look only where the full checks find none either."""
    edit, socket = CASES[case]
    text = _domain(edit, socket=socket)
    if case == "no metadata":
        text = text.replace("</sevhook:attestation>", "-->")
    if case == "no launchSecurity":
        text = text.replace("</launchSecurity>", "</launchSecurityX>")
    _status(tmp_path, text)
    domain = read_status("web1", os.getpid(), tmp_path)
    assert domain is not None
    first_look = emulator_qemu(domain)
    try:
        guest = managed_guest(domain, "web1", tmp_path)
    except HookFailure as exc:
        assert exc.step == "metadata" and exc.reason
        assert case not in ("emulator mode", "hook mode", "no metadata")
        return
    mode = guest.attestation.mode if guest is not None else None
    if first_look is None:
        assert mode != "emulator"
    else:
        assert mode == "emulator" and guest is not None and guest.attestation.emulator_qemu == first_look == QEMU
    assert case in ("emulator mode", "hook mode", "no metadata")


def test_unreadable_metadata_is_refused_not_ignored(tmp_path):
    """An <sevhook:attestation> the schema refuses has no model: the guest must not start unattested."""
    _status(tmp_path, _domain(("<sevhook:broker url='http://127.0.0.1:9'/>", "")))
    with pytest.raises(HookFailure, match="broker"):
        guest_from_status("web1", os.getpid(), tmp_path)
