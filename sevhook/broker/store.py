"""What the broker's two services share: the database (one write path, the audit row every decision
writes, database failures turned into one clear error) and the short-lived caches a change made
through the admin service must be able to clear.

Every call here blocks (SQLAlchemy's synchronous engine); the HTTP layer runs it in a worker thread (the
host API's in the database lanes of `lanes`), so a database that waits on a lock never stalls the event
loop."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Engine, insert, select
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError, IntegrityError

from sevhook.broker import db
from sevhook.broker.kds import SignedCeks
from sevhook.broker.vault import Vault
from sevhook.errors import SevhookError
from sevhook.sev.certs import AmdCertificate

CACHE_SECONDS = 2.0
WRITE_WAIT = 10.0  # seconds a write waits for the database's write lock (SQLite's busy_timeout too)
_AUDIT_INSERT = insert(db.audit)
_ROOTS = select(db.roots).order_by(db.roots.c.name)


class DatabaseFailure(SevhookError):
    """The database refused a read or a write (read-only or full file system, corrupt pages, lost
    connection, a lock held too long). The message names the database and the driver's one-line
    reason, never SQL or its parameters (they may hold a token's hash)."""

    def __init__(self, message: str, cause: str) -> None:
        super().__init__(message)
        self.cause = cause

    @classmethod
    def from_driver(cls, shown_url: str, exc: DBAPIError) -> DatabaseFailure:
        lines = str(exc.orig).strip().splitlines() if exc.orig is not None else []
        cause = lines[0][:200] if lines else exc.__class__.__name__
        if "locked" in cause:  # SQLite's busy_timeout ran out
            return cls.busy(shown_url)
        return cls(f"database {shown_url}: {cause}; check that its file system is writable and not full, or "
                   "restore the database from a backup if it is damaged", cause)

    @classmethod
    def busy(cls, shown_url: str) -> DatabaseFailure:
        return cls(f"database {shown_url}: busy for {WRITE_WAIT:g} s (another process holds its write lock); "
                   "retry, or end the process that keeps a transaction open", "busy")


class Expiring:
    """A small thread-safe cache whose entries live `ttl` seconds (by default CACHE_SECONDS: host tokens,
    the root list), so a change made through another replica shows within that time."""

    def __init__(self, max_entries: int = 10000, ttl: float = CACHE_SECONDS) -> None:
        self._entries: dict[str, tuple[float, Any]] = {}
        self._max = max_entries
        self._ttl = ttl
        self._lock = threading.Lock()

    def get(self, key: str) -> Any:
        with self._lock:
            entry = self._entries.get(key)
        if entry is None or time.monotonic() - entry[0] > self._ttl:
            return None
        return entry[1]

    def put(self, key: str, value: Any) -> None:
        with self._lock:
            if len(self._entries) >= self._max:
                self._entries.clear()
            self._entries[key] = (time.monotonic(), value)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def forget(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)


class Store:
    """The engine, the vault and the caches both services use; thread-safe (one connection per call)."""

    def __init__(self, engine: Engine, vault: Vault) -> None:
        self.engine = engine
        self.vault = vault
        self.shown_url = engine.url.render_as_string(hide_password=True)
        self.host_tokens = Expiring()  # token digest -> host name, known tokens only
        self.roots = Expiring(max_entries=1)
        self.materials = Expiring()  # guest id -> its digests and sealed secrets (launch.GuestMaterial)
        self.ceks = SignedCeks(engine)  # ASK-signed CEKs for platforms whose firmware exports them unsigned
        # SQLite has one writer at a time and its busy wait sleeps up to 100 ms; queue writers here instead
        self._write_lock = threading.Lock() if engine.dialect.name == "sqlite" else None

    @contextlib.contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection for reads; a database failure becomes DatabaseFailure."""
        with self._translated(), self.engine.connect() as conn:
            yield conn

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction (committed on success, rolled back on any exception). IntegrityError
        passes through unchanged: the admin service turns it into 'already registered'."""
        with self._translated(), self._writer(), self.engine.begin() as conn:
            yield conn

    @contextlib.contextmanager
    def _writer(self) -> Iterator[None]:
        """This process's turn to write, waited for at most WRITE_WAIT (queued writers never pile up
        behind a lock another process holds)."""
        if self._write_lock is None:
            yield
            return
        if not self._write_lock.acquire(timeout=WRITE_WAIT):
            raise DatabaseFailure.busy(self.shown_url)
        try:
            yield
        finally:
            self._write_lock.release()

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        try:
            yield
        except IntegrityError:
            raise
        except DBAPIError as exc:
            raise DatabaseFailure.from_driver(self.shown_url, exc) from exc

    def registered_roots(self) -> list[Any]:
        """The roots table (cached CACHE_SECONDS; add-root clears it)."""
        roots = self.roots.get("all")
        if not roots:
            with self.read() as conn:
                roots = conn.execute(_ROOTS).all()
            self.roots.put("all", roots)
        return roots

    def registered_asks(self) -> list[AmdCertificate]:
        return [AmdCertificate.parse(r.ask) for r in self.registered_roots() if r.ask]

    @staticmethod
    def audit(conn: Connection, actor: str, action: str, decision: str, reason: str, *,
              guest_id: str | None = None, launch_id: str | None = None,
              measurement: str | None = None, detail: str = "") -> None:
        """One audit row; every decision, allowed or denied, writes one."""
        conn.execute(_AUDIT_INSERT, {
            "at": time.time(), "actor": actor[:80], "action": action, "guest_id": guest_id and guest_id[:128],
            "launch_id": launch_id and launch_id[:64], "decision": decision, "reason": reason,
            "measurement": measurement, "detail": detail[:2000]})
