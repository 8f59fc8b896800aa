"""The owner's service: trusted roots, hosts and their tokens, guests with their rules and sealed
secrets, and the audit log. Names and ids are never reused, so the audit log stays unambiguous."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import insert, select, update
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from sevhook.broker import db
from sevhook.broker.rules import NAME_PATTERN, GuestSpec, Refusal
from sevhook.broker.store import Store
from sevhook.broker.vault import new_token, token_digest
from sevhook.errors import UsageError
from sevhook.sev.certs import AmdCertificate, parse_ca_bundle
from sevhook.sev.roots import pinned_root


class AdminService:
    """Registrations and the audit log over the shared store; thread-safe."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ---- roots -------------------------------------------------------------------------------

    def add_root(self, name: str, ca_bundle: bytes, test: bool = False) -> dict[str, Any]:
        """Register a trusted root from its ASK|ARK bundle (AMD's ask_ark_*.cert format)."""
        if not NAME_PATTERN.match(name):
            raise UsageError(f"root name {name!r}: use 1-64 letters, digits and . _ : @ -")
        ask, ark = parse_ca_bundle(ca_bundle, f"root {name}")
        amd = pinned_root(ark)
        if amd is None and not test:
            raise UsageError(f"root {name}: ARK {ark.key_id.hex()} is not one of AMD's published roots; "
                             "to trust it anyway (a test or software platform), register it as a test root "
                             "(--test, or \"test\": true in the admin API)")
        if ark.is_signed:  # AMD's first Naples ARK is unsigned; it is recognised by its pinned key instead
            ark.verify_signed_by(ark)
        ask.verify_signed_by(ark)
        test = amd is None
        try:
            with self.store.write() as conn:
                conn.execute(insert(db.roots).values(name=name, ark=ark.to_bytes(), ask=ask.to_bytes(),
                                                     test=test, created_at=time.time()))
                self.store.audit(conn, "admin", "add-root", "allow", "ok", detail=f"root {name} test={test}")
        except IntegrityError as exc:
            raise UsageError(f"root {name!r} is already registered") from exc
        self.store.roots.clear()  # this replica sees the new root at once
        return {"name": name, "test": test, "ark_key_id": ark.key_id.hex()}

    def add_cek(self, data: bytes, chip_id: str | None) -> dict[str, str]:
        """Import an ASK-signed CEK (air-gapped brokers); it must verify under a registered ASK."""
        return self.store.ceks.import_cek(data, chip_id, self.store.registered_asks())

    def list_roots(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
            rows = conn.execute(select(db.roots).order_by(db.roots.c.name)).all()
        return [{"name": r.name, "test": r.test, "ark_key_id": AmdCertificate.parse(r.ark).key_id.hex()}
                for r in rows]

    # ---- hosts -------------------------------------------------------------------------------

    def add_host(self, name: str, token: str | None = None) -> str:
        """Register a host; returns its bearer token (shown once, stored only as a hash). A caller
        that must save the token before registering it (the CLI's --token-file) makes it with
        `vault.new_token()` and passes it in."""
        if not NAME_PATTERN.match(name):
            raise UsageError(f"host name {name!r}: use 1-64 letters, digits and . _ : @ -")
        token = token or new_token()
        try:
            with self.store.write() as conn:
                conn.execute(insert(db.hosts).values(name=name, token_sha256=token_digest(token), revoked=False,
                                                     created_at=time.time()))
                self.store.audit(conn, "admin", "add-host", "allow", "ok", detail=f"host {name}")
        except IntegrityError as exc:
            raise UsageError(f"host {name!r} is already registered; host names are never reused, even after "
                             "revoke-host (the audit log names them): pick another name") from exc
        return token

    def list_hosts(self) -> list[dict[str, Any]]:
        """Registered hosts, revoked ones included (never their tokens: only hashes are stored)."""
        with self.store.read() as conn:
            rows = conn.execute(select(db.hosts.c.name, db.hosts.c.revoked, db.hosts.c.created_at)
                                .order_by(db.hosts.c.name)).all()
        return [{"name": r.name, "revoked": r.revoked, "created_at": r.created_at} for r in rows]

    def host(self, name: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(db.hosts.c.name, db.hosts.c.revoked, db.hosts.c.created_at)
                               .where(db.hosts.c.name == name)).first()
        if row is None:
            raise Refusal("unknown-host", f"host {name!r} is not registered", status=404)
        return {"name": row.name, "revoked": row.revoked, "created_at": row.created_at}

    def revoke_host(self, name: str) -> None:
        """Refuse the host's token from now on (other replicas: within their CACHE_SECONDS)."""
        with self.store.write() as conn:
            result = conn.execute(update(db.hosts).where(db.hosts.c.name == name).values(revoked=True))
            if result.rowcount != 1:
                raise Refusal("unknown-host", f"host {name!r} is not registered", status=404)
            self.store.audit(conn, "admin", "revoke-host", "allow", "ok", detail=f"host {name}")
        self.store.host_tokens.clear()  # this replica refuses the token at once

    # ---- guests ------------------------------------------------------------------------------

    def add_guest(self, spec: GuestSpec) -> dict[str, Any]:
        spec.check()
        now = time.time()
        vault = self.store.vault
        try:
            with self.store.write() as conn:
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
                         "value_sealed": vault.seal(value, f"secret:{spec.guest_id}:{guid}")}
                        for guid, value in spec.secrets])
                self.store.audit(conn, "admin", "add-guest", "allow", "ok", guest_id=spec.guest_id,
                                 detail=f"{len(spec.digests)} digest(s), policies "
                                        f"{[hex(p) for p in spec.policies]}, {len(spec.secrets)} secret(s)")
        except IntegrityError as exc:
            raise UsageError(f"guest {spec.guest_id!r} is already registered; guest ids are never reused, even after "
                             "revoke-guest (the audit log names them): pick another id") from exc
        return self.guest(spec.guest_id)

    def guest(self, guest_id: str) -> dict[str, Any]:
        with self.store.read() as conn:
            row = conn.execute(select(db.guests).where(db.guests.c.id == guest_id)).first()
            if row is None:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered", status=404)
            return self._guest_view(conn, row)

    def list_guests(self) -> list[dict[str, Any]]:
        with self.store.read() as conn:
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
        with self.store.write() as conn:
            result = conn.execute(update(db.guests).where(db.guests.c.id == guest_id).values(revoked=True))
            if result.rowcount != 1:
                raise Refusal("unknown-guest", f"guest {guest_id!r} is not registered", status=404)
            self.store.audit(conn, "admin", "revoke-guest", "allow", "ok", guest_id=guest_id)

    # ---- audit -------------------------------------------------------------------------------

    def audit_log(self, limit: int = 100, after_id: int = 0, guest_id: str | None = None) -> list[dict[str, Any]]:
        query = select(db.audit).where(db.audit.c.id > after_id).order_by(db.audit.c.id).limit(limit)
        if guest_id is not None:
            query = query.where(db.audit.c.guest_id == guest_id)
        with self.store.read() as conn:
            return [dict(row._mapping) for row in conn.execute(query).all()]
