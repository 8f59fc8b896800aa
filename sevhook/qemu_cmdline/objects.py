"""Launch-security models <-> QEMU objects: the ordered, typed property list libvirt builds.

The object is syntax-free: json_syntax and keyval turn it into the `-object` text and back. The
property order and omissions are libvirt's (qemuBuildSEVCommandLine and friends): number and
boolean types matter for the JSON form, and only what the domain XML sets is emitted."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from sevhook.errors import FormatError, SevhookError
from sevhook.sev.policy import SevPolicy, SnpPolicy
from sevhook.xml.models import (
    LaunchSecurity,
    S390PvLaunchSecurity,
    SevLaunchSecurity,
    SevSnpLaunchSecurity,
    TdxLaunchSecurity,
)

PropValue = int | bool | str
PropKind = Literal["uint32", "uint64", "bool", "str"]

SEV_GUEST = "sev-guest"
SEV_SNP_GUEST = "sev-snp-guest"
S390_PV_GUEST = "s390-pv-guest"
TDX_GUEST = "tdx-guest"

OBJECT_ID = "lsec0"
LIBVIRT4_OBJECT_ID = "sev0"

# Every property QEMU accepts on each confidential-guest object (QEMU target/i386/sev.c,
# hw/s390x/pv.c), so a command line can be read even where libvirt would not write a property.
QEMU_PROPERTIES: dict[str, dict[str, PropKind]] = {
    SEV_GUEST: {
        "cbitpos": "uint32",
        "reduced-phys-bits": "uint32",
        "policy": "uint32",
        "handle": "uint32",
        "dh-cert-file": "str",
        "session-file": "str",
        "kernel-hashes": "bool",
        "sev-device": "str",
    },
    SEV_SNP_GUEST: {
        "cbitpos": "uint32",
        "reduced-phys-bits": "uint32",
        "kernel-hashes": "bool",
        "policy": "uint64",
        "guest-visible-workarounds": "str",
        "id-block": "str",
        "id-auth": "str",
        "host-data": "str",
        "author-key-enabled": "bool",
        "vcek-disabled": "bool",
        "sev-device": "str",
    },
    S390_PV_GUEST: {},
    TDX_GUEST: {},
}
LAUNCH_SECURITY_TYPES = frozenset(QEMU_PROPERTIES)

# Where each property comes from in the domain XML, for messages a domain author can act on.
XML_SOURCE: dict[str, str] = {
    "cbitpos": "<cbitpos>",
    "reduced-phys-bits": "<reducedPhysBits>",
    "policy": "<policy>",
    "handle": "<handle> (libvirt never passes it)",
    "dh-cert-file": "<dhCert>",
    "session-file": "<session>",
    "kernel-hashes": "kernelHashes=",
    "guest-visible-workarounds": "<guestVisibleWorkarounds>",
    "id-block": "<idBlock>",
    "id-auth": "<idAuth>",
    "host-data": "<hostData>",
    "author-key-enabled": "authorKey=",
    "vcek-disabled": "vcek= (inverted)",
    "sev-device": "nothing (libvirt never passes it)",
}

_UINT_MAX = {"uint32": 0xFFFF_FFFF, "uint64": 0xFFFF_FFFF_FFFF_FFFF}


@dataclass(frozen=True)
class QemuObject:
    """One `-object`: its QOM type, id and properties in command-line order."""

    qom_type: str
    id: str
    props: tuple[tuple[str, PropValue], ...] = ()

    def get(self, name: str) -> PropValue | None:
        for key, value in self.props:
            if key == name:
                return value
        return None

    def names(self) -> list[str]:
        return [key for key, _ in self.props]


@dataclass(frozen=True)
class LaunchFiles:
    """Where QEMU reads dhCert and session from (libvirt's `<libDir>/dh_cert.base64` etc.)."""

    dh_cert_file: str
    session_file: str


def check_value(qom_type: str, name: str, value: PropValue) -> str | None:
    """Why QEMU would refuse `name=value` on this object type, or None when it takes it."""
    kinds = QEMU_PROPERTIES.get(qom_type)
    if kinds is None:
        return f"'{qom_type}' is not a launch-security object type"
    kind = kinds.get(name)
    if kind is None:
        return f"QEMU's {qom_type} has no property '{name}'"
    if kind == "bool":
        return None if isinstance(value, bool) else f"'{name}' must be a boolean"
    if kind == "str":
        return None if isinstance(value, str) else f"'{name}' must be a string"
    if isinstance(value, bool) or not isinstance(value, int):
        return f"'{name}' must be an unsigned integer"
    if not 0 <= value <= _UINT_MAX[kind]:
        return f"'{name}' = {value} does not fit in {kind}"
    return None


def _text(value: str | None) -> str | None:
    """libvirt reads optional text with virXPathString, which gives NULL for an empty element."""
    return value or None


def _platform_value(model: SevLaunchSecurity | SevSnpLaunchSecurity, field: str, element: str) -> int:
    value = getattr(model, field)
    if value is None:
        raise SevhookError(
            f"<launchSecurity> has no <{element}> and no host value was given: pass --domcaps FILE "
            "(from `virsh domcapabilities`), --cbitpos N --reduced-phys-bits N, --qmp SOCKET or -c URI"
        )
    return value


def unsupported_tdx() -> SevhookError:
    return SevhookError(
        "launchSecurity type 'tdx' is not supported: sevhook translates only sev, sev-snp and s390-pv "
        "(libvirt's tdx-guest needs a TDX host and QEMU; use libvirt itself for TDX guests)"
    )


def model_to_object(model: LaunchSecurity, files: LaunchFiles, object_id: str = OBJECT_ID) -> QemuObject:
    """The object libvirt builds for this `<launchSecurity>`; cbitpos etc. must already be filled in."""
    props: list[tuple[str, PropValue]] = []
    if isinstance(model, SevLaunchSecurity):
        props += [
            ("cbitpos", _platform_value(model, "cbitpos", "cbitpos")),
            ("reduced-phys-bits", _platform_value(model, "reduced_phys_bits", "reducedPhysBits")),
            ("policy", model.policy.value),
        ]
        if _text(model.dh_cert) is not None:
            props.append(("dh-cert-file", files.dh_cert_file))
        if _text(model.session) is not None:
            props.append(("session-file", files.session_file))
        if model.kernel_hashes is not None:
            props.append(("kernel-hashes", bool(model.kernel_hashes)))
        return QemuObject(SEV_GUEST, object_id, tuple(props))
    if isinstance(model, SevSnpLaunchSecurity):
        props += [
            ("cbitpos", _platform_value(model, "cbitpos", "cbitpos")),
            ("reduced-phys-bits", _platform_value(model, "reduced_phys_bits", "reducedPhysBits")),
        ]
        if model.kernel_hashes is not None:
            props.append(("kernel-hashes", bool(model.kernel_hashes)))
        props.append(("policy", model.policy.value))
        for name, value in (
            ("guest-visible-workarounds", model.guest_visible_workarounds),
            ("id-block", model.id_block),
            ("id-auth", model.id_auth),
            ("host-data", model.host_data),
        ):
            if _text(value) is not None:
                props.append((name, value))  # base64 passes through verbatim
        if model.author_key is not None:
            props.append(("author-key-enabled", bool(model.author_key)))
        if model.vcek is not None:
            props.append(("vcek-disabled", not model.vcek))
        return QemuObject(SEV_SNP_GUEST, object_id, tuple(props))
    if isinstance(model, S390PvLaunchSecurity):
        return QemuObject(S390_PV_GUEST, object_id)
    if isinstance(model, TdxLaunchSecurity):
        raise unsupported_tdx()
    raise SevhookError(f"unknown launch security model {type(model).__name__}")


class FileLookup(Protocol):
    """Where file properties are resolved: a dict of path -> text, or the disk."""

    def get(self, path: str, /) -> str | None: ...


@dataclass(frozen=True)
class ObjectReading:
    """A launch-security model read back from an object, with what could not be carried over."""

    model: LaunchSecurity
    unread_files: tuple[tuple[str, str], ...]  # (path, why) for dh-cert/session files not readable


def object_to_model(obj: QemuObject, file_text: FileLookup) -> ObjectReading:
    """Invert model_to_object. File properties are looked up in `file_text` (path -> content);
    sev-device, which libvirt never writes, has no model field (a check reports it as a difference)."""
    unread: list[tuple[str, str]] = []

    def read(prop: str) -> str | None:
        path = obj.get(prop)
        if path is None:
            return None
        text = file_text.get(str(path))
        if text is None:
            unread.append((str(path), f"the {prop} file is not readable here"))
        return text

    values = dict(obj.props)
    if obj.qom_type == SEV_GUEST:
        model: LaunchSecurity = SevLaunchSecurity(
            policy=SevPolicy(int(values.get("policy", 1))),  # QEMU's default policy is 0x1
            cbitpos=_int_or_none(values.get("cbitpos")),
            reduced_phys_bits=_int_or_none(values.get("reduced-phys-bits")),
            dh_cert=read("dh-cert-file"),
            session=read("session-file"),
            kernel_hashes=_bool_or_none(values.get("kernel-hashes")),
            handle=_int_or_none(values.get("handle")),
        )
    elif obj.qom_type == SEV_SNP_GUEST:
        vcek_disabled = _bool_or_none(values.get("vcek-disabled"))
        model = SevSnpLaunchSecurity(
            policy=SnpPolicy(int(values.get("policy", 0x30000))),  # QEMU's default SNP policy
            cbitpos=_int_or_none(values.get("cbitpos")),
            reduced_phys_bits=_int_or_none(values.get("reduced-phys-bits")),
            kernel_hashes=_bool_or_none(values.get("kernel-hashes")),
            author_key=_bool_or_none(values.get("author-key-enabled")),
            vcek=None if vcek_disabled is None else not vcek_disabled,
            guest_visible_workarounds=_str_or_none(values.get("guest-visible-workarounds")),
            id_block=_str_or_none(values.get("id-block")),
            id_auth=_str_or_none(values.get("id-auth")),
            host_data=_str_or_none(values.get("host-data")),
        )
    elif obj.qom_type == S390_PV_GUEST:
        model = S390PvLaunchSecurity()
    elif obj.qom_type == TDX_GUEST:
        raise unsupported_tdx()
    else:
        raise FormatError(f"'{obj.qom_type}' is not a launch-security object type")
    return ObjectReading(model, tuple(unread))


def _int_or_none(value: PropValue | None) -> int | None:
    return None if value is None or isinstance(value, bool) else int(value)


def _bool_or_none(value: PropValue | None) -> bool | None:
    return value if isinstance(value, bool) else None


def _str_or_none(value: PropValue | None) -> str | None:
    return value if isinstance(value, str) else None


@dataclass(frozen=True)
class ParsedObject:
    """An object read from the command line: the properties QEMU would take, and why others not."""

    obj: QemuObject
    problems: tuple[str, ...] = ()


def keyval_number(text: str) -> int | None:
    """A number as QEMU's keyval visitor reads it (strtoull, base 0: decimal, 0x-hex, 0-octal)."""
    body = text
    if not body or body != body.strip() or body[0] in "+-":
        return None
    try:
        if body[:2].lower() == "0x":
            return int(body[2:], 16) if body[2:] else None
        if len(body) > 1 and body[0] == "0":
            return int(body[1:], 8)
        return int(body, 10)
    except ValueError:
        return None


_KEYVAL_TRUE = frozenset({"on", "yes", "true", "y"})
_KEYVAL_FALSE = frozenset({"off", "no", "false", "n"})


def keyval_bool(text: str) -> bool | None:
    """A boolean as QEMU's qapi_bool_parse reads it."""
    if text in _KEYVAL_TRUE:
        return True
    if text in _KEYVAL_FALSE:
        return False
    return None


def validate_props(qom_type: str, object_id: str, pairs: list[tuple[str, PropValue]], typed: bool) -> ParsedObject:
    """Keep the properties QEMU accepts; `typed` is False for keyval text, which is coerced first."""
    problems: list[str] = []
    kept: list[tuple[str, PropValue]] = []
    seen: set[str] = set()
    kinds = QEMU_PROPERTIES[qom_type]
    for name, raw in pairs:
        if name in seen:
            problems.append(f"property '{name}' is given twice")
            continue
        seen.add(name)
        value: PropValue | None = raw
        kind = kinds.get(name)
        if not typed and kind is not None and isinstance(raw, str):
            if kind == "bool":
                value = keyval_bool(raw)
            elif kind in _UINT_MAX:
                value = keyval_number(raw)
            if value is None:
                problems.append(f"'{name}={raw}' is not a valid {kind} for QEMU's {qom_type}")
                continue
        why = check_value(qom_type, name, value)
        if why:
            problems.append(why)
            continue
        kept.append((name, value))
    return ParsedObject(QemuObject(qom_type, object_id, tuple(kept)), tuple(problems))
