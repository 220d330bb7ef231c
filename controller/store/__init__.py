"""The controller's state: nodes, certificates, join tokens, tasks, instances, alerts.

:class:`Store` holds every query, written once in the SQL that both databases speak; a
:class:`~controller.store.database.Database` runs them: :mod:`controller.store.sqlite`
(embedded, the default, one controller process) or :mod:`controller.store.postgres` (any
number of controller processes on one database). :func:`open_store` picks one from the
``database`` setting.

The queries are grouped by the records they serve, one module each (:mod:`.nodes`,
:mod:`.tasks`, :mod:`.instances`...); :class:`Store` is made of those groups, so that every
caller asks ``store.method(...)`` whichever group the method is in. What spans every
table (opening, the schema, pruning) is here.

Rows are plain dicts, times epoch seconds, JSON columns decoded. The store records; the
rules (what a finished task does to its instance, what removing a node does to its tasks)
are decided by the controller's services and handed to it as arguments. A change another
controller must react to at once travels as an event (see :mod:`controller.store.database`).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from controller.store.access import AccessQueries
from controller.store.alerts import AlertQueries
from controller.store.controllers import ControllerQueries
from controller.store.database import Event, StoreError
from controller.store.enrollment import EnrollmentQueries
from controller.store.fleet_settings import FleetSettingQueries
from controller.store.images import ImageQueries
from controller.store.instances import InstanceQueries
from controller.store.migrations import MigrationQueries
from controller.store.nodes import NodeQueries
from controller.store.rebalancing import RebalancingQueries
from controller.store.schema import SCHEMA_VERSION, statements
from controller.store.tasks import TaskQueries


def is_database_url(database: str) -> bool:
    """Whether the ``database`` setting names a PostgreSQL server rather than a SQLite file."""
    return database.startswith(("postgresql://", "postgres://"))


def open_store(database: str) -> Store:
    """The store for ``database`` (a ``postgresql://`` URL, or a SQLite file path), not yet open."""
    if is_database_url(database):
        # Imported here: only controllers on PostgreSQL need asyncpg installed.
        from controller.store.postgres import PostgresDatabase

        return Store(PostgresDatabase(database))
    from controller.store.sqlite import SQLiteDatabase

    return Store(SQLiteDatabase(Path(database)))


class Store(ControllerQueries, EnrollmentQueries, NodeQueries, TaskQueries, InstanceQueries, ImageQueries,
            MigrationQueries, RebalancingQueries, AccessQueries, FleetSettingQueries, AlertQueries):
    """Every query the controller makes. Each method is one transaction."""

    async def open(self) -> Store:
        """Connect and bring the schema up to date (see :mod:`controller.store.schema`)."""
        await self.db.connect()
        try:
            await self._migrate()
        except BaseException:
            await self.db.close()
            raise
        return self

    async def _migrate(self) -> None:
        async with self.db.transaction(schema_lock=True) as tx:
            await tx.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            row = await tx.one("SELECT value FROM meta WHERE key='schema_version'")
            version = int(row["value"]) if row else 0
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the database's schema is version {version}, newer than this controller's ({SCHEMA_VERSION}): "
                    "another controller was upgraded; upgrade this one to the same release"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for sql in statements(self.db.dialect, step):
                    await tx.execute(sql)
            if version < SCHEMA_VERSION:
                await tx.execute(
                    "INSERT INTO meta VALUES ('schema_version', ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                    str(SCHEMA_VERSION),
                )

    async def close(self) -> None:
        await self.db.close()

    def subscribe(self, callback: Callable[[Event | None], None]) -> None:
        self.db.subscribe(callback)

    async def singleton(self, name: str, work: Callable[[], Awaitable[None]]) -> None:
        await self.db.singleton(name, work)

    # Old data does not grow forever.

    async def prune(self, before: float, forwarding: bool) -> dict[str, int]:
        """Delete what ended before ``before``: finished tasks, migrations no longer running,
        rebalancing decisions, used or expired join tokens, web sessions and sign-in links, and
        the transitions of alerts resolved by then (once forwarded, when ``forwarding``). Alerts
        still firing keep their latest transition."""
        async with self._tx() as tx:
            return {
                "tasks": await tx.execute(
                    "DELETE FROM tasks WHERE state IN ('succeeded', 'failed') AND updated_at < ?", before),
                "migrations": await tx.execute("DELETE FROM migrations WHERE active = 0 AND updated_at < ?", before),
                "rebalancing decisions": await tx.execute("DELETE FROM rebalance_history WHERE at < ?", before),
                "tokens": await tx.execute(
                    "DELETE FROM tokens WHERE (uses_left <= 0 OR expires_at < ?) AND created_at < ?", before, before),
                "sessions": await tx.execute("DELETE FROM ui_sessions WHERE expires_at < ?", before),
                "alerts": await tx.execute(
                    "DELETE FROM alerts AS a WHERE a.received_at < ? AND (a.forwarded = 1 OR ? = 0) AND EXISTS "
                    "(SELECT 1 FROM alerts AS r WHERE r.node = a.node AND r.rule = a.rule AND r.labels = a.labels "
                    "AND r.state = 'resolved' AND r.received_at >= a.received_at AND r.received_at < ?)",
                    before, int(forwarding), before),
            }
