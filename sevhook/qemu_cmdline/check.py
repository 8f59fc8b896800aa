"""Does a QEMU argv carry exactly a domain's launch security? Property by property.

What QEMU does with the object is compared (type, every property value, the contents of the
dhCert/session files it reads); how it is written (JSON or keyval, the object id, the machine
property's name) is form, reported as a note but not as a difference."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sevhook.qemu_cmdline.argv import ArgvLaunchSecurity
from sevhook.qemu_cmdline.objects import XML_SOURCE, FileLookup, PropValue
from sevhook.qemu_cmdline.translate import Translation
from sevhook.xml.models import LaunchSecurity, SevLaunchSecurity, SevSnpLaunchSecurity

FILE_PROPERTIES = ("dh-cert-file", "session-file")


@dataclass(frozen=True)
class CheckResult:
    differences: tuple[str, ...]
    notes: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.differences


def fill_from_argv(model: LaunchSecurity, found: ArgvLaunchSecurity) -> tuple[LaunchSecurity, list[str]]:
    """Take host values the XML leaves out from the argv itself (nothing else says what they are)."""
    if not isinstance(model, (SevLaunchSecurity, SevSnpLaunchSecurity)) or found.object is None:
        return model, []
    notes: list[str] = []
    changes: dict[str, int] = {}
    for field, prop in (("cbitpos", "cbitpos"), ("reduced_phys_bits", "reduced-phys-bits")):
        value = found.object.get(prop)
        if getattr(model, field) is None and isinstance(value, int) and not isinstance(value, bool):
            changes[field] = value
            notes.append(f"{prop}={value} accepted from the command line: the domain XML leaves it to the host (give "
                         "--domcaps FILE to check it)")
    return (dataclasses.replace(model, **changes) if changes else model), notes


def _show(name: str, value: PropValue | None) -> str:
    if value is None:
        return "absent"
    if name == "policy" and isinstance(value, int) and not isinstance(value, bool):
        return f"{value:#x}"
    if isinstance(value, bool):
        return "true" if value else "false"
    return repr(value) if isinstance(value, str) else str(value)


def compare(expected: Translation, found: ArgvLaunchSecurity, files: FileLookup, strict: bool = False) -> CheckResult:
    """Differences between what the domain XML gives QEMU and what the argv gives it."""
    differences = list(found.problems)
    notes: list[str] = []
    if found.object is None:
        differences.append(
            f"the command line carries no launch security (expected {expected.object.qom_type} via -machine "
            f"{expected.machine_text})"
        )
        return CheckResult(tuple(differences), tuple(notes))
    actual = found.object
    if actual.qom_type != expected.object.qom_type:
        differences.append(f"object type: domain wants {expected.object.qom_type}, command line has {actual.qom_type}")
        return CheckResult(tuple(differences), tuple(notes))
    if (found.machine_property, actual.id, found.syntax) != (expected.machine_property[0], expected.object.id,
                                                             expected.syntax):
        notes.append(
            f"written as {found.machine_property}={actual.id} with {found.syntax} -object "
            f"(libvirt for this QEMU: {expected.machine_text} with {expected.syntax}); QEMU treats both alike"
        )
    names = expected.object.names() + [name for name in actual.names() if name not in expected.object.names()]
    for name in names:
        want, have = expected.object.get(name), actual.get(name)
        source = XML_SOURCE.get(name, name)
        if name in FILE_PROPERTIES and want is not None and have is not None:
            differences += _compare_file(name, str(want), str(have), expected, files, strict, notes)
        elif want != have or type(want) is not type(have):
            differences.append(f"{name} (from {source}): domain wants {_show(name, want)}, command line has "
                               f"{_show(name, have)}")
    return CheckResult(tuple(differences), tuple(notes))


def _compare_file(
    name: str, want: str, have: str, expected: Translation, files: FileLookup, strict: bool, notes: list[str]
) -> list[str]:
    """The path must be libvirt's; the content, where readable, must be the XML's exact text."""
    source = XML_SOURCE[name]
    found: list[str] = []
    if want != have:
        found.append(f"{name} (from {source}): domain wants {want!r} (lib dir {expected.lib_dir}), command line has "
                     f"{have!r}")
    content = files.get(have)
    if content is None:
        message = f"{name} {have!r} is not readable here, so its content was not compared with {source}"
        (found if strict else notes).append(message)
    elif content != expected.files.get(want):
        found.append(f"{name} {have!r} does not hold the exact text of {source}")
    return found
