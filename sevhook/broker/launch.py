"""The hosts' service: authenticate a host's token, verify its platform chain to a registered root,
make launch sessions, and decide whether a reported measurement earns the guest's secret.

Every decision writes an audit row (with the measurement as sent and the reason). A single-use
launch moves out of state 'created' by a conditional UPDATE whose row count decides who won, so two
replicas on one database cannot both release it; any refused attestation also spends it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
import time
import uuid
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from sevhook.broker import db
from sevhook.broker.kds import CekRefusal, is_unsigned
from sevhook.broker.lanes import Lanes
from sevhook.broker.rules import Refusal, check_launch_rules, decode_field, policy_refusal
from sevhook.broker.store import CACHE_SECONDS, Expiring, Store
from sevhook.errors import FormatError
from sevhook.sev.certs import SEV_CERT_SIZE, AmdCertificate, SevCertificate, Usage
from sevhook.sev.chain import CERT_CHAIN_SIZE, CertificateChain, verify_chain
from sevhook.sev.measurement import LaunchMeasurement, verify_measurement
from sevhook.sev.roots import TrustAnchor
from sevhook.sev.secret import SecretTable, wrap_secret
from sevhook.sev.session import create_session

DEFAULT_LAUNCH_TTL = 3600.0
CHAIN_CACHE_SIZE = 1024
VOUCHED_SECONDS = 3600.0  # how long a token that authenticated keeps its holder clear of the address budget
VERIFY_WORKERS = 2  # threads for chain checks that miss the caches (signatures, a KDS fetch, the roots table)

# Statements built once; each call only binds parameters (the hot paths run thousands of times a second).
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
_CLAIM_SINGLE_USE = (update(db.launches)
                     .where(db.launches.c.id == bindparam("launch_id"), db.launches.c.state == "created")
                     .values(state=bindparam("new_state"), finished_at=bindparam("now"),
                             attestations=db.launches.c.attestations + 1))
_COUNT_REUSE = (update(db.launches)
                .where(db.launches.c.id == bindparam("launch_id"), db.launches.c.state == "created")
                .values(attestations=db.launches.c.attestations + 1))


@dataclass(frozen=True)
class VerifiedPlatform:
    pdh: SevCertificate
    root: str


@dataclass(frozen=True)
class GuestMaterial:
    """A guest's launch digests and sealed secrets (changed only by `update-guest`)."""

    digests: tuple[bytes, ...]
    secrets: tuple[tuple[str, bytes], ...] = field(repr=False)


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


class LaunchService:
    """Sessions, attestation and release over the shared store; thread-safe."""

    def __init__(self, store: Store, launch_ttl: float = DEFAULT_LAUNCH_TTL) -> None:
        self.store = store
        self.launch_ttl = launch_ttl
        self._chains = _ChainCache()
        # what the host sent -> its verified platform, as long as the roots cache: the event loop's fast path
        self._platforms = Expiring(ttl=CACHE_SECONDS)
        self._vouched = Expiring(ttl=VOUCHED_SECONDS)  # digests of tokens that authenticated; never random ones
        self.lanes = Lanes(store)
        self._verifier = ThreadPoolExecutor(max_workers=VERIFY_WORKERS, thread_name_prefix="sevhook-verify")

    # ---- host authentication -----------------------------------------------------------------

    def cached_host(self, digest: str) -> str | None:
        """The host whose token (by digest) authenticated within CACHE_SECONDS, from memory; None: ask
        `host_for_digest`."""
        name: str | None = self.store.host_tokens.get(digest)
        return name

    async def host_for_digest(self, digest: str) -> str | None:
        """The host a token (by digest) belongs to, from the database; None for an unknown token;
        Refusal('host-revoked') for a revoked host's token, so the host learns why rather than
        suspecting a typo."""
        row = await self.lanes.read(lambda conn: conn.execute(_HOST_BY_TOKEN, {"digest": digest}).first())
        if row is None:
            return None
        if row.revoked:
            raise await self._deny(Refusal("host-revoked", f"host {row.name!r} has been revoked by the broker's "
                                           "owner; ask the owner for a new host registration"),
                                   row.name, "authenticate")
        self.store.host_tokens.put(digest, row.name)  # only known tokens are cached: random ones cannot fill it
        self._vouched.put(digest, True)
        return str(row.name)

    def is_vouched(self, digest: str) -> bool:
        """Whether the token (by digest) authenticated here within VOUCHED_SECONDS (no database access).
        It only earns a lookup when the client's address is over its failed-auth budget: the lookup
        itself still decides, so a token revoked since then is refused as usual."""
        return self._vouched.get(digest) is not None

    # ---- platform chains ---------------------------------------------------------------------

    def _with_signed_cek(self, chain_bytes: bytes, cpu0_id_b64: str | None) -> bytes:
        """The chain with an unsigned (firmware-exported) CEK swapped for its verified ASK-signed copy."""
        offset = 2 * SEV_CERT_SIZE if len(chain_bytes) == CERT_CHAIN_SIZE else 3 * SEV_CERT_SIZE
        cek = SevCertificate.parse(chain_bytes[offset:offset + SEV_CERT_SIZE], "cert_chain CEK")
        if cek.usage != Usage.CEK or not is_unsigned(cek):
            return chain_bytes
        try:
            signed = self.store.ceks.resolve(cek, cpu0_id_b64, self.store.registered_asks())
        except CekRefusal as exc:
            raise Refusal(exc.reason, exc.message) from exc
        return chain_bytes[:offset] + signed.to_bytes() + chain_bytes[offset + SEV_CERT_SIZE:]

    def verify_platform(self, pdh_b64: str, chain_b64: str, cpu0_id_b64: str | None = None) -> VerifiedPlatform:
        """Verify PDH and chain (QMP's PEK|OCA|CEK, or a full PDH..ARK chain) to a registered root; an
        unsigned CEK is first replaced by its ASK-signed copy (cache or KDS, by chip id)."""
        pdh_bytes = decode_field(pdh_b64, "pdh")
        chain_bytes = decode_field(chain_b64, "cert_chain")
        roots = self.store.registered_roots()
        if not roots:
            raise Refusal("unknown-root", "no root is registered with this broker; the owner must run "
                          "`sevhook broker add-root`")
        try:
            if len(chain_bytes) >= CERT_CHAIN_SIZE:
                chain_bytes = self._with_signed_cek(chain_bytes, cpu0_id_b64)
                chain_b64 = base64.b64encode(chain_bytes).decode("ascii")
            pdh = SevCertificate.parse(pdh_bytes, "pdh")
            if pdh.usage != Usage.PDH:
                raise FormatError(f"pdh: the certificate has usage {pdh.usage.name}, expected PDH")
            if len(chain_bytes) == CERT_CHAIN_SIZE:
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
            raise Refusal("chain-invalid", exc.message) from exc
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
        if len(chain_bytes) == CERT_CHAIN_SIZE and only_root_link_failed:
            # consistent PEK|OCA|CEK whose CEK no registered ASK signed: another root (or a corrupt CEK signature)
            raise Refusal("unknown-root", "the chain's CEK is signed by none of the registered roots' ASKs "
                          f"({', '.join(r.name for r, _ in candidates)})")
        raise Refusal("chain-invalid", " | ".join(failures))

    # ---- launches ----------------------------------------------------------------------------

    async def _deny(self, refusal: Refusal, actor: str, action: str, **where: Any) -> Refusal:
        """Audit a refusal (in the write lane) and hand it back for raising."""
        await self.lanes.write(lambda conn: self.store.audit(conn, actor, action, "deny", refusal.reason,
                                                             detail=refusal.message, **where))
        return refusal

    async def _platform(self, pdh_b64: str, chain_b64: str, cpu0_id_b64: str | None) -> VerifiedPlatform:
        """verify_platform, answered on the event loop when the same PDH and chain verified within
        CACHE_SECONDS; otherwise in a verifier thread (signatures, the roots table, a KDS fetch block)."""
        key = hashlib.sha256("|".join((pdh_b64, chain_b64, cpu0_id_b64 or "")).encode()).hexdigest()
        platform: VerifiedPlatform | None = self._platforms.get(key)
        if platform is None:
            platform = await asyncio.get_running_loop().run_in_executor(
                self._verifier, self.verify_platform, pdh_b64, chain_b64, cpu0_id_b64)
            self._platforms.put(key, platform)
        return platform

    async def create_launch(self, host: str, guest_id: str, pdh_b64: str, chain_b64: str,
                            policy: int | None = None, cpu0_id_b64: str | None = None) -> dict[str, Any]:
        """A launch session for the guest on a verified platform: the read and the insert run in the
        lanes, the session's ECDH and the sealing on the event loop (short and CPU-bound)."""
        where = {"guest_id": guest_id}
        try:
            row = await self.lanes.read(lambda conn: conn.execute(_GUEST_BY_ID, {"guest_id": guest_id}).first())
            if row is None:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered with this broker")
            if row.revoked:
                raise Refusal("guest-revoked", f"guest {guest_id!r} has been revoked by its owner")
            allowed = json.loads(row.policies)
            chosen = allowed[0] if policy is None else policy
            refusal = policy_refusal(chosen, allowed)
            if refusal:
                raise refusal
            platform = await self._platform(pdh_b64, chain_b64, cpu0_id_b64)
        except Refusal as refusal:
            raise await self._deny(refusal, host, "create-launch", **where)  # noqa: B904  (_deny returns the refusal it was given)
        session = create_session(platform.pdh, chosen)
        launch_id = str(uuid.uuid4())
        values = {
            "id": launch_id, "guest_id": guest_id, "host": host, "policy": chosen, "state": "created",
            "keys_sealed": self.store.vault.seal(session.tek + session.tik, f"launch:{launch_id}"),
            "platform_api": f"{platform.pdh.api_major}.{platform.pdh.api_minor}", "attestations": 0,
            "created_at": time.time()}

        def insert_launch(conn: Connection) -> None:
            conn.execute(_LAUNCH_INSERT, values)
            self.store.audit(conn, host, "create-launch", "allow", "ok", guest_id=guest_id, launch_id=launch_id,
                             detail=f"root {platform.root}, policy {chosen:#x}")

        await self.lanes.write(insert_launch)
        return {"launch_id": launch_id, "godh": session.godh_b64, "session": session.session_b64, "policy": chosen}

    async def launch_status(self, host: str, launch_id: str) -> dict[str, Any]:
        row = await self._launch_row(host, launch_id)
        state = row.state
        if state == "created" and time.time() - row.created_at > self.launch_ttl:
            state = "expired"
        return {"launch_id": row.id, "guest": row.guest_id, "state": state, "policy": row.policy,
                "attestations": row.attestations, "created_at": row.created_at, "finished_at": row.finished_at}

    async def _launch_row(self, host: str, launch_id: str, query: Any = _LAUNCH_BY_ID) -> Any:
        row = await self.lanes.read(lambda conn: conn.execute(query, {"launch_id": launch_id}).first())
        if row is None or row.host != host:  # another host's launch is as good as unknown
            raise Refusal("unknown-launch", f"launch {launch_id!r} is not known to this broker for this host",
                          status=404)
        return row

    async def _material(self, guest_id: str) -> GuestMaterial:
        # cached CACHE_SECONDS: `update-guest` (another process, or another replica) adds and removes digests
        material: GuestMaterial | None = self.store.materials.get(guest_id)
        if material is None:
            def load(conn: Connection) -> GuestMaterial:
                digests = tuple(conn.execute(_DIGESTS_OF, {"guest_id": guest_id}).scalars().all())
                secret_rows = conn.execute(_SECRETS_OF, {"guest_id": guest_id}).all()
                return GuestMaterial(digests, tuple((r.guid, r.value_sealed) for r in secret_rows))

            material = await self.lanes.read(load)
            self.store.materials.put(guest_id, material)
        return material

    # ---- attestation and release -------------------------------------------------------------

    async def attest(self, host: str, launch_id: str, measurement_b64: str, api_major: int, api_minor: int,
                     build_id: int, policy: int) -> dict[str, str]:
        """Decide on a measurement; on success the answer is the LAUNCH_SECRET packet (base64). The
        checks and the wrap run on the event loop; the reads and the claim run in the lanes."""
        try:
            reported = LaunchMeasurement.parse(measurement_b64, "measurement")
        except FormatError as exc:
            raise Refusal("bad-request", exc.message, status=400) from exc
        shown = reported.to_bytes().hex()
        try:
            row = await self._launch_row(host, launch_id, _LAUNCH_WITH_RULES)
        except Refusal as refusal:
            raise await self._deny(refusal, host, "attest", launch_id=launch_id[:64], measurement=shown)  # noqa: B904  (the refusal itself)
        where = {"guest_id": row.guest_id, "launch_id": row.id, "measurement": shown}
        if row.state != "created":
            raise await self._deny(Refusal("launch-used", f"launch {row.id} is single-use and was already "
                                           f"{row.state}; create a new launch"), host, "attest", **where)
        if time.time() - row.created_at > self.launch_ttl:
            raise await self._deny(Refusal("launch-expired", f"launch {row.id} expired; create a new launch"),
                                   host, "attest", **where)
        refusal = check_launch_rules(row, api_major, api_minor, build_id, policy)
        material = await self._material(row.guest_id) if refusal is None else GuestMaterial((), ())
        vault = self.store.vault
        keys = vault.open(row.keys_sealed, f"launch:{row.id}")
        tek, tik = keys[:16], keys[16:]
        if refusal is None:
            matched = False
            for digest in material.digests:  # every digest is checked: no early exit
                matched |= verify_measurement(reported, tik, api_major, api_minor, build_id, policy, digest)
            if not matched:
                refusal = Refusal("measurement-mismatch", f"the measurement of launch {row.id} matches none of "
                                  f"the {len(material.digests)} allowed launch digest(s) of guest {row.guest_id}")
        if refusal is not None:
            await self._spend(row, host, refusal, where)
            raise refusal
        table = SecretTable(tuple((uuid.UUID(guid), vault.open(sealed, f"secret:{row.guest_id}:{guid}"))
                                  for guid, sealed in material.secrets))
        header, ciphertext = wrap_secret(tek, tik, reported.measurement, table.build(),
                                         api_major=api_major, api_minor=api_minor)
        lost_race = Refusal("launch-used", f"launch {row.id} is single-use and another attestation won the race; "
                            "create a new launch")

        def claim(conn: Connection) -> bool:
            """The database decides which of several concurrent attestations of a single-use launch wins."""
            if row.reusable:
                claimed = conn.execute(_COUNT_REUSE, {"launch_id": row.id}).rowcount == 1
            else:
                claimed = conn.execute(_CLAIM_SINGLE_USE, {"launch_id": row.id, "new_state": "released",
                                                           "now": time.time()}).rowcount == 1
            if claimed:
                self.store.audit(conn, host, "attest", "allow", "released",
                                 detail=f"{len(material.secrets)} secret(s)", **where)
            else:
                self.store.audit(conn, host, "attest", "deny", lost_race.reason, detail=lost_race.message, **where)
            return claimed

        if not await self.lanes.write(claim):  # the secret leaves only after its claim committed
            raise lost_race
        return {"secret_header": base64.b64encode(header.to_bytes()).decode(),
                "secret": base64.b64encode(ciphertext).decode()}

    async def _spend(self, row: Any, host: str, refusal: Refusal, where: dict[str, Any]) -> None:
        """Record a refused attestation; a single-use launch is spent by it (no second try)."""
        def spend(conn: Connection) -> None:
            if not row.reusable:
                conn.execute(_CLAIM_SINGLE_USE, {"launch_id": row.id, "new_state": "failed", "now": time.time()})
            self.store.audit(conn, host, "attest", "deny", refusal.reason, detail=refusal.message, **where)

        await self.lanes.write(spend)
