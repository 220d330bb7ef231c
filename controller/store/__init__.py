"""The controller's state: nodes, certificates, join tokens, tasks, instances, alerts.

:class:`Store` holds every query, written once in the SQL that both databases speak; a
:class:`Database` runs them: :mod:`controller.store.sqlite` (embedded, the default, one
controller process) or :mod:`controller.store.postgres` (any number of controller
processes on one database). :func:`open_store` picks one from the ``database`` setting.

Rows are plain dicts, times epoch seconds, JSON columns decoded. The store records; the
rules (what a finished task does to its instance, what removing a node does to its tasks)
are decided by the controller's services and handed to it as arguments.

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
import json
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any, Literal, Protocol

from controller.store.schema import SCHEMA_VERSION, statements

TokenCheck = Literal["ok", "unknown", "expired", "used"]
# How long after a join its answer can still be asked for again, at least (a controller
# killed before the answer left it has this long to come back).
JOIN_RETRY_SECONDS = 600
Event = dict[str, Any]
JSON_COLUMNS = ("facts", "plugins", "instances", "usage", "capacity", "payload", "result", "spec", "reasons", "labels", "annotations", "doc",
                "image", "images")


class StoreError(Exception):
    """The store cannot do what was asked (a conflict, a missing row, a database it must not use)."""


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
    """What :class:`Store` needs from a database."""

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


class Store:
    """Every query the controller makes. Each method is one transaction."""

    def __init__(self, db: Database):
        self.db = db

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

    def _tx(self) -> AbstractAsyncContextManager[Tx]:
        return self.db.transaction()

    # Controllers.

    async def controller_seen(self, controller_id: str, url: str, started_at: float) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO controllers VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET url=excluded.url, last_seen=excluded.last_seen",
                controller_id, url, started_at, time.time(),
            )

    async def list_controllers(self, seen_since: float) -> list[dict[str, Any]]:
        async with self._tx() as tx:
            return await tx.all("SELECT * FROM controllers WHERE last_seen >= ? ORDER BY started_at, id", seen_since)

    async def controller_gone(self, controller_id: str) -> None:
        async with self._tx() as tx:
            await tx.execute("DELETE FROM controllers WHERE id=?", controller_id)

    # Tokens and enrollment.

    async def add_token(self, token_hash: str, expires_at: float, uses: int) -> None:
        async with self._tx() as tx:
            await tx.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)", token_hash, expires_at, uses, time.time())

    async def token_status(self, token_hash: str) -> TokenCheck:
        """Whether the token could enroll a node now, without spending it."""
        async with self._tx() as tx:
            return await _token_status(tx, token_hash)

    async def enroll(
        self, token_hash: str, key_hash: str, node_id: str, hostname: str, serial: str, expires_at: float
    ) -> TokenCheck:
        """Spend one use of the token and create the node, in one transaction; the node
        remembers the token and key for :meth:`joined_before`."""
        async with self._tx() as tx:
            # Spending first: with two controllers, the row lock makes the second wait and
            # then see the use gone.
            spent = await tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash=? AND uses_left > 0 AND expires_at > ?",
                token_hash, time.time(),
            )
            if not spent:
                return await _token_status(tx, token_hash)
            await tx.execute("INSERT INTO nodes (id, hostname, created_at) VALUES (?, ?, ?)", node_id, hostname, time.time())
            await _remember_join(tx, node_id, token_hash, key_hash)
            await tx.execute("INSERT INTO certificates VALUES (?, ?, ?)", serial, node_id, expires_at)
            tx.notify({"event": "certificate", "node": node_id, "serial": serial})
            return "ok"

    async def rejoin(
        self, token_hash: str, key_hash: str, node_id: str, serial: str, expires_at: float
    ) -> TokenCheck | Literal["removed"]:
        """Spend one use of the token and give the existing ``node_id`` a new certificate, in
        one transaction; "removed" when the node is gone: removal is final."""
        async with self._tx() as tx:
            known = await tx.all("SELECT id FROM nodes WHERE id=? AND removed=0", node_id)
            if not known:
                return "removed"
            spent = await tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash=? AND uses_left > 0 AND expires_at > ?",
                token_hash, time.time(),
            )
            if not spent:
                return await _token_status(tx, token_hash)
            # Removed since the check above: the token stays spent, the node stays out.
            if not await _add_certificate(tx, node_id, serial, expires_at):
                return "removed"
            await _remember_join(tx, node_id, token_hash, key_hash)
            return "ok"

    async def joined_before(self, token_hash: str, key_hash: str) -> str | None:
        """The node that joined with this token and key within the retry window (see
        :func:`_remember_join`), not removed since; None otherwise."""
        async with self._tx() as tx:
            row = await tx.one(
                "SELECT id FROM nodes WHERE join_token=? AND join_key=? AND join_retry_until > ? AND removed=0",
                token_hash, key_hash, time.time(),
            )
        return None if row is None else row["id"]

    async def add_certificate(self, node_id: str, serial: str, expires_at: float) -> bool:
        """Record a renewed certificate; False (nothing recorded) when the node was removed,
        even by a removal that committed a moment ago: removal is final."""
        async with self._tx() as tx:
            return await _add_certificate(tx, node_id, serial, expires_at)

    async def valid_serials(self, node_id: str | None = None) -> dict[str, set[str]]:
        """Serials of the certificates each node (or just ``node_id``) may still use."""
        sql = "SELECT c.node_id, c.serial FROM certificates c JOIN nodes n ON n.id = c.node_id WHERE n.removed = 0"
        async with self._tx() as tx:
            rows = await (tx.all(sql + " AND n.id = ?", node_id) if node_id else tx.all(sql))
        out: dict[str, set[str]] = {}
        for row in rows:
            out.setdefault(row["node_id"], set()).add(row["serial"])
        return out

    # Nodes.

    async def register_node(self, node_id: str, fields: dict[str, Any], capacity: dict[str, Any]) -> None:
        """Record what a (re)starting agent reports; ``capacity`` becomes the node's capacity
        only if it has none yet (its first registration)."""
        async with self._tx() as tx:
            await tx.execute(
                "UPDATE nodes SET hostname=?, agent_version=?, metrics_url=?, facts=?, plugins=?, instances=?, "
                "last_seen=?, capacity=COALESCE(capacity, ?) WHERE id=?",
                fields["hostname"], fields["agent_version"], fields["metrics_url"], json.dumps(fields["facts"]),
                json.dumps(fields["plugins"]), json.dumps(fields["instances"]), fields["last_seen"],
                json.dumps(capacity), node_id,
            )

    async def set_capacity(self, node_id: str, capacity: dict[str, Any]) -> None:
        async with self._tx() as tx:
            await tx.execute("UPDATE nodes SET capacity=? WHERE id=?", json.dumps(capacity), node_id)

    async def save_live(self, rows: dict[str, dict[str, Any]], changed: Sequence[str] = ()) -> None:
        """Persist heartbeat state (last_seen, instances, plugins, usage, images) for many nodes
        at once; ``changed``: the nodes whose instances or plugins changed, which the event names."""
        async with self._tx() as tx:
            if changed:
                # A NOTIFY payload is capped (8000 bytes): past a hundred nodes, "some changed".
                tx.notify({"event": "live", "nodes": list(changed) if len(changed) <= 100 else None})
            await tx.executemany(
                "UPDATE nodes SET last_seen=?, instances=?, plugins=COALESCE(?, plugins), usage=COALESCE(?, usage), "
                "images=COALESCE(?, images) WHERE id=?",
                [
                    (
                        live["last_seen"], json.dumps(live["instances"]),
                        json.dumps(live["plugins"]) if live.get("plugins") is not None else None,
                        json.dumps(live["usage"]) if live.get("usage") is not None else None,
                        json.dumps(live["images"]) if live.get("images") is not None else None, node_id,
                    )
                    for node_id, live in rows.items()
                ],
            )

    async def get_node(self, node_id: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return _decoded(await tx.one("SELECT * FROM nodes WHERE id=?", node_id))

    async def list_nodes(self, include_removed: bool = False, limit: int | None = None,
                         after: str | None = None, match: str | None = None) -> list[dict[str, Any]]:
        """Nodes by id; ``limit`` of them after the id ``after`` (a page), or all; ``match``:
        only those whose id or hostname contains it, whatever the case."""
        clauses, args = ([] if include_removed else ["removed = 0"]), []
        if after is not None:
            clauses.append("id > ?")
            args.append(after)
        if match:
            # The text is a value, never SQL; LIKE's own wildcards in it are escaped.
            pattern = "%" + match.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            clauses.append("(LOWER(id) LIKE ? ESCAPE '\\' OR LOWER(hostname) LIKE ? ESCAPE '\\')")
            args += [pattern, pattern]
        async with self._tx() as tx:
            return _all_decoded(await tx.all(_select("nodes", clauses, "id", limit), *args, *_limit(limit)))

    async def set_drained(self, node_id: str, drained: bool) -> None:
        async with self._tx() as tx:
            await tx.execute("UPDATE nodes SET drained=? WHERE id=?", int(drained), node_id)
            tx.notify({"event": "drained", "node": node_id})

    async def remove_node(self, node_id: str, task_error: str, task_code: str) -> None:
        """Remove the node and revoke its certificates at once; its tasks not yet ended fail
        with ``task_error`` and ``task_code``."""
        async with self._tx() as tx:
            await tx.execute("UPDATE nodes SET removed=1 WHERE id=?", node_id)
            await tx.execute("DELETE FROM certificates WHERE node_id=?", node_id)
            ended = await tx.all(
                "UPDATE tasks SET state='failed', error=?, code=?, updated_at=? "
                "WHERE node=? AND state IN ('pending', 'delivered') RETURNING id",
                task_error, task_code, time.time(), node_id,
            )
            tx.notify({"event": "removed", "node": node_id})
            for row in ended:
                tx.notify({"event": "task", "id": row["id"]})

    # Tasks.

    async def add_task(self, task: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert ``task``; with an idempotency key already used on that node, return that task."""
        async with self._tx() as tx:
            created = await _insert_task(tx, task)
            row = await tx.one(
                "SELECT * FROM tasks WHERE node=? AND idempotency_key=?", task["node"], task["idempotency_key"]
            )
            return _decoded(row), created  # type: ignore[return-value]

    async def claim_tasks(self, node_id: str, limit: int) -> list[dict[str, Any]]:
        """Mark up to ``limit`` of the node's pending tasks delivered and return them, oldest
        first; a task is claimed once even when two controllers claim at the same moment."""
        # PostgreSQL: rows another controller is claiming are skipped, not waited for (and
        # then found taken). SQLite: transactions take turns anyway.
        skip_locked = " FOR UPDATE SKIP LOCKED" if self.db.dialect == "postgresql" else ""
        async with self._tx() as tx:
            # MATERIALIZED: picked once; a LIMIT inside IN (...) may be evaluated again per row.
            rows = await tx.all(
                "WITH picked AS MATERIALIZED (SELECT id FROM tasks WHERE node=? AND state='pending' "
                f"ORDER BY created_at LIMIT ?{skip_locked}) "
                "UPDATE tasks SET state='delivered', updated_at=? WHERE state='pending' AND id IN (SELECT id FROM picked) "
                "RETURNING *",
                node_id, limit, time.time(),
            )
        return sorted(_all_decoded(rows), key=lambda t: t["created_at"])

    async def requeue_delivered(self, node_id: str) -> int:
        async with self._tx() as tx:
            return await tx.execute(
                "UPDATE tasks SET state='pending', updated_at=? WHERE node=? AND state='delivered'", time.time(), node_id
            )

    async def finish_task(
        self, task_id: str, node_id: str, outcome: dict[str, Any], forget_instance: Callable[[dict[str, Any]], bool]
    ) -> dict[str, Any] | None:
        """Record a task's end; None if it is not this node's. When ``forget_instance(task)``
        says so, the task's instance record is deleted with it."""
        async with self._tx() as tx:
            task = _decoded(await tx.one("SELECT * FROM tasks WHERE id=? AND node=?", task_id, node_id))
            if task is None:
                return None
            if task["state"] in ("succeeded", "failed"):
                return task  # a repeated report (the agent retried after a lost answer)
            await tx.execute(
                "UPDATE tasks SET state=?, result=?, error=?, code=?, updated_at=? WHERE id=?",
                outcome["state"], json.dumps(outcome.get("result") or {}), outcome.get("error"),
                outcome.get("code"), time.time(), task_id,
            )
            task = _decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task_id))
            assert task is not None
            if task["instance"] and forget_instance(task):
                await tx.execute("DELETE FROM instances WHERE name=? AND node=?", task["instance"], node_id)
            tx.notify({"event": "task", "id": task_id})
            return task

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return _decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task_id))

    async def list_tasks(self, node: str | None, state: str | None, limit: int,
                         before: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Tasks newest first; ``before`` (created_at, id) starts after that task (a page)."""
        clauses, args = [], []
        if node:
            clauses.append("node=?")
            args.append(node)
        if state:
            clauses.append("state=?")
            args.append(state)
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [before[0], before[0], before[1]]
        async with self._tx() as tx:
            return _all_decoded(await tx.all(_select("tasks", clauses, "created_at DESC, id DESC", limit), *args, limit))

    async def counts(self) -> dict[str, dict[str, int]]:
        async with self._tx() as tx:
            rows = await tx.all("SELECT state, COUNT(*) AS n FROM tasks GROUP BY state")
        return {"tasks": {row["state"]: int(row["n"]) for row in rows}}

    async def cancel_task(self, task_id: str, error: str, code: str = "cancelled", taken: bool = False) -> bool:
        """Fail ``task_id`` if no node has taken it yet (or, with ``taken``, if it has not
        ended: what its node reports of it later is ignored); True when this failed it."""
        states = "('pending', 'delivered')" if taken else "('pending')"
        async with self._tx() as tx:
            cancelled = await tx.execute(
                f"UPDATE tasks SET state='failed', error=?, code=?, updated_at=? WHERE id=? AND state IN {states}",
                error, code, time.time(), task_id,
            )
            if cancelled:
                tx.notify({"event": "task", "id": task_id})
            return cancelled == 1

    # Instances.

    async def add_instance(self, instance: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
        """Store the instance and its create task together; StoreError if the name is taken."""
        async with self._tx() as tx:
            image = instance.get("image")
            added = await tx.execute(
                "INSERT INTO instances (name, kind, node, spec, reasons, created_at, image, image_sha256, pinned, "
                "checkpoint_keep) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO NOTHING",
                instance["name"], instance["kind"], instance["node"], json.dumps(instance["spec"]),
                json.dumps(instance["reasons"]), time.time(), json.dumps(image) if image else None,
                image["sha256"] if image else None, int(instance.get("pinned", False)),
                instance.get("checkpoint_keep"),
            )
            if not added:
                raise StoreError(f"an instance named {instance['name']!r} already exists")
            await _insert_task(tx, task)
            return _decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task["id"]))  # type: ignore[return-value]

    async def get_instance(self, name: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return _decoded(await tx.one("SELECT * FROM instances WHERE name=?", name))

    async def latest_instance_task(self, name: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return _decoded(await tx.one("SELECT * FROM tasks WHERE instance=? ORDER BY created_at DESC LIMIT 1", name))

    async def list_instances(self, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Instances by name; ``limit`` of them after the name ``after`` (a page), or all."""
        clauses, args = (["name > ?"], [after]) if after is not None else ([], [])
        async with self._tx() as tx:
            return _all_decoded(await tx.all(_select("instances", clauses, "name", limit), *args, *_limit(limit)))

    async def delete_instance(self, name: str) -> None:
        async with self._tx() as tx:
            await tx.execute("DELETE FROM instances WHERE name=?", name)

    async def move_instance(self, name: str, source: str, destination: str) -> bool:
        """Move the instance's record, only from the node the caller believes it is on."""
        async with self._tx() as tx:
            return await tx.execute("UPDATE instances SET node=? WHERE name=? AND node=?", destination, name, source) == 1

    # The image catalogue: one row per image (a form of a name's version), aliases apart.

    async def add_image(self, image: dict[str, Any]) -> None:
        """Record an imported image; StoreError when its bytes or its name, version and kind
        are already in the catalogue (another controller imported it a moment ago)."""
        async with self._tx() as tx:
            added = await tx.execute(
                "INSERT INTO images (sha256, name, version, kind, format, size_bytes, description, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                image["sha256"], image["name"], image["version"], image["kind"], image["format"],
                image["size_bytes"], image["description"], image["created_at"],
            )
            if not added:
                raise StoreError(f"image {image['name']}:{image['version']} ({image['kind']}) or these bytes "
                                 "are already in the catalogue")

    async def find_images(self, name: str | None = None, version: str | None = None, kind: str | None = None,
                          sha256: str | None = None) -> list[dict[str, Any]]:
        """Images matching every criterion given, oldest first (all of them when none is)."""
        clauses, args = [], []
        for column, value in (("name", name), ("version", version), ("kind", kind), ("sha256", sha256)):
            if value is not None:
                clauses.append(f"{column}=?")
                args.append(value)
        async with self._tx() as tx:
            return await tx.all(_select("images", clauses, "name, created_at, kind", None), *args)

    async def images_bytes(self) -> int:
        async with self._tx() as tx:
            row = await tx.one("SELECT COALESCE(SUM(size_bytes), 0) AS total FROM images")
        return int(row["total"]) if row else 0

    async def delete_images(self, digests: list[str]) -> list[str]:
        """Delete these images and the aliases of their names that no longer name any, unless
        instances use them: then nothing is deleted and their names are returned."""
        marks = ", ".join("?" for _ in digests)
        async with self._tx() as tx:
            users = await tx.all(f"SELECT name FROM instances WHERE image_sha256 IN ({marks}) ORDER BY name",  # noqa: S608
                                 *digests)
            if users:
                return [row["name"] for row in users]
            await tx.execute(f"DELETE FROM images WHERE sha256 IN ({marks})", *digests)  # noqa: S608
            await tx.execute(
                "DELETE FROM image_aliases AS a WHERE NOT EXISTS (SELECT 1 FROM images AS i WHERE "
                "i.name || ':' || i.version = a.target OR i.name = a.target)")
            return []

    async def get_image_alias(self, alias: str) -> str | None:
        async with self._tx() as tx:
            row = await tx.one("SELECT target FROM image_aliases WHERE alias=?", alias)
        return row["target"] if row else None

    async def list_image_aliases(self) -> list[dict[str, Any]]:
        async with self._tx() as tx:
            return await tx.all("SELECT alias, target FROM image_aliases ORDER BY alias")

    async def put_image_alias(self, alias: str, target: str) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO image_aliases VALUES (?, ?, ?) ON CONFLICT (alias) DO UPDATE SET "
                "target=excluded.target, updated_at=excluded.updated_at", alias, target, time.time())

    async def delete_image_alias(self, alias: str) -> bool:
        async with self._tx() as tx:
            return await tx.execute("DELETE FROM image_aliases WHERE alias=?", alias) == 1

    # Migrations: one JSON document each; while one runs (``state`` "running") it holds its
    # instance and names the controller driving it.

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
            row = _decoded(await tx.one("SELECT doc, controller FROM migrations WHERE id=?", migration_id))
        return {**row["doc"], "controller": row["controller"]} if row is not None else None

    async def list_migrations(self, state: str | None, limit: int,
                              before: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Migration documents newest first; ``before`` (created_at, id) starts after that
        migration (a page). Each has ``listed_at``, its row's created_at, for the next cursor."""
        clauses, args = [], []
        if state:
            clauses.append("state=?")
            args.append(state)
        if before is not None:
            clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
            args += [before[0], before[0], before[1]]
        async with self._tx() as tx:
            rows = _all_decoded(await tx.all(_select("migrations", clauses, "created_at DESC, id DESC", limit),
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
            rows = _all_decoded(await tx.all("SELECT doc, controller FROM migrations WHERE active=1"))
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
            rows = _all_decoded(await tx.all("SELECT doc FROM migrations WHERE active=1"))
        return [row["doc"] for row in rows]

    async def instance_tasks(self, name: str, since: float) -> list[dict[str, Any]]:
        """The tasks about instance ``name`` created since ``since``, oldest first."""
        async with self._tx() as tx:
            return _all_decoded(await tx.all(
                "SELECT * FROM tasks WHERE instance=? AND created_at >= ? ORDER BY created_at", name, since))

    # Rebalancing: samples of the nodes' usage, the decisions, and the lease of a round.

    async def add_rebalance_samples(self, samples: list[tuple[str, float, float, dict[str, float]]],
                                    before: float) -> None:
        """Add (node, at, cpu share, {instance: cores}) samples; forget those older than ``before``."""
        async with self._tx() as tx:
            await tx.executemany("INSERT INTO rebalance_samples VALUES (?, ?, ?, ?) ON CONFLICT (node, at) DO NOTHING",
                                 [(node, at, cpu, json.dumps(cores)) for node, at, cpu, cores in samples])
            await tx.execute("DELETE FROM rebalance_samples WHERE at < ?", before)

    async def rebalance_samples(self, since: float) -> list[dict[str, Any]]:
        """The samples taken since ``since``, oldest first."""
        async with self._tx() as tx:
            return _all_decoded(await tx.all("SELECT * FROM rebalance_samples WHERE at >= ? ORDER BY at, node", since))

    async def add_rebalance_entry(self, entry: dict[str, Any]) -> None:
        async with self._tx() as tx:
            await tx.execute("INSERT INTO rebalance_history (at, doc, instance) VALUES (?, ?, ?)",
                             entry["at"], json.dumps(entry), entry["instance"])

    async def rebalance_history(self, limit: int | None = None, before: int | None = None,
                                since: float | None = None) -> list[dict[str, Any]]:
        """Decisions newest first, each ``{"id", **doc}``: ``limit`` of them older than the entry
        ``before`` (a page), or every one made since ``since``."""
        clauses, args = [], []
        if before is not None:
            clauses.append("id < ?")
            args.append(before)
        if since is not None:
            clauses.append("at >= ?")
            args.append(since)
        async with self._tx() as tx:
            rows = _all_decoded(await tx.all(_select("rebalance_history", clauses, "id DESC", limit), *args,
                                             *_limit(limit)))
        return [{"id": row["id"], **row["doc"]} for row in rows]

    async def take_lease(self, name: str, holder: str, seconds: float) -> bool:
        """Hold ``name`` for ``seconds`` unless another holder has it and it has not expired."""
        now = time.time()
        async with self._tx() as tx:
            return await tx.execute(
                "INSERT INTO leases VALUES (?, ?, ?) ON CONFLICT (name) DO UPDATE SET holder=excluded.holder, "
                "expires_at=excluded.expires_at WHERE leases.expires_at < ?",
                name, holder, now + seconds, now,
            ) == 1

    async def release_lease(self, name: str, holder: str) -> None:
        async with self._tx() as tx:
            await tx.execute("DELETE FROM leases WHERE name=? AND holder=?", name, holder)

    # The audit log.

    async def add_audit(self, entry: dict[str, Any]) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO audit (at, role, name, serial, method, path, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                entry["at"], entry["role"], entry["name"], entry["serial"], entry["method"], entry["path"],
                entry["status"], entry["error"],
            )

    async def list_audit(self, limit: int, before: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (older than the entry ``before``), newest first."""
        clauses, args = (["id < ?"], [before]) if before is not None else ([], [])
        async with self._tx() as tx:
            return await tx.all(_select("audit", clauses, "id DESC", limit), *args, limit)

    # Admin and scraper certificates.

    async def add_client_certificate(self, serial: str, role: str, name: str, expires_at: float) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO client_certificates VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (serial) DO NOTHING",
                serial, role, name, expires_at, time.time(),
            )

    async def list_client_certificates(self, limit: int | None = None,
                                       after: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Admin and scraper certificates oldest first; ``after`` (created_at, serial) starts
        after that certificate (a page)."""
        clauses, args = ([], []) if after is None else (
            ["(created_at > ? OR (created_at = ? AND serial > ?))"], [after[0], after[0], after[1]])
        async with self._tx() as tx:
            return await tx.all(_select("client_certificates", clauses, "created_at, serial", limit), *args,
                                *_limit(limit))

    async def revoke_client_certificate(self, serial: str) -> bool:
        """Revoke an admin or scraper certificate; False when no such certificate was issued."""
        async with self._tx() as tx:
            found = await tx.execute(
                "UPDATE client_certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial=?", time.time(), serial
            )
            if found:
                tx.notify({"event": "revoked", "serial": serial})
            return found == 1

    async def revoked_serials(self) -> set[str]:
        async with self._tx() as tx:
            rows = await tx.all("SELECT serial FROM client_certificates WHERE revoked_at IS NOT NULL")
        return {row["serial"] for row in rows}

    # The web interface: single-use sign-in links and the browser sessions they become.

    async def add_ui_signin(self, signin_id: str, secret_hash: str, name: str, expires_at: float) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO ui_sessions (id, hash, kind, name, created_at, expires_at) VALUES (?, ?, 'signin', ?, ?, ?)",
                signin_id, secret_hash, name, time.time(), expires_at,
            )

    async def redeem_ui_signin(self, secret_hash: str, session: dict[str, Any]) -> TokenCheck:
        """Spend a sign-in link and open ``session`` (id, hash, expires_at, remote) in its
        name, in one transaction: a link opens one session, however many browsers race."""
        now = time.time()
        async with self._tx() as tx:
            row = await tx.one(
                "UPDATE ui_sessions SET used_at=? WHERE hash=? AND kind='signin' AND used_at IS NULL "
                "AND revoked_at IS NULL AND expires_at > ? RETURNING name",
                now, secret_hash, now,
            )
            if row is None:
                found = await tx.one("SELECT expires_at, used_at FROM ui_sessions WHERE hash=? AND kind='signin'",
                                     secret_hash)
                if found is None:
                    return "unknown"
                return "used" if found["used_at"] is not None else "expired"
            await tx.execute(
                "INSERT INTO ui_sessions (id, hash, kind, name, created_at, expires_at, remote) "
                "VALUES (?, ?, 'session', ?, ?, ?, ?)",
                session["id"], session["hash"], row["name"], now, session["expires_at"], session["remote"],
            )
            return "ok"

    async def ui_session(self, secret_hash: str) -> dict[str, Any] | None:
        """The browser session whose cookie hashes to ``secret_hash``, if it is still valid."""
        async with self._tx() as tx:
            return await tx.one(
                "SELECT id, name, expires_at FROM ui_sessions WHERE hash=? AND kind='session' "
                "AND revoked_at IS NULL AND expires_at > ?",
                secret_hash, time.time(),
            )

    async def list_ui_sessions(self) -> list[dict[str, Any]]:
        """Sign-in links and sessions not yet expired, oldest first (never their hashes)."""
        async with self._tx() as tx:
            return await tx.all(
                "SELECT id, kind, name, created_at, expires_at, used_at, revoked_at, remote FROM ui_sessions "
                "WHERE expires_at > ? ORDER BY created_at, id",
                time.time(),
            )

    async def revoke_ui_session(self, session_id: str) -> bool:
        """End a session (or withdraw an unused link) at once; False when there is no such id."""
        async with self._tx() as tx:
            found = await tx.execute(
                "UPDATE ui_sessions SET revoked_at = COALESCE(revoked_at, ?) WHERE id=?", time.time(), session_id
            )
            if found:
                tx.notify({"event": "ui-revoked", "id": session_id})
            return found == 1

    # Fleet settings (log forwarding...): one JSON document per key.

    async def get_setting(self, key: str) -> Any:
        async with self._tx() as tx:
            row = await tx.one("SELECT value FROM settings WHERE key=?", key)
        return json.loads(row["value"]) if row is not None else None

    async def put_setting(self, key: str, value: Any) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                key, json.dumps(value),
            )

    # Alerts: every transition a node reported, once each (the node may send one twice).

    async def add_alerts(self, node_id: str, alerts: list[dict[str, Any]]) -> int:
        now, added = time.time(), 0
        async with self._tx() as tx:
            for index, a in enumerate(alerts):
                # received_at orders transitions (a resolve after its firing): a microsecond
                # apart keeps a batch's order in both databases, which have no common rowid.
                added += await tx.execute(
                    "INSERT INTO alerts (node, id, rule, state, severity, labels, annotations, value, "
                    "starts_at, ends_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (node, id) DO NOTHING",
                    node_id, a["id"], a["rule"], a["state"], a["severity"], json.dumps(a["labels"]),
                    json.dumps(a["annotations"]), a["value"], a["starts_at"], a["ends_at"], now + index * 1e-6,
                )
            if added:
                tx.notify({"event": "alerts"})
        return added

    async def current_alerts(self, state: str | None = None, node: str | None = None, limit: int | None = None,
                             before: tuple[float, str, str] | None = None) -> list[dict[str, Any]]:
        """Each alert's latest transition (an alert is a node, a rule and its labels), the most
        recently received first; ``before`` (received_at, node, id) starts after that one (a page)."""
        clauses = ["NOT EXISTS (SELECT 1 FROM alerts AS later WHERE later.node = alerts.node "
                   "AND later.rule = alerts.rule AND later.labels = alerts.labels AND (later.received_at > "
                   "alerts.received_at OR (later.received_at = alerts.received_at AND later.id > alerts.id)))"]
        args: list[Any] = []
        for column, value in (("state", state), ("node", node)):
            if value is not None:
                clauses.append(f"{column} = ?")
                args.append(value)
        if before is not None:
            clauses.append("(received_at < ? OR (received_at = ? AND (node < ? OR (node = ? AND id < ?))))")
            args += [before[0], before[0], before[1], before[1], before[2]]
        async with self._tx() as tx:
            return _all_decoded(await tx.all(_select("alerts", clauses, "received_at DESC, node DESC, id DESC", limit),
                                             *args, *_limit(limit)))

    async def unforwarded_alerts(self, limit: int) -> list[dict[str, Any]]:
        async with self._tx() as tx:
            return _all_decoded(
                await tx.all("SELECT * FROM alerts WHERE forwarded=0 ORDER BY received_at, node, id LIMIT ?", limit)
            )

    async def mark_forwarded(self, keys: list[tuple[str, str]]) -> None:
        async with self._tx() as tx:
            await tx.executemany("UPDATE alerts SET forwarded=1 WHERE node=? AND id=?", keys)


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


def _select(table: str, clauses: list[str], order: str, limit: int | None) -> str:
    """SELECT * with fixed clauses (never user input: values go as parameters)."""
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return f"SELECT * FROM {table}{where} ORDER BY {order}" + (" LIMIT ?" if limit is not None else "")  # noqa: S608


def _limit(limit: int | None) -> list[int]:
    return [] if limit is None else [limit]


async def _token_status(tx: Tx, token_hash: str) -> TokenCheck:
    row = await tx.one("SELECT expires_at, uses_left FROM tokens WHERE hash=?", token_hash)
    if row is None:
        return "unknown"
    if row["expires_at"] <= time.time():
        return "expired"
    if row["uses_left"] <= 0:
        return "used"
    return "ok"


async def _remember_join(tx: Tx, node_id: str, token_hash: str, key_hash: str) -> None:
    """Let the same join (token and key) get ``node_id`` again if its answer is lost: until
    the token expires, and at least JOIN_RETRY_SECONDS after this join."""
    floor = time.time() + JOIN_RETRY_SECONDS
    await tx.execute(
        "UPDATE nodes SET join_token=?, join_key=?, join_retry_until=(SELECT CASE WHEN expires_at > ? "
        "THEN expires_at ELSE ? END FROM tokens WHERE hash=?) WHERE id=?",
        token_hash, key_hash, floor, floor, token_hash, node_id,
    )


async def _add_certificate(tx: Tx, node_id: str, serial: str, expires_at: float) -> bool:
    """Record a certificate of ``node_id`` unless the node was removed; whether it was."""
    added = await tx.execute(
        "INSERT INTO certificates SELECT CAST(? AS TEXT), id, CAST(? AS DOUBLE PRECISION) FROM nodes "
        "WHERE id=? AND removed=0",
        serial, expires_at, node_id,
    )
    # Keep only certificates still valid: renewals would otherwise pile up forever.
    await tx.execute("DELETE FROM certificates WHERE node_id=? AND expires_at < ?", node_id, time.time())
    if added:
        tx.notify({"event": "certificate", "node": node_id, "serial": serial})
    return added == 1

async def _insert_task(tx: Tx, task: dict[str, Any]) -> bool:
    """Insert a pending task; False when its node already has one with that idempotency key."""
    now = time.time()
    created = await tx.execute(
        "INSERT INTO tasks (id, node, kind, payload, idempotency_key, state, instance, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?) ON CONFLICT (node, idempotency_key) DO NOTHING",
        task["id"], task["node"], task["kind"], json.dumps(task["payload"]), task["idempotency_key"],
        task.get("instance"), now, now,
    )
    if created:
        tx.notify({"event": "tasks", "node": task["node"]})
    return created == 1


def _decoded(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    for column in JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


def _all_decoded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [_decoded(row) for row in rows]  # type: ignore[misc]


__all__ = ["Database", "Event", "Store", "StoreError", "StoreUnavailable", "TokenCheck", "Tx", "is_database_url",
           "open_store"]
