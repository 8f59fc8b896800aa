"""A full QEMU argv -> the launch security it carries, in either -object syntax.

QEMU options take one argument unless they are flags, so the argv is walked option by option:
`-object` and `-machine` are found wherever they are, and an option's argument is never taken for
an option (`-append -object` is a kernel command line, not an object)."""

from __future__ import annotations

import os
import shlex
import stat
from dataclasses import dataclass
from typing import Literal

from sevhook.errors import FormatError
from sevhook.qemu_cmdline import json_syntax, keyval
from sevhook.qemu_cmdline.objects import FileLookup, ObjectReading, ParsedObject, QemuObject, object_to_model
from sevhook.qemu_cmdline.options import iter_options
from sevhook.qemu_cmdline.translate import CGS_PROPERTY, MEMORY_ENCRYPTION_PROPERTY
from sevhook.xml.models import LaunchSecurity

MACHINE_OPTIONS = frozenset({"machine", "M"})
OBJECT_OPTIONS = frozenset({"object"})


def _last_libvirt_command(text: str) -> str:
    """A domain log (/var/log/libvirt/qemu/NAME.log) holds one command per start among other lines:
    keep the last one, which starts with libvirt's `LC_ALL=C` and continues while lines end in `\\`."""
    lines = text.splitlines()
    starts = [index for index, line in enumerate(lines) if line.startswith("LC_ALL=")]
    if not starts:
        return text
    index = starts[-1]
    block = [lines[index]]
    while block[-1].endswith("\\") and index + 1 < len(lines):
        index += 1
        block.append(lines[index])
    return "\n".join(block)


def argv_from_text(text: str) -> list[str]:
    """An argv from a saved command line: NUL-separated (/proc/PID/cmdline), or shell text as in
    libvirt's .args files and domain logs (the last start's command; `VAR=value` prefixes dropped,
    `\\`-newlines joined)."""
    if "\0" in text:
        return [part for part in text.split("\0") if part]
    text = _last_libvirt_command(text)
    try:
        words = shlex.split(text.replace("\\\n", ""), posix=True)
    except ValueError as exc:
        raise FormatError(f"command line text cannot be split like a shell would: {exc}") from exc
    while words and "=" in words[0] and not words[0].startswith("-") and words[0].split("=", 1)[0].isidentifier():
        words.pop(0)
    return words


@dataclass(frozen=True)
class OptionArg:
    """One option's argument and where it sits in the argv."""

    index: int
    option: str
    text: str


@dataclass(frozen=True)
class CommandLine:
    """The parts of a QEMU argv that launch security lives in."""

    program: str | None
    machine_args: tuple[OptionArg, ...]
    object_args: tuple[OptionArg, ...]


def scan(argv: list[str]) -> CommandLine:
    """Walk the argv once, collecting every -machine and -object argument."""
    program = argv[0] if argv and not argv[0].startswith("-") else None
    machines: list[OptionArg] = []
    objects: list[OptionArg] = []
    for option in iter_options(argv, start=1 if program is not None else 0):
        if option.value is None or not option.name:
            continue  # a flag or a positional disk image
        arg = OptionArg(option.index, option.token, option.value)
        if option.name in MACHINE_OPTIONS:
            machines.append(arg)
        elif option.name in OBJECT_OPTIONS:
            objects.append(arg)
    return CommandLine(program, tuple(machines), tuple(objects))


def machine_properties(args: tuple[OptionArg, ...]) -> dict[str, str]:
    """Every -machine merged as QEMU merges them (a later value wins); the implied key is `type`."""
    merged: dict[str, str] = {}
    for arg in args:
        what = f"argv[{arg.index}] ({arg.option})"
        if arg.text.startswith("{"):
            pairs = [(key, _scalar_text(value)) for key, value in json_syntax.loads_members(arg.text, what)]
        else:
            pairs = keyval.split(arg.text, "type", what)
        merged.update(pairs)
    return merged


def _scalar_text(value: object) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def parse_object_arg(arg: OptionArg) -> tuple[Literal["json", "keyval"], ParsedObject] | None:
    """A launch-security -object in whichever syntax it is written; None for other objects."""
    what = f"argv[{arg.index}] ({arg.option})"
    if arg.text.startswith("{"):  # QEMU's own test: JSON exactly when the first character is '{'
        parsed = json_syntax.parse_object(arg.text, what)
        return None if parsed is None else ("json", parsed)
    parsed = keyval.parse_object(arg.text, what)
    return None if parsed is None else ("keyval", parsed)


def object_id_of(arg: OptionArg) -> str | None:
    """The id of any -object (launch security or not), for telling what -machine points at."""
    try:
        if arg.text.startswith("{"):
            value = dict(json_syntax.loads_members(arg.text, "-object")).get("id")
            return value if isinstance(value, str) else None
        return dict(keyval.split(arg.text, "qom-type", "-object")).get("id")
    except FormatError:
        return None


MAX_LAUNCH_FILE_BYTES = 1 << 20  # a dhCert is ~2.8 KB of base64; never read /dev/zero or a disk image


class DiskFiles:
    """FileLookup over the real files a command line names (what QEMU itself would read): regular
    files up to 1 MiB, so a hostile argv naming /dev/zero or a FIFO cannot hang the check."""

    def get(self, path: str, /) -> str | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
        except (OSError, ValueError):
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return None
            chunks: list[bytes] = []
            size = 0
            while chunk := os.read(fd, 65536):
                chunks.append(chunk)
                size += len(chunk)
                if size > MAX_LAUNCH_FILE_BYTES:
                    return None
            return b"".join(chunks).decode("utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        finally:
            os.close(fd)


@dataclass(frozen=True)
class ArgvLaunchSecurity:
    """The launch security a QEMU argv carries, and everything that keeps it from being exact."""

    model: LaunchSecurity | None
    object: QemuObject | None
    syntax: Literal["json", "keyval"] | None
    machine_property: str | None  # confidential-guest-support or memory-encryption
    problems: tuple[str, ...] = ()
    object_text: str | None = None  # the -object argument exactly as given
    unread_files: tuple[tuple[str, str], ...] = ()


def read_launch_security(argv: list[str], files: FileLookup | None = None) -> ArgvLaunchSecurity:
    """Find the launch-security object the machine points at and read it back into a model."""
    cmdline = scan(argv)
    machine = machine_properties(cmdline.machine_args)
    problems: list[str] = []
    cgs = machine.get(CGS_PROPERTY)
    encryption = machine.get(MEMORY_ENCRYPTION_PROPERTY)
    if cgs and encryption and cgs != encryption:
        problems.append(f"-machine sets both {CGS_PROPERTY}={cgs} and {MEMORY_ENCRYPTION_PROPERTY}={encryption}")
    machine_property = CGS_PROPERTY if cgs else MEMORY_ENCRYPTION_PROPERTY if encryption else None
    wanted = cgs or encryption

    found: list[tuple[OptionArg, Literal["json", "keyval"], ParsedObject]] = []
    for arg in cmdline.object_args:
        parsed = parse_object_arg(arg)
        if parsed is not None:
            found.append((arg, parsed[0], parsed[1]))
    chosen = [entry for entry in found if entry[2].obj.id == wanted]
    for arg, _, parsed in found:
        if parsed.obj.id != wanted:
            problems.append(f"argv[{arg.index}]: {parsed.obj.qom_type} '{parsed.obj.id}' is not the machine's "
                            f"{CGS_PROPERTY}")
    if wanted and not chosen:
        other = [arg for arg in cmdline.object_args if object_id_of(arg) == wanted]
        problems.append(
            f"-machine {machine_property}={wanted} names "
            + ("an object that is not a launch-security object" if other else "no -object with that id")
        )
    if len(chosen) > 1:
        problems.append(f"{len(chosen)} objects have the id '{wanted}' (QEMU refuses duplicate ids)")
    if not chosen:
        return ArgvLaunchSecurity(None, None, None, machine_property, tuple(problems))
    arg, syntax, parsed = chosen[-1]
    problems += [f"argv[{arg.index}]: {problem}" for problem in parsed.problems]
    reading: ObjectReading = object_to_model(parsed.obj, files if files is not None else DiskFiles())
    return ArgvLaunchSecurity(
        reading.model,
        parsed.obj,
        syntax,
        machine_property,
        tuple(problems),
        arg.text,
        reading.unread_files,
    )
