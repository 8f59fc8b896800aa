"""The broker's HTTP API (FastAPI; the OpenAPI spec is at /openapi.json): two routers over the two
services, /v1/... for hosts (a bearer token per host) and /admin/... for the owner (the admin token).

Every error answer is `{"error": message, "reason": code}`. Request bodies are capped before they reach
the app. Authenticated requests are rate-limited per host (or the admin); requests without a valid token
are rate-limited per client address, so random tokens buy no extra requests. All database work runs in
worker threads (the host API in the database lanes of `lanes`, the admin API in `def` routes), so a
database waiting on a lock held by another process never stalls the event loop; /healthz and /readyz use
a pool of their own with a deadline."""

# No `from __future__ import annotations` here: FastAPI must evaluate the route signatures.
import asyncio
import functools
import inspect
import json
import logging
import re
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from sevhook import __version__
from sevhook.broker.admin import AdminService
from sevhook.broker.guards import BodyLimit, RateLimiter, replaying
from sevhook.broker.launch import LaunchService
from sevhook.broker.models import (
    ERRORS,
    HOST_PATTERN,
    ID_PATTERN,
    AttestationRequest,
    AuditEntry,
    ErrorBody,
    GuestBody,
    GuestRequest,
    HealthBody,
    HostBody,
    HostRequest,
    HostTokenBody,
    LaunchGrantBody,
    LaunchRequest,
    LaunchStatusBody,
    RootBody,
    RootRequest,
    SecretGrantBody,
)
from sevhook.broker.rules import GuestSpec, Refusal, decode_field
from sevhook.broker.service import Broker
from sevhook.broker.settings import Limits
from sevhook.broker.store import DatabaseFailure
from sevhook.broker.vault import token_digest, tokens_match
from sevhook.errors import SevhookError, VerificationError

log = logging.getLogger("sevhook.broker")
Model = TypeVar("Model", bound=BaseModel)

HEALTH_TIMEOUT = 2.0  # seconds a health check may take before it answers 503
# RFC 7235: the scheme is case-insensitive; then exactly one space and a token68, nothing else
_TOKEN68 = re.compile(r"[A-Za-z0-9._~+/-]+=*")
AUTH_FORMAT = "send 'Authorization: Bearer TOKEN' (one space between the scheme and the token, nothing else)"


def _error(status: int, reason: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message, "reason": reason}, status_code=status, headers=headers)


class StrictBearer(HTTPBearer):
    """The bearer token of a request, or None without an Authorization header. Strict about the
    syntax (a token68 after exactly one space) so that no two spellings name the same token; only the
    scheme's case is free, as RFC 7235 says. Keeps HTTPBearer's entry in the OpenAPI spec."""

    async def __call__(self, request: Request) -> str | None:  # type: ignore[override]
        return bearer_token(request.headers.get("authorization"))


def bearer_token(header: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header; None without a header, "" for a header
    that is present but malformed (a failed authentication that never reaches a lookup)."""
    if header is None:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not _TOKEN68.fullmatch(token):
        return ""
    return token


def _client(request: Request) -> str:
    return f"addr:{request.client.host if request.client else '?'}"


class Gate:
    """Authentication and rate limits for both routers."""

    def __init__(self, launch: LaunchService, admin_digest: str, limits: Limits) -> None:
        self.launch = launch
        self.admin_digest = admin_digest
        self.per_caller = RateLimiter(limits.rate, limits.burst)
        self.failures = RateLimiter(limits.auth_failure_rate, limits.auth_failure_burst)

    def _failed(self, request: Request, refusal: Refusal) -> Refusal:
        """Charge a failed authentication to the client's address; past its budget, answer 429."""
        if not self.failures.allow(_client(request)):
            return Refusal("rate-limited", "too many requests without a valid token from this address; slow down",
                           status=429)
        return refusal

    def _spend(self, caller: str) -> None:
        if not self.per_caller.allow(caller):
            raise Refusal("rate-limited", "too many requests for this token; slow down", status=429)

    async def host(self, request: Request, token: str | None) -> str:
        if not token:
            message = "send the host's token as 'Authorization: Bearer TOKEN'" if token is None else AUTH_FORMAT
            raise self._failed(request, Refusal("token-missing" if token is None else "token-invalid", message,
                                                status=401))
        digest = token_digest(token)
        host = self.launch.cached_host(digest)
        if host is None:
            if not self.launch.is_vouched(digest) and not self.failures.has_room(_client(request)):
                raise Refusal("rate-limited", "too many requests without a valid token from this address; slow "
                              "down", status=429)  # spend no database lookup on an address that keeps failing
            host = await self.launch.host_for_digest(digest)
        if host is None:
            raise self._failed(request, Refusal("token-invalid", "the bearer token is not a registered host's token",
                                                status=401))
        self._spend(f"host:{host}")
        return host

    def admin(self, request: Request, token: str | None) -> None:
        if not token:
            message = "send the admin token as 'Authorization: Bearer TOKEN'" if token is None else AUTH_FORMAT
            raise self._failed(request, Refusal("token-missing" if token is None else "token-invalid", message,
                                                status=401))
        if not tokens_match(token_digest(token), self.admin_digest):
            raise self._failed(request, Refusal("token-invalid", "the bearer token is not the broker's admin token",
                                                status=401))
        self._spend("admin")


def launch_router(launch: LaunchService, gate: Gate, bearer: StrictBearer) -> APIRouter:
    """The host API: sessions, attestation, launch status. The routes are coroutines: the service
    does their CPU work on the event loop and sends each database round trip to its lanes."""

    async def host_auth(request: Request, token: Annotated[str | None, Depends(bearer)]) -> str:
        return await gate.host(request, token)

    router = APIRouter(prefix="/v1", tags=["host"], responses=ERRORS)
    Host = Annotated[str, Depends(host_auth)]
    LaunchId = Annotated[str, Path(max_length=64, pattern="^[A-Za-z0-9-]+$")]

    @router.post("/launches", response_model=LaunchGrantBody)
    async def create_launch(body: LaunchRequest, host: Host) -> dict[str, Any]:
        """Verify the platform chain to a registered root and make a launch session for the guest."""
        return await launch.create_launch(host, body.guest, body.pdh, body.cert_chain, body.policy, body.cpu0_id)

    @router.post("/launches/{launch_id}/attestation", response_model=SecretGrantBody)
    async def attest(launch_id: LaunchId, body: AttestationRequest, host: Host) -> dict[str, str]:
        """Check the launch measurement; answer the wrapped secret or 403 with a reason code."""
        return await launch.attest(host, launch_id, body.measurement, body.api_major, body.api_minor,
                                   body.build_id, body.policy)

    @router.get("/launches/{launch_id}", response_model=LaunchStatusBody)
    async def launch_status(launch_id: LaunchId, host: Host) -> dict[str, Any]:
        return await launch.launch_status(host, launch_id)

    return router


def admin_router(admin: AdminService, gate: Gate, bearer: StrictBearer) -> APIRouter:
    """The owner's API: roots, hosts, guests, audit."""

    def admin_auth(request: Request, token: Annotated[str | None, Depends(bearer)]) -> None:
        gate.admin(request, token)

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(admin_auth)], responses=ERRORS)
    HostName = Annotated[str, Path(max_length=64, pattern=HOST_PATTERN)]
    GuestId = Annotated[str, Path(max_length=128, pattern=ID_PATTERN)]

    @router.post("/roots", response_model=RootBody)
    def add_root(body: RootRequest) -> dict[str, Any]:
        return admin.add_root(body.name, decode_field(body.ca, "ca"), test=body.test)

    @router.get("/roots", response_model=list[RootBody])
    def list_roots() -> list[dict[str, Any]]:
        return admin.list_roots()

    @router.post("/hosts", response_model=HostTokenBody)
    def add_host(body: HostRequest) -> dict[str, str]:
        return {"name": body.name, "token": admin.add_host(body.name)}

    @router.get("/hosts", response_model=list[HostBody])
    def list_hosts() -> list[dict[str, Any]]:
        return admin.list_hosts()

    @router.post("/hosts/{name}/revoke", response_model=HostBody)
    def revoke_host(name: HostName) -> dict[str, Any]:
        """Refuse the host's token from now on (403 host-revoked); the name stays taken."""
        admin.revoke_host(name)
        return admin.host(name)

    @router.post("/guests", response_model=GuestBody)
    def add_guest(body: GuestRequest) -> dict[str, Any]:
        return admin.add_guest(GuestSpec(
            guest_id=body.id,
            digests=tuple(bytes.fromhex(d) for d in body.digests),
            policies=tuple(body.policies),
            min_api=(body.min_api_major, body.min_api_minor),
            min_build=body.min_build,
            secrets=tuple((entry.guid, decode_field(entry.value, f"secrets[{entry.guid}]")) for entry in body.secrets),
            reusable=body.reusable,
        ))

    @router.get("/guests", response_model=list[GuestBody])
    def list_guests() -> list[dict[str, Any]]:
        return admin.list_guests()

    @router.get("/guests/{guest_id}", response_model=GuestBody)
    def get_guest(guest_id: GuestId) -> dict[str, Any]:
        return admin.guest(guest_id)

    @router.post("/guests/{guest_id}/revoke", response_model=GuestBody)
    def revoke_guest(guest_id: GuestId) -> dict[str, Any]:
        admin.revoke_guest(guest_id)
        return admin.guest(guest_id)

    @router.get("/audit", response_model=list[AuditEntry])
    def audit(limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              after: Annotated[int, Query(ge=0, le=2**62)] = 0,
              guest: Annotated[str | None, Query(max_length=128)] = None) -> list[dict[str, Any]]:
        return admin.audit_log(limit=limit, after_id=after, guest_id=guest)

    return router


class Health:
    """/healthz (a cheap read) and /readyz (a committed write), each answered within HEALTH_TIMEOUT
    from two threads of their own, so a stuck database or a full worker pool cannot hide from them.
    Probes that arrive while a check of the same kind runs share its outcome: a burst of probes (many
    load balancers, or many keep-alive connections polling at once) costs one check, not one each."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="sevhook-health")
        self._running: dict[str, asyncio.Future[BaseException | None]] = {}

    async def live(self) -> dict[str, str]:
        """Liveness: the database answers a read of a broker table."""
        return await self._probe(self.broker.check_read, "read")

    async def ready(self) -> dict[str, str]:
        """Readiness: the database commits a write (not read-only, not full, not locked)."""
        return await self._probe(self.broker.check_write, "write")

    async def _check_once(self, check: Callable[[], None]) -> BaseException | None:
        """None when the check passed within HEALTH_TIMEOUT, else why it did not."""
        try:
            await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(self._pool, check), HEALTH_TIMEOUT)
        except (TimeoutError, DatabaseFailure, DBAPIError) as exc:
            return exc
        return None

    def _forget(self, what: str, done: asyncio.Future[BaseException | None]) -> None:
        if self._running.get(what) is done:
            del self._running[what]

    async def _probe(self, check: Callable[[], None], what: str) -> dict[str, str]:
        shared = self._running.get(what)
        if shared is None or shared.get_loop() is not asyncio.get_running_loop():
            shared = self._running[what] = asyncio.ensure_future(self._check_once(check))
            shared.add_done_callback(functools.partial(self._forget, what))
        failure = await asyncio.shield(shared)  # a probe that goes away does not cancel the others' check
        if isinstance(failure, TimeoutError):
            raise Refusal("database-unavailable", f"the broker's database did not answer a {what} within "
                          f"{HEALTH_TIMEOUT:g} s", status=503) from failure
        if failure is not None:
            raise Refusal("database-unavailable", f"the broker's database failed a {what}", status=503) from failure
        return {"status": "ok"}


def health_router(health: Health) -> APIRouter:
    """/healthz and /readyz (see Health)."""
    router = APIRouter(tags=["service"], responses={503: {"model": ErrorBody}})

    @router.get("/healthz", response_model=HealthBody)
    async def healthz() -> dict[str, str]:
        """Liveness: the database answers a read of a broker table."""
        return await health.live()

    @router.get("/readyz", response_model=HealthBody)
    async def readyz() -> dict[str, str]:
        """Readiness: the database commits a write (not read-only, not full, not locked)."""
        return await health.ready()

    return router


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Refusal)
    async def refusal_handler(_request: Request, exc: Refusal) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        if exc.status in (429, 503):
            headers = {"Retry-After": "1"}
        return _error(exc.status, exc.reason, exc.message, headers)

    @app.exception_handler(VerificationError)
    async def storage_error_handler(_request: Request, exc: VerificationError) -> JSONResponse:
        # the services handle every check a caller can fail; this is a sealed row that does not open
        log.error("storage integrity: %s", exc.message)
        return _error(500, "storage-integrity", "a stored value failed its integrity check; nothing was released")

    @app.exception_handler(DatabaseFailure)
    async def database_failure_handler(_request: Request, exc: DatabaseFailure) -> JSONResponse:
        log.error("database failure: %s", exc.cause)
        return _error(503, "database-unavailable", "the broker's database failed; try again", {"Retry-After": "1"})

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


_ATTESTATION_PATH = re.compile(r"/v1/launches/([A-Za-z0-9-]{1,64})/attestation")  # LaunchId's rules
_JSON_TYPES = (None, "application/json")


class FastPath:
    """The calls a busy broker answers most (create a launch, attest, /healthz) go straight to their
    service, past FastAPI's routing and dependency solving, which took most of their CPU time. Only a
    well-formed request takes this path: a GET of /healthz, or a POST to the exact route path with a
    JSON body its model accepts. Anything else (another path or method, a bad launch id, content type
    or body) goes to the FastAPI route unchanged, which answers it as always. The same Gate, services
    and error handlers answer both ways, and the routes stay in the OpenAPI spec."""

    def __init__(self, app: FastAPI, launch: LaunchService, gate: Gate, health: Health) -> None:
        self.app = app
        self.launch = launch
        self.gate = gate
        self.health = health

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if scope["method"] == "GET" and path == "/healthz":
            await self._answer(scope, receive, send, self.health.live)
            return
        attestation = _ATTESTATION_PATH.fullmatch(path)
        if scope["method"] != "POST" or (attestation is None and path != "/v1/launches"):
            await self.app(scope, receive, send)
            return
        body = await _whole_body(receive)
        if body is None:  # the client went away
            return
        replay = replaying(body, receive)
        request = Request(scope, replay)
        call: Callable[[str], Awaitable[dict[str, Any]]] | None = None
        if attestation is not None:
            attest_body = _valid_body(request, body, AttestationRequest)
            if attest_body is not None:
                call = functools.partial(self._attest, attestation.group(1), attest_body)
        else:
            launch_body = _valid_body(request, body, LaunchRequest)
            if launch_body is not None:
                call = functools.partial(self._create, launch_body)
        if call is None:
            await self.app(scope, replay, send)
            return
        run = call

        async def authenticated() -> dict[str, Any]:
            return await run(await self.gate.host(request, bearer_token(request.headers.get("authorization"))))

        await self._answer(scope, replay, send, authenticated, request)

    async def _answer(self, scope: Scope, receive: Receive, send: Send,
                      handle: Callable[[], Awaitable[dict[str, Any]]], request: Request | None = None) -> None:
        """Send what `handle` returns as JSON, or the app's answer to what it raised."""
        try:
            response: Response = JSONResponse(await handle())
        except Exception as exc:  # noqa: BLE001  (answered by the app's own handler for its type)
            response = await self._handled(request or Request(scope, receive), exc)
        await response(scope, receive, send)

    async def _attest(self, launch_id: str, body: AttestationRequest, host: str) -> dict[str, Any]:
        return await self.launch.attest(host, launch_id, body.measurement, body.api_major, body.api_minor,
                                        body.build_id, body.policy)

    async def _create(self, body: LaunchRequest, host: str) -> dict[str, Any]:
        return await self.launch.create_launch(host, body.guest, body.pdh, body.cert_chain, body.policy, body.cpu0_id)

    async def _handled(self, request: Request, exc: Exception) -> Response:
        """The answer the app's exception handler for this type (or its nearest base) gives."""
        for kind in type(exc).__mro__:
            handler = self.app.exception_handlers.get(kind)
            if handler is not None:
                answer = handler(request, exc)
                return await answer if inspect.isawaitable(answer) else answer  # type: ignore[no-any-return]
        raise exc


async def _whole_body(receive: Receive) -> bytes | None:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _valid_body(request: Request, body: bytes, model: type[Model]) -> Model | None:
    """The body as `model` when it is JSON the model accepts (parsed as FastAPI parses it); None otherwise."""
    if request.headers.get("content-type") not in _JSON_TYPES:
        return None
    try:
        return model.model_validate(json.loads(body))
    except (ValueError, ValidationError):  # json's errors are ValueErrors (UnicodeDecodeError too)
        return None


def create_app(broker: Broker, admin_digest: str, limits: Limits = Limits()) -> FastAPI:
    """The ASGI app for one broker; `admin_digest` is the SHA-256 of the admin token."""
    app = FastAPI(
        title="sevhook key broker",
        version=__version__,
        description="Releases SEV launch secrets to hosts whose guests measured as the owner registered.",
    )
    _install_error_handlers(app)
    gate = Gate(broker.launch, admin_digest, limits)
    bearer = StrictBearer(auto_error=False, description="per-host token (/v1) or the admin token (/admin)")
    health = Health(broker)
    app.include_router(health_router(health))
    app.include_router(launch_router(broker.launch, gate, bearer))
    app.include_router(admin_router(broker.admin, gate, bearer))
    app.state.fast_path = FastPath(app, broker.launch, gate, health)
    return app


def wrap_limits(app: FastAPI, limits: Limits) -> Callable[[Scope, Receive, Send], Awaitable[None]]:
    """The app behind the host API's fast path and the body-size cap (outermost, so nothing reads an
    oversized body)."""
    return BodyLimit(app.state.fast_path, limits.max_body)
