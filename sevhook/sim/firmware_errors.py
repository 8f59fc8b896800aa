"""SEV firmware return codes (sev_ret_code) and the error the simulated firmware raises with them."""

from __future__ import annotations

import enum

from sevhook.errors import SevhookError


class SevStatus(enum.IntEnum):
    SUCCESS = 0x00
    INVALID_PLATFORM_STATE = 0x01
    INVALID_GUEST_STATE = 0x02
    INVALID_CONFIG = 0x03
    INVALID_LEN = 0x04
    ALREADY_OWNED = 0x05
    INVALID_CERTIFICATE = 0x06
    POLICY_FAILURE = 0x07
    INACTIVE = 0x08
    INVALID_ADDRESS = 0x09
    BAD_SIGNATURE = 0x0A
    BAD_MEASUREMENT = 0x0B
    ASID_OWNED = 0x0C
    INVALID_ASID = 0x0D
    WBINVD_REQUIRED = 0x0E
    DFFLUSH_REQUIRED = 0x0F
    INVALID_GUEST = 0x10
    INVALID_COMMAND = 0x11
    ACTIVE = 0x12
    HWERROR_PLATFORM = 0x13
    HWERROR_UNSAFE = 0x14
    UNSUPPORTED = 0x15
    INVALID_PARAM = 0x16
    RESOURCE_LIMIT = 0x17
    SECURE_DATA_INVALID = 0x18


# The short descriptions QEMU prints beside fw_error (target/i386/sev.c keeps one per code).
STATUS_TEXT = {
    SevStatus.INVALID_PLATFORM_STATE: "Platform state is invalid",
    SevStatus.INVALID_GUEST_STATE: "Guest state is invalid",
    SevStatus.INVALID_CONFIG: "Platform configuration is invalid",
    SevStatus.INVALID_LEN: "Buffer too small",
    SevStatus.ALREADY_OWNED: "Platform is already owned",
    SevStatus.INVALID_CERTIFICATE: "Certificate is invalid",
    SevStatus.POLICY_FAILURE: "Policy is not allowed",
    SevStatus.INACTIVE: "Guest is not active",
    SevStatus.INVALID_ADDRESS: "Invalid address",
    SevStatus.BAD_SIGNATURE: "Bad signature",
    SevStatus.BAD_MEASUREMENT: "Bad measurement",
    SevStatus.ASID_OWNED: "ASID is already owned",
    SevStatus.INVALID_ASID: "Invalid ASID",
    SevStatus.WBINVD_REQUIRED: "WBINVD is required",
    SevStatus.DFFLUSH_REQUIRED: "DF_FLUSH is required",
    SevStatus.INVALID_GUEST: "Guest handle is invalid",
    SevStatus.INVALID_COMMAND: "Invalid command",
    SevStatus.ACTIVE: "Guest is active",
    SevStatus.HWERROR_PLATFORM: "Hardware error",
    SevStatus.HWERROR_UNSAFE: "Hardware unsafe",
    SevStatus.UNSUPPORTED: "Feature not supported",
    SevStatus.INVALID_PARAM: "Invalid parameter",
    SevStatus.RESOURCE_LIMIT: "Required firmware resource depleted",
    SevStatus.SECURE_DATA_INVALID: "Part-specific integrity check failure",
}


class FirmwareError(SevhookError):
    """A simulated firmware command failed with a SEV return code; `detail` says why (never a secret)."""

    def __init__(self, command: str, status: int, detail: str, lengths: tuple[int, ...] = ()) -> None:
        self.command = command
        self.status = SevStatus(status)
        self.detail = detail
        self.lengths = lengths  # INVALID_LEN: the buffer sizes the caller must supply
        super().__init__(f"{command}: fw_error={int(status)} {self.status.name} ({detail})")

    @property
    def fw_error(self) -> int:
        return int(self.status)

    @property
    def text(self) -> str:
        return STATUS_TEXT.get(self.status, self.status.name)
