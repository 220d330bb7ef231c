"""The embedded store: one SQLite file in WAL mode, for a controller that runs alone.

One worker thread owns the connection, so the event loop never blocks on the disk; an
asyncio lock makes transactions take turns. Events go to this process's own subscribers
(there is no other controller to tell), when the transaction commits.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, TypeVar

from controller.store.database import Event, StoreError

T = TypeVar("T")


class SQLiteDatabase:
    dialect = "sqlite"

    def __init__(self, path: Path):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kumo-store")
        self._conn: sqlite3.Connection | None = None
        self._lock = asyncio.Lock()
        self._subscribers: list[Callable[[Event | None], None]] = []

    async def connect(self) -> None:
        try:
            self._conn = await self._run(self._open)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"database {self.path}: {exc}") from None

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @asynccontextmanager
    async def transaction(self, *, schema_lock: bool = False) -> AsyncIterator[_Tx]:
        # BEGIN IMMEDIATE takes the write lock up front, which is the schema lock too.
        assert self._conn is not None, "the store is not open"
        conn = self._conn
        async with self._lock:
            await self._run(conn.execute, "BEGIN IMMEDIATE")
            tx = _Tx(self)
            try:
                yield tx
            except BaseException:
                # Shielded: a cancelled request must still leave the connection out of its transaction.
                await asyncio.shield(self._run(conn.execute, "ROLLBACK"))
                raise
            commit = asyncio.ensure_future(self._run(conn.execute, "COMMIT"))
            # Events go out once the commit is done, even if whoever waits for it is cancelled.
            commit.add_done_callback(lambda done: done.cancelled() or done.exception() or self._dispatch(tx.events))
            await asyncio.shield(commit)

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            for callback in self._subscribers:
                callback(event)

    def subscribe(self, callback: Callable[[Event | None], None]) -> None:
        self._subscribers.append(callback)

    async def singleton(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        await work()  # one controller process per SQLite file: it is always the one


class _Tx:
    def __init__(self, db: SQLiteDatabase):
        self._db = db
        self.events: list[Event] = []

    def _conn(self) -> sqlite3.Connection:
        assert self._db._conn is not None
        return self._db._conn

    async def execute(self, sql: str, *args: Any) -> int:
        return await self._db._run(lambda: self._conn().execute(sql, args).rowcount)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._db._run(self._conn().executemany, sql, list(rows))

    async def one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._db._run(lambda: self._conn().execute(sql, args).fetchone())
        return dict(row) if row is not None else None

    async def all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        rows = await self._db._run(lambda: self._conn().execute(sql, args).fetchall())
        return [dict(row) for row in rows]

    def notify(self, event: Event) -> None:
        self.events.append(event)
