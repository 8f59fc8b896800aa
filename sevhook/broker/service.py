"""The broker as one object: the store both services share, the admin service (roots, hosts, guests,
audit) and the launch service (sessions, attestation, release), plus the health checks the HTTP
layer answers with. The CLI, the HTTP app and the demo all build it here."""

from __future__ import annotations

import time

from sqlalchemy import Engine, select, update

from sevhook.broker import db
from sevhook.broker.admin import AdminService
from sevhook.broker.launch import DEFAULT_LAUNCH_TTL, LaunchService
from sevhook.broker.store import Store
from sevhook.broker.vault import Vault


class Broker:
    """One broker over one database: `admin` for the owner, `launch` for the hosts."""

    def __init__(self, engine: Engine, vault: Vault, launch_ttl: float = DEFAULT_LAUNCH_TTL) -> None:
        self.store = Store(engine, vault)
        self.admin = AdminService(self.store)
        self.launch = LaunchService(self.store, launch_ttl)

    @property
    def engine(self) -> Engine:
        return self.store.engine

    def check_read(self) -> None:
        """Liveness: a cheap read of a broker table (a corrupt or vanished database fails it)."""
        with self.store.read() as conn:
            conn.execute(select(db.roots.c.name).limit(1)).all()

    def check_write(self) -> None:
        """Readiness: a committed write, so a read-only or full file system or a held lock fails it."""
        with self.store.write() as conn:
            if conn.execute(update(db.health).where(db.health.c.id == 1).values(checked_at=time.time())).rowcount:
                return
            conn.execute(db.health.insert().values(id=1, checked_at=time.time()))
