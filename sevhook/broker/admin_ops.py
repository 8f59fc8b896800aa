"""The owner's changes to what is registered, beyond adding and revoking: roll a guest forward
(new launch digests, rules, rotated secrets), rotate a host's token; and the checks the admin
commands share (an initialised data directory).

Each change is one transaction with its audit rows, so a failed update changes nothing."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select, update

from sevhook.broker import db
from sevhook.broker.admin import AdminService
from sevhook.broker.rules import GuestSpec, Refusal
from sevhook.broker.vault import STORAGE_KEY_FILE, new_token, token_digest
from sevhook.errors import UsageError


def require_initialised(data_dir: Path, source: str) -> None:
    """Refuse a data directory `broker init` never made, saying where its path came from, so the
    advice never leads to a second, empty broker beside the real one."""
    if (data_dir / STORAGE_KEY_FILE).exists():
        return
    origin = "the built-in default" if source == "default" else source
    raise UsageError(f"{data_dir}: not an initialised broker data directory (no {STORAGE_KEY_FILE}; the path came "
                     f"from {origin}); if your broker lives elsewhere, set data-dir in the [broker] section of "
                     "sevhook.toml (see `sevhook config show`), else create it with `sevhook broker init`")


@dataclass(frozen=True)
class GuestUpdate:
    """What `update-guest` changes; None or empty leaves that part as it is."""

    guest_id: str
    add_digests: tuple[bytes, ...] = ()
    digest_labels: tuple[str, ...] = ()
    remove_digests: tuple[bytes, ...] = ()
    policies: tuple[int, ...] = ()
    min_api: tuple[int, int] | None = None
    min_build: int | None = None
    secrets: tuple[tuple[uuid.UUID, bytes], ...] = field(default=(), repr=False)

    def changes(self) -> bool:
        return bool(self.add_digests or self.remove_digests or self.policies or self.secrets
                    or self.min_api is not None or self.min_build is not None)


def update_guest(admin: AdminService, change: GuestUpdate) -> dict[str, Any]:
    """Apply `change` to a registered, unrevoked guest in one transaction, one audit row per kind of
    change. The guest keeps at least one digest; given secrets replace those with the same GUID."""
    if not change.changes():
        raise UsageError(f"guest {change.guest_id}: nothing to change; give --add-firmware, --add-digest, "
                         "--remove-digest, --policy, --min-api, --min-build, --secret or --disk-passphrase")
    current = admin.guest(change.guest_id)
    if current["revoked"]:
        raise UsageError(f"guest {change.guest_id} is revoked; a revoked guest cannot be changed (register a new id)")
    existing = [bytes.fromhex(d["digest"]) for d in current["digests"]]
    for digest in change.remove_digests:
        if digest not in existing:
            raise UsageError(f"--remove-digest {digest.hex()}: not a digest of guest {change.guest_id} "
                             "(`sevhook broker list-guests --json` shows them)")
    added = [d for d in dict.fromkeys(change.add_digests) if d not in existing]
    remaining = [d for d in existing if d not in change.remove_digests] + added
    policies = change.policies or tuple(current["policies"])
    min_api = change.min_api or tuple(int(p) for p in current["min_api"].split("."))
    min_build = current["min_build"] if change.min_build is None else change.min_build
    old_secrets = {uuid.UUID(g) for g in current["secret_guids"]}
    if not remaining:
        raise UsageError(f"guest {change.guest_id}: removing every launch digest would leave a guest that can "
                         "never attest; add the new digest in the same command, or revoke the guest")
    # the new rules as a whole pass add-guest's checks (digest sizes, policies, ranges, the secret area)
    GuestSpec(change.guest_id, tuple(remaining), tuple(policies), min_api, min_build,
              secrets=change.secrets).check()
    labels = list(change.digest_labels) + [""] * len(change.add_digests)
    label_of = dict(zip(change.add_digests, labels, strict=False))
    where = {"guest_id": change.guest_id}
    with admin.store.write() as conn:
        if added:
            conn.execute(insert(db.digests), [{"guest_id": change.guest_id, "digest": d, "label": label_of[d][:200]}
                                              for d in added])
            admin.store.audit(conn, "admin", "update-guest", "allow", "digest-added",
                          detail=", ".join(f"{d.hex()} {label_of[d]}".strip() for d in added), **where)
        if change.remove_digests:
            conn.execute(delete(db.digests).where(db.digests.c.guest_id == change.guest_id,
                                                  db.digests.c.digest.in_(change.remove_digests)))
            admin.store.audit(conn, "admin", "update-guest", "allow", "digest-removed",
                          detail=", ".join(d.hex() for d in change.remove_digests), **where)
        rules = {}
        if change.policies:
            rules["policies"] = json.dumps(list(policies))
        if change.min_api is not None:
            rules.update(min_api_major=min_api[0], min_api_minor=min_api[1])
        if change.min_build is not None:
            rules["min_build"] = min_build
        if rules:
            conn.execute(update(db.guests).where(db.guests.c.id == change.guest_id).values(**rules))
            admin.store.audit(conn, "admin", "update-guest", "allow", "rules-changed",
                          detail=f"policies {[hex(p) for p in policies]}, min API {min_api[0]}.{min_api[1]}, "
                                 f"min build {min_build}", **where)
        if change.secrets:
            guids = [str(guid) for guid, _ in change.secrets]
            conn.execute(delete(db.secrets).where(db.secrets.c.guest_id == change.guest_id,
                                                  db.secrets.c.guid.in_(guids)))
            conn.execute(insert(db.secrets), [
                {"guest_id": change.guest_id, "guid": str(guid),
                 "value_sealed": admin.store.vault.seal(value, f"secret:{change.guest_id}:{guid}")}
                for guid, value in change.secrets])
            rotated = [g for g, _ in change.secrets if g in old_secrets]
            admin.store.audit(conn, "admin", "update-guest", "allow", "secrets-changed",
                          detail=f"rotated {[str(g) for g in rotated]}, added "
                                 f"{[str(g) for g, _ in change.secrets if g not in old_secrets]}", **where)
    admin.store.materials.forget(change.guest_id)  # this process sees the change at once
    return admin.guest(change.guest_id)


def rotate_host_token(admin: AdminService, name: str, token: str | None = None) -> str:
    """Give a registered, unrevoked host a new bearer token (`token`, or a fresh one); the old one is
    refused from now on (other replicas: within their token cache's few seconds). Returns the token."""
    with admin.store.read() as conn:
        row = conn.execute(select(db.hosts.c.revoked).where(db.hosts.c.name == name)).first()
    if row is None:
        raise Refusal("unknown-host", f"host {name!r} is not registered", status=404)
    if row.revoked:
        raise UsageError(f"host {name} is revoked; its name stays taken: register the host under a new name")
    token = token or new_token()
    with admin.store.write() as conn:
        conn.execute(update(db.hosts).where(db.hosts.c.name == name).values(token_sha256=token_digest(token)))
        admin.store.audit(conn, "admin", "rotate-host-token", "allow", "ok", detail=f"host {name}")
    admin.store.host_tokens.clear()
    return token
