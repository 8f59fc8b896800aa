"""The JSON `-object` form (QEMU >= 6.0): compact, keys in libvirt's order, typed values.

libvirt prints JSON without spaces and without escaping '/', so the text here is byte for byte
what libvirt passes; parsing is strict where QEMU is (duplicate keys, value types)."""

from __future__ import annotations

import json
from typing import Any

from sevhook.errors import FormatError
from sevhook.qemu_cmdline.objects import LAUNCH_SECURITY_TYPES, ParsedObject, PropValue, QemuObject, validate_props

_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def format_object(obj: QemuObject) -> str:
    """`{"qom-type":...,"id":...,<props in order>}` exactly as libvirt writes it."""
    members: dict[str, PropValue] = {"qom-type": obj.qom_type, "id": obj.id}
    members.update(obj.props)
    return _ENCODER.encode(members)


class _Members(list):  # type: ignore[type-arg]
    """A JSON object's members in order (told apart from a JSON array)."""


def _pairs_no_duplicates(pairs: list[tuple[str, Any]]) -> _Members:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            raise FormatError(f"duplicate key {key!r} (QEMU refuses it)")
        seen.add(key)
    return _Members(pairs)


def _reject_constant(name: str) -> None:
    raise FormatError(f"{name} is not valid JSON")


def loads_members(text: str, what: str) -> list[tuple[str, Any]]:
    """The members of a JSON object argument, in order; FormatError for anything else."""
    try:
        value = json.loads(text, object_pairs_hook=_pairs_no_duplicates, parse_constant=_reject_constant)
    except FormatError as exc:
        raise FormatError(f"{what}: {exc.message}") from exc
    except RecursionError as exc:
        raise FormatError(f"{what}: JSON nested too deeply") from exc
    except ValueError as exc:
        raise FormatError(f"{what}: not valid JSON ({exc})") from exc
    if not isinstance(value, _Members):
        raise FormatError(f"{what}: expected a JSON object")
    return value


def parse_object(text: str, what: str = "-object") -> ParsedObject | None:
    """Read a JSON -object; None when it is some other kind of object (memory backend, secret...)."""
    members = loads_members(text, what)
    values = dict(members)
    qom_type = values.get("qom-type")
    if not isinstance(qom_type, str):
        raise FormatError(f"{what}: 'qom-type' must be a string")
    if qom_type not in LAUNCH_SECURITY_TYPES:
        return None
    object_id = values.get("id")
    if not isinstance(object_id, str):
        raise FormatError(f"{what}: {qom_type} needs a string 'id'")
    pairs: list[tuple[str, PropValue]] = []
    problems: list[str] = []
    for key, value in members:
        if key in ("qom-type", "id"):
            continue
        if isinstance(value, (bool, int, str)):
            pairs.append((key, value))
        else:
            problems.append(f"'{key}' has a {type(value).__name__} value QEMU does not take here")
    parsed = validate_props(qom_type, object_id, pairs, typed=True)
    return ParsedObject(parsed.obj, tuple(problems) + parsed.problems)
