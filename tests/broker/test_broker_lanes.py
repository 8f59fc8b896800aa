"""The database lanes (sevhook.broker.lanes) on a real SQLite file: jobs run off the event loop, the
jobs of one loop pass share one transaction (group commit), one job's failure is never another's, and
single use holds when two claims of one launch land in the same batch."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import Connection

from sevhook.broker import db
from sevhook.broker.lanes import Lanes
from sevhook.broker.launch import _CLAIM_SINGLE_USE
from sevhook.broker.store import Store
from sevhook.broker.vault import Vault


@pytest.fixture
def store(tmp_path: Path) -> Store:
    engine = db.make_engine(db.default_url(tmp_path))
    db.create_schema(engine)
    return Store(engine, Vault(os.urandom(32)))


def _audit_row(store: Store, actor: str) -> object:
    def job(conn: Connection) -> str:
        store.audit(conn, actor, "test", "allow", "ok")
        return actor
    return job


def _actors(store: Store) -> list[str]:
    with store.read() as conn:
        return sorted(conn.execute(select(db.audit.c.actor)).scalars())


def test_jobs_run_in_the_lane_threads_not_on_the_event_loop(store: Store) -> None:
    lanes = Lanes(store)

    async def main() -> tuple[int, int, int]:
        return (threading.get_ident(), await lanes.read(lambda _conn: threading.get_ident()),
                await lanes.write(lambda _conn: threading.get_ident()))

    loop_thread, read_thread, write_thread = asyncio.run(main())
    assert len({loop_thread, read_thread, write_thread}) == 3


def test_a_failing_job_does_not_fail_the_others_in_its_batch(store: Store) -> None:
    lanes = Lanes(store)

    def failing(conn: Connection) -> None:
        store.audit(conn, "never-committed", "test", "allow", "ok")
        raise ValueError("this job fails after its write")

    async def main() -> list[object]:
        jobs = [_audit_row(store, f"host-{n}") for n in range(5)]
        jobs.insert(2, failing)
        # submitted in one pass of the loop: one batch, so one transaction that must be rolled back
        return await asyncio.gather(*(lanes.write(job) for job in jobs), return_exceptions=True)  # type: ignore[arg-type]

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[2], ValueError)
    assert [o for n, o in enumerate(outcomes) if n != 2] == [f"host-{n}" for n in range(5)]
    assert _actors(store) == [f"host-{n}" for n in range(5)]  # the failing job's row is gone, the others stay


def test_a_batch_commits_before_any_waiter_learns_its_result(store: Store) -> None:
    lanes = Lanes(store)

    async def main() -> list[str]:
        seen = []
        for actor in await asyncio.gather(*(lanes.write(_audit_row(store, f"h{n}")) for n in range(10))):  # type: ignore[arg-type]
            seen.append(actor)
            assert actor in _actors(store)  # visible to another connection: committed
        return seen

    assert len(asyncio.run(main())) == 10


def test_single_use_holds_for_two_claims_in_one_batch(store: Store) -> None:
    with store.write() as conn:
        conn.execute(db.guests.insert().values(id="g", policies="[1]", created_at=time.time()))
        conn.execute(db.launches.insert().values(id="L", guest_id="g", host="h", policy=1, state="created",
                                                 keys_sealed=b"x", created_at=time.time()))
    lanes = Lanes(store)

    def claim(conn: Connection) -> bool:
        return conn.execute(_CLAIM_SINGLE_USE, {"launch_id": "L", "new_state": "released",
                                                "now": time.time()}).rowcount == 1

    async def main() -> list[bool]:
        return list(await asyncio.gather(*(lanes.write(claim) for _ in range(8))))

    assert sorted(asyncio.run(main())) == [False] * 7 + [True]
    with store.read() as conn:
        assert conn.execute(select(func.count()).select_from(db.launches)
                            .where(db.launches.c.state == "released")).scalar() == 1


def test_a_failed_read_leaves_the_other_reads_of_its_batch_their_answers(store: Store) -> None:
    lanes = Lanes(store)

    def broken(conn: Connection) -> None:
        conn.exec_driver_sql("SELECT * FROM no_such_table")

    async def main() -> list[object]:
        reads = [lambda conn: conn.execute(select(func.count()).select_from(db.audit)).scalar()] * 3
        reads.insert(1, broken)
        return await asyncio.gather(*(lanes.read(job) for job in reads), return_exceptions=True)

    outcomes = asyncio.run(main())
    assert isinstance(outcomes[1], Exception)
    assert [o for n, o in enumerate(outcomes) if n != 1] == [0, 0, 0]
