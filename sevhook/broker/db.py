"""The broker's tables (SQLAlchemy Core) and the one engine factory for SQLite and PostgreSQL.

Secrets and launch keys are stored only as AES-GCM ciphertext (see `vault`); host tokens only as
SHA-256 hashes. Single use is enforced by the database itself (a conditional UPDATE), so several
broker replicas on one PostgreSQL cannot release the same launch twice."""

from __future__ import annotations

import re
from pathlib import Path

from sqlalchemy import (
    Boolean,
    Column,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import URL
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.exc import ArgumentError, NoSuchModuleError
from sqlalchemy.pool import ConnectionPoolEntry

from sevhook.errors import UsageError

metadata = MetaData()

roots = Table(
    "roots",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("ark", LargeBinary, nullable=False),  # AMD-format ARK certificate bytes
    Column("ask", LargeBinary, nullable=True),  # the ASK it signed, used when a host sends PEK|OCA|CEK only
    Column("test", Boolean, nullable=False, default=False),  # an explicitly named non-AMD root
    Column("created_at", Float, nullable=False),
)

hosts = Table(
    "hosts",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("token_sha256", String(64), nullable=False, unique=True),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

guests = Table(
    "guests",
    metadata,
    Column("id", String(128), primary_key=True),
    Column("policies", Text, nullable=False),  # JSON list of allowed policy integers, first = default
    Column("min_api_major", Integer, nullable=False, default=0),
    Column("min_api_minor", Integer, nullable=False, default=0),
    Column("min_build", Integer, nullable=False, default=0),
    Column("reusable", Boolean, nullable=False, default=False),
    Column("revoked", Boolean, nullable=False, default=False),
    Column("created_at", Float, nullable=False),
)

digests = Table(
    "digests",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("guest_id", String(128), ForeignKey("guests.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("digest", LargeBinary, nullable=False),  # 32-byte SHA-256 launch digest
    Column("label", String(200), nullable=False, default=""),
)

secrets = Table(
    "secrets",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("guest_id", String(128), ForeignKey("guests.id", ondelete="CASCADE"), nullable=False, index=True),
    Column("guid", String(36), nullable=False),
    Column("value_sealed", LargeBinary, nullable=False),  # AES-GCM nonce | ciphertext | tag
)

launches = Table(
    "launches",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("guest_id", String(128), ForeignKey("guests.id", ondelete="CASCADE"), nullable=False),
    Column("host", String(64), nullable=False),
    Column("policy", Integer, nullable=False),
    Column("state", String(16), nullable=False),  # created | released | failed
    Column("keys_sealed", LargeBinary, nullable=False),  # AES-GCM of TEK | TIK
    Column("platform_api", String(16), nullable=False, default=""),
    Column("attestations", Integer, nullable=False, default=0),
    Column("created_at", Float, nullable=False),
    Column("finished_at", Float, nullable=True),
)

signed_ceks = Table(  # ASK-signed CEKs from AMD's KDS (or `broker add-cek`), by the exported CEK's key
    "signed_ceks",
    metadata,
    Column("key_sha256", String(64), primary_key=True),  # SHA-256 of the CEK's public-key field
    Column("chip_id", String(256), nullable=True, index=True),  # GET_ID as upper-case hex, when known
    Column("cek", LargeBinary, nullable=False),  # the 2084-byte signed CEK
    Column("fetched_at", Float, nullable=False),
    Column("source", String(300), nullable=False, default=""),  # the KDS URL, or "add-cek"
)

audit = Table(
    "audit",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", Float, nullable=False),
    Column("actor", String(80), nullable=False),
    Column("action", String(40), nullable=False),
    Column("guest_id", String(128), nullable=True),
    Column("launch_id", String(64), nullable=True),
    Column("decision", String(8), nullable=False),  # allow | deny
    Column("reason", String(40), nullable=False),
    Column("measurement", String(96), nullable=True),  # hex of measurement | mnonce as sent
    Column("detail", Text, nullable=False, default=""),
)
Index("ix_audit_at", audit.c.at)

health = Table(  # one row the readiness check rewrites: proof that a write reaches the disk
    "health",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("checked_at", Float, nullable=False),
)
BROKER_TABLES = ("roots", "hosts", "guests", "digests", "secrets", "launches", "audit")  # what `init` made


def default_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / 'broker.sqlite3').resolve()}"


def _sqlite_pragmas(dbapi_connection: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
    """WAL keeps readers and the writer apart; NORMAL sync is durable across process crashes."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=10000")
    cursor.close()


_PASSWORD_IN_URL = re.compile(r"(?P<user>://[^:/@]*):.*@")  # greedy: a password may hold '@'


def shown_url(url: str) -> str:
    """The URL fit for a message or log: any password masked, even in a URL SQLAlchemy cannot parse."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return _PASSWORD_IN_URL.sub(r"\g<user>:***@", url)


def make_engine(url: str | URL) -> Engine:
    """One code path for both backends; the URL decides (sqlite:///FILE or postgresql+psycopg://...)."""
    shown = shown_url(url) if isinstance(url, str) else url.render_as_string(hide_password=True)
    try:
        backend = make_url(url).get_backend_name()
        if backend == "sqlite":
            engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 10})
            event.listen(engine, "connect", _sqlite_pragmas)
        elif backend == "postgresql":
            engine = create_engine(url, pool_size=10, max_overflow=10, pool_pre_ping=True)
        else:
            raise UsageError(f"--db {shown!r}: use sqlite:///FILE or postgresql+psycopg://USER@HOST:PORT/DB")
    except NoSuchModuleError as exc:
        raise UsageError(f"--db {shown!r}: unknown database driver; use sqlite:///FILE or "
                         "postgresql+psycopg://USER@HOST:PORT/DB") from exc
    except (ArgumentError, ValueError) as exc:  # their messages may quote the whole URL, password included
        raise UsageError(f"--db {shown!r}: not a valid database URL; use sqlite:///FILE or "
                         "postgresql+psycopg://USER@HOST:PORT/DB") from exc
    return engine


def create_schema(engine: Engine) -> None:
    """Create missing tables (idempotent; safe when several replicas start at once)."""
    metadata.create_all(engine, checkfirst=True)
