"""The shared store: PostgreSQL, for any number of controller processes serving one fleet.

Every controller reads and writes the same tables; what one must tell the others at once
travels by ``NOTIFY kumo`` inside the transaction that made it true, so it arrives when that
commits, and each controller keeps one connection that ``LISTEN``s. Work that exactly one
controller may do (forwarding alerts) holds a session advisory lock on a connection of its
own: when that controller dies its connection closes, the lock is free, and another one
takes the work over. Nothing here is home-made consensus; PostgreSQL decides.

Connection failures become :class:`StoreUnavailable` (the API answers 503, the request is
safe to retry); a wrong password or database name is a :class:`StoreError` that stops the
controller with the ``database`` setting named.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from controller.store.database import Event, StoreError, StoreUnavailable, cancel_and_wait

log = logging.getLogger("kumo.controller.store")

CHANNEL = "kumo"
POOL_SIZE = 16
CHECK_INTERVAL = 5.0
ACQUIRE_TIMEOUT = 10.0  # every connection busy this long: answer 503 rather than queue for ever
COMMAND_TIMEOUT = 30.0  # no query of the store's takes near this; one that does is a dead connection
CLOSE_TIMEOUT = 5.0  # how often a listening or lock-holding connection proves it is alive
RETRY_MAX = 10.0
SCHEMA_LOCK = "schema"

# Errors after which the same request can succeed once the database is back.
CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.InterfaceError,
)
# Errors that no retry fixes: the setting is wrong.
CONFIG_ERRORS = (
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    asyncpg.exceptions.InvalidCatalogNameError,
)
_PLACEHOLDER = re.compile(r"\?")


def _numbered(sql: str) -> str:
    """``?`` placeholders (the store's) as ``$1, $2...`` (PostgreSQL's)."""
    counter = iter(range(1, 1000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


def lock_key(name: str) -> int:
    """A signed 64-bit advisory-lock key for ``name``, the same in every controller."""
    return int.from_bytes(hashlib.sha256(f"kumo:{name}".encode()).digest()[:8], "big", signed=True)


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return url.replace(f":{parts.password}@", ":***@", 1)


class PostgresDatabase:
    dialect = "postgresql"

    def __init__(self, url: str):
        self.url = url
        self._pool: asyncpg.Pool | None = None
        self._subscribers: list[Callable[[Event | None], None]] = []
        self._listener: asyncio.Task[None] | None = None
        self._sql: dict[str, str] = {}

    def _where(self) -> str:
        return f"database {safe_url(self.url)}"

    async def connect(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=POOL_SIZE,
                                                   command_timeout=COMMAND_TIMEOUT)
        except CONFIG_ERRORS as exc:
            raise StoreError(f"{self._where()}: {exc}; fix the database setting in controller.yaml") from None
        except CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"{self._where()} cannot be reached: {exc}") from None
        except (ValueError, asyncpg.exceptions.ClientConfigurationError) as exc:
            raise StoreError(f"{self._where()}: {exc}; fix the database setting in controller.yaml") from None
        try:
            listening = await self._listening()
        except CONNECTION_ERRORS as exc:
            await self._pool.close()
            raise StoreUnavailable(f"{self._where()} cannot be reached: {exc}") from None
        # Listening before the store is used: what the controller loads next cannot miss a change.
        self._listener = asyncio.create_task(self._listen(listening), name="kumo-store-listen")

    async def close(self) -> None:
        if self._listener is not None:
            await cancel_and_wait([self._listener])
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), CLOSE_TIMEOUT)
            except TimeoutError:
                log.warning("database connections still busy after %.0f s: closing them now", CLOSE_TIMEOUT)
                self._pool.terminate()

    def sql(self, text: str) -> str:
        numbered = self._sql.get(text)
        if numbered is None:
            numbered = self._sql[text] = _numbered(text)
        return numbered

    @asynccontextmanager
    async def transaction(self, *, schema_lock: bool = False) -> AsyncIterator[_Tx]:
        assert self._pool is not None, "the store is not open"
        try:
            conn = await self._pool.acquire(timeout=ACQUIRE_TIMEOUT)
        except CONNECTION_ERRORS as exc:
            raise StoreUnavailable(f"no connection to the {self._where()}: {exc or 'all are busy'}") from None
        try:
            async with conn.transaction():
                if schema_lock:
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(SCHEMA_LOCK))
                tx = _Tx(self, conn)
                yield tx
                for event in tx.events:
                    await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, json.dumps(event))
        except (*CONNECTION_ERRORS, asyncpg.exceptions.InternalClientError) as exc:
            _discard(conn)
            raise StoreUnavailable(f"lost the connection to the {self._where()}: {exc}") from None
        except asyncio.CancelledError:
            # Cut mid-query (the client went away): the protocol's state is unknown, and a
            # connection handed back like that fails the next user or never comes back.
            _discard(conn)
            raise
        finally:
            # asyncpg may have let go of a connection it saw die: then there is nothing to hand back.
            with contextlib.suppress(asyncpg.exceptions.InterfaceError):
                await self._pool.release(conn)

    # Events.

    def subscribe(self, callback: Callable[[Event | None], None]) -> None:
        self._subscribers.append(callback)

    def _dispatch(self, event: Event | None) -> None:
        for callback in self._subscribers:
            callback(event)

    def _on_notify(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            event = json.loads(payload)
        except ValueError:
            log.warning("ignoring a malformed event on channel %s: %r", CHANNEL, payload[:200])
            return
        self._dispatch(event)

    async def _listening(self) -> asyncpg.Connection:
        conn = await asyncpg.connect(self.url)
        try:
            await conn.add_listener(CHANNEL, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        return conn

    async def _listen(self, conn: asyncpg.Connection) -> None:
        """Keep one LISTENing connection; after reconnecting, tell subscribers they may have
        missed events (None), so they reload instead of waiting for what never comes."""
        delay = 0.5
        while True:
            try:
                await _while_alive(conn)
            finally:
                conn.terminate()
            log.warning("lost the connection that listens for other controllers' events; reconnecting")
            while True:
                try:
                    conn = await self._listening()
                    break
                except (*CONNECTION_ERRORS, *CONFIG_ERRORS) as exc:
                    log.warning("cannot listen for other controllers' events (%s); retrying in %.0f s", exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, RETRY_MAX)
            log.info("listening for other controllers' events again")
            delay = 0.5
            self._dispatch(None)

    # Singleton work.

    async def singleton(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        key, delay = lock_key(name), 0.5
        while True:
            try:
                conn = await asyncpg.connect(self.url)
            except (*CONNECTION_ERRORS, *CONFIG_ERRORS):
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                continue
            delay = 0.5
            try:
                while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", key):
                    await asyncio.sleep(CHECK_INTERVAL)
                log.info("this controller now does %s (another controller may take it over if this one dies)", name)
                # The lock lives exactly as long as the connection: watch it beside the work.
                runner, alive = asyncio.ensure_future(work()), asyncio.ensure_future(_while_alive(conn))
                try:
                    await asyncio.wait({runner, alive}, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    # Not `await task` under suppress(CancelledError): that would also swallow
                    # this task's own cancellation (the controller stopping) and loop on.
                    await cancel_and_wait((runner, alive))
                if alive.done() and not alive.cancelled():
                    log.warning("stopped doing %s: its lock's connection to the database was lost", name)
                else:
                    log.error("%s stopped unexpectedly; taking it up again", name,
                              exc_info=runner.exception() if not runner.cancelled() else None)
                    await asyncio.sleep(delay)
            except CONNECTION_ERRORS as exc:
                log.warning("lost the database connection holding %s: %s", name, exc)
            finally:
                conn.terminate()


def _discard(conn: asyncpg.Connection) -> None:
    """Close ``conn`` at once so the pool replaces it (it may already be gone)."""
    with contextlib.suppress(asyncpg.exceptions.InterfaceError):
        conn.terminate()


async def _while_alive(conn: asyncpg.Connection) -> None:
    """Return when ``conn`` is lost (asyncpg notices a dead peer only when it talks to it)."""
    while not conn.is_closed():
        await asyncio.sleep(CHECK_INTERVAL)
        # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow this task's own
        # cancellation when the query ends at that moment, and the loop would run on after
        # the controller asked it to stop.
        try:
            async with asyncio.timeout(CHECK_INTERVAL):
                await conn.execute("SELECT 1")
        except CONNECTION_ERRORS:
            return


class _Tx:
    def __init__(self, db: PostgresDatabase, conn: asyncpg.Connection):
        self._db = db
        self._conn = conn
        self.events: list[Event] = []

    async def execute(self, sql: str, *args: Any) -> int:
        status = await self._conn.execute(self._db.sql(sql), *args)
        count = status.rpartition(" ")[2]  # "UPDATE 3", "INSERT 0 1", "CREATE TABLE"
        return int(count) if count.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self._conn.executemany(self._db.sql(sql), list(rows))

    async def one(self, sql: str, *args: Any) -> dict[str, Any] | None:
        row = await self._conn.fetchrow(self._db.sql(sql), *args)
        return dict(row) if row is not None else None

    async def all(self, sql: str, *args: Any) -> list[dict[str, Any]]:
        return [dict(row) for row in await self._conn.fetch(self._db.sql(sql), *args)]

    def notify(self, event: Event) -> None:
        self.events.append(event)
