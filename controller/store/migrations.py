"""The store's migrations: one JSON document each; while one runs (``state`` "running") it
holds its instance and names the controller driving it, so that another controller can
adopt it when that one dies."""

from __future__ import annotations

import json
import time
from typing import Any

from controller.store.queries import Queries, all_decoded, decoded, page_before, select_sql


class MigrationQueries(Queries):
    async def begin_migration(self, migration: dict[str, Any], controller_id: str) -> str | None:
        """Record a new running migration; the id of the one already holding the instance instead."""
        now = time.time()
        async with self._tx() as tx:
            added = await tx.execute(
                "INSERT INTO migrations (id, instance, doc, created_at, updated_at, controller, active) "
                "VALUES (?, ?, ?, ?, ?, ?, 1) ON CONFLICT (instance) WHERE active = 1 DO NOTHING",
                migration["id"], migration["instance"], json.dumps(migration), now, now, controller_id,
            )
            if added:
                return None
            row = await tx.one("SELECT id FROM migrations WHERE instance=? AND active=1", migration["instance"])
            return row["id"] if row else ""

    async def put_migration(self, migration: dict[str, Any]) -> None:
        """Save a migration's document; one no longer running lets go of its instance."""
        async with self._tx() as tx:
            await tx.execute(
                "UPDATE migrations SET doc=?, updated_at=?, active=?, state=? WHERE id=?",
                json.dumps(migration), time.time(), int(migration["state"] == "running"), migration["state"],
                migration["id"],
            )
            tx.notify({"event": "migration", "id": migration["id"], "instance": migration["instance"]})

    async def drop_migration(self, migration_id: str) -> None:
        """Forget a migration that never started (its pre-flight refused it)."""
        async with self._tx() as tx:
            await tx.execute("DELETE FROM migrations WHERE id=?", migration_id)

    async def get_migration(self, migration_id: str) -> dict[str, Any] | None:
        """The document, with ``controller`` (who drives it) beside it."""
        async with self._tx() as tx:
            row = decoded(await tx.one("SELECT doc, controller FROM migrations WHERE id=?", migration_id))
        return {**row["doc"], "controller": row["controller"]} if row is not None else None

    async def list_migrations(self, state: str | None, limit: int,
                              before: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Migration documents newest first; ``before`` (created_at, id) starts after that
        migration (a page). Each has ``listed_at``, its row's created_at, for the next cursor."""
        clauses, args = [], []
        if state:
            clauses.append("state=?")
            args.append(state)
        page_before(before, clauses, args)
        async with self._tx() as tx:
            rows = all_decoded(await tx.all(select_sql("migrations", clauses, "created_at DESC, id DESC", limit),
                                             *args, limit))
        return [{**row["doc"], "controller": row["controller"], "listed_at": row["created_at"]} for row in rows]

    async def active_migration(self, instance: str) -> str | None:
        """The id of the migration holding ``instance``, if one does."""
        async with self._tx() as tx:
            row = await tx.one("SELECT id FROM migrations WHERE instance=? AND active=1", instance)
        return row["id"] if row else None

    async def orphaned_migrations(self, live_controllers: list[str]) -> list[dict[str, Any]]:
        """Running migrations whose controller is not among ``live_controllers``: it died."""
        async with self._tx() as tx:
            rows = all_decoded(await tx.all("SELECT doc, controller FROM migrations WHERE active=1"))
        return [{**row["doc"], "controller": row["controller"]} for row in rows
                if row["controller"] not in live_controllers]

    async def adopt_migration(self, migration_id: str, dead: str, controller_id: str) -> bool:
        """Make ``controller_id`` the driver of a running migration ``dead`` drove; False when
        another controller adopted it first."""
        async with self._tx() as tx:
            return await tx.execute(
                "UPDATE migrations SET controller=? WHERE id=? AND controller=? AND active=1",
                controller_id, migration_id, dead,
            ) == 1

    async def active_migrations(self) -> list[dict[str, Any]]:
        """The documents of the migrations running now, whichever controller drives them."""
        async with self._tx() as tx:
            rows = all_decoded(await tx.all("SELECT doc FROM migrations WHERE active=1"))
        return [row["doc"] for row in rows]
