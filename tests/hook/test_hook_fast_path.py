"""The hook's hot path: for guests sevhook does not manage, the installed script exits 0 with no
output before importing anything heavy; the operations that need no QEMU behave as documented."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sevhook.hook import fast
from sevhook.xml.models import SEVHOOK_NS
from sevhook.xml.parsing import MAX_DOCUMENT_BYTES
from tests.hook.domains import domain_xml

PLAIN = "<domain type='kvm'><name>plain</name><memory>1</memory></domain>"
SEV_ONLY = ("<domain type='kvm'><name>sev</name><launchSecurity type='sev'><policy>0x0003</policy>"
            "</launchSecurity></domain>")
HEAVY = ("lxml", "sevhook.xml", "sevhook.hook.runner", "qemu", "httpx", "cryptography", "asyncio", "dataclasses")


def test_namespace_constant_matches_the_models():
    assert fast.SEVHOOK_NS == SEVHOOK_NS.encode()
    assert fast.MAX_DOCUMENT_BYTES == MAX_DOCUMENT_BYTES


def test_prefilter():
    managed = domain_xml("g", socket="/run/sevhook/g.qmp").encode()
    assert fast.concerns_sevhook(managed)
    assert not fast.concerns_sevhook(PLAIN.encode())
    assert not fast.concerns_sevhook(SEV_ONLY.encode())
    metadata_only = managed.replace(b"<launchSecurity", b"<other").replace(b"</launchSecurity", b"</other")
    assert fast.concerns_sevhook(metadata_only)  # the full parse refuses metadata without SEV: never skipped


@pytest.mark.parametrize("xml", [PLAIN, SEV_ONLY])
@pytest.mark.parametrize("operation", ["prepare", "start", "started", "stopped", "release", "migrate", "restore"])
def test_unmanaged_domains_pass_silently(run_hook, xml, operation, hook_log):
    result = run_hook("other", operation, xml)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert not hook_log.exists()  # not even the log is opened


def test_no_heavy_import_for_unmanaged_domains(hook_script):
    """-X importtime lists every module the interpreter imported while running the script."""
    python, flags = hook_script.read_text().splitlines()[0][2:].split()
    result = subprocess.run([python, flags, "-X", "importtime", str(hook_script), "plain", "prepare", "begin", "-"],
                            input=PLAIN, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "sevhook.hook.fast" in imported
    assert not [name for name in imported for heavy in HEAVY if name == heavy or name.startswith(heavy + ".")]


def test_reconnect_and_attach_do_nothing_even_for_managed_guests(run_hook, hook_log):
    xml = domain_xml("g", socket="/nonexistent/g.qmp")
    for operation in ("reconnect", "attach"):
        result = run_hook("g", operation, xml)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("operation", ["migrate", "restore"])
def test_managed_guests_cannot_move(run_hook, session_blobs, operation):
    godh, session = session_blobs
    xml = domain_xml("g", socket="/run/sevhook/g.qmp", godh_b64=godh, session_b64=session)
    result = run_hook("g", operation, xml)
    assert result.returncode == 1
    assert result.stdout == ""  # stdout would replace the domain XML
    assert result.stderr.startswith(f"sevhook: g: {operation}: an attested SEV guest cannot be migrated")
    assert len(result.stderr.splitlines()) == 1


def test_cli_run_uses_the_same_entry(session_blobs):
    result = subprocess.run([sys.executable, "-m", "sevhook.cli", "hook", "run", "plain", "started", "begin", "-"],
                            input=PLAIN, capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    godh, session = session_blobs
    managed = domain_xml("g", socket="/run/sevhook/g.qmp", godh_b64=godh, session_b64=session)
    result = subprocess.run([sys.executable, "-m", "sevhook.cli", "hook", "run", "g", "migrate", "begin", "-"],
                            input=managed, capture_output=True, text=True, timeout=60,
                            env={"SEVHOOK_HOOK_LOG": "/dev/null", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "cannot be migrated" in result.stderr


def test_unreadable_metadata_fails_closed(run_hook):
    broken = domain_xml("g", socket="relative.qmp")  # the schema wants an absolute socket path
    result = run_hook("g", "prepare", broken)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g: load: ")
    assert "Traceback" not in result.stderr


def test_not_xml_fails_closed(run_hook):
    result = run_hook("g", "prepare", "<launchSecurity http://sevhook.org/xmlns/libvirt/1.0")
    assert result.returncode == 1 and "load" in result.stderr and "Traceback" not in result.stderr


def test_prepare_checks_the_owner_certificate_in_full(run_hook, session_blobs):
    godh, session = session_blobs
    certificate = bytearray(base64.b64decode(godh))
    certificate[8:12] = (0x1002).to_bytes(4, "little")  # usage PEK: right size and version, wrong certificate
    xml = domain_xml("g", socket="/run/sevhook/g.qmp", godh_b64=base64.b64encode(certificate).decode(),
                     session_b64=session)
    result = run_hook("g", "prepare", xml)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g: validate: ") and "key usage 0x1002" in result.stderr


def test_started_refuses_a_document_that_does_not_validate(run_hook, session_blobs):
    """Without the full certificate check (the firmware has accepted <dhCert> by then), `started` still
    refuses what `prepare` would have refused, before it touches the guest's monitor."""
    godh, _ = session_blobs
    xml = domain_xml("g", socket="/nonexistent/g.qmp", godh_b64=godh, session_b64=base64.b64encode(bytes(64)).decode())
    result = run_hook("g", "started", xml)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g: validate: ") and "<session> decodes to 64 bytes" in result.stderr


def _run_hook_bytes(hook_script: Path, hook_log: Path, name: str, operation: str, document: bytes
                    ) -> subprocess.CompletedProcess[bytes]:
    """The installed script as libvirtd runs it, with the domain XML given as raw bytes."""
    environment = {"PATH": "/usr/bin:/bin", "SEVHOOK_HOOK_LOG": str(hook_log)}
    return subprocess.run([str(hook_script), name, operation, "begin", "-"], input=document, capture_output=True,
                          timeout=60, env=environment)


def _indirect_spellings(managed: str) -> dict[str, bytes]:
    """The same managed domain in forms whose bytes do not contain sevhook's namespace verbatim."""
    ns = SEVHOOK_NS
    referenced = managed.replace(ns, ns.replace("sevhook", "&#115;evhook", 1))
    return {
        "utf-16": managed.encode("utf-16"),
        "utf-16-declared": ("<?xml version='1.0' encoding='UTF-16'?>\n" + managed).encode("utf-16"),
        "utf-32": managed.encode("utf-32"),
        "character-reference": referenced.encode(),
        "ebcdic": ("<?xml version='1.0' encoding='IBM500'?>\n" + managed).encode("cp500"),
    }


@pytest.mark.parametrize("spelling", ["utf-16", "utf-16-declared", "utf-32", "character-reference", "ebcdic"])
def test_prefilter_passes_indirect_spellings_to_the_full_parse(session_blobs, spelling):
    godh, session = session_blobs
    managed = domain_xml("g", socket="/run/sevhook/g/qmp.sock", godh_b64=godh, session_b64=session)
    document = _indirect_spellings(managed)[spelling]
    assert SEVHOOK_NS.encode() not in document
    assert fast.concerns_sevhook(document)


@pytest.mark.parametrize("spelling", ["utf-16", "utf-16-declared", "character-reference"])
def test_managed_guests_spelled_indirectly_are_still_refused(hook_script, hook_log, session_blobs, spelling):
    """The full hook parses these documents as the same managed guest, so a move is refused as usual."""
    godh, session = session_blobs
    managed = domain_xml("g", socket="/run/sevhook/g/qmp.sock", godh_b64=godh, session_b64=session)
    result = _run_hook_bytes(hook_script, hook_log, "g", "migrate", _indirect_spellings(managed)[spelling])
    assert result.returncode == 1
    assert result.stderr.decode().startswith("sevhook: g: migrate: an attested SEV guest cannot be migrated")


def test_metadata_without_launch_security_is_refused(run_hook, session_blobs):
    """The owner asked for attestation: a guest whose <launchSecurity> is gone must not start unattested."""
    managed = domain_xml("g", socket="/run/sevhook/g/qmp.sock")
    metadata_only = re.sub(r"<launchSecurity.*</launchSecurity>", "", managed, flags=re.DOTALL)
    assert "launchSecurity" not in metadata_only
    result = run_hook("g", "prepare", metadata_only)
    assert result.returncode == 1
    assert result.stderr.startswith("sevhook: g: metadata: <sevhook:attestation> is set but the domain has no valid")


@pytest.mark.parametrize("document", [
    "<domain type='kvm'><name>plain</name><description>a&#10;b</description></domain>",
    "<?xml version='1.0' encoding='ISO-8859-1'?><domain type='kvm'><name>plain</name></domain>",
])
def test_unmanaged_domains_the_prefilter_cannot_skip_still_pass(run_hook, hook_log, document):
    assert fast.concerns_sevhook(document.encode())
    result = run_hook("plain", "prepare", document)
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@pytest.mark.parametrize("document", [PLAIN, SEV_ONLY, "<?xml version='1.0' encoding=\"utf-8\"?>" + PLAIN, ""])
def test_plain_utf8_documents_without_the_namespace_are_skipped(document):
    assert not fast.concerns_sevhook(document.encode())


def test_oversized_stdin_is_refused_without_reading_it_whole(hook_script, hook_log):
    """`yes | hook` must not fill memory: the read stops after the 10 MiB virsh accepts."""
    with subprocess.Popen(["yes"], stdout=subprocess.PIPE) as endless:
        result = subprocess.run([str(hook_script), "g", "prepare", "begin", "-"], stdin=endless.stdout,
                                capture_output=True, text=True, timeout=60,
                                env={"PATH": "/usr/bin:/bin", "SEVHOOK_HOOK_LOG": str(hook_log)})
        endless.kill()
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        f"sevhook: g: load: the domain XML on stdin is larger than {MAX_DOCUMENT_BYTES} bytes, the most virsh "
        "accepts; pass the domain's XML as libvirt formats it"]
