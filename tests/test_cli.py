"""The `sevhook` entry point itself: version, help and usage errors."""

import os
import re
import subprocess
import sys

import pytest

from sevhook import __version__
from sevhook.cli import main
from sevhook.console import DEBUG_ENV, report_error
from sevhook.errors import FormatError, cause_chain, raised_at


def test_version_is_printed(capsys):
    try:
        main(["--version"])
    except SystemExit as exc:
        assert exc.code == 0
    assert capsys.readouterr().out.strip() == f"sevhook {__version__}"


def test_no_command_is_a_usage_error(capsys):
    assert main([]) == 2
    assert "usage: sevhook" in capsys.readouterr().err


def test_unknown_command_exits_2():
    proc = subprocess.run([sys.executable, "-m", "sevhook.cli", "no-such-command"], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "invalid choice" in proc.stderr
    assert "Traceback" not in proc.stderr


def run_sevhook(*args: str, debug_env: str | None = None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != DEBUG_ENV}
    if debug_env is not None:
        env[DEBUG_ENV] = debug_env
    return subprocess.run([sys.executable, "-m", "sevhook.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120)


BAD_MEASUREMENT = ("owner", "secret", "--measurement", "AAA*", "--tek", "/nonexistent/tek", "--tik", "/nonexistent/tik")


def test_an_error_is_one_line_without_debug():
    proc = run_sevhook(*BAD_MEASUREMENT)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "sevhook: error: --measurement: not valid base64: character '*' at position 4 is not base64"]


def test_debug_prints_the_cause_chain_innermost_last():
    proc = run_sevhook("--debug", *BAD_MEASUREMENT)
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert lines[0] == "sevhook: error: --measurement: not valid base64: character '*' at position 4 is not base64"
    assert re.fullmatch(r"sevhook: debug: raised as sevhook\.errors\.UsageError \(sevhook/commands/owner\.py:\d+\)",
                        lines[1])
    assert re.fullmatch(r"sevhook: debug: caused by sevhook\.errors\.FormatError: character '\*' at position 4 is "
                        r"not base64 \(sevhook/encoding\.py:\d+\)", lines[2])
    assert len(lines) == 3 and "Traceback" not in proc.stderr


@pytest.mark.parametrize(("value", "shown"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_sevhook_debug_variable(value, shown):
    proc = run_sevhook("validate", "/nonexistent/web1.xml", debug_env=value)
    assert proc.returncode == 2
    assert proc.stderr.startswith("sevhook: error: /nonexistent/web1.xml: no such file: check the path\n")
    cause = "sevhook: debug: caused by FileNotFoundError: No such file or directory: /nonexistent/web1.xml ("
    assert (cause in proc.stderr) is shown
    assert len(proc.stderr.splitlines()) == (3 if shown else 1)


def _raise_chain(innermost: BaseException) -> FormatError:
    try:
        try:
            raise innermost
        except Exception as exc:
            raise FormatError("session blob: cannot be opened") from exc
    except FormatError as outer:
        return outer


def test_the_debug_printer_never_prints_binary_arguments(capsys):
    key = bytes(range(16))
    error = _raise_chain(ValueError(key, "with a key"))
    report_error(error, debug=True)
    err = capsys.readouterr().err
    assert "caused by ValueError: (message not shown: its arguments are not text)" in err
    assert repr(key)[2:12] not in err and key.hex() not in err
    error = _raise_chain(UnicodeDecodeError("utf-8", b"\xff" + key, 0, 1, "invalid start byte"))
    assert cause_chain(error) == [
        f"UnicodeDecodeError: (message not shown: its arguments are not text) ({raised_at(error.__cause__)})"]


def test_the_chain_follows_causes_and_context_but_not_suppressed_context():
    try:
        try:
            try:
                raise KeyError("policy")
            except KeyError:
                raise OSError(2, "No such file or directory", "/x") from None
        except OSError as exc:
            raise ValueError("bad value") from exc  # explicit cause
    except ValueError:
        try:
            raise FormatError("outer")  # implicit context: the ValueError being handled
        except FormatError as outer:
            error = outer
    chain = [line.partition(" (")[0] for line in cause_chain(error)]
    assert chain == ["ValueError: bad value", "FileNotFoundError: No such file or directory: /x"]
    assert cause_chain(FormatError("never raised")) == []
    looping = FormatError("a")
    looping.__cause__ = FormatError("b")
    looping.__cause__.__cause__ = looping
    assert [line.partition(" (")[0] for line in cause_chain(looping)] == ["sevhook.errors.FormatError: b"]
