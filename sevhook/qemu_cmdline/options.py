"""QEMU's command-line grammar, the one table and walker every sevhook argv reader uses (sevhook cmdline
--check, the software platform's stand-in): which options take an argument, and how a key=value list
splits.

QEMU gives an option the next word as its argument unless the option is a flag, so a flag missing from
FLAG_OPTIONS would make a reader swallow the following option; tests/qemu_cmdline checks the table
against the real qemu-system-x86_64."""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

from sevhook.errors import FormatError

# Options without HAS_ARG in qemu-options.hx. QEMU 7.2's own flags, plus flags of older or newer
# releases and other targets, which still occur in saved command lines and domain logs.
FLAG_OPTIONS = frozenset(
    {
        "h", "help", "?", "version", "S", "s", "snapshot", "nodefaults", "no-user-config", "nodefconfig",
        "no-shutdown", "no-reboot", "no-acpi", "no-hpet", "no-fd-bootchk", "win2k-hack", "rtc-td-hack",
        "enable-kvm", "no-kvm", "no-kvm-irqchip", "no-kvm-pit", "no-kvm-pit-reinjection", "enable-hax",
        "enable-fips", "mem-prealloc", "audio-help", "usb", "nographic", "curses", "sdl", "portrait",
        "full-screen", "no-frame", "alt-grab", "ctrl-grab", "no-quit", "show-cursor", "singlestep",
        "preconfig", "xen-attach", "xen-domid-restrict", "daemonize", "only-migratable", "async-teardown",
        "enable-sync-profile", "semihosting", "old-param", "perfmap", "jitdump",
    }
)


class MissingArgument(FormatError):
    """An option that takes an argument ends the argv; each reader words it for its own users."""

    def __init__(self, index: int, token: str) -> None:
        super().__init__(f"argv[{index}]: option {token} needs an argument")
        self.index = index
        self.token = token


class Option(NamedTuple):
    """One option as QEMU reads it: a flag (value None), an option and its argument, or a bare word
    (name "", QEMU's disk image). `index` is where the value is (the token itself for a flag). A tuple:
    the stand-in reads an argv on every libvirt probe."""

    index: int
    name: str
    value: str | None
    token: str


def iter_options(
    argv: list[str],
    start: int = 0,
    extra_flags: frozenset[str] = frozenset(),
    extra_options: frozenset[str] = frozenset(),
) -> Iterator[Option]:
    """Walk argv[start:] as QEMU does. `extra_flags`/`extra_options` are a wrapper's own options (the
    stand-in's --sim-*), which may also be written `--name=value`; QEMU's own never are."""
    index = start
    count = len(argv)
    while index < count:
        token = argv[index]
        if len(token) < 2 or token[0] != "-":  # a bare word: a disk image, or `-` (stdin)
            yield Option(index, "", token, token)
            index += 1
            continue
        name = token[2:] if token[1] == "-" else token[1:]  # QEMU reads --object as -object
        if extra_options and token[1] == "-" and "=" in name:
            own_name, _, own_value = name.partition("=")
            if own_name in extra_options:
                yield Option(index, own_name, own_value, token)
                index += 1
                continue
        if name in FLAG_OPTIONS or name in extra_flags:
            yield Option(index, name, None, token)
            index += 1
            continue
        if index + 1 >= count:
            raise MissingArgument(index, token)
        yield Option(index + 1, name, argv[index + 1], token)
        index += 2


def split_keyval_parts(text: str) -> list[str]:
    """Split a key=value list on its single commas (`,,` is an escaped comma and stays in the part,
    verbatim, so a part can be written back unchanged)."""
    parts: list[str] = []
    current: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == ",":
            if text[index + 1 : index + 2] == ",":
                current.append(",,")
                index += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        index += 1
    parts.append("".join(current))
    return parts


def unescape(part: str) -> str:
    """A part's text as QEMU sees it (`,,` -> `,`)."""
    return part.replace(",,", ",")
