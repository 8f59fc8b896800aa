"""The broker's decisions, independent of HTTP: verify a platform chain against the registered roots,
create launch sessions, and decide whether a reported measurement earns the guest's secret.

Every decision writes an audit row (with the measurement as sent and the reason). A single-use
launch moves out of state 'created' by a conditional UPDATE whose row count decides who won, so two
replicas on one database cannot both release it; any refused attestation also spends it."""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine, bindparam, insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sevhook.broker import db
from sevhook.broker.vault import Vault, new_token, token_digest
from sevhook.encoding import decode_base64
from sevhook.errors import FormatError, SevhookError, UsageError
from sevhook.sev.certs import AmdCertificate, SevCertificate, Usage, parse_ca_bundle
from sevhook.sev.chain import CertificateChain, verify_chain
from sevhook.sev.measurement import LaunchMeasurement, verify_measurement
from sevhook.sev.policy import SevPolicy
from sevhook.sev.roots import TrustAnchor, pinned_root
from sevhook.sev.secret import SECRET_AREA_SIZE, SecretTable, wrap_secret
from sevhook.sev.session import create_session

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,63}$")
GUEST_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")
SEV_CERT_SIZE = 2084
QMP_CHAIN_SIZE = 3 * SEV_CERT_SIZE
DEFAULT_LAUNCH_TTL = 3600.0
CHAIN_CACHE_SIZE = 1024

# The stable reason codes of refused host requests (also listed in the OpenAPI spec and docs/broker.md).
REASONS = {
    "measurement-mismatch": "the measurement matches none of the guest's allowed launch digests",
    "policy-not-allowed": "the policy is not one of the guest's allowed policies",
    "policy-mismatch": "the reported policy differs from the one the launch session was made for",
    "debug-not-allowed": "the policy allows debugging but the guest forbids it",
    "launch-used": "this single-use launch has already had its attestation decided",
    "launch-expired": "the launch is older than the broker's launch lifetime; create a new one",
    "firmware-too-old": "the platform's SEV API version is below the guest's minimum",
    "build-too-old": "the platform's firmware build is below the guest's minimum",
    "unknown-guest": "no such guest is registered",
    "unknown-host": "no such host is registered (admin API)",
    "guest-revoked": "the guest has been revoked by its owner",
    "chain-invalid": "the platform certificate chain does not verify",
    "unknown-root": "the chain does not lead to a registered root (ARK)",
    "unknown-launch": "no such launch for this host",
    "token-missing": "no bearer token was sent",
    "token-invalid": "the bearer token is not a registered host's (or the admin) token",
    "host-revoked": "the host's token has been revoked by the owner (sevhook broker revoke-host)",
    "bad-request": "malformed base64, wrong sizes or fields out of range",
    "body-too-large": "the request body exceeds the broker's limit",
    "rate-limited": "too many requests for this token; retry after the Retry-After delay",
    "database-unavailable": "the broker's database failed; retry later",
    "not-found": "no such API path",
    "method-not-allowed": "the path does not take this HTTP method",
    "internal": "an unexpected broker error (a bug); see the broker's log",
    "storage-integrity": "a sealed value in the database does not open (wrong storage key or tampered row)",
}


class Refusal(SevhookError):
    """A decision against the caller, with a stable reason code and an HTTP status."""

    def __init__(self, reason: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True)
class GuestSpec:
    """What the owner registers for a guest; secrets are (GUID, value) pairs released as one table."""

    guest_id: str
    digests: tuple[bytes, ...]
    policies: tuple[int, ...]
    min_api: tuple[int, int] = (0, 0)
    min_build: int = 0
    secrets: tuple[tuple[uuid.UUID, bytes], ...] = field(default=(), repr=False)
    reusable: bool = False
    digest_labels: tuple[str, ...] = ()

    def check(self) -> None:
        if not GUEST_ID_PATTERN.match(self.guest_id):
            raise UsageError(f"guest id {self.guest_id!r}: use 1-128 letters, digits and . _ : @ - "
                             "(starting with a letter or digit)")
        if not self.digests:
            raise UsageError(f"guest {self.guest_id}: give at least one launch digest (--digest or firmware inputs)")
        for digest in self.digests:
            if len(digest) != 32:
                raise UsageError(f"guest {self.guest_id}: a launch digest is {len(digest)} bytes, expected 32 (SHA-256)")
        if not self.policies:
            raise UsageError(f"guest {self.guest_id}: give at least one allowed policy (--policy)")
        for policy in self.policies:
            SevPolicy(policy)
        if not (0 <= self.min_api[0] <= 255 and 0 <= self.min_api[1] <= 255 and 0 <= self.min_build <= 255):
            raise UsageError(f"guest {self.guest_id}: minimum API parts and build must each be 0..255")
        guids = [guid for guid, _ in self.secrets]
        if len(set(guids)) != len(guids):
            raise UsageError(f"guest {self.guest_id}: a secret GUID is given twice")
        size = len(SecretTable(tuple(self.secrets)).build())
        if size > SECRET_AREA_SIZE:
            raise UsageError(f"guest {self.guest_id}: the secret table is {size} bytes; OVMF's secret area holds "
                             f"{SECRET_AREA_SIZE} (use smaller or fewer secrets)")


@dataclass(frozen=True)
class VerifiedPlatform:
    pdh: SevCertificate
    root: str


class _ChainCache:
    """Remembers chains that verified (by hash of the chain and the root's certificates), so a host
    starting many guests pays for the signature checks once. Only successes are cached."""

    def __init__(self, size: int = CHAIN_CACHE_SIZE) -> None:
        self._size = size
        self._entries: OrderedDict[bytes, str] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> str | None:
        with self._lock:
            root = self._entries.get(key)
            if root is not None:
                self._entries.move_to_end(key)
            return root

    def put(self, key: bytes, root: str) -> None:
        with self._lock:
            self._entries[key] = root
            self._entries.move_to_end(key)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)


def _b64(text: str, what: str) -> bytes:
    try:
        return decode_base64(text)
    except FormatError as exc:
        raise Refusal("bad-request", f"{what}: not valid base64 ({exc.message})", status=400) from None


def _debug_allowed(policy: int) -> bool:
    return SevPolicy(policy).debug_allowed


def _policy_refusal(policy: int, allowed: Iterable[int]) -> Refusal | None:
    allowed = list(allowed)
    if policy in allowed:
        return None
    if _debug_allowed(policy) and not any(_debug_allowed(p) for p in allowed):
        return Refusal("debug-not-allowed", f"policy {policy:#x} allows debugging (NODBG clear); "
                       f"guest allows only {', '.join(f'{p:#x}' for p in allowed)}")
    return Refusal("policy-not-allowed", f"policy {policy:#x} is not allowed for this guest "
                   f"(allowed: {', '.join(f'{p:#x}' for p in allowed)})")


# Statements built once; each call only binds parameters (the hot paths run thousands of times a second).
_AUDIT_INSERT = insert(db.audit)
_LAUNCH_INSERT = insert(db.launches)
_HOST_BY_TOKEN = select(db.hosts.c.name, db.hosts.c.revoked).where(db.hosts.c.token_sha256 == bindparam("digest"))
_GUEST_BY_ID = select(db.guests).where(db.guests.c.id == bindparam("guest_id"))
_LAUNCH_BY_ID = select(db.launches).where(db.launches.c.id == bindparam("launch_id"))
_LAUNCH_WITH_RULES = (
    select(db.launches, db.guests.c.revoked.label("guest_revoked"), db.guests.c.policies,
           db.guests.c.min_api_major, db.guests.c.min_api_minor, db.guests.c.min_build, db.guests.c.reusable)
    .select_from(db.launches.outerjoin(db.guests, db.guests.c.id == db.launches.c.guest_id))
    .where(db.launches.c.id == bindparam("launch_id"))
)
_DIGESTS_OF = select(db.digests.c.digest).where(db.digests.c.guest_id == bindparam("guest_id"))
_SECRETS_OF = (select(db.secrets.c.guid, db.secrets.c.value_sealed)
               .where(db.secrets.c.guest_id == bindparam("guest_id")).order_by(db.secrets.c.id))
_ROOTS = select(db.roots).order_by(db.roots.c.name)
_CLAIM_SINGLE_USE = (update(db.launches)
                     .where(db.launches.c.id == bindparam("launch_id"), db.launches.c.state == "created")
                     .values(state=bindparam("new_state"), finished_at=bindparam("now"),
                             attestations=db.launches.c.attestations + 1))
_COUNT_REUSE = (update(db.launches)
                .where(db.launches.c.id == bindparam("launch_id"), db.launches.c.state == "created")
                .values(attestations=db.launches.c.attestations + 1))
CACHE_SECONDS = 2.0


@dataclass(frozen=True)
class GuestMaterial:
    """A guest's launch digests and sealed secrets (changed only by `update-guest`)."""

    digests: tuple[bytes, ...]
    secrets: tuple[tuple[str, bytes], ...] = field(repr=False)


class _Expiring:
    """A small thread-safe cache whose entries live CACHE_SECONDS (host tokens, the root list), so a
    change made through another replica shows within that time."""

    def __init__(self, max_entries: int = 10000) -> None:
        self._entries: dict[str, tuple[float, Any]] = {}
        self._max = max_entries
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > CACHE_SECONDS:
            return None
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (time.monotonic(), value)


class Broker:
    """The broker's state machine over one database; thread-safe (one connection per call)."""

    def __init__(self, engine: Engine, vault: Vault, launch_ttl: float = DEFAULT_LAUNCH_TTL) -> None:
        self.engine = engine
        self.vault = vault
        self.launch_ttl = launch_ttl
        self._chains = _ChainCache()
        self._hosts = _Expiring()
        self._roots = _Expiring(max_entries=1)
        self._materials: dict[str, tuple[float, GuestMaterial]] = {}
        # SQLite has one writer at a time and its busy wait sleeps up to 100 ms; queue writers here instead
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else contextlib.nullcontext()

    @contextlib.contextmanager
    def _write(self) -> Iterator[Connection]:
        """A write transaction (committed on success, rolled back on any exception)."""
        with self._write_lock, self.engine.begin() as conn:
            yield conn

    # ---- audit -------------------------------------------------------------------------------

    @staticmethod
    def _audit(conn: Connection, actor: str, action: str, decision: str, reason: str, *,
               guest_id: str | None = None, launch_id: str | None = None,
               measurement: str | None = None, detail: str = "") -> None:
        conn.execute(_AUDIT_INSERT, {
            "at": time.time(), "actor": actor[:80], "action": action, "guest_id": guest_id and guest_id[:128],
            "launch_id": launch_id and launch_id[:64], "decision": decision, "reason": reason,
            "measurement": measurement, "detail": detail[:2000]})

    def _deny(self, refusal: Refusal, actor: str, action: str, **where: Any) -> Refusal:
        with self._write() as conn:
            self._audit(conn, actor, action, "deny", refusal.reason, detail=refusal.message, **where)
        return refusal

    # ---- owner administration ----------------------------------------------------------------

    def add_root(self, name: str, ca_bundle: bytes, test: bool = False) -> dict[str, Any]:
        """Register a trusted root from its ASK|ARK bundle (AMD's ask_ark_*.cert format)."""
        if not NAME_PATTERN.match(name):
            raise UsageError(f"root name {name!r}: use 1-64 letters, digits and . _ : @ -")
        ask, ark = parse_ca_bundle(ca_bundle, f"root {name}")
        amd = pinned_root(ark)
        if amd is None and not test:
            raise UsageError(f"root {name}: ARK {ark.key_id.hex()} is not one of AMD's published roots; "
                             "to trust it anyway (a test or software platform), register it as a test root (--test, or \"test\": true in the admin API)")
        if ark.is_signed:  # AMD's first Naples ARK is unsigned; it is recognised by its pinned key instead
            ark.verify_signed_by(ark)
        ask.verify_signed_by(ark)
        test = amd is None
        try:
            with self._write() as conn:
                conn.execute(insert(db.roots).values(name=name, ark=ark.to_bytes(), ask=ask.to_bytes(),
                                                     test=test, created_at=time.time()))
                self._audit(conn, "admin", "add-root", "allow", "ok", detail=f"root {name} test={test}")
            self._roots = _Expiring(max_entries=1)  # this replica sees the new root at once
        except IntegrityError:
            raise UsageError(f"root {name!r} is already registered") from None
        return {"name": name, "test": test, "ark_key_id": ark.key_id.hex()}

    def list_roots(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.roots).order_by(db.roots.c.name)).all()
        return [{"name": r.name, "test": r.test, "ark_key_id": AmdCertificate.parse(r.ark).key_id.hex()}
                for r in rows]

    def add_host(self, name: str, token: str | None = None) -> str:
        """Register a host; returns its bearer token (shown once, stored only as a hash). A caller
        that must save the token before registering it (the CLI's --token-file) makes it with
        `vault.new_token()` and passes it in."""
        if not NAME_PATTERN.match(name):
            raise UsageError(f"host name {name!r}: use 1-64 letters, digits and . _ : @ -")
        token = token or new_token()
        try:
            with self._write() as conn:
                conn.execute(insert(db.hosts).values(name=name, token_sha256=token_digest(token), revoked=False,
                                                     created_at=time.time()))
                self._audit(conn, "admin", "add-host", "allow", "ok", detail=f"host {name}")
        except IntegrityError:
            raise UsageError(f"host {name!r} is already registered; host names are never reused, even after "
                             "revoke-host (the audit log names them): pick another name") from None
        return token

    def list_hosts(self) -> list[dict[str, Any]]:
        """Registered hosts, revoked ones included (never their tokens: only hashes are stored)."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.hosts.c.name, db.hosts.c.revoked, db.hosts.c.created_at)
                                .order_by(db.hosts.c.name)).all()
        return [{"name": r.name, "revoked": r.revoked, "created_at": r.created_at} for r in rows]

    def host(self, name: str) -> dict[str, Any]:
        for entry in self.list_hosts():
            if entry["name"] == name:
                return entry
        raise Refusal("unknown-host", f"host {name!r} is not registered", status=404)

    def revoke_host(self, name: str) -> None:
        """Refuse the host's token from now on (other replicas: within their CACHE_SECONDS)."""
        with self._write() as conn:
            result = conn.execute(update(db.hosts).where(db.hosts.c.name == name).values(revoked=True))
            if result.rowcount != 1:
                raise Refusal("unknown-host", f"host {name!r} is not registered", status=404)
            self._audit(conn, "admin", "revoke-host", "allow", "ok", detail=f"host {name}")
        self._hosts = _Expiring()  # this replica refuses the token at once

    def host_for_token(self, token: str) -> str | None:
        """The host a token belongs to; None for an unknown token; Refusal('host-revoked') for a
        revoked host's token, so the host learns why rather than suspecting a typo."""
        digest = token_digest(token)
        name = self._hosts.get(digest)
        if name is None:
            with self.engine.connect() as conn:
                row = conn.execute(_HOST_BY_TOKEN, {"digest": digest}).first()
            if row is None:
                return None
            if row.revoked:
                raise self._deny(Refusal("host-revoked", f"host {row.name!r} has been revoked by the broker's owner; "
                                         "ask the owner for a new host registration"), row.name, "authenticate")
            name = row.name
            self._hosts.put(digest, name)  # only known tokens are cached: random tokens cannot fill the cache
        return name

    def add_guest(self, spec: GuestSpec) -> dict[str, Any]:
        spec.check()
        now = time.time()
        try:
            with self._write() as conn:
                conn.execute(insert(db.guests).values(
                    id=spec.guest_id, policies=json.dumps(list(spec.policies)), min_api_major=spec.min_api[0],
                    min_api_minor=spec.min_api[1], min_build=spec.min_build, reusable=spec.reusable,
                    revoked=False, created_at=now))
                labels = list(spec.digest_labels) + [""] * len(spec.digests)
                conn.execute(insert(db.digests), [
                    {"guest_id": spec.guest_id, "digest": digest, "label": labels[i][:200]}
                    for i, digest in enumerate(spec.digests)])
                if spec.secrets:
                    conn.execute(insert(db.secrets), [
                        {"guest_id": spec.guest_id, "guid": str(guid),
                         "value_sealed": self.vault.seal(value, f"secret:{spec.guest_id}:{guid}")}
                        for guid, value in spec.secrets])
                self._audit(conn, "admin", "add-guest", "allow", "ok", guest_id=spec.guest_id,
                            detail=f"{len(spec.digests)} digest(s), policies "
                                   f"{[hex(p) for p in spec.policies]}, {len(spec.secrets)} secret(s)")
        except IntegrityError:
            raise UsageError(f"guest {spec.guest_id!r} is already registered; guest ids are never reused, even after "
                             "revoke-guest (the audit log names them): pick another id") from None
        return self.guest(spec.guest_id)

    def guest(self, guest_id: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = conn.execute(select(db.guests).where(db.guests.c.id == guest_id)).first()
            if row is None:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered", status=404)
            return self._guest_view(conn, row)

    def list_guests(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(db.guests).order_by(db.guests.c.id)).all()
            return [self._guest_view(conn, row) for row in rows]

    @staticmethod
    def _guest_view(conn: Connection, row: Any) -> dict[str, Any]:
        digest_rows = conn.execute(select(db.digests.c.digest, db.digests.c.label).where(
            db.digests.c.guest_id == row.id).order_by(db.digests.c.id)).all()
        secret_guids = conn.execute(select(db.secrets.c.guid).where(db.secrets.c.guest_id == row.id)
                                    .order_by(db.secrets.c.id)).scalars().all()
        return {
            "id": row.id,
            "digests": [{"digest": d.digest.hex(), "label": d.label} for d in digest_rows],
            "policies": json.loads(row.policies),
            "min_api": f"{row.min_api_major}.{row.min_api_minor}",
            "min_build": row.min_build,
            "reusable": row.reusable,
            "revoked": row.revoked,
            "secret_guids": list(secret_guids),
        }

    def revoke_guest(self, guest_id: str) -> None:
        with self._write() as conn:
            result = conn.execute(update(db.guests).where(db.guests.c.id == guest_id).values(revoked=True))
            if result.rowcount != 1:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered", status=404)
            self._audit(conn, "admin", "revoke-guest", "allow", "ok", guest_id=guest_id)

    def audit_log(self, limit: int = 100, after_id: int = 0, guest_id: str | None = None) -> list[dict[str, Any]]:
        query = select(db.audit).where(db.audit.c.id > after_id).order_by(db.audit.c.id).limit(limit)
        if guest_id is not None:
            query = query.where(db.audit.c.guest_id == guest_id)
        with self.engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(query).all()]

    # ---- platform chains ---------------------------------------------------------------------

    def verify_platform(self, pdh_b64: str, chain_b64: str) -> VerifiedPlatform:
        """Verify PDH and chain (QMP's PEK|OCA|CEK, or a full PDH..ARK chain) to a registered root."""
        pdh_bytes = _b64(pdh_b64, "pdh")
        chain_bytes = _b64(chain_b64, "cert_chain")
        roots = self._roots.get("all")
        if not roots:
            with self.engine.connect() as conn:
                roots = conn.execute(_ROOTS).all()
            self._roots.put("all", roots)
        if not roots:
            raise Refusal("unknown-root", "no root is registered with this broker; the owner must run "
                          "`sevhook broker add-root`")
        try:
            pdh = SevCertificate.parse(pdh_bytes, "pdh")
            if pdh.usage != Usage.PDH:
                raise FormatError(f"pdh: the certificate has usage {pdh.usage.name}, expected PDH")
            if len(chain_bytes) == QMP_CHAIN_SIZE:
                candidates = [(r, CertificateChain.from_qmp(pdh_b64, chain_b64, r.ask + r.ark)) for r in roots]
            else:
                chain = CertificateChain.from_full(chain_bytes)
                if chain.pdh.to_bytes() != pdh_bytes:
                    raise FormatError("cert_chain: the full chain's PDH differs from the 'pdh' field")
                ark = chain.ark.to_bytes()
                candidates = [(r, chain) for r in roots if r.ark == ark]
                if not candidates:
                    raise Refusal("unknown-root", "cert_chain: its ARK is not a registered root")
        except FormatError as exc:
            raise Refusal("chain-invalid", exc.message) from None
        failures: list[str] = []
        only_root_link_failed = True
        for root, chain in candidates:
            key = hashlib.sha256(b"|".join((pdh_bytes, chain_bytes, root.ask or b"", root.ark))).digest()
            if self._chains.get(key) == root.name:
                return VerifiedPlatform(pdh, root.name)
            report = verify_chain(chain, (TrustAnchor(root.name, AmdCertificate.parse(root.ark)),))
            if report.ok:
                self._chains.put(key, root.name)
                return VerifiedPlatform(pdh, root.name)
            failures.append(f"{root.name}: " + "; ".join(f"{link.name}: {link.why}" for link in report.failures))
            only_root_link_failed &= {link.name for link in report.failures} == {"ASK -> CEK"}
        if len(chain_bytes) == QMP_CHAIN_SIZE and only_root_link_failed:
            # consistent PEK|OCA|CEK whose CEK no registered ASK signed: another root (or a corrupt CEK signature)
            raise Refusal("unknown-root", "the chain's CEK is signed by none of the registered roots' ASKs "
                          f"({', '.join(r.name for r, _ in candidates)})")
        raise Refusal("chain-invalid", " | ".join(failures))

    # ---- host API ----------------------------------------------------------------------------

    def create_launch(self, host: str, guest_id: str, pdh_b64: str, chain_b64: str,
                      policy: int | None = None) -> dict[str, Any]:
        where = {"guest_id": guest_id}
        try:
            with self.engine.connect() as conn:
                row = conn.execute(_GUEST_BY_ID, {"guest_id": guest_id}).first()
            if row is None:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered with this broker")
            if row.revoked:
                raise Refusal("guest-revoked", f"guest {guest_id!r} has been revoked by its owner")
            allowed = json.loads(row.policies)
            chosen = allowed[0] if policy is None else policy
            refusal = _policy_refusal(chosen, allowed)
            if refusal:
                raise refusal
            platform = self.verify_platform(pdh_b64, chain_b64)
        except Refusal as refusal:
            raise self._deny(refusal, host, "create-launch", **where) from None
        session = create_session(platform.pdh, chosen)
        launch_id = str(uuid.uuid4())
        with self._write() as conn:
            conn.execute(_LAUNCH_INSERT, {
                "id": launch_id, "guest_id": guest_id, "host": host, "policy": chosen, "state": "created",
                "keys_sealed": self.vault.seal(session.tek + session.tik, f"launch:{launch_id}"),
                "platform_api": f"{platform.pdh.api_major}.{platform.pdh.api_minor}", "attestations": 0,
                "created_at": time.time()})
            self._audit(conn, host, "create-launch", "allow", "ok", guest_id=guest_id, launch_id=launch_id,
                        detail=f"root {platform.root}, policy {chosen:#x}")
        return {"launch_id": launch_id, "godh": session.godh_b64, "session": session.session_b64, "policy": chosen}

    def launch_status(self, host: str, launch_id: str) -> dict[str, Any]:
        row = self._launch_row(host, launch_id)
        state = row.state
        if state == "created" and time.time() - row.created_at > self.launch_ttl:
            state = "expired"
        return {"launch_id": row.id, "guest": row.guest_id, "state": state, "policy": row.policy,
                "attestations": row.attestations, "created_at": row.created_at, "finished_at": row.finished_at}

    def _launch_row(self, host: str, launch_id: str, query: Any = _LAUNCH_BY_ID) -> Any:
        with self.engine.connect() as conn:
            row = conn.execute(query, {"launch_id": launch_id}).first()
        if row is None or row.host != host:  # another host's launch is as good as unknown
            raise Refusal("unknown-launch", f"launch {launch_id!r} is not known to this broker for this host",
                          status=404)
        return row

    def forget_guest(self, guest_id: str) -> None:
        """Drop this replica's cached digests and secrets of a guest its owner just changed."""
        self._materials.pop(guest_id, None)

    def forget_host_tokens(self) -> None:
        """Drop this replica's token cache after a token changed, so the old one is refused at once."""
        self._hosts = _Expiring()

    def _material(self, guest_id: str) -> GuestMaterial:
        # cached CACHE_SECONDS: `update-guest` (another process, or another replica) adds and removes digests
        cached = self._materials.get(guest_id)
        material = cached[1] if cached and time.monotonic() - cached[0] <= CACHE_SECONDS else None
        if material is None:
            with self.engine.connect() as conn:
                digests = tuple(conn.execute(_DIGESTS_OF, {"guest_id": guest_id}).scalars().all())
                secret_rows = conn.execute(_SECRETS_OF, {"guest_id": guest_id}).all()
            material = GuestMaterial(digests, tuple((r.guid, r.value_sealed) for r in secret_rows))
            if len(self._materials) > 10000:
                self._materials.clear()
            self._materials[guest_id] = (time.monotonic(), material)
        return material

    def attest(self, host: str, launch_id: str, measurement_b64: str, api_major: int, api_minor: int,
               build_id: int, policy: int) -> dict[str, str]:
        """Decide on a measurement; on success the answer is the LAUNCH_SECRET packet (base64)."""
        try:
            reported = LaunchMeasurement.parse(measurement_b64, "measurement")
        except FormatError as exc:
            raise Refusal("bad-request", exc.message, status=400) from None
        shown = reported.to_bytes().hex()
        try:
            row = self._launch_row(host, launch_id, _LAUNCH_WITH_RULES)
        except Refusal as refusal:
            raise self._deny(refusal, host, "attest", launch_id=launch_id[:64], measurement=shown) from None
        where = {"guest_id": row.guest_id, "launch_id": row.id, "measurement": shown}
        if row.state != "created":
            raise self._deny(Refusal("launch-used", f"launch {row.id} is single-use and was already "
                                     f"{row.state}; create a new launch"), host, "attest", **where)
        if time.time() - row.created_at > self.launch_ttl:
            raise self._deny(Refusal("launch-expired", f"launch {row.id} expired; create a new launch"),
                             host, "attest", **where)
        refusal = self._check_rules(row, api_major, api_minor, build_id, policy)
        material = self._material(row.guest_id) if refusal is None else GuestMaterial((), ())
        keys = self.vault.open(row.keys_sealed, f"launch:{row.id}")
        tek, tik = keys[:16], keys[16:]
        if refusal is None:
            matched = False
            for digest in material.digests:  # every digest is checked: no early exit
                matched |= verify_measurement(reported, tik, api_major, api_minor, build_id, policy, digest)
            if not matched:
                refusal = Refusal("measurement-mismatch", f"the measurement of launch {row.id} matches none of "
                                  f"the {len(material.digests)} allowed launch digest(s) of guest {row.guest_id}")
        if refusal is not None:
            self._spend(row, host, refusal, where)
            raise refusal
        table = SecretTable(tuple((uuid.UUID(guid), self.vault.open(sealed, f"secret:{row.guest_id}:{guid}"))
                                  for guid, sealed in material.secrets))
        header, ciphertext = wrap_secret(tek, tik, reported.measurement, table.build(),
                                         api_major=api_major, api_minor=api_minor)
        with self._write() as conn:
            if row.reusable:
                claimed = conn.execute(_COUNT_REUSE, {"launch_id": row.id}).rowcount == 1
            else:  # the database decides which of several concurrent attestations wins
                claimed = conn.execute(_CLAIM_SINGLE_USE, {"launch_id": row.id, "new_state": "released",
                                                           "now": time.time()}).rowcount == 1
            if claimed:
                self._audit(conn, host, "attest", "allow", "released",
                            detail=f"{len(material.secrets)} secret(s)", **where)
            else:
                refusal = Refusal("launch-used", f"launch {row.id} is single-use and another attestation "
                                  "won the race; create a new launch")
                self._audit(conn, host, "attest", "deny", refusal.reason, detail=refusal.message, **where)
        if refusal is not None:
            raise refusal
        return {"secret_header": base64.b64encode(header.to_bytes()).decode(),
                "secret": base64.b64encode(ciphertext).decode()}

    @staticmethod
    def _check_rules(row: Any, api_major: int, api_minor: int, build_id: int, policy: int) -> Refusal | None:
        """The owner's rules on the reported platform and policy (the measurement authenticates them)."""
        if row.policies is None:
            return Refusal("unknown-guest", f"guest {row.guest_id!r} is no longer registered")
        if row.guest_revoked:
            return Refusal("guest-revoked", f"guest {row.guest_id!r} has been revoked by its owner")
        refusal = _policy_refusal(policy, json.loads(row.policies))
        if refusal:
            return refusal
        if policy != row.policy:
            return Refusal("policy-mismatch", f"reported policy {policy:#x} differs from the launch session's "
                           f"policy {row.policy:#x}")
        if (api_major, api_minor) < (row.min_api_major, row.min_api_minor):
            return Refusal("firmware-too-old", f"platform SEV API {api_major}.{api_minor} is below the guest's "
                           f"minimum {row.min_api_major}.{row.min_api_minor}")
        if build_id < row.min_build:
            return Refusal("build-too-old", f"platform firmware build {build_id} is below the guest's minimum "
                           f"{row.min_build}")
        return None

    def _spend(self, row: Any, host: str, refusal: Refusal, where: dict[str, Any]) -> None:
        """Record a refused attestation; a single-use launch is spent by it (no second try)."""
        with self._write() as conn:
            if not row.reusable:
                conn.execute(_CLAIM_SINGLE_USE, {"launch_id": row.id, "new_state": "failed", "now": time.time()})
            self._audit(conn, host, "attest", "deny", refusal.reason, detail=refusal.message, **where)
