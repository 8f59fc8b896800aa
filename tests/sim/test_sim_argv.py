"""Reading real QEMU command lines (libvirt's own golden argv) and rewriting them for the real QEMU."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sevhook.errors import SevhookError, UsageError
from sevhook.sim.argv import inherited_fds, parse_keyval, parse_qemu_argv
from sevhook.sim.proxy import rewrite_argv
from sevhook.sim.qmp_protocol import QmpError, StreamSplitter, check_request


def golden_argv(path: Path) -> list[str]:
    """A libvirt .args file: shell text with continuations; drop the environment and the binary."""
    words = shlex.split(path.read_text().replace("\\\n", ""))
    while "=" in words[0] and not words[0].startswith("/"):
        words.pop(0)
    return words[1:]


def test_libvirt_json_syntax_with_fd_monitor(shared: Path) -> None:
    inv = parse_qemu_argv(golden_argv(shared / "libvirt-golden" / "launch-security-sev.x86_64-6.0.0.args"))
    assert inv.name == "QEMUGuest1" and inv.start_paused
    assert inv.sev is not None and inv.sev.object_id == "lsec0"
    assert (inv.sev.policy, inv.sev.cbitpos, inv.sev.reduced_phys_bits) == (1, 47, 1)
    assert inv.sev.dh_cert_file.endswith("dh_cert.base64") and inv.sev.session_file.endswith("session.base64")
    assert [(m.fd, m.chardev_id) for m in inv.monitors] == [(1729, "charmonitor")]
    assert inv.ram_bytes == 219136 * 1024


def test_libvirt_4x_keyval_syntax_with_path_monitor(shared: Path) -> None:
    inv = parse_qemu_argv(golden_argv(
        shared / "libvirt-golden" / "launch-security-sev.args.libvirt-4.x-commit-11ab77fe"))
    assert inv.sev is not None and inv.sev.object_id == "sev0" and inv.sev.policy == 1
    assert inv.confidential_guest_support == "sev0"  # memory-encryption=
    assert inv.monitors[0].path == "/tmp/lib/domain--1-QEMUGuest1/monitor.sock"


def test_firmware_from_blockdev_pflash_and_bios() -> None:
    blockdevs = [
        "-blockdev", json.dumps({"driver": "file", "filename": "/fw/CODE.fd", "node-name": "p0s"}),
        "-blockdev", json.dumps({"node-name": "p0f", "read-only": True, "driver": "raw", "file": "p0s"}),
        "-machine", "q35,pflash0=p0f",
    ]
    assert parse_qemu_argv(blockdevs).firmware == "/fw/CODE.fd"
    assert parse_qemu_argv(["-drive",
                            "if=pflash,format=raw,unit=0,file=/fw/a,,b.fd,readonly=on"]).firmware == "/fw/a,b.fd"
    assert parse_qemu_argv(["-bios", "/fw/OVMF.fd"]).firmware == "/fw/OVMF.fd"


def test_direct_boot_smp_and_kernel_hashes() -> None:
    inv = parse_qemu_argv([
        "-machine", "q35,confidential-guest-support=s0", "-object",
        "sev-guest,id=s0,policy=0x5,cbitpos=51,reduced-phys-bits=1,kernel-hashes=on",
        "-kernel", "/k", "-initrd", "/i", "-append", "console=ttyS0", "-smp", "sockets=2,cores=2",
    ])
    assert inv.sev is not None and inv.sev.kernel_hashes and inv.sev.policy == 5
    assert (inv.kernel, inv.initrd, inv.append, inv.vcpus) == ("/k", "/i", "console=ttyS0", 4)


def test_errors_name_the_option() -> None:
    with pytest.raises(UsageError, match="-object sev-snp-guest"):
        parse_qemu_argv(["-machine", "q35,confidential-guest-support=s0", "-object",
                         '{"qom-type":"sev-snp-guest","id":"s0"}'])
    with pytest.raises(UsageError, match="requires an argument"):
        parse_qemu_argv(["-m"])
    with pytest.raises(UsageError, match="server=on"):
        parse_qemu_argv(["-qmp", "unix:/x"])
    with pytest.raises(UsageError, match="policy"):
        parse_qemu_argv(["-machine", "q35,confidential-guest-support=s0", "-object", "sev-guest,id=s0,policy=zz"])


def test_old_style_booleans_and_escapes() -> None:
    assert parse_keyval("socket,id=c,path=/a,,b,server,nowait", "backend") == {
        "backend": "socket", "id": "c", "path": "/a,b", "server": "on", "wait": "off"}


def test_rewrite_removes_sev_forces_tcg_and_replaces_monitors(shared: Path) -> None:
    inv = parse_qemu_argv(golden_argv(shared / "libvirt-golden" / "launch-security-sev.x86_64-6.0.0.args"))
    out = rewrite_argv(inv, {inv.monitors[0].option_index: "/run/p/m0.sock"})
    text = " ".join(out)
    assert "sev-guest" not in text and "confidential-guest-support" not in text
    assert out[out.index("-accel") + 1] == "tcg"
    assert "socket,id=charmonitor,path=/run/p/m0.sock,server=on,wait=off" in out
    assert "fd=1729" not in text
    assert "-sandbox" in out and out[out.index("-msg") + 1] == "timestamp=on"


def test_rewrite_keeps_the_probe_accelerator() -> None:
    argv = ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
            "-qmp", "unix:/v/qmp.monitor,server=on,wait=off", "-pidfile", "/v/qmp.pid", "-daemonize"]
    inv = parse_qemu_argv(argv)
    assert inv.is_probe and inv.daemonize and inv.pidfile == "/v/qmp.pid"
    out = rewrite_argv(inv, {inv.monitors[0].option_index: "/p.sock"})
    assert out == ["-S", "-no-user-config", "-nodefaults", "-nographic", "-machine", "none,accel=kvm:tcg",
                   "-qmp", "unix:/p.sock,server=on,wait=off"]


def test_inherited_fds_are_found() -> None:
    argv = ["-netdev", '{"type":"tap","fd":"33","id":"n"}', "-add-fd", "set=0,fd=40",
            "-chardev", "socket,id=c,fd=29,server=on,wait=off", "-netdev", "tap,fds=41:42,id=x"]
    assert inherited_fds(argv) == {33, 40, 29, 41, 42}


@settings(max_examples=150, deadline=None)
@given(st.lists(st.text(min_size=0, max_size=30), max_size=12))
def test_fuzz_argv_parser_raises_only_sevhook_errors(argv: list[str]) -> None:
    try:
        parse_qemu_argv(argv)
    except SevhookError:
        pass


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_fuzz_qmp_stream_never_raises(data: bytes) -> None:
    splitter = StreamSplitter()
    for parsed in splitter.feed(data):
        if parsed.error is None:
            try:
                check_request(parsed.value)
            except QmpError:
                pass


def _split(chunks: list[bytes]) -> list[tuple[object, str | None, bytes]]:
    splitter = StreamSplitter()
    return [(parsed.value, parsed.error and parsed.error.desc, parsed.raw) for chunk in chunks
            for parsed in splitter.feed(chunk)]


JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                        max_size=3), max_leaves=8)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=120),
                 st.builds(lambda value, before, after: before + json.dumps(value).encode() + after,
                           st.dictionaries(st.text(max_size=6), JSON_VALUES, max_size=4),
                           st.sampled_from([b"", b" ", b"\r\n"]), st.sampled_from([b"", b"\r\n", b"\n", b"{", b" x"]))))
def test_a_whole_read_splits_as_the_byte_by_byte_stream(data: bytes) -> None:
    """The relay's fast path for a read holding one whole object gives what QEMU's streamer would."""
    assert _split([data]) == _split([data[i:i + 1] for i in range(len(data))])


def test_sev_object_is_checked_as_qemu_checks_it() -> None:
    machine = ["-machine", "q35,confidential-guest-support=s0"]
    inv = parse_qemu_argv([*machine, "-object", "sev-guest,id=s0,policy=010,handle=0x2,kernel-hashes=on"])
    assert inv.sev is not None and (inv.sev.policy, inv.sev.handle, inv.sev.kernel_hashes) == (8, 2, True)
    for bad in ("sev-guest,id=s0,polcy=1", "sev-guest,id=s0,policy=1,policy=2", "sev-guest,id=s0,kernel-hashes=ON",
                '{"qom-type":"sev-guest","id":"s0","policy":"1"}', "sev-guest,id=s0,policy=0x100000000"):
        with pytest.raises(UsageError, match=r"-object sev-guest,id=s0: .*QEMU refuses it"):
            parse_qemu_argv([*machine, "-object", bad])
    with pytest.raises(SevhookError, match=r"argv\[4\] \(-object\): sev-guest needs an id="):
        parse_qemu_argv([*machine, "-object", "sev-guest,policy=1"])
