"""QEMU's key=value option syntax (`sev-guest,id=lsec0,policy=1`), both ways.

A comma inside a value is written twice (`,,`); the first element may be an implied key (the
object's qom-type, the machine's type). libvirt used this form for -object before QEMU 6.0."""

from __future__ import annotations

from sevhook.errors import FormatError
from sevhook.qemu_cmdline.objects import LAUNCH_SECURITY_TYPES, ParsedObject, PropValue, QemuObject, validate_props
from sevhook.qemu_cmdline.options import split_keyval_parts, unescape


def escape(value: str) -> str:
    return value.replace(",", ",,")


def format_value(value: PropValue, hex_number: bool = False) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int):
        return f"{value:#x}" if hex_number else str(value)
    return escape(value)


def format_object(obj: QemuObject, hex_keys: frozenset[str] = frozenset()) -> str:
    """`qom-type,id=ID,key=value,...`; hex_keys prints those numbers as 0x-hex (libvirt 4.x policy)."""
    parts = [escape(obj.qom_type), f"id={escape(obj.id)}"]
    parts += [f"{name}={format_value(value, name in hex_keys)}" for name, value in obj.props]
    return ",".join(parts)


def split(text: str, implied_key: str | None, what: str) -> list[tuple[str, str]]:
    """`a,b=c,d=e,,f` -> [(implied_key, 'a'), ('b', 'c'), ('d', 'e,f')], as QEMU's keyval parser;
    a trailing comma ends the list."""
    parts = split_keyval_parts(text)
    if parts[-1] == "" and (len(parts) > 1 or implied_key is None):
        parts.pop()
    pairs: list[tuple[str, str]] = []
    offset = 0
    for position, part in enumerate(parts):
        key_end = _key_end(part)
        if position == 0 and implied_key is not None and (key_end == len(part) or part[key_end] == ","):
            pairs.append((implied_key, unescape(part)))
        else:
            key = part[:key_end]
            if not key:
                raise FormatError(f"{what}: empty parameter name at offset {offset} in {text!r}")
            if key_end == len(part) or part[key_end] != "=":
                raise FormatError(f"{what}: expected '=' after parameter '{key}' in {text!r}")
            pairs.append((key, unescape(part[key_end + 1 :])))
        offset += len(part) + 1
    return pairs


def _key_end(part: str) -> int:
    """Keys run to the first '=' or ','."""
    end = 0
    while end < len(part) and part[end] not in "=,":
        end += 1
    return end


def parse_object(text: str, what: str = "-object") -> ParsedObject | None:
    """Read a keyval -object; None when it is not a launch-security object."""
    pairs = split(text, "qom-type", what)
    values: dict[str, str] = {}
    for key, value in pairs:
        if key in ("qom-type", "id") and key in values:
            raise FormatError(f"{what}: '{key}' is given twice in {text!r}")
        values.setdefault(key, value)
    qom_type = values.get("qom-type")
    if not qom_type:
        raise FormatError(f"{what}: no object type in {text!r}")
    if qom_type not in LAUNCH_SECURITY_TYPES:
        return None
    object_id = values.get("id")
    if not object_id:
        raise FormatError(f"{what}: {qom_type} needs an id= in {text!r}")
    props: list[tuple[str, PropValue]] = [(k, v) for k, v in pairs if k not in ("qom-type", "id")]
    return validate_props(qom_type, object_id, props, typed=False)
