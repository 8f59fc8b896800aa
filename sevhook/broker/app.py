"""The broker's HTTP API (FastAPI; the OpenAPI spec is at /openapi.json).

/v1/... is the host API (a bearer token per host); /admin/... is the owner's API (the admin token).
Every error answer is `{"error": message, "reason": code}`. Request bodies are capped before they
reach the app, and each token (or client address, without a token) has a token-bucket rate limit."""

# No `from __future__ import annotations` here: FastAPI must evaluate the route signatures, which name
# dependencies defined inside create_app.
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

from fastapi import Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sevhook import __version__
from sevhook.broker.service import GUEST_ID_PATTERN, NAME_PATTERN, REASONS, Broker, GuestSpec, Refusal
from sevhook.broker.vault import token_digest, tokens_match
from sevhook.errors import SevhookError, VerificationError

log = logging.getLogger("sevhook.broker")

T = TypeVar("T")
DEFAULT_MAX_BODY = 64 * 1024
MAX_POLICY = 0xFFFF_FFFF
ID_PATTERN = GUEST_ID_PATTERN.pattern
HOST_PATTERN = NAME_PATTERN.pattern


@dataclass(frozen=True)
class Limits:
    max_body: int = DEFAULT_MAX_BODY
    rate: float = 100.0  # requests per second per token; 0 disables
    burst: int = 200


# ---- wire models ------------------------------------------------------------------------------

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
    code: {"model": ErrorBody} for code in (400, 401, 403, 404, 413, 422, 429)
}


# ---- limits -----------------------------------------------------------------------------------

class RateLimiter:
    """Token buckets keyed by token hash (or client address); bounded memory, thread-safe."""

    def __init__(self, rate: float, burst: int, max_keys: int = 10000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str) -> bool:
        if self.rate <= 0:
            return True
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[key] = (tokens - 1.0 if allowed else tokens, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        return allowed


class BodyLimit:
    """Reads at most `limit` body bytes before the app sees the request; more gives 413."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = self.limit + 1
                if declared > self.limit:
                    await self._too_large(send)
                    return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._too_large(send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send) -> None:
        payload = json.dumps({"error": f"request body larger than {self.limit} bytes",
                              "reason": "body-too-large"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(payload)).encode()), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": payload})


# ---- the application ----------------------------------------------------------------------------

def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


def create_app(broker: Broker, admin_digest: str, limits: Limits = Limits()) -> FastAPI:
    """The ASGI app for one broker; `admin_digest` is the SHA-256 of the admin token."""
    app = FastAPI(
        title="sevhook key broker",
        version=__version__,
        description="Releases SEV launch secrets to hosts whose guests measured as the owner registered.",
    )
    limiter = RateLimiter(limits.rate, limits.burst)
    bearer = HTTPBearer(auto_error=False, description="per-host token (/v1) or the admin token (/admin)")

    @app.exception_handler(Refusal)
    async def refusal_handler(_request: Request, exc: Refusal) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status == 429:
            headers = {"Retry-After": "1"}
        return _error(exc.status, exc.reason, exc.message, headers)

    @app.exception_handler(VerificationError)
    async def storage_error_handler(_request: Request, exc: VerificationError) -> JSONResponse:
        # the service handles every check a caller can fail; this is a sealed row that does not open
        log.error("storage integrity: %s", exc.message)
        return _error(500, "storage-integrity", "a stored value failed its integrity check; nothing was released")

    @app.exception_handler(SevhookError)
    async def sevhook_error_handler(_request: Request, exc: SevhookError) -> JSONResponse:
        return _error(400, "bad-request", exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_handler(_request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in error.get('loc', ()))}: {error.get('msg', 'invalid')}"
            for error in exc.errors()[:5]
        )
        return _error(422, "bad-request", problems or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error_handler(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        reason = {404: "not-found", 405: "method-not-allowed"}.get(exc.status_code, f"http-{exc.status_code}")
        return _error(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(DBAPIError)
    async def database_error_handler(_request: Request, exc: DBAPIError) -> JSONResponse:
        log.error("database error: %s", exc.orig.__class__.__name__ if exc.orig else exc.__class__.__name__)
        return _error(503, "database-unavailable", "the broker's database failed; try again", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def internal_error_handler(_request: Request, exc: Exception) -> JSONResponse:
        log.error("internal error: %s", exc.__class__.__name__)  # no message: it could quote a value
        return _error(500, "internal", "internal broker error; see the broker's log")

    # The auth dependencies run on the event loop (no thread hop): the token lookup is cached and, on a
    # miss, one indexed query.
    def credentials_key(request: Request, credentials: HTTPAuthorizationCredentials | None) -> str | None:
        digest = token_digest(credentials.credentials) if credentials else None
        if not limiter.allow(digest or f"addr:{request.client.host if request.client else '?'}"):
            raise Refusal("rate-limited", "too many requests for this token; slow down", status=429)
        return digest

    async def host_auth(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                                  Depends(bearer)]) -> str:
        credentials_key(request, credentials)
        if credentials is None:
            raise Refusal("token-missing", "send the host's token as 'Authorization: Bearer TOKEN'", status=401)
        host = broker.host_for_token(credentials.credentials)
        if host is None:
            raise Refusal("token-invalid", "the bearer token is not a registered host's token", status=401)
        return host

    async def admin_auth(request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None,
                                                                   Depends(bearer)]) -> None:
        digest = credentials_key(request, credentials)
        if digest is None:
            raise Refusal("token-missing", "send the admin token as 'Authorization: Bearer TOKEN'", status=401)
        if not tokens_match(digest, admin_digest):
            raise Refusal("token-invalid", "the bearer token is not the broker's admin token", status=401)

    async def run(function: Callable[..., T], *args: Any) -> T:
        """The host API's work: inline for SQLite (CPU-bound, one writer at a time: a worker thread
        would only add GIL hand-offs), in the thread pool for a database reached over the network."""
        if inline:
            return function(*args)
        return await run_in_threadpool(function, *args)

    inline = broker.engine.dialect.name == "sqlite"
    Host = Annotated[str, Depends(host_auth)]
    LaunchId = Annotated[str, Path(max_length=64, pattern="^[A-Za-z0-9-]+$")]

    @app.get("/healthz", tags=["service"], responses={503: {"model": ErrorBody}})
    def health() -> dict[str, str]:
        """Readiness: the database answers."""
        try:
            with broker.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception:  # noqa: BLE001 - any database failure means not ready
            raise Refusal("database-unavailable", "the broker's database does not answer", status=503) from None
        return {"status": "ok"}

    @app.post("/v1/launches", tags=["host"], response_model=LaunchGrantBody, responses=ERRORS)
    async def create_launch(body: LaunchRequest, host: Host) -> dict[str, Any]:
        """Verify the platform chain to a registered root and make a launch session for the guest."""
        return await run(broker.create_launch, host, body.guest, body.pdh, body.cert_chain, body.policy, body.cpu0_id)

    @app.post("/v1/launches/{launch_id}/attestation", tags=["host"], response_model=SecretGrantBody,
              responses=ERRORS)
    async def attest(launch_id: LaunchId, body: AttestationRequest, host: Host) -> dict[str, str]:
        """Check the launch measurement; answer the wrapped secret or 403 with a reason code."""
        return await run(broker.attest, host, launch_id, body.measurement, body.api_major, body.api_minor, body.build_id,
                             body.policy)

    @app.get("/v1/launches/{launch_id}", tags=["host"], response_model=LaunchStatusBody, responses=ERRORS)
    def launch_status(launch_id: LaunchId, host: Host) -> dict[str, Any]:
        return broker.launch_status(host, launch_id)

    admin = [Depends(admin_auth)]

    @app.post("/admin/roots", tags=["admin"], dependencies=admin, response_model=RootBody, responses=ERRORS)
    def add_root(body: RootRequest) -> dict[str, Any]:
        return broker.add_root(body.name, _decode(body.ca, "ca"), test=body.test)

    @app.get("/admin/roots", tags=["admin"], dependencies=admin, response_model=list[RootBody], responses=ERRORS)
    def list_roots() -> list[dict[str, Any]]:
        return broker.list_roots()

    @app.post("/admin/hosts", tags=["admin"], dependencies=admin, response_model=HostTokenBody, responses=ERRORS)
    def add_host(body: HostRequest) -> dict[str, str]:
        return {"name": body.name, "token": broker.add_host(body.name)}

    @app.get("/admin/hosts", tags=["admin"], dependencies=admin, response_model=list[HostBody], responses=ERRORS)
    def list_hosts() -> list[dict[str, Any]]:
        return broker.list_hosts()

    @app.post("/admin/hosts/{name}/revoke", tags=["admin"], dependencies=admin, response_model=HostBody,
              responses=ERRORS)
    def revoke_host(name: Annotated[str, Path(max_length=64, pattern=HOST_PATTERN)]) -> dict[str, Any]:
        """Refuse the host's token from now on (403 host-revoked); the name stays taken."""
        broker.revoke_host(name)
        return broker.host(name)

    @app.post("/admin/guests", tags=["admin"], dependencies=admin, response_model=GuestBody, responses=ERRORS)
    def add_guest(body: GuestRequest) -> dict[str, Any]:
        spec = GuestSpec(
            guest_id=body.id,
            digests=tuple(bytes.fromhex(d) for d in body.digests),
            policies=tuple(body.policies),
            min_api=(body.min_api_major, body.min_api_minor),
            min_build=body.min_build,
            secrets=tuple((entry.guid, _decode(entry.value, f"secrets[{entry.guid}]")) for entry in body.secrets),
            reusable=body.reusable,
        )
        return broker.add_guest(spec)

    @app.get("/admin/guests", tags=["admin"], dependencies=admin, response_model=list[GuestBody],
             responses=ERRORS)
    def list_guests() -> list[dict[str, Any]]:
        return broker.list_guests()

    @app.get("/admin/guests/{guest_id}", tags=["admin"], dependencies=admin, response_model=GuestBody,
             responses=ERRORS)
    def get_guest(guest_id: Annotated[str, Path(max_length=128, pattern=ID_PATTERN)]) -> dict[str, Any]:
        return broker.guest(guest_id)

    @app.post("/admin/guests/{guest_id}/revoke", tags=["admin"], dependencies=admin, response_model=GuestBody,
              responses=ERRORS)
    def revoke_guest(guest_id: Annotated[str, Path(max_length=128, pattern=ID_PATTERN)]) -> dict[str, Any]:
        broker.revoke_guest(guest_id)
        return broker.guest(guest_id)

    @app.get("/admin/audit", tags=["admin"], dependencies=admin, response_model=list[AuditEntry],
             responses=ERRORS)
    def audit(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              after: Annotated[int, Query(ge=0, le=2**62)] = 0,
              guest: Annotated[str | None, Query(max_length=128)] = None) -> list[dict[str, Any]]:
        return broker.audit_log(limit=limit, after_id=after, guest_id=guest)

    return app


def _decode(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise Refusal("bad-request", f"{what}: not valid base64", status=400) from None


def wrap_limits(app: FastAPI, limits: Limits) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The app behind the body-size cap (outermost, so nothing reads an oversized body)."""
    return BodyLimit(app, limits.max_body)
