"""What the store's queries need from a database, and the errors either side raises.

:class:`Database` is the contract that :mod:`controller.store.sqlite` and
:mod:`controller.store.postgres` fill: transactions (:class:`Tx`) that run SQL with ``?``
placeholders, events, and work that one controller does at a time. It stands apart from
the queries so that both databases and every query module depend on it alone.

Several controllers learn of each other's changes through **events**: a method that
changes something another controller must react to at once (a task queued for a node it
long-polls, a task ended, a certificate added or revoked, an alert arrived) sends an event
with its transaction, delivered when it commits, to every controller including its own.
A subscriber that is told ``None`` may have missed events and must reload what it caches.
Some events only keep live views current (a migration's phase, a node's instances changed,
a web session revoked): subscribers ignore what they have no use for.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from typing import Any, Protocol

Event = dict[str, Any]


class StoreError(Exception):
    """The store cannot do what was asked (a conflict, a missing row, a database it must not use)."""


class StoreUnavailable(Exception):
    """The database cannot be reached now; the same request may succeed when it is back."""


class Tx(Protocol):
    """One transaction. SQL uses ``?`` placeholders; rows come back as dicts."""

    async def execute(self, sql: str, *args: Any) -> int:
        """Run one statement; the number of rows it changed."""

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None: ...
    async def one(self, sql: str, *args: Any) -> dict[str, Any] | None: ...
    async def all(self, sql: str, *args: Any) -> list[dict[str, Any]]: ...

    def notify(self, event: Event) -> None:
        """Send ``event`` to every controller's subscriber when (and only if) this commits."""


class Database(Protocol):
    """What :class:`controller.store.Store` needs from a database."""

    dialect: str  # a key of controller.store.schema.DIALECT

    async def connect(self) -> None:
        """Connect; :class:`StoreUnavailable` when the database cannot be reached (worth retrying),
        :class:`StoreError` when it never will be (wrong password, no such database)."""

    def transaction(self, *, schema_lock: bool = False) -> AbstractAsyncContextManager[Tx]:
        """A transaction; ``schema_lock`` also excludes every other controller's schema upgrade."""

    def subscribe(self, callback: Callable[[Event | None], None]) -> None:
        """Call ``callback`` with every event any controller sends, from now on."""

    async def singleton(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        """Run ``work`` only while this process is the one controller that holds ``name``;
        wait for it to be free otherwise, and take it over when its holder dies. Never returns."""

    async def close(self) -> None: ...


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until every one has ended. On Python 3.11 an
    ``asyncio.wait_for`` inside a library (a pool's acquire timeout) can swallow a
    cancellation that lands as its wait ends, and a loop then runs on: each task still
    running is cancelled again until it ends."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=1.0)
