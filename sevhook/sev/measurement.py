"""The LAUNCH_MEASURE result: HMAC-SHA256 under the TIK over the platform version, policy, launch
digest and a firmware nonce. QEMU and libvirt report base64(measurement(32) || mnonce(16))."""

from __future__ import annotations

import base64
import hmac
import struct
from dataclasses import dataclass

from sevhook.encoding import decode_base64
from sevhook.errors import FormatError

MEASUREMENT_SIZE = 32
MNONCE_SIZE = 16
LAUNCH_MEASUREMENT_SIZE = MEASUREMENT_SIZE + MNONCE_SIZE
DIGEST_SIZE = 32
MEASURE_CONTEXT = 0x04
_HEADER = struct.Struct("<BBBBI")
_POLICY = struct.Struct("<I")


def uses_versioned_form(api_major: int, api_minor: int) -> bool:
    """API 0.17 added the context byte, API version and build to the MACed message."""
    return (api_major, api_minor) >= (0, 17)


def measurement_message(
    api_major: int, api_minor: int, build_id: int, policy: int, launch_digest: bytes, mnonce: bytes
) -> bytes:
    """0x04 || major || minor || build || policy(u32 LE) || LD || MNONCE; without the first four
    bytes before API 0.17."""
    if len(launch_digest) != DIGEST_SIZE:
        raise FormatError(f"launch digest: {len(launch_digest)} bytes, expected {DIGEST_SIZE} (SHA-256)")
    if len(mnonce) != MNONCE_SIZE:
        raise FormatError(f"mnonce: {len(mnonce)} bytes, expected {MNONCE_SIZE}")
    try:
        if uses_versioned_form(api_major, api_minor):
            head = _HEADER.pack(MEASURE_CONTEXT, api_major, api_minor, build_id, policy)
        else:
            head = _POLICY.pack(policy)
    except struct.error as exc:
        raise FormatError(
            f"api {api_major}.{api_minor}, build {build_id} or policy {policy:#x} out of range "
            "(api and build are bytes, the policy is 32 bits)"
        ) from exc
    return head + launch_digest + mnonce


def compute_measurement(
    tik: bytes, api_major: int, api_minor: int, build_id: int, policy: int, launch_digest: bytes, mnonce: bytes
) -> bytes:
    """The 32-byte measurement the firmware returns for these inputs."""
    message = measurement_message(api_major, api_minor, build_id, policy, launch_digest, mnonce)
    return hmac.digest(tik, message, "sha256")


@dataclass(frozen=True)
class LaunchMeasurement:
    """`sev_measure_buf`: the 32-byte measurement and the 16-byte firmware nonce."""

    measurement: bytes
    mnonce: bytes

    @classmethod
    def parse(cls, data: bytes | str, what: str = "launch measurement") -> LaunchMeasurement:
        """Accept the 48 raw bytes or their base64 text (as QEMU/libvirt print it)."""
        if isinstance(data, str) or len(data) != LAUNCH_MEASUREMENT_SIZE:
            text = data if isinstance(data, str) else bytes(data).decode("latin-1")
            try:
                data = decode_base64(text) if text.strip() else b""  # empty: the length message below
            except FormatError as exc:
                raise FormatError(f"{what}: not valid base64: {exc.message} (expected base64 of 48 bytes)") from exc
        if len(data) != LAUNCH_MEASUREMENT_SIZE:
            raise FormatError(
                f"{what}: {len(data)} bytes, expected {LAUNCH_MEASUREMENT_SIZE} (measurement 32 + mnonce 16)"
            )
        return cls(bytes(data[:MEASUREMENT_SIZE]), bytes(data[MEASUREMENT_SIZE:]))

    def to_bytes(self) -> bytes:
        return self.measurement + self.mnonce

    @property
    def b64(self) -> str:
        return base64.b64encode(self.to_bytes()).decode()


def verify_measurement(
    launch_measurement: LaunchMeasurement | bytes | str,
    tik: bytes,
    api_major: int,
    api_minor: int,
    build_id: int,
    policy: int,
    launch_digest: bytes,
) -> bool:
    """True when the reported measurement matches the expected inputs (constant-time compare).
    `launch_measurement` may also be the 48 raw bytes or their base64 text."""
    if not isinstance(launch_measurement, LaunchMeasurement):
        launch_measurement = LaunchMeasurement.parse(launch_measurement)
    expected = compute_measurement(
        tik, api_major, api_minor, build_id, policy, launch_digest, launch_measurement.mnonce
    )
    return hmac.compare_digest(expected, launch_measurement.measurement)
