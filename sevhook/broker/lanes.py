"""Database lanes: the host API's database work runs in threads of its own, off the event loop, a batch
at a time.

Each lane is one thread with a queue. The event loop does the CPU work of a request (parsing, MACs,
ECDH, sealing) itself and hands the lane only the database round trip, as a job: a function of one
SQLAlchemy connection. The lane takes every job that queued while it was busy, runs them on one
connection, and wakes the event loop once for the whole batch. Under load that turns many thread
hand-offs (and their fights for the GIL) into few, which is where the broker's time went.

The write lane commits a batch in one transaction (group commit); when any job in it fails, the batch
is rolled back and every job runs again alone, so one job's failure is never another's. A job's result
reaches its waiter only after its transaction committed. Reads have a lane of their own, so a write
waiting on a lock another process holds never delays a read; /healthz has its own threads (app.py)."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy.engine import Connection

from sevhook.broker.store import Store

T = TypeVar("T")
Job = Callable[[Connection], Any]
MAX_BATCH = 64  # jobs per batch (more when one pass of the loop submits more): bounds a transaction's length
_Submitted = tuple[Job, "asyncio.Future[Any]", asyncio.AbstractEventLoop]


@dataclass(frozen=True)
class Outcome:
    """What one job gave: its value, or the exception it raised."""

    value: Any = None
    error: BaseException | None = None


def _settle(done: Sequence[tuple[asyncio.Future[Any], Outcome]]) -> None:
    """On the event loop: hand each waiter its outcome (a waiter that went away is skipped)."""
    for future, outcome in done:
        if future.done():
            continue
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.value)


class Lane:
    """One thread running batches of jobs through `run_batch` (which gives one Outcome per job). Jobs
    submitted during one pass of the event loop reach the thread together, in one wake-up."""

    def __init__(self, name: str, run_batch: Callable[[list[Job]], list[Outcome]]) -> None:
        self._run_batch = run_batch
        self._queue: queue.SimpleQueue[list[_Submitted]] = queue.SimpleQueue()
        self._pending: dict[asyncio.AbstractEventLoop, list[_Submitted]] = {}
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False
        self._start = threading.Lock()

    async def __call__(self, job: Callable[[Connection], T]) -> T:
        """Run `job` in this lane and wait for its outcome without blocking the event loop."""
        if not self._started:
            with self._start:
                if not self._started:
                    self._thread.start()
                    self._started = True
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:  # the first job of this pass: hand the pass's jobs over once it ends
            pending = self._pending[loop] = []
            loop.call_soon(self._hand_over, loop)
        pending.append((job, future, loop))
        return await future

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._queue.put(self._pending.pop(loop))

    def _serve(self) -> None:
        while True:
            batch = self._queue.get()
            while len(batch) < MAX_BATCH:
                try:
                    batch += self._queue.get_nowait()
                except queue.Empty:
                    break
            try:
                outcomes = self._run_batch([job for job, _future, _loop in batch])
            except BaseException as exc:  # noqa: BLE001  (the lane must outlive any failure; each waiter learns it)
                outcomes = [Outcome(error=exc)] * len(batch)
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Outcome]]] = {}
            for (_job, future, loop), outcome in zip(batch, outcomes, strict=True):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, done in by_loop.items():
                if not loop.is_closed():
                    loop.call_soon_threadsafe(_settle, done)


def _read_batch(store: Store, jobs: list[Job]) -> list[Outcome]:
    """All reads of a batch on one connection (one pool checkout instead of one per read)."""
    outcomes = []
    with store.read() as conn:
        for job in jobs:
            try:
                outcomes.append(Outcome(job(conn)))
            except Exception as exc:  # noqa: BLE001  (handed to the job's waiter)
                outcomes.append(Outcome(error=exc))
                conn.rollback()  # a failed statement can spoil the transaction (PostgreSQL): the next read starts clean
    return outcomes


def _write_alone(store: Store, job: Job) -> Outcome:
    try:
        with store.write() as conn:
            return Outcome(job(conn))
    except Exception as exc:  # noqa: BLE001  (handed to the job's waiter)
        return Outcome(error=exc)


def _write_batch(store: Store, jobs: list[Job]) -> list[Outcome]:
    """Group commit: one transaction for the batch; if anything in it fails, each job alone."""
    if len(jobs) == 1:
        return [_write_alone(store, jobs[0])]
    try:
        with store.write() as conn:
            values = [job(conn) for job in jobs]
    except Exception:  # noqa: BLE001  (rolled back; the jobs run again one by one, each to its own outcome)
        return [_write_alone(store, job) for job in jobs]
    return [Outcome(value) for value in values]


class Lanes:
    """The read lane and the write lane over one store."""

    def __init__(self, store: Store) -> None:
        self.read = Lane("sevhook-db-read", lambda jobs: _read_batch(store, jobs))
        self.write = Lane("sevhook-db-write", lambda jobs: _write_batch(store, jobs))
