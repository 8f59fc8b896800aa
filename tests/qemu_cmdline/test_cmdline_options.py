"""The one flag table (sevhook.qemu_cmdline.options) against Debian's QEMU 7.2 itself, and the shared
walker and keyval splitter that `sevhook cmdline --check` and the software platform both read with.

The real binary decides which options take an argument: `qemu-system-x86_64 -version -OPT` checks
every option before acting on any (a missing argument is "requires an argument", an unknown option
"invalid option"), then prints its version and exits before `-OPT` runs. So a flag QEMU lists that
the table lacks, or a table entry QEMU gives an argument, fails here."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sevhook.errors import UsageError
from sevhook.qemu_cmdline.argv import scan
from sevhook.qemu_cmdline.options import FLAG_OPTIONS, MissingArgument, iter_options, split_keyval_parts, unescape
from sevhook.sim.argv import SIM_FLAGS, SIM_OPTIONS, parse_qemu_argv, split_options

QEMU = "/usr/bin/qemu-system-x86_64"
# A help line names an option at its start: `-m [size=]megs`, `--preconfig`, `-hda/-hdb file`, `-h or -help`.
HELP_OPTION = re.compile(r"^--?([A-Za-z0-9?][\w-]*)((?:/-[\w-]+)*)(?: or -([\w-]+))?")


def help_option_names(help_text: str) -> set[str]:
    names: set[str] = set()
    for line in help_text.splitlines():
        match = HELP_OPTION.match(line)
        if match is None:
            continue
        names.add(match.group(1))
        names.update(alias for alias in match.group(2).split("/-") if alias)
        if match.group(3):
            names.add(match.group(3))
    return names


@cache
def qemu_help() -> str:
    proc = subprocess.run([QEMU, "-help"], capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def qemu_takes_argument(name: str) -> bool | None:
    """True/False as the real QEMU parses `-name`; None when this QEMU does not know the option."""
    proc = subprocess.run([QEMU, "-version", f"-{name}"], capture_output=True, text=True, timeout=60, check=False)
    if proc.returncode == 0:
        return False
    if f"-{name}: requires an argument" in proc.stderr:
        return True
    if f"-{name}: invalid option" in proc.stderr:
        return None
    raise AssertionError(f"-{name}: unexpected answer from QEMU (status {proc.returncode}): {proc.stderr}")


def classify(names: set[str]) -> dict[str, bool | None]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(sorted(names), pool.map(qemu_takes_argument, sorted(names)), strict=True))


@pytest.mark.qemu
def test_this_is_qemu_7_2() -> None:
    assert qemu_help().startswith("QEMU emulator version 7.2"), qemu_help().splitlines()[0]


@pytest.mark.qemu
def test_the_help_parser_finds_qemus_options() -> None:
    names = help_option_names(qemu_help())
    assert {"object", "machine", "S", "preconfig", "help", "h", "hda", "hdb", "fdb", "no-user-config"} <= names
    assert len(names) > 80


@pytest.mark.qemu
def test_every_option_qemu_lists_is_read_as_qemu_reads_it() -> None:
    answers = classify(help_option_names(qemu_help()))
    unknown = sorted(name for name, takes in answers.items() if takes is None)
    assert not unknown, f"QEMU's help lists options it refuses (the help parser is wrong): {unknown}"
    missing = sorted(name for name, takes in answers.items() if takes is False and name not in FLAG_OPTIONS)
    wrong = sorted(name for name, takes in answers.items() if takes is True and name in FLAG_OPTIONS)
    assert not missing, f"QEMU 7.2 flags missing from FLAG_OPTIONS (their next word would be taken): {missing}"
    assert not wrong, f"FLAG_OPTIONS has options QEMU 7.2 gives an argument: {wrong}"


@pytest.mark.qemu
def test_every_table_flag_is_a_flag_or_unknown_to_qemu_7_2() -> None:
    """Entries QEMU 7.2 does not know are flags of other releases or targets, kept for saved logs;
    none may be an option that takes an argument."""
    answers = classify(set(FLAG_OPTIONS))
    assert not [name for name, takes in answers.items() if takes is True]
    assert sum(takes is False for takes in answers.values()) > 20  # the probe really ran


def test_both_readers_walk_the_same_options() -> None:
    argv = ["-S", "-no-user-config", "-append", "-object", "-machine", "q35,cgs=x", "disk.img", "-async-teardown",
            "-object", "sev-guest,id=x", "-perfmap", "-preconfig"]
    walked = [(option.name, option.value) for option in iter_options(argv)]
    assert walked == [("S", None), ("no-user-config", None), ("append", "-object"), ("machine", "q35,cgs=x"),
                      ("", "disk.img"), ("async-teardown", None), ("object", "sev-guest,id=x"), ("perfmap", None),
                      ("preconfig", None)]
    assert [(option.name, option.value) for option in split_options(argv)] == walked
    assert [arg.text for arg in scan(["qemu", *argv]).object_args] == ["sev-guest,id=x"]


def test_the_stand_ins_own_options_only_for_the_stand_in() -> None:
    argv = ["--sim-state-dir=/tmp/s", "--sim-standalone", "--sim-qemu-version", "7.2.0", "-S"]
    assert [(o.name, o.value) for o in split_options(argv)] == [
        ("sim-state-dir", "/tmp/s"), ("sim-standalone", None), ("sim-qemu-version", "7.2.0"), ("S", None)]
    assert {"sim-standalone"} == SIM_FLAGS and "sim-state-dir" in SIM_OPTIONS
    # QEMU itself has no --name=value form: the word is an unknown option that takes the next word
    assert [(o.name, o.value) for o in iter_options(["--object=x", "-S"])] == [("object=x", "-S")]


def test_a_missing_argument_is_reported_in_each_readers_words() -> None:
    with pytest.raises(MissingArgument, match=r"argv\[1\]: option -m needs an argument"):
        list(iter_options(["-S", "-m"]))
    with pytest.raises(UsageError, match="qemu-system-x86_64: -m: requires an argument"):
        split_options(["-S", "-m"])


keyval_text = st.text(alphabet="ab=,", max_size=12)


@given(keyval_text)
def test_keyval_parts_join_back_to_the_text(text: str) -> None:
    parts = split_keyval_parts(text)
    assert ",".join(parts) == text
    assert all(part.count(",") % 2 == 0 for part in parts)  # only escaped commas stay inside a part
    assert all(unescape(part).count(",") * 2 == part.count(",") for part in parts)


def test_flags_once_missing_from_the_stand_in_no_longer_swallow_the_next_option() -> None:
    """-async-teardown, -no-kvm-pit and -jitdump were flags only for `cmdline --check`; the stand-in
    took `-S` after them for their argument and started the guest running."""
    for flag in ("-async-teardown", "-no-kvm-pit", "-jitdump", "-old-param"):
        inv = parse_qemu_argv(["-machine", "none", flag, "-S", "-daemonize"])
        assert inv.start_paused and inv.daemonize, flag



argv_words = st.lists(
    st.one_of(st.sampled_from(["-S", "-object", "--machine", "-m", "-", "--", "disk.img", "-append", "-jitdump",
                               "--sim-state-dir=/s", "--sim-standalone"]), st.text(max_size=6)),
    max_size=12,
)


@given(argv_words)
def test_the_walker_reads_every_word_once_or_names_the_option_without_argument(argv: list[str]) -> None:
    try:
        options = list(iter_options(argv, extra_flags=SIM_FLAGS, extra_options=SIM_OPTIONS))
    except MissingArgument as exc:
        assert exc.index == len(argv) - 1 and exc.token == argv[-1]
        return
    position = 0
    for option in options:
        assert argv[position] == option.token
        if option.index == position:  # one word: a flag, a bare word, or the stand-in's --name=value
            assert option.value is None or option.value == option.token or option.token.endswith(f"={option.value}")
            position += 1
        else:
            assert (option.index, option.value) == (position + 1, argv[position + 1])
            position += 2
    assert position == len(argv)
