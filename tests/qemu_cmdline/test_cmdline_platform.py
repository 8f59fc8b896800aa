"""Host values for missing cbitpos/reducedPhysBits: domcaps files, explicit numbers, live QMP and
libvirt, and the rule that the XML's own values win."""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sevhook.errors import SevhookError, UsageError
from sevhook.qemu_cmdline.platform import (
    DomainCapabilitiesFile,
    ExplicitValues,
    LibvirtConnection,
    PlatformInfo,
    QmpSocket,
    fill_platform,
    parse_domain_capabilities,
)
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import S390PvLaunchSecurity, SevLaunchSecurity, SevSnpLaunchSecurity

QEMU = "/usr/bin/qemu-system-x86_64"
CAPS = b"""<domainCapabilities><features>
<sev supported='yes'><cbitpos>51</cbitpos><reducedPhysBits>1</reducedPhysBits><maxGuests>15</maxGuests></sev>
</features></domainCapabilities>"""


class Unreachable:
    """A source that must not be asked: the XML already has both values."""

    def describe(self) -> str:
        return "unreachable"

    def load(self) -> PlatformInfo:
        raise AssertionError("the platform source was consulted although the XML has the values")


def test_domcaps_file(tmp_path: Path) -> None:
    path = tmp_path / "caps.xml"
    path.write_bytes(CAPS)
    assert DomainCapabilitiesFile(path).load() == PlatformInfo(51, 1, str(path))


@pytest.mark.parametrize(
    "data, message",
    [
        (b"<domainCapabilities><features><sev supported='no'/></features></domainCapabilities>", "supported='no'"),
        (b"<domainCapabilities><features/></domainCapabilities>", "has no <features><sev>"),
        (b"<capabilities/>", "not <domainCapabilities>"),
        (b"not xml", "not XML"),
        (b"<domainCapabilities><features><sev "
         b"supported='yes'><cbitpos>x</cbitpos></sev></features></domainCapabilities>",
         "<cbitpos>: expected an unsigned number"),
        (b"<!DOCTYPE d [<!ENTITY e SYSTEM 'file:///etc/passwd'>]><domainCapabilities>&e;</domainCapabilities>",
         "has no <features><sev>"),
    ],
)
def test_bad_domcaps_are_clear_errors(data: bytes, message: str) -> None:
    with pytest.raises(SevhookError, match=message):
        parse_domain_capabilities(data, "caps.xml")


def test_missing_domcaps_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read domain capabilities"):
        DomainCapabilitiesFile(tmp_path / "none.xml").load()


def test_xml_values_win_and_only_missing_ones_are_filled() -> None:
    complete = SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47, reduced_phys_bits=1)
    assert fill_platform(complete, Unreachable()) == (complete, None)
    assert fill_platform(S390PvLaunchSecurity(), None) == (S390PvLaunchSecurity(), None)
    partial = SevSnpLaunchSecurity(policy=SnpPolicy(0x30000), cbitpos=48)
    filled, info = fill_platform(partial, ExplicitValues(51, 5))
    assert (filled.cbitpos, filled.reduced_phys_bits, info.source) == (48, 5, "--cbitpos/--reduced-phys-bits")  # type: ignore[union-attr]


def test_no_source_names_every_way_to_give_one() -> None:
    with pytest.raises(SevhookError, match=r"no <reducedPhysBits>.*--domcaps FILE.*--qmp SOCKET or -c URI"):
        fill_platform(SevLaunchSecurity(policy=SevPolicy(1), cbitpos=47), None)


@pytest.mark.qemu
def test_live_qmp_of_real_qemu_reports_qemus_own_error(tmp_path: Path) -> None:
    """This host has no SEV: QEMU 7.2 answers query-sev-capabilities with an error, which must surface."""
    sock = tmp_path / "qmp.sock"
    proc = subprocess.Popen(
        [QEMU, "-machine", "none", "-accel", "kvm", "-accel", "tcg", "-nodefaults", "-display", "none", "-S",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert sock.exists(), "QEMU did not create its QMP socket"
        with pytest.raises(SevhookError,
                           match=r"query-sev-capabilities failed: (SEV is not enabled in KVM|KVM not enabled)"):
            QmpSocket(str(sock), timeout=10).load()
    finally:
        proc.kill()
        proc.wait(timeout=10)


class QmpServer:
    """A QMP endpoint on a real Unix socket speaking the protocol (greeting, capabilities
    negotiation, commands), for the host answers QEMU gives only on SEV hardware."""

    def __init__(self, path: Path, reply: dict[str, object] | None, greet: bool = True) -> None:
        self.path, self.reply, self.greet = path, reply, greet
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_unix_server(self._client, path=str(self.path)))
        self.ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.greet:
            await reader.read()  # say nothing: the client must time out
            return
        writer.write(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, '
                     b'"capabilities": []}}\r\n')
        decoder, buffer = json.JSONDecoder(), ""
        while chunk := await reader.read(4096):  # QMP is a JSON stream: messages need no newline
            buffer += chunk.decode()
            while buffer.strip():
                try:
                    command, end = decoder.raw_decode(buffer.lstrip())
                except json.JSONDecodeError:
                    break  # the rest of this message is still on its way
                buffer = buffer.lstrip()[end:]
                writer.write(json.dumps(self._answer(command)).encode() + b"\r\n")
                await writer.drain()
        writer.close()

    def _answer(self, command: dict[str, object]) -> dict[str, object]:
        if command["execute"] == "qmp_capabilities":
            answer: dict[str, object] = {"return": {}}
        elif command["execute"] == "query-sev-capabilities" and self.reply is not None:
            answer = {"return": self.reply}
        else:
            answer = {"error": {"class": "GenericError", "desc": "SEV is not enabled in KVM"}}
        if "id" in command:
            answer["id"] = command["id"]
        return answer

    def __enter__(self) -> QmpServer:
        self.thread.start()
        self.ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture
def qmp_path(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "monitor.sock"


def test_live_qmp_capabilities(qmp_path: Path) -> None:
    reply = {"pdh": "AAAA", "cert-chain": "AAAA", "cpu0-id": "AAAA", "cbitpos": 51, "reduced-phys-bits": 1}
    with QmpServer(qmp_path, reply):
        assert QmpSocket(str(qmp_path)).load() == PlatformInfo(51, 1, f"QMP {qmp_path}")


def test_qmp_reply_without_the_values(qmp_path: Path) -> None:
    with QmpServer(qmp_path, {"pdh": "AAAA"}), pytest.raises(SevhookError, match="lacks cbitpos"):
        QmpSocket(str(qmp_path)).load()


def test_qmp_silent_peer_times_out(qmp_path: Path) -> None:
    started = time.monotonic()
    with QmpServer(qmp_path, None, greet=False), pytest.raises(SevhookError,
                                                               match=r"no answer within 0.5 s|cannot connect"):
        QmpSocket(str(qmp_path), timeout=0.5).load()
    assert time.monotonic() - started < 5


def test_qmp_nobody_listening(tmp_path: Path) -> None:
    with pytest.raises(SevhookError, match="cannot connect"):
        QmpSocket(str(tmp_path / "absent.sock"), timeout=2).load()


@pytest.mark.libvirt
def test_libvirt_without_sev_says_so(libvirt_uri: str) -> None:
    with pytest.raises(SevhookError, match=r"getSEVInfo failed: .*SEV"):
        LibvirtConnection(libvirt_uri).load()


@pytest.mark.libvirt
def test_real_virsh_domcapabilities_of_this_host(libvirt_uri: str, tmp_path: Path) -> None:
    """The real document parses; this host's QEMU has no SEV, which must be the message."""
    proc = subprocess.run(["virsh", "-c", libvirt_uri, "domcapabilities"], capture_output=True, timeout=60, check=True)
    with pytest.raises(SevhookError, match="the host has no usable SEV"):
        parse_domain_capabilities(proc.stdout, "domcaps.xml")
