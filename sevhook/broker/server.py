"""Running the broker: open the data directory and database, build the app, serve it with uvicorn
(TLS from certificate files when given). Several replicas may share one PostgreSQL database and
one storage key (copy the data directory's storage.key and admin.token to each)."""

from __future__ import annotations

import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

import uvicorn
from sqlalchemy.exc import SQLAlchemyError

from sevhook.broker import db
from sevhook.broker.app import Limits, create_app, wrap_limits
from sevhook.broker.kds import DEFAULT_KDS_URL
from sevhook.broker.service import DEFAULT_LAUNCH_TTL, Broker
from sevhook.broker.vault import STORAGE_KEY_FILE, Vault, admin_token_digest, init_keys
from sevhook.errors import UsageError

log = logging.getLogger("sevhook.broker")

DEFAULT_LISTEN = "127.0.0.1:8700"


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


def open_broker(data_dir: Path, db_url: str | None, launch_ttl: float = DEFAULT_LAUNCH_TTL,
                create_keys: bool = False) -> Broker:
    """The Broker over the data directory's storage key and the database (created if missing)."""
    if create_keys:
        init_keys(data_dir)
    vault = Vault.from_data_dir(data_dir)  # before touching the database: a wrong --data-dir creates nothing
    engine = db.make_engine(db_url or db.default_url(data_dir))
    try:
        db.create_schema(engine)
    except SQLAlchemyError as exc:
        raise UsageError(f"database {engine.url.render_as_string(hide_password=True)}: cannot open it "
                         f"({exc.__class__.__name__}: {str(exc.orig if hasattr(exc, 'orig') else exc)[:200]})"
                         ) from None
    return Broker(engine, vault, launch_ttl=launch_ttl)


@dataclass(frozen=True)
class ServeOptions:
    data_dir: Path
    db_url: str | None
    listen: str = DEFAULT_LISTEN
    tls_cert: Path | None = None
    tls_key: Path | None = None
    limits: Limits = Limits()
    launch_ttl: float = DEFAULT_LAUNCH_TTL
    access_log: bool = False
    init: bool = False  # create missing keys (as `sevhook broker init`) instead of refusing the data directory
    kds_url: str | None = DEFAULT_KDS_URL  # where unsigned CEKs' signed copies come from; None: imported only


def _check_tls(options: ServeOptions) -> None:
    if (options.tls_cert is None) != (options.tls_key is None):
        raise UsageError("give both --tls-cert and --tls-key, or neither")
    if options.tls_cert is None or options.tls_key is None:
        return
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    for flag, path in (("--tls-cert", options.tls_cert), ("--tls-key", options.tls_key)):
        if not path.is_file():
            raise UsageError(f"{flag} {path}: TLS file not found; give the path of an existing PEM file")
    try:
        context.load_cert_chain(str(options.tls_cert), str(options.tls_key))
    except (ssl.SSLError, OSError) as exc:
        raise UsageError(f"--tls-cert {options.tls_cert} / --tls-key {options.tls_key}: not a matching PEM "
                         f"certificate and key ({exc.__class__.__name__})") from None


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
    _check_tls(options)
    if not options.init and not (options.data_dir / STORAGE_KEY_FILE).exists():
        raise UsageError(f"{options.data_dir}: not an initialised broker data directory (no {STORAGE_KEY_FILE}); "
                         f"run `sevhook broker init --data-dir {options.data_dir}` first, or serve with --init "
                         "to create it")
    broker = open_broker(options.data_dir, options.db_url, options.launch_ttl, create_keys=options.init)
    broker.ceks.configure(options.kds_url)
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
        timeout_keep_alive=30,
        lifespan="off",
    )
    sock = _bind(host, port, options.listen)
    bound_port = sock.getsockname()[1]
    scheme = "https" if options.tls_cert else "http"
    shown_host = f"[{host}]" if ":" in host else host
    log.info("broker on %s://%s:%d, database %s, data %s", scheme, shown_host, bound_port,
             broker.engine.url.render_as_string(hide_password=True), options.data_dir)
    try:
        uvicorn.Server(config).run(sockets=[sock])
    finally:
        sock.close()
        broker.engine.dispose()
    return 0
