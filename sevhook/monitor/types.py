"""Typed answers of QEMU's launch-related QMP commands, each with the parser for its JSON shape,
and the interface both monitor back ends (QMP socket, libvirt) implement."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from sevhook.encoding import decode_base64 as strict_base64
from sevhook.errors import FormatError
from sevhook.monitor.errors import MonitorProtocolError

if TYPE_CHECKING:
    from sevhook.sev.measurement import LaunchMeasurement

SEV_STATES = ("uninit", "launch-update", "launch-secret", "running", "send-update", "receive-update")
LAUNCH_SECRET = "launch-secret"


def _field(answer: Mapping[str, object], key: str, kind: type, command: str) -> object:
    """One typed field of a QMP answer; a missing or mistyped field is a protocol error."""
    value = answer.get(key)
    if kind is int and isinstance(value, bool):  # bool is an int to Python, never to QMP
        value = None
    if not isinstance(value, kind):
        raise MonitorProtocolError(
            f"{command}: QEMU's answer has no valid {key!r} ({kind.__name__} expected, got {value!r:.60})",
            command=command,
        )
    return value


def _optional(answer: Mapping[str, object], key: str, kind: type, command: str) -> object | None:
    return None if answer.get(key) is None else _field(answer, key, kind, command)


def _mapping(answer: object, command: str) -> Mapping[str, object]:
    if not isinstance(answer, Mapping):
        raise MonitorProtocolError(f"{command}: QEMU answered {type(answer).__name__}, expected an object",
                                   command=command)
    return answer


def decode_base64(text: object, what: str, command: str) -> bytes:
    """Strict base64 from a QMP string field; anything else is a protocol error."""
    if not isinstance(text, str):
        raise MonitorProtocolError(f"{command}: {what} is not a base64 string", command=command)
    try:
        return strict_base64(text)
    except FormatError as exc:
        raise MonitorProtocolError(f"{command}: {what} is not valid base64 ({exc.message})", command=command) from exc


@dataclass(frozen=True)
class LaunchInfo:
    """What libvirt reports for a measured launch (virDomainGetLaunchSecurityInfo)."""

    measurement_b64: str
    api_major: int
    api_minor: int
    build_id: int
    policy: int


@dataclass(frozen=True)
class VmStatus:
    """`query-status`: QEMU's run state (prelaunch, paused, running, ...)."""

    status: str
    running: bool

    @classmethod
    def from_qmp(cls, answer: object) -> VmStatus:
        data = _mapping(answer, "query-status")
        return cls(status=str(_field(data, "status", str, "query-status")),
                   running=bool(_field(data, "running", bool, "query-status")))


@dataclass(frozen=True)
class SevInfo:
    """`query-sev`. QEMU < 9.1 answers a flat SEV object; 9.1 adds `sev-type` with `policy` (SEV)
    or `snp-policy` (SEV-SNP). Both shapes parse to this one type; `sev_type` is "sev" for the old
    shape."""

    enabled: bool
    api_major: int
    api_minor: int
    build_id: int
    state: str
    sev_type: str
    policy: int | None = None
    snp_policy: int | None = None
    handle: int | None = None

    @classmethod
    def from_qmp(cls, answer: object) -> SevInfo:
        cmd = "query-sev"
        data = _mapping(answer, cmd)
        sev_type = str(_optional(data, "sev-type", str, cmd) or "sev")
        if sev_type not in ("sev", "sev-snp"):
            raise MonitorProtocolError(f"{cmd}: unknown sev-type {sev_type!r}", command=cmd)
        state = str(_field(data, "state", str, cmd))
        if state not in SEV_STATES:
            raise MonitorProtocolError(f"{cmd}: unknown SEV state {state!r}", command=cmd)
        policy_key = "snp-policy" if sev_type == "sev-snp" else "policy"
        policy = int(_field(data, policy_key, int, cmd))  # type: ignore[call-overload]
        handle = _optional(data, "handle", int, cmd)
        return cls(
            enabled=bool(_field(data, "enabled", bool, cmd)),
            api_major=int(_field(data, "api-major", int, cmd)),  # type: ignore[call-overload]
            api_minor=int(_field(data, "api-minor", int, cmd)),  # type: ignore[call-overload]
            build_id=int(_field(data, "build-id", int, cmd)),  # type: ignore[call-overload]
            state=state,
            sev_type=sev_type,
            policy=policy if sev_type == "sev" else None,
            snp_policy=policy if sev_type == "sev-snp" else None,
            handle=handle if isinstance(handle, int) else None,
        )


@dataclass(frozen=True)
class SevCapabilities:
    """`query-sev-capabilities` (libvirt: getSEVInfo): the platform's PDH and certificate chain
    (PEK || OCA || CEK), base64 as QEMU gives them, plus the C-bit position."""

    pdh_b64: str
    cert_chain_b64: str
    cbitpos: int
    reduced_phys_bits: int
    cpu0_id_b64: str | None = None

    @classmethod
    def from_qmp(cls, answer: object) -> SevCapabilities:
        cmd = "query-sev-capabilities"
        data = _mapping(answer, cmd)
        pdh = str(_field(data, "pdh", str, cmd))
        chain = str(_field(data, "cert-chain", str, cmd))
        decode_base64(pdh, "pdh", cmd)
        decode_base64(chain, "cert-chain", cmd)
        cpu0 = _optional(data, "cpu0-id", str, cmd)
        return cls(pdh_b64=pdh, cert_chain_b64=chain,
                   cbitpos=int(_field(data, "cbitpos", int, cmd)),  # type: ignore[call-overload]
                   reduced_phys_bits=int(_field(data, "reduced-phys-bits", int, cmd)),  # type: ignore[call-overload]
                   cpu0_id_b64=cpu0 if isinstance(cpu0, str) else None)


def parse_measurement(answer: object) -> LaunchMeasurement:
    """`query-sev-launch-measure` -> {"data": base64(measurement || mnonce)}."""
    from sevhook.sev.measurement import LaunchMeasurement  # noqa: PLC0415  (the hook's hot path: at measure only)

    cmd = "query-sev-launch-measure"
    data = _field(_mapping(answer, cmd), "data", str, cmd)
    try:
        return LaunchMeasurement.parse(str(data), what=f"{cmd} data")
    except FormatError as exc:
        raise MonitorProtocolError(exc.message, command=cmd) from exc


def parse_report(answer: object) -> bytes:
    """`query-sev-attestation-report` -> {"data": base64 report}; the raw report bytes."""
    cmd = "query-sev-attestation-report"
    return decode_base64(_field(_mapping(answer, cmd), "data", str, cmd), "data", cmd)


class LaunchMonitor(Protocol):
    """What the hook and `sevhook start` need from a paused SEV guest, whatever the transport.
    `timeout` bounds each following call, in seconds, where the transport allows it."""

    timeout: float

    def status(self) -> VmStatus: ...

    def query_sev(self) -> SevInfo: ...

    def launch_measurement(self) -> LaunchMeasurement: ...

    def capabilities(self) -> SevCapabilities: ...

    def inject_secret(self, header_b64: str, secret_b64: str, gpa: int | None = None) -> None: ...

    def cont(self) -> None: ...

    def stop(self) -> None: ...

    def attestation_report(self, mnonce: bytes) -> bytes: ...

    def close(self) -> None: ...
