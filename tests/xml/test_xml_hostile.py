"""Hostile and broken input: one clear error naming file and line, never a traceback, no file or network
access through entities, bounded time and memory."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sevhook.errors import SevhookError, UsageError
from sevhook.xml import DomainXmlError, load_domain, validate_file
from sevhook.xml.parsing import MAX_DOCUMENT_BYTES

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
DOCTYPE_MESSAGE = (
    "the document declares a DOCTYPE (DTD); domain XML never uses DTDs or entities and sevhook does not "
    "expand them: remove the <!DOCTYPE ...> declaration"
)
PAST_PROLOG_SCAN = "<!--" + "x" * (70 * 1024) + "-->\n"  # pushes a DOCTYPE beyond the pre-parse scan


def _one_error(source: object, name: str = "doc.xml") -> str:
    with pytest.raises(DomainXmlError) as caught:
        load_domain(source, filename=name)  # type: ignore[arg-type]
    problems = caught.value.problems
    assert len(problems) == 1 and problems[0].level == "error" and problems[0].file == name
    return f"{problems[0].line}: {problems[0].message}"


def test_not_xml() -> None:
    assert (
        _one_error(b"hello, world") == "1: not well-formed XML: Start tag expected, '<' not found: fix the XML syntax"
    )


def test_empty_and_blank_documents() -> None:
    message = "1: the document is empty: pass a domain XML file (virsh dumpxml NAME)"
    assert _one_error(b"") == message
    assert _one_error(b"  \n\t ") == message


def test_wrong_root() -> None:
    assert _one_error(b"<network><name>n</name></network>") == (
        "1: the root element is <network>, not <domain>: pass a libvirt domain XML file"
    )


def test_binary_garbage() -> None:
    assert _one_error(bytes(range(256))).startswith("1: not well-formed XML:")


def test_fifty_megabyte_file_is_refused_without_reading_it(tmp_path: Path) -> None:
    path = tmp_path / "huge.xml"
    with path.open("wb") as handle:
        handle.write(b"<domain type='kvm'><name>g</name><description>")
        handle.truncate(50 * 1024 * 1024)  # sparse: the size is what matters
    started = time.perf_counter()
    problems = validate_file(path)
    assert time.perf_counter() - started < 0.5
    assert [(p.line, p.message) for p in problems] == [
        (
            1,
            f"the document is {50 * 1024 * 1024} bytes, larger than the {MAX_DOCUMENT_BYTES} bytes virsh accepts "
            "for domain XML: this is not a domain definition; pass the domain's XML file (virsh dumpxml NAME)",
        )
    ]


def test_fifty_megabyte_bytes_are_refused_quickly() -> None:
    data = b"<domain type='kvm'>" + b"<a/>" * (50 * 1024 * 1024 // 4) + b"</domain>"
    started = time.perf_counter()
    assert "larger than the" in _one_error(data)
    assert time.perf_counter() - started < 0.5


def test_deep_nesting_is_refused_quickly() -> None:
    depth = 100_000
    data = b"<domain type='kvm'>" + b"<a>" * depth + b"</a>" * depth + b"</domain>"
    started = time.perf_counter()
    message = _one_error(data)
    assert time.perf_counter() - started < 1.0
    assert "nested too deeply" in message


@pytest.fixture()
def fifo(tmp_path: Path) -> Path:
    """A named pipe: any attempt to open it for reading blocks, so a test that reads it hangs (and times out)."""
    path = tmp_path / "secret-fifo"
    os.mkfifo(path)
    return path


@pytest.mark.timeout(20)
@pytest.mark.parametrize("padding", ["", PAST_PROLOG_SCAN], ids=["doctype-first", "doctype-after-64k-comment"])
def test_external_entities_are_never_opened(padding: str, fifo: Path) -> None:
    for target in (f"file://{fifo}", "file:///etc/passwd", str(fifo)):
        data = (
            f"<?xml version='1.0'?>\n{padding}<!DOCTYPE domain [<!ENTITY x SYSTEM '{target}'>]>\n"
            "<domain type='kvm'><name>&x;</name></domain>\n"
        ).encode()
        message = _one_error(data)
        assert message == f"{2 + padding.count(chr(10))}: {DOCTYPE_MESSAGE}"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("padding", ["", PAST_PROLOG_SCAN], ids=["doctype-first", "doctype-after-64k-comment"])
def test_no_network_access_through_dtd_or_entities(padding: str) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    connections: list[object] = []

    def accept() -> None:
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:
            try:
                connections.append(listener.accept())
            except OSError:
                continue

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        for doctype in (
            f"<!DOCTYPE domain SYSTEM 'http://127.0.0.1:{port}/domain.dtd'>",
            f"<!DOCTYPE domain [<!ENTITY x SYSTEM 'http://127.0.0.1:{port}/x'>]>",
        ):
            data = f"<?xml version='1.0'?>\n{padding}{doctype}\n<domain type='kvm'><name>&x;</name></domain>".encode()
            assert _one_error(data).endswith(DOCTYPE_MESSAGE)
    finally:
        thread.join()
        listener.close()
    assert connections == [], "the parser connected to the network"


@pytest.mark.timeout(20)
@pytest.mark.parametrize("padding", ["", PAST_PROLOG_SCAN], ids=["doctype-first", "doctype-after-64k-comment"])
def test_billion_laughs_is_refused_in_bounded_time(padding: str) -> None:
    entities = "<!ENTITY a0 'lol'>" + "".join(f"<!ENTITY a{i} '{f'&a{i - 1};' * 10}'>" for i in range(1, 12))
    body = "<domain type='kvm'><name>&a11;</name></domain>"
    data = f"<?xml version='1.0'?>\n{padding}<!DOCTYPE domain [{entities}]>\n{body}"
    started = time.perf_counter()
    message = _one_error(data.encode())
    assert time.perf_counter() - started < 1.0
    assert message == f"{2 + padding.count(chr(10))}: {DOCTYPE_MESSAGE}"


def test_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as caught:
        validate_file(tmp_path / "nope.xml")
    assert caught.value.message == f"{tmp_path / 'nope.xml'}: no such file: check the path"
    with pytest.raises(UsageError, match="is a directory"):
        validate_file(tmp_path)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (1024 * 1024 * 1024, 1024 * 1024 * 1024))


@pytest.mark.timeout(60)
def test_cli_gives_one_line_per_hostile_file_under_a_memory_limit(tmp_path: Path) -> None:
    huge = tmp_path / "huge.xml"
    with huge.open("wb") as handle:
        handle.write(b"<domain>")
        handle.truncate(50 * 1024 * 1024)
    deep = tmp_path / "deep.xml"
    deep.write_bytes(b"<domain>" + b"<a>" * 50_000 + b"</a>" * 50_000 + b"</domain>")
    hostile = [*sorted((FIXTURES / "invalid").glob("hostile-*.xml")), huge, deep]
    for path in hostile:
        proc = subprocess.run(
            [sys.executable, "-m", "sevhook.cli", "validate", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            preexec_fn=_limit_memory,
        )
        assert proc.returncode == 1, (path, proc.stdout, proc.stderr)
        assert proc.stderr == "" and len(proc.stdout.splitlines()) == 1, (path, proc.stdout, proc.stderr)
        assert proc.stdout.startswith(f"{path}:") and ": error: " in proc.stdout


FIXTURE_TEXTS = [p.read_bytes() for p in sorted(FIXTURES.glob("*/*.xml")) if p.stat().st_size < 20_000]


@st.composite
def mutated_fixture(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(FIXTURE_TEXTS)))
    for _ in range(draw(st.integers(1, 6))):
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        action = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        if action == "flip" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 40))]
        elif action == "insert":
            data[position:position] = draw(st.sampled_from([b"<", b">", b"&", b"<x/>", b"'", b"]]>", b"\x00", b"&#0;"]))
        else:
            del data[position:]
    return bytes(data)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(mutated_fixture(), st.binary(max_size=300)))
def test_any_bytes_give_problems_or_a_sevhook_error(data: bytes) -> None:
    try:
        document = load_domain(data, filename="fuzz.xml")
    except DomainXmlError as exc:
        assert len(exc.problems) == 1 and exc.problems[0].file == "fuzz.xml"
        return
    except SevhookError as exc:  # pragma: no cover - must not happen for bytes
        pytest.fail(f"unexpected {type(exc).__name__}: {exc}")
    for problem in document.problems:
        assert problem.file == "fuzz.xml" and problem.line >= 1 and problem.message
