"""Running the broker: open the data directory and database, build the app, serve it with uvicorn
(TLS from certificate files when given). Several replicas may share one PostgreSQL database and
one storage key (copy the data directory's storage.key and admin.token to each)."""

from __future__ import annotations

import gc
import logging
import os
import socket
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from sqlalchemy import URL, inspect, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError

from sevhook.broker import db
from sevhook.broker.app import create_app, wrap_limits
from sevhook.broker.http import guarded_protocol
from sevhook.broker.kds import DEFAULT_KDS_URL
from sevhook.broker.launch import DEFAULT_LAUNCH_TTL
from sevhook.broker.service import Broker
from sevhook.broker.settings import Limits
from sevhook.broker.vault import STORAGE_KEY_FILE, Vault, admin_token_digest, check_data_dir, init_keys
from sevhook.config import DB_PASSWORD_ENV
from sevhook.errors import UsageError
from sevhook.files import read_input_file

log = logging.getLogger("sevhook.broker")

DEFAULT_LISTEN = "127.0.0.1:8700"
MAX_SMALL_FILE = 1 << 20  # a PEM chain, key or password file is far smaller


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "sevhook" / "broker"


def parse_listen(text: str) -> tuple[str, int]:
    """ADDR:PORT, [IPv6]:PORT or :PORT (loopback)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--listen {text!r}: use ADDR:PORT, e.g. 127.0.0.1:8700 or [::1]:8700")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port_text)


def _read_regular(path: Path, what: str) -> bytes:
    """A small regular file: the server reads it again at start-up, so a fifo or device is refused."""
    if not path.exists():
        raise UsageError(f"{what} {path}: file not found; give the path of an existing file")
    return read_input_file(path, MAX_SMALL_FILE, what, regular_only=True)


def database_url(url: str | None, data_dir: Path, password_file: Path | None = None,
                 environ: Mapping[str, str] = os.environ) -> URL:
    """The database URL with its password from a file or $SEVHOOK_DB_PASSWORD, never from the command
    line, where every user of the machine can read it in the process list."""
    text = url or db.default_url(data_dir)
    try:
        parsed = make_url(text)
    except (ArgumentError, ValueError) as exc:
        raise UsageError(f"--db {db.shown_url(text)!r}: not a valid database URL; use sqlite:///FILE or "
                         "postgresql+psycopg://USER@HOST:PORT/DB") from exc
    if parsed.password is not None:
        raise UsageError(f"--db {db.shown_url(text)!r}: the URL holds a password, which other users can read in the "
                         f"process list; remove it from the URL and put it in a 0600 file given with "
                         f"--db-password-file, or in ${DB_PASSWORD_ENV}")
    password: str | None = None
    if password_file is not None:
        info = _stat(password_file, "--db-password-file")
        if info.st_mode & 0o077:
            raise UsageError(f"--db-password-file {password_file}: readable by others (mode "
                             f"{info.st_mode & 0o777:o}); run chmod 600 on it")
        lines = _read_regular(password_file, "--db-password-file").decode("utf-8", "replace").splitlines()
        password = lines[0] if lines else ""
        if not password:
            raise UsageError(f"--db-password-file {password_file}: the first line must hold the password")
    elif environ.get(DB_PASSWORD_ENV):
        password = environ[DB_PASSWORD_ENV]
    if password is not None:
        if parsed.get_backend_name() == "sqlite":
            raise UsageError("a database password applies to PostgreSQL only; the database is SQLite")
        parsed = parsed.set(password=password)
    return parsed


def _stat(path: Path, what: str) -> os.stat_result:
    try:
        return path.stat()
    except FileNotFoundError as exc:
        raise UsageError(f"{what} {path}: file not found; give the path of an existing file") from exc
    except OSError as exc:
        raise UsageError(f"{what} {path}: cannot read it ({exc.strerror})") from exc


def open_broker(data_dir: Path, db_url: str | URL | None, launch_ttl: float = DEFAULT_LAUNCH_TTL,
                create: bool = False) -> Broker:
    """The Broker over the data directory's storage key and the database. Only `create` (`broker init`,
    `serve --init`) makes keys and tables; otherwise a database without the broker's tables (an empty
    file, the wrong database) is refused rather than served as an empty broker."""
    if create:
        init_keys(data_dir)
    else:
        check_data_dir(data_dir)
    vault = Vault.from_data_dir(data_dir)  # before touching the database: a wrong --data-dir creates nothing
    url = db_url if isinstance(db_url, URL) else make_url(db_url or db.default_url(data_dir))
    sqlite_file = Path(url.database) if url.get_backend_name() == "sqlite" and url.database else None
    if sqlite_file is not None:
        prepare_sqlite_file(sqlite_file, create)
    engine = db.make_engine(url)
    shown = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            present = set(inspect(conn).get_table_names())
        missing = [name for name in db.BROKER_TABLES if name not in present]
        if missing and not create:
            raise UsageError(f"database {shown}: it has no broker tables ({', '.join(missing)} missing), so it is "
                             "not this broker's database or it was emptied; restore it from a backup, or run "
                             f"`sevhook broker init --data-dir {data_dir}` to start a new, empty broker")
        db.create_schema(engine)  # new tables of a newer version (and all of them at init)
    except SQLAlchemyError as exc:
        engine.dispose()
        cause = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()
        raise UsageError(f"database {shown}: cannot open it ({exc.__class__.__name__}: "
                         f"{cause[0][:200] if cause else 'no detail'}); check the path and its permissions, or "
                         "restore it from a backup") from exc
    except UsageError:
        engine.dispose()
        raise
    if sqlite_file is not None:
        tighten_sqlite_files(sqlite_file)
    return Broker(engine, vault, launch_ttl=launch_ttl)


def prepare_sqlite_file(path: Path, create: bool) -> None:
    """An existing database file must be a non-empty regular file (a zero-length file would silently
    become an empty broker); a new one is created 0600 so SQLite's -wal and -shm copy that mode."""
    try:
        info = path.stat()
    except FileNotFoundError:
        if not create:
            raise UsageError(f"database {path}: missing; restore it from a backup, or run `sevhook broker init` "
                             "to start a new, empty broker") from None
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600))
        except OSError as exc:
            raise UsageError(f"database {path}: cannot create it ({exc.strerror})") from exc
        return
    except OSError as exc:
        raise UsageError(f"database {path}: cannot read it ({exc.strerror})") from exc
    if not stat.S_ISREG(info.st_mode):
        raise UsageError(f"database {path}: not a regular file; give the broker's SQLite file")
    if info.st_size == 0:
        raise UsageError(f"database {path}: the file is empty (0 bytes), so the broker's tables and audit log are "
                         "gone; restore it from a backup, or remove it and run `sevhook broker init` for a new, "
                         "empty broker")
    if not os.access(path, os.R_OK | os.W_OK):
        raise UsageError(f"database {path}: not readable and writable by this user; fix its owner or mode (0600)")


def tighten_sqlite_files(path: Path) -> None:
    """The database and its -wal/-shm hold the audit log and sealed blobs: 0600, whatever made them."""
    for member in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        try:
            mode = member.stat().st_mode & 0o777
            if mode & 0o077:
                member.chmod(mode & 0o700)
        except FileNotFoundError:
            continue
        except OSError as exc:
            raise UsageError(f"{member}: readable by others and cannot be made private ({exc.strerror}); "
                             "run chmod 600 on it") from exc


@dataclass(frozen=True)
class ServeOptions:
    """Everything `serve` needs; the command line (or a configuration file) fills it."""

    data_dir: Path
    db_url: str | URL | None
    listen: str = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = field(default_factory=Limits)
    launch_ttl: float = DEFAULT_LAUNCH_TTL
    access_log: bool = False
    init: bool = False  # create missing keys and tables (as `sevhook broker init`) instead of refusing
    kds_url: str | None = DEFAULT_KDS_URL  # where unsigned CEKs' signed copies come from; None: imported only


def check_tls(cert: Path | None, key: Path | None) -> None:
    """Each file is a regular, readable PEM file of the right kind, and the two match; every failure
    names the file and what is wrong with it."""
    if (cert is None) != (key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if cert is None or key is None:
        return
    cert_pem = _read_regular(cert, "--tls-cert")
    key_pem = _read_regular(key, "--tls-key")
    try:
        x509.load_pem_x509_certificates(cert_pem)
    except ValueError as exc:
        raise UsageError(f"--tls-cert {cert}: not a PEM certificate (expected -----BEGIN CERTIFICATE-----)") from exc
    try:
        load_pem_private_key(key_pem, password=None)
    except TypeError as exc:
        raise UsageError(f"--tls-key {key}: the private key is encrypted; give an unencrypted PEM key "
                         "(readable only by the broker's user)") from exc
    except ValueError as exc:
        raise UsageError(f"--tls-key {key}: not a PEM private key (expected -----BEGIN ... PRIVATE KEY-----)") from exc
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(str(cert), str(key))
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: the key does not belong to the certificate "
                         f"({exc.__class__.__name__})") from exc


def _bind(host: str, port: int, listen: str) -> socket.socket:
    """The listening socket, bound here so the log names the real port (also for :0) and a taken
    address is one clear error."""
    try:
        family, kind, proto, _name, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:  # socket.gaierror included
        raise UsageError(f"--listen {listen}: cannot resolve {host!r} ({exc.strerror or exc})") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise UsageError(f"--listen {listen}: cannot bind ({exc.strerror}); pick a free port") from None
    return sock


def serve(options: ServeOptions) -> int:
    """Serve until SIGINT/SIGTERM."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    host, port = parse_listen(options.listen)
    check_tls(options.tls_cert, options.tls_key)
    options.limits.check()
    if not options.init and not (options.data_dir / STORAGE_KEY_FILE).exists():
        raise UsageError(f"{options.data_dir}: not an initialised broker data directory (no {STORAGE_KEY_FILE}); "
                         f"run `sevhook broker init --data-dir {options.data_dir}` first, or serve with --init "
                         "to create it")
    broker = open_broker(options.data_dir, options.db_url, options.launch_ttl, create=options.init)
    broker.store.ceks.configure(options.kds_url)
    app = wrap_limits(create_app(broker, admin_token_digest(options.data_dir), options.limits), options.limits)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        ssl_certfile=str(options.tls_cert) if options.tls_cert else None,
        ssl_keyfile=str(options.tls_key) if options.tls_key else None,
        access_log=options.access_log,
        log_level="info",
        server_header=False,
        http=guarded_protocol(options.limits),
        timeout_keep_alive=options.limits.keepalive_timeout,
        lifespan="off",
    )
    sock = _bind(host, port, options.listen)
    bound_port = sock.getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    shown_host = f"[{host}]" if ":" in host else host
    log.info("broker on %s://%s:%d, database %s, data %s", scheme, shown_host, bound_port,
             broker.engine.url.render_as_string(hide_password=True), options.data_dir)
    # what start-up made (the app, SQLAlchemy, pydantic, the caches' classes) lives as long as the process:
    # frozen, it is left out of the collector's full passes, which otherwise walk it while requests wait
    gc.collect()
    gc.freeze()
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        broker.engine.dispose()
    return 0
