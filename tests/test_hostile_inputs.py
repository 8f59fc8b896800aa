"""Every sevhook command that reads a user-given input file, given a FIFO nobody writes to, /dev/zero
or a directory: one clear line naming the file (besides warnings about other options), exit 1 or 2,
no traceback, and never a hang (each run has a timeout). Also the broker client's token file, which
the hook reads (the hook's bounded stdin: tests/hook/test_hook_fast_path.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from sevhook.files import PIPE_WAIT_SECONDS, InputFileError, read_input_file
from tests.hook.domains import domain_xml

DATA = Path(__file__).parent / "data" / "vectors"
SEVCTL = DATA / "sevctl"
CHAIN = DATA / "chains" / "naples"
MEASUREMENT = "oMDewIouJSpbpNRHj7Mk3p08H2dPZQdsZMU14qIymBnDE/q1EcIWsVBbGy6pkDxA"
LAUNCH = ("--api-major", "1", "--api-minor", "40", "--build-id", "40", "--policy", "3")
GUID = "736869e5-84f0-4973-92ec-06879ce3da0b"
RUN_TIMEOUT = PIPE_WAIT_SECONDS + 40  # a refusal takes at most the pipe wait; a hang takes this long and fails


@dataclass(frozen=True)
class Case:
    """One command line; {F} is the hostile file, {D} a scratch directory, {X} a valid domain XML."""

    name: str
    argv: tuple[str, ...]


CASES = [
    Case("validate", ("validate", "{F}")),
    Case("cmdline", ("cmdline", "{F}")),
    Case("cmdline --check", ("cmdline", "--check", "{F}", "qemu-system-x86_64")),
    Case("cmdline --args-file", ("cmdline", "--check", "{X}", "--args-file", "{F}")),
    Case("cmdline --domcaps", ("cmdline", "--domcaps", "{F}", "{X}")),
    Case("owner verify-chain", ("owner", "verify-chain", "{F}")),
    Case("owner verify-chain --pdh", ("owner", "verify-chain", str(CHAIN / "cert_chain_export.bin"), "--pdh", "{F}")),
    Case("owner verify-chain --ark", ("owner", "verify-chain", str(CHAIN / "full_chain.bin"), "--ark", "{F}")),
    Case("owner verify-chain --trust-anchor", ("owner", "verify-chain", str(CHAIN / "full_chain.bin"),
                                               "--trust-anchor", "{F}")),
    Case("owner session --pdh", ("owner", "session", "--pdh", "{F}", "--policy", "1", "--out-dir", "{D}",
                                 "--insecure-skip-chain")),
    Case("owner session --chain", ("owner", "session", "--pdh", str(CHAIN / "pdh.cert"), "--chain", "{F}",
                                   "--policy", "1", "--out-dir", "{D}")),
    Case("owner secret --tik", ("owner", "secret", "--tik", "{F}", "--tek", str(SEVCTL / "secret_tek1.bin"),
                                "--measurement", MEASUREMENT, "--disk-passphrase", str(SEVCTL / "secret_secret1.txt"))),
    Case("owner secret --tek", ("owner", "secret", "--tik", str(SEVCTL / "secret_tik1.bin"), "--tek", "{F}",
                                "--measurement", MEASUREMENT, "--disk-passphrase", str(SEVCTL / "secret_secret1.txt"))),
    Case("owner secret --secret", ("owner", "secret", "--tik", str(SEVCTL / "secret_tik1.bin"), "--tek",
                                   str(SEVCTL / "secret_tek1.bin"), "--measurement", MEASUREMENT,
                                   "--secret", f"{GUID}:{{F}}")),
    Case("owner secret --disk-passphrase", ("owner", "secret", "--tik", str(SEVCTL / "secret_tik1.bin"), "--tek",
                                            str(SEVCTL / "secret_tek1.bin"), "--measurement", MEASUREMENT,
                                            "--disk-passphrase", "{F}")),
    Case("owner measure --firmware", ("owner", "measure", "--firmware", "{F}")),
    Case("owner measure --kernel", ("owner", "measure", "--firmware", str(SEVCTL / "OVMF.amdsev.trimmed.fd"),
                                    "--kernel", "{F}")),
    Case("owner verify-measurement --tik", ("owner", "verify-measurement", "--measurement", MEASUREMENT, "--tik", "{F}",
                                            *LAUNCH, "--launch-digest", "00" * 32)),
    Case("owner verify-measurement --firmware", ("owner", "verify-measurement", "--measurement", MEASUREMENT, "--tik",
                                                 str(SEVCTL / "measurement_tik1.bin"), *LAUNCH, "--firmware", "{F}")),
    Case("owner diagnose-mismatch --tik", ("owner", "diagnose-mismatch", "--measurement", MEASUREMENT, "--tik", "{F}",
                                           *LAUNCH, "--firmware", str(SEVCTL / "OVMF.amdsev.trimmed.fd"))),
    Case("broker add-root --ca", ("broker", "add-root", "milan", "--ca", "{F}", "--data-dir", "{D}")),
    Case("broker add-guest --secret", ("broker", "add-guest", "g", "--digest", "00" * 32, "--policy", "1",
                                       "--secret", f"{GUID}:{{F}}", "--data-dir", "{D}")),
    Case("broker add-guest --disk-passphrase", ("broker", "add-guest", "g", "--digest", "00" * 32, "--policy", "1",
                                                "--disk-passphrase", "{F}", "--data-dir", "{D}")),
    Case("broker add-guest --firmware", ("broker", "add-guest", "g", "--firmware", "{F}", "--policy", "1",
                                         "--data-dir", "{D}")),
    Case("broker add-guest --kernel", ("broker", "add-guest", "g", "--firmware", str(SEVCTL / "OVMF.amdsev.trimmed.fd"),
                                       "--kernel", "{F}", "--policy", "1", "--data-dir", "{D}")),
    Case("owner measure --initrd", ("owner", "measure", "--firmware", str(SEVCTL / "OVMF.amdsev.trimmed.fd"),
                                    "--kernel", str(SEVCTL / "measurement_vmlinuz-fake"), "--initrd", "{F}")),
    Case("owner measure --vmsa", ("owner", "measure", "--mode", "seves", "--firmware",
                                  str(SEVCTL / "OVMF.amdsev.trimmed.fd"), "--vmsa", "{F}")),
    Case("broker serve --tls-cert", ("broker", "serve", "--data-dir", "{D}", "--init", "--listen", "127.0.0.1:0",
                                     "--tls-cert", "{F}", "--tls-key", "{F}")),
    Case("prepare-domain", ("prepare-domain", "{F}", "--mode", "hook", "--broker", "http://127.0.0.1:9",
                            "--guest", "g", "--platform-export", str(CHAIN / "full_chain.bin"), "-o", "{D}/out.xml")),
    Case("prepare-domain --platform-export", ("prepare-domain", "{X}", "--mode", "hook", "--broker",
                                              "http://127.0.0.1:9", "--guest", "g", "--platform-export", "{F}",
                                              "-o", "{D}/out.xml")),
    Case("prepare-domain --token-file", ("prepare-domain", "{X}", "--mode", "hook", "--broker", "http://127.0.0.1:9",
                                         "--guest", "g", "--platform-export", str(CHAIN / "full_chain.bin"),
                                         "--token-file", "{F}", "-o", "{D}/out.xml")),
    Case("prepare-domain --ca-file", ("prepare-domain", "{X}", "--mode", "hook", "--broker", "https://127.0.0.1:9",
                                      "--guest", "g", "--platform-export", str(CHAIN / "full_chain.bin"),
                                      "--ca-file", "{F}", "-o", "{D}/out.xml")),
]
HOSTILE = ["fifo", "/dev/zero", "directory"]


def _command(case: Case, hostile: Path, scratch: Path, domain: Path) -> list[str]:
    words = [word.replace("{F}", str(hostile)).replace("{D}", str(scratch)).replace("{X}", str(domain))
             for word in case.argv]
    return [sys.executable, "-m", "sevhook.cli", *words]


def _run(command: list[str], scratch: Path) -> tuple[int | None, str]:
    """Exit status (None: killed after RUN_TIMEOUT, a hang) and stderr."""
    try:
        result = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True, timeout=RUN_TIMEOUT, env={**os.environ, "SEVHOOK_SIM_DIR": str(scratch)})
    except subprocess.TimeoutExpired as exc:
        return None, exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
    return result.returncode, result.stderr


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], tuple[Path, int | None, str]]:
    """Every case with every hostile file, a dozen at a time (a FIFO case waits out the pipe wait)."""
    base = tmp_path_factory.mktemp("hostile")
    domain = base / "domain.xml"
    domain.write_text(domain_xml("g", socket=None))
    jobs = {}
    for case in CASES:
        for kind in HOSTILE:
            scratch = base / f"{len(jobs)}"
            scratch.mkdir()
            if kind == "fifo":
                hostile = scratch / "input.fifo"
                os.mkfifo(hostile)
            elif kind == "directory":
                hostile = scratch / "input.d"
                hostile.mkdir()
            else:
                hostile = Path(kind)
            jobs[(case.name, kind)] = (hostile, _command(case, hostile, scratch, domain), scratch)
    with ThreadPoolExecutor(max_workers=12) as pool:
        futures = {key: pool.submit(_run, command, scratch) for key, (_, command, scratch) in jobs.items()}
        return {key: (jobs[key][0], *future.result()) for key, future in futures.items()}


@pytest.mark.parametrize("kind", HOSTILE)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_input_files_get_one_clear_line(outcomes, case: Case, kind: str) -> None:
    hostile, status, stderr = outcomes[(case.name, kind)]
    assert status is not None, f"hung: {stderr}"
    assert "Traceback" not in stderr
    assert status in (1, 2), stderr
    lines = [line for line in stderr.splitlines() if not line.startswith("sevhook: warning: ")]
    assert len(lines) == 1, stderr
    assert str(hostile) in lines[0]


def test_the_hook_token_and_ca_files_must_be_regular_files(tmp_path: Path) -> None:
    from sevhook.broker.client import BrokerClient

    fifo = tmp_path / "token.fifo"
    os.mkfifo(fifo)
    for path, words in ((fifo, "is a pipe (FIFO), not a regular file; give a regular file"),
                        (Path("/dev/zero"), "is a character device, not a regular file; give a regular file")):
        begin = time.monotonic()
        with pytest.raises(InputFileError) as refused:
            BrokerClient("http://127.0.0.1:9", token_file=path)
        assert refused.value.message.startswith(f"broker token file {path}: ") and words in refused.value.message
        with pytest.raises(InputFileError) as refused:
            BrokerClient("https://127.0.0.1:9", token="t", ca_file=path)
        assert refused.value.message.startswith(f"broker CA file {path}: ") and words in refused.value.message
        assert time.monotonic() - begin < 1  # refused at once: the hook's budget is not spent waiting


def test_a_fifo_with_a_writer_is_read(tmp_path: Path) -> None:
    fifo = tmp_path / "in.fifo"
    os.mkfifo(fifo)
    writer = subprocess.Popen(["sh", "-c", f"sleep 0.3; printf abc > '{fifo}'"])
    try:
        assert read_input_file(fifo, 10, "input") == b"abc"
    finally:
        writer.wait(timeout=20)


def test_a_regular_file_over_the_limit_is_refused_from_its_size(tmp_path: Path) -> None:
    big = tmp_path / "big"
    with big.open("wb") as handle:
        handle.truncate(1 << 40)  # sparse: reading it would take hours
    with pytest.raises(InputFileError, match=rf"^input {big}: larger than the 1 MiB limit"):
        read_input_file(big, 1 << 20, "input")


def test_an_oversized_token_is_never_sent(tmp_path: Path) -> None:
    """A token travels in every request's header: a 50 MiB one is refused when the file is read."""
    from sevhook.broker.client import BrokerClient

    token = tmp_path / "host.token"
    token.write_bytes(b"a" * (50 << 20))
    with pytest.raises(InputFileError, match=rf"^broker token file {token}: larger than the 4096 bytes limit"):
        BrokerClient("http://127.0.0.1:9", token_file=token)
