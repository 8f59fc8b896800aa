"""The broker's wire format: request and answer bodies of the host API (/v1) and the admin API (/admin),
with the bounds every field is validated against before a service sees it. FastAPI builds the
OpenAPI spec from them."""

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, Field

from sevhook.broker.rules import GUEST_ID_PATTERN, NAME_PATTERN, REASONS

MAX_POLICY = 0xFFFF_FFFF
ID_PATTERN = GUEST_ID_PATTERN.pattern
HOST_PATTERN = NAME_PATTERN.pattern


class ErrorBody(BaseModel):
    error: str = Field(description="what went wrong, for a person")
    reason: str = Field(description="stable machine-readable reason code: " + "; ".join(
        f"{code} ({meaning})" for code, meaning in REASONS.items()))


class LaunchRequest(BaseModel):
    guest: str = Field(pattern=ID_PATTERN, max_length=128, description="the guest id the owner registered")
    pdh: str = Field(max_length=4096, description="base64 PDH certificate (QMP query-sev-capabilities 'pdh')")
    cert_chain: str = Field(max_length=32768, description="base64 PEK|OCA|CEK (QMP 'cert-chain') or a full "
                            "PDH|PEK|OCA|CEK|ASK|ARK chain")
    policy: int | None = Field(default=None, ge=0, le=MAX_POLICY,
                               description="requested policy; must be allowed; default: the guest's first")
    cpu0_id: str | None = Field(default=None, max_length=512, description="base64 chip id (QMP 'cpu0-id', GET_ID): "
                                "lets the broker fetch the ASK-signed CEK that the firmware's export lacks")


class LaunchGrantBody(BaseModel):
    launch_id: str
    godh: str = Field(description="base64 GODH certificate for QEMU dh-cert-file")
    session: str = Field(description="base64 128-byte session blob for QEMU session-file")
    policy: int


class AttestationRequest(BaseModel):
    measurement: str = Field(max_length=128, description="base64 of measurement(32)|mnonce(16) from "
                             "query-sev-launch-measure")
    api_major: int = Field(ge=0, le=255)
    api_minor: int = Field(ge=0, le=255)
    build_id: int = Field(ge=0, le=255)
    policy: int = Field(ge=0, le=MAX_POLICY)


class SecretGrantBody(BaseModel):
    secret_header: str = Field(description="base64 52-byte LAUNCH_SECRET packet header")
    secret: str = Field(description="base64 encrypted secret table")


class LaunchStatusBody(BaseModel):
    launch_id: str
    guest: str
    state: str = Field(description="created | released | failed | expired")
    policy: int
    attestations: int
    created_at: float
    finished_at: float | None


class RootRequest(BaseModel):
    name: str = Field(pattern=HOST_PATTERN, max_length=64)
    ca: str = Field(max_length=16384, description="base64 ASK|ARK bundle (AMD ask_ark_<gen>.cert format)")
    test: bool = Field(default=False, description="trust a non-AMD root (e.g. a software platform's) by name")


class RootBody(BaseModel):
    name: str
    test: bool
    ark_key_id: str


class HostRequest(BaseModel):
    name: str = Field(pattern=HOST_PATTERN, max_length=64)


class HostTokenBody(BaseModel):
    name: str
    token: str = Field(description="the host's bearer token; shown once, stored only as a hash")


class HostBody(BaseModel):
    name: str
    revoked: bool
    created_at: float


class SecretEntry(BaseModel):
    guid: uuid.UUID
    value: str = Field(max_length=8192, description="base64 secret value")


class GuestRequest(BaseModel):
    id: str = Field(pattern=ID_PATTERN, max_length=128)
    digests: list[Annotated[str, Field(pattern="^[0-9a-fA-F]{64}$")]] = Field(min_length=1, max_length=64)
    policies: list[Annotated[int, Field(ge=0, le=MAX_POLICY)]] = Field(min_length=1, max_length=32)
    min_api_major: int = Field(default=0, ge=0, le=255)
    min_api_minor: int = Field(default=0, ge=0, le=255)
    min_build: int = Field(default=0, ge=0, le=255)
    secrets: list[SecretEntry] = Field(default_factory=list, max_length=32)
    reusable: bool = False


class DigestBody(BaseModel):
    digest: str
    label: str


class GuestBody(BaseModel):
    id: str
    digests: list[DigestBody]
    policies: list[int]
    min_api: str
    min_build: int
    reusable: bool
    revoked: bool
    secret_guids: list[str]


class AuditEntry(BaseModel):
    id: int
    at: float
    actor: str
    action: str
    guest_id: str | None
    launch_id: str | None
    decision: str
    reason: str
    measurement: str | None
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429, 503)
}


class HealthBody(BaseModel):
    status: str = Field(description="ok")
