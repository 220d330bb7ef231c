"""The controller's state: nodes, certificates, join tokens, tasks, instances.

:class:`Store` is the interface the API is written against; :class:`SQLiteStore` is the
embedded implementation (WAL). A PostgreSQL implementation serving several controller
processes implements the same methods. Rows are plain dicts; times are epoch seconds.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

T = TypeVar("T")
TokenCheck = Literal["ok", "unknown", "expired", "used"]

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
    hash TEXT PRIMARY KEY, expires_at REAL NOT NULL, uses_left INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
    id TEXT PRIMARY KEY, hostname TEXT NOT NULL, created_at REAL NOT NULL,
    removed INTEGER NOT NULL DEFAULT 0, drained INTEGER NOT NULL DEFAULT 0,
    last_seen REAL, agent_version TEXT, metrics_url TEXT,
    facts TEXT NOT NULL DEFAULT '{}', plugins TEXT NOT NULL DEFAULT '{}', instances TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS certificates (
    serial TEXT PRIMARY KEY, node_id TEXT NOT NULL REFERENCES nodes(id), expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY, node TEXT NOT NULL REFERENCES nodes(id), kind TEXT NOT NULL,
    payload TEXT NOT NULL, idempotency_key TEXT NOT NULL, state TEXT NOT NULL,
    result TEXT, error TEXT, code TEXT, instance TEXT,
    created_at REAL NOT NULL, updated_at REAL NOT NULL, UNIQUE (node, idempotency_key));
CREATE INDEX IF NOT EXISTS tasks_by_node_state ON tasks (node, state, created_at);
CREATE INDEX IF NOT EXISTS tasks_by_instance ON tasks (instance, created_at);
CREATE TABLE IF NOT EXISTS instances (
    name TEXT PRIMARY KEY, kind TEXT NOT NULL, node TEXT NOT NULL REFERENCES nodes(id),
    spec TEXT NOT NULL, reasons TEXT NOT NULL DEFAULT '{}', created_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (
    node TEXT NOT NULL REFERENCES nodes(id), id TEXT NOT NULL, rule TEXT NOT NULL, state TEXT NOT NULL,
    severity TEXT NOT NULL, labels TEXT NOT NULL, annotations TEXT NOT NULL, value REAL,
    starts_at TEXT NOT NULL, ends_at TEXT, received_at REAL NOT NULL, forwarded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (node, id));
CREATE INDEX IF NOT EXISTS alerts_unforwarded ON alerts (forwarded, received_at);
CREATE TABLE IF NOT EXISTS migrations (
    id TEXT PRIMARY KEY, instance TEXT NOT NULL, doc TEXT NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS migrations_by_instance ON migrations (instance, created_at);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, role TEXT NOT NULL, name TEXT NOT NULL,
    serial TEXT NOT NULL, method TEXT NOT NULL, path TEXT NOT NULL, status INTEGER NOT NULL, error TEXT);
CREATE TABLE IF NOT EXISTS client_certificates (
    serial TEXT PRIMARY KEY, role TEXT NOT NULL, name TEXT NOT NULL, expires_at REAL NOT NULL,
    created_at REAL NOT NULL, revoked_at REAL);
"""
JSON_COLUMNS = ("facts", "plugins", "instances", "payload", "result", "spec", "reasons", "labels", "annotations", "doc")


class StoreError(Exception):
    """The store cannot do what was asked (a conflict, a missing row)."""


class Store(Protocol):
    """What the API needs from persistent state. Every method is safe to await from the loop."""

    async def close(self) -> None: ...
    async def add_token(self, token_hash: str, expires_at: float, uses: int) -> None: ...
    async def token_status(self, token_hash: str) -> TokenCheck: ...
    async def enroll(
        self, token_hash: str, node_id: str, hostname: str, serial: str, expires_at: float
    ) -> TokenCheck: ...
    async def add_certificate(self, node_id: str, serial: str, expires_at: float) -> bool: ...
    async def valid_serials(self) -> dict[str, set[str]]: ...
    async def register_node(self, node_id: str, fields: dict[str, Any]) -> None: ...
    async def save_live(self, rows: dict[str, dict[str, Any]]) -> None: ...
    async def get_node(self, node_id: str) -> dict[str, Any] | None: ...
    async def list_nodes(self, include_removed: bool = False) -> list[dict[str, Any]]: ...
    async def set_drained(self, node_id: str, drained: bool) -> None: ...
    async def remove_node(self, node_id: str) -> None: ...
    async def add_task(self, task: dict[str, Any]) -> tuple[dict[str, Any], bool]: ...
    async def claim_tasks(self, node_id: str, limit: int) -> list[dict[str, Any]]: ...
    async def requeue_delivered(self, node_id: str) -> int: ...
    async def finish_task(self, task_id: str, node_id: str, outcome: dict[str, Any]) -> dict[str, Any] | None: ...
    async def get_task(self, task_id: str) -> dict[str, Any] | None: ...
    async def list_tasks(self, node: str | None, state: str | None, limit: int) -> list[dict[str, Any]]: ...
    async def counts(self) -> dict[str, dict[str, int]]: ...
    async def add_instance(self, instance: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]: ...
    async def get_instance(self, name: str) -> dict[str, Any] | None: ...
    async def latest_instance_task(self, name: str) -> dict[str, Any] | None: ...
    async def list_instances(self) -> list[dict[str, Any]]: ...
    async def delete_instance(self, name: str) -> None: ...
    async def add_client_certificate(self, serial: str, role: str, name: str, expires_at: float) -> None: ...
    async def list_client_certificates(self) -> list[dict[str, Any]]: ...
    async def revoke_client_certificate(self, serial: str) -> bool: ...
    async def revoked_serials(self) -> set[str]: ...
    async def add_audit(self, entry: dict[str, Any]) -> None: ...
    async def list_audit(self, limit: int) -> list[dict[str, Any]]: ...
    async def get_setting(self, key: str) -> Any: ...
    async def put_setting(self, key: str, value: Any) -> None: ...
    async def add_alerts(self, node_id: str, alerts: list[dict[str, Any]]) -> int: ...
    async def list_alerts(self) -> list[dict[str, Any]]: ...
    async def unforwarded_alerts(self, limit: int) -> list[dict[str, Any]]: ...
    async def mark_forwarded(self, keys: list[tuple[str, str]]) -> None: ...
    async def cancel_task(self, task_id: str, error: str) -> bool: ...
    async def move_instance(self, name: str, source: str, destination: str) -> bool: ...
    async def put_migration(self, migration: dict[str, Any]) -> None: ...
    async def get_migration(self, migration_id: str) -> dict[str, Any] | None: ...


class SQLiteStore:
    """SQLite in WAL mode, reached from a single worker thread so the event loop never blocks."""

    def __init__(self, path: Path):
        self.path = path
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kumo-store")
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> SQLiteStore:
        await self._run(self._open)
        return self

    def _open(self) -> None:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute("PRAGMA busy_timeout=5000")
        conn.executescript(SCHEMA)
        row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path}: schema version {row[0]} is newer than this controller's ({SCHEMA_VERSION}); "
                "upgrade the controller"
            )
        self._conn = conn

    async def close(self) -> None:
        if self._conn is not None:
            await self._run(self._conn.close)
            self._conn = None
        self._executor.shutdown(wait=True)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _tx(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def transaction() -> T:
            assert self._conn is not None, "store is not open"
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")
            return result

        return await self._run(transaction)

    # Tokens and enrollment.

    async def add_token(self, token_hash: str, expires_at: float, uses: int) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO tokens VALUES (?, ?, ?, ?)", (token_hash, expires_at, uses, time.time())
            )
        )

    async def token_status(self, token_hash: str) -> TokenCheck:
        """Whether the token could enroll a node now, without spending it."""
        return await self._tx(lambda c: _token_status(c, token_hash))

    async def enroll(
        self, token_hash: str, node_id: str, hostname: str, serial: str, expires_at: float
    ) -> TokenCheck:
        """Spend one use of the token and create the node, in one transaction."""

        def enroll(c: sqlite3.Connection) -> TokenCheck:
            status = _token_status(c, token_hash)
            if status != "ok":
                return status
            c.execute("UPDATE tokens SET uses_left = uses_left - 1 WHERE hash=?", (token_hash,))
            c.execute("INSERT INTO nodes (id, hostname, created_at) VALUES (?, ?, ?)", (node_id, hostname, time.time()))
            c.execute("INSERT INTO certificates VALUES (?, ?, ?)", (serial, node_id, expires_at))
            return "ok"

        return await self._tx(enroll)

    async def add_certificate(self, node_id: str, serial: str, expires_at: float) -> bool:
        """Record a renewed certificate; False (nothing recorded) when the node was removed,
        even by a removal that committed a moment ago: removal is final."""

        def add(c: sqlite3.Connection) -> bool:
            added = c.execute(
                "INSERT INTO certificates SELECT ?, id, ? FROM nodes WHERE id=? AND removed=0",
                (serial, expires_at, node_id),
            ).rowcount
            # Keep only certificates still valid: renewals would otherwise pile up forever.
            c.execute("DELETE FROM certificates WHERE node_id=? AND expires_at < ?", (node_id, time.time()))
            return added == 1

        return await self._tx(add)

    async def valid_serials(self) -> dict[str, set[str]]:
        def load(c: sqlite3.Connection) -> dict[str, set[str]]:
            out: dict[str, set[str]] = {}
            rows = c.execute(
                "SELECT c.node_id, c.serial FROM certificates c JOIN nodes n ON n.id = c.node_id WHERE n.removed = 0"
            )
            for row in rows:
                out.setdefault(row["node_id"], set()).add(row["serial"])
            return out

        return await self._tx(load)

    # Nodes.

    async def register_node(self, node_id: str, fields: dict[str, Any]) -> None:
        await self._tx(
            lambda c: c.execute(
                "UPDATE nodes SET hostname=?, agent_version=?, metrics_url=?, facts=?, plugins=?, instances=?, "
                "last_seen=? WHERE id=?",
                (
                    fields["hostname"], fields["agent_version"], fields["metrics_url"],
                    json.dumps(fields["facts"]), json.dumps(fields["plugins"]),
                    json.dumps(fields["instances"]), fields["last_seen"], node_id,
                ),
            )
        )

    async def save_live(self, rows: dict[str, dict[str, Any]]) -> None:
        """Persist heartbeat state (last_seen, instances, plugins) for many nodes at once."""

        def save(c: sqlite3.Connection) -> None:
            for node_id, live in rows.items():
                c.execute(
                    "UPDATE nodes SET last_seen=?, instances=?, plugins=COALESCE(?, plugins) WHERE id=?",
                    (
                        live["last_seen"], json.dumps(live["instances"]),
                        json.dumps(live["plugins"]) if live.get("plugins") is not None else None, node_id,
                    ),
                )

        await self._tx(save)

    async def get_node(self, node_id: str) -> dict[str, Any] | None:
        return await self._tx(lambda c: _one(c.execute("SELECT * FROM nodes WHERE id=?", (node_id,))))

    async def list_nodes(self, include_removed: bool = False) -> list[dict[str, Any]]:
        where = "" if include_removed else " WHERE removed = 0"
        return await self._tx(lambda c: _all(c.execute(f"SELECT * FROM nodes{where} ORDER BY id")))  # noqa: S608

    async def set_drained(self, node_id: str, drained: bool) -> None:
        await self._tx(lambda c: c.execute("UPDATE nodes SET drained=? WHERE id=?", (int(drained), node_id)))

    async def remove_node(self, node_id: str) -> None:
        def remove(c: sqlite3.Connection) -> None:
            c.execute("UPDATE nodes SET removed=1 WHERE id=?", (node_id,))
            c.execute("DELETE FROM certificates WHERE node_id=?", (node_id,))
            c.execute(
                "UPDATE tasks SET state='failed', error='the node was removed', code='node-removed', updated_at=? "
                "WHERE node=? AND state IN ('pending', 'delivered')",
                (time.time(), node_id),
            )

        await self._tx(remove)

    # Tasks.

    async def add_task(self, task: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert ``task``; with an idempotency key already used on that node, return that task."""

        def add(c: sqlite3.Connection) -> tuple[dict[str, Any], bool]:
            existing = _one(
                c.execute(
                    "SELECT * FROM tasks WHERE node=? AND idempotency_key=?", (task["node"], task["idempotency_key"])
                )
            )
            if existing is not None:
                return existing, False
            _insert_task(c, task)
            return _one(c.execute("SELECT * FROM tasks WHERE id=?", (task["id"],))), True  # type: ignore[return-value]

        return await self._tx(add)

    async def claim_tasks(self, node_id: str, limit: int) -> list[dict[str, Any]]:
        def claim(c: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = _all(
                c.execute(
                    "SELECT * FROM tasks WHERE node=? AND state='pending' ORDER BY created_at LIMIT ?", (node_id, limit)
                )
            )
            now = time.time()
            for row in rows:
                c.execute("UPDATE tasks SET state='delivered', updated_at=? WHERE id=?", (now, row["id"]))
                row["state"] = "delivered"
            return rows

        return await self._tx(claim)

    async def requeue_delivered(self, node_id: str) -> int:
        return await self._tx(
            lambda c: c.execute(
                "UPDATE tasks SET state='pending', updated_at=? WHERE node=? AND state='delivered'",
                (time.time(), node_id),
            ).rowcount
        )

    async def finish_task(self, task_id: str, node_id: str, outcome: dict[str, Any]) -> dict[str, Any] | None:
        """Record a task's end and its effect on the instance it concerns; None if not this node's."""

        def finish(c: sqlite3.Connection) -> dict[str, Any] | None:
            task = _one(c.execute("SELECT * FROM tasks WHERE id=? AND node=?", (task_id, node_id)))
            if task is None:
                return None
            if task["state"] in ("succeeded", "failed"):
                return task  # a repeated report (the agent retried after a lost answer)
            c.execute(
                "UPDATE tasks SET state=?, result=?, error=?, code=?, updated_at=? WHERE id=?",
                (
                    outcome["state"], json.dumps(outcome.get("result") or {}), outcome.get("error"),
                    outcome.get("code"), time.time(), task_id,
                ),
            )
            operation = task["kind"].rpartition(".")[2]
            if task["instance"] and (
                (operation == "delete" and outcome["state"] == "succeeded")
                or (operation == "create" and outcome["state"] == "failed")
            ):
                # A deleted instance, or one whose create failed, leaves nothing behind here either.
                c.execute("DELETE FROM instances WHERE name=? AND node=?", (task["instance"], node_id))
            return _one(c.execute("SELECT * FROM tasks WHERE id=?", (task_id,)))

        return await self._tx(finish)

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        return await self._tx(lambda c: _one(c.execute("SELECT * FROM tasks WHERE id=?", (task_id,))))

    async def list_tasks(self, node: str | None, state: str | None, limit: int) -> list[dict[str, Any]]:
        clauses, args = [], []
        if node:
            clauses.append("node=?")
            args.append(node)
        if state:
            clauses.append("state=?")
            args.append(state)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        sql = f"SELECT * FROM tasks{where} ORDER BY created_at DESC LIMIT ?"  # noqa: S608 - fixed clauses
        return await self._tx(lambda c: _all(c.execute(sql, (*args, limit))))

    async def counts(self) -> dict[str, dict[str, int]]:
        def count(c: sqlite3.Connection) -> dict[str, dict[str, int]]:
            tasks = {r[0]: r[1] for r in c.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")}
            return {"tasks": tasks}

        return await self._tx(count)

    # Instances.

    async def add_instance(self, instance: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
        """Store the instance and its create task together; StoreError if the name is taken."""

        def add(c: sqlite3.Connection) -> dict[str, Any]:
            if c.execute("SELECT 1 FROM instances WHERE name=?", (instance["name"],)).fetchone():
                raise StoreError(f"an instance named {instance['name']!r} already exists")
            c.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?)",
                (
                    instance["name"], instance["kind"], instance["node"], json.dumps(instance["spec"]),
                    json.dumps(instance["reasons"]), time.time(),
                ),
            )
            _insert_task(c, task)
            return _one(c.execute("SELECT * FROM tasks WHERE id=?", (task["id"],)))  # type: ignore[return-value]

        return await self._tx(add)

    async def get_instance(self, name: str) -> dict[str, Any] | None:
        return await self._tx(lambda c: _one(c.execute("SELECT * FROM instances WHERE name=?", (name,))))

    async def latest_instance_task(self, name: str) -> dict[str, Any] | None:
        return await self._tx(
            lambda c: _one(c.execute("SELECT * FROM tasks WHERE instance=? ORDER BY created_at DESC LIMIT 1", (name,)))
        )

    async def list_instances(self) -> list[dict[str, Any]]:
        return await self._tx(lambda c: _all(c.execute("SELECT * FROM instances ORDER BY name")))

    async def delete_instance(self, name: str) -> None:
        await self._tx(lambda c: c.execute("DELETE FROM instances WHERE name=?", (name,)))

    # Fleet settings (log forwarding...): one JSON document per key.

    # The audit log.

    async def add_audit(self, entry: dict[str, Any]) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT INTO audit (at, role, name, serial, method, path, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry["at"], entry["role"], entry["name"], entry["serial"], entry["method"], entry["path"],
             entry["status"], entry["error"])))

    async def list_audit(self, limit: int) -> list[dict[str, Any]]:
        """The newest ``limit`` entries, newest first."""
        return await self._tx(lambda c: _all(c.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (limit,))))

    # Admin and scraper certificates.

    async def add_client_certificate(self, serial: str, role: str, name: str, expires_at: float) -> None:
        await self._tx(lambda c: c.execute(
            "INSERT OR IGNORE INTO client_certificates VALUES (?, ?, ?, ?, ?, NULL)",
            (serial, role, name, expires_at, time.time())))

    async def list_client_certificates(self) -> list[dict[str, Any]]:
        return await self._tx(lambda c: _all(c.execute("SELECT * FROM client_certificates ORDER BY created_at")))

    async def revoke_client_certificate(self, serial: str) -> bool:
        """Revoke an admin or scraper certificate; False when no such certificate was issued."""
        return await self._tx(lambda c: c.execute(
            "UPDATE client_certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial=?",
            (time.time(), serial)).rowcount == 1)

    async def revoked_serials(self) -> set[str]:
        rows = await self._tx(lambda c: c.execute(
            "SELECT serial FROM client_certificates WHERE revoked_at IS NOT NULL").fetchall())
        return {row[0] for row in rows}

    async def get_setting(self, key: str) -> Any:
        row = await self._tx(lambda c: c.execute("SELECT value FROM settings WHERE key=?", (key,)).fetchone())
        return json.loads(row[0]) if row is not None else None

    async def put_setting(self, key: str, value: Any) -> None:
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO settings VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value=excluded.value",
                (key, json.dumps(value)),
            )
        )

    # Alerts: every transition a node reported, once each (the node may send one twice).

    async def add_alerts(self, node_id: str, alerts: list[dict[str, Any]]) -> int:
        def add(c: sqlite3.Connection) -> int:
            now, added = time.time(), 0
            for a in alerts:
                added += c.execute(
                    "INSERT OR IGNORE INTO alerts (node, id, rule, state, severity, labels, annotations, value, "
                    "starts_at, ends_at, received_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        node_id, a["id"], a["rule"], a["state"], a["severity"], json.dumps(a["labels"]),
                        json.dumps(a["annotations"]), a["value"], a["starts_at"], a["ends_at"], now,
                    ),
                ).rowcount
            return added

        return await self._tx(add)

    async def list_alerts(self) -> list[dict[str, Any]]:
        return await self._tx(lambda c: _all(c.execute("SELECT * FROM alerts ORDER BY received_at, rowid")))

    async def unforwarded_alerts(self, limit: int) -> list[dict[str, Any]]:
        return await self._tx(
            lambda c: _all(c.execute("SELECT * FROM alerts WHERE forwarded=0 ORDER BY received_at, rowid LIMIT ?", (limit,)))
        )

    async def mark_forwarded(self, keys: list[tuple[str, str]]) -> None:
        await self._tx(lambda c: c.executemany("UPDATE alerts SET forwarded=1 WHERE node=? AND id=?", keys))

    # Migrations: a task that never reached its node can be withdrawn, and an instance moves
    # to another node only from the node the caller believes it is on.

    async def cancel_task(self, task_id: str, error: str) -> bool:
        """Fail ``task_id`` if no node has taken it yet; True when it was withdrawn."""
        return await self._tx(
            lambda c: c.execute(
                "UPDATE tasks SET state='failed', error=?, code='cancelled', updated_at=? WHERE id=? AND state='pending'",
                (error, time.time(), task_id),
            ).rowcount
            == 1
        )

    async def move_instance(self, name: str, source: str, destination: str) -> bool:
        return await self._tx(
            lambda c: c.execute(
                "UPDATE instances SET node=? WHERE name=? AND node=?", (destination, name, source)
            ).rowcount
            == 1
        )

    async def put_migration(self, migration: dict[str, Any]) -> None:
        """Insert or replace one migration's record (a JSON document with ``id`` and ``instance``)."""
        now = time.time()
        await self._tx(
            lambda c: c.execute(
                "INSERT INTO migrations VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET doc=excluded.doc, updated_at=excluded.updated_at",
                (migration["id"], migration["instance"], json.dumps(migration), now, now),
            )
        )

    async def get_migration(self, migration_id: str) -> dict[str, Any] | None:
        row = await self._tx(lambda c: _one(c.execute("SELECT doc FROM migrations WHERE id=?", (migration_id,))))
        return row["doc"] if row is not None else None


def _token_status(c: sqlite3.Connection, token_hash: str) -> TokenCheck:
    row = c.execute("SELECT expires_at, uses_left FROM tokens WHERE hash=?", (token_hash,)).fetchone()
    if row is None:
        return "unknown"
    if row["expires_at"] <= time.time():
        return "expired"
    if row["uses_left"] <= 0:
        return "used"
    return "ok"


def _insert_task(c: sqlite3.Connection, task: dict[str, Any]) -> None:
    now = time.time()
    c.execute(
        "INSERT INTO tasks (id, node, kind, payload, idempotency_key, state, instance, created_at, updated_at) "
        "VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
        (
            task["id"], task["node"], task["kind"], json.dumps(task["payload"]), task["idempotency_key"],
            task.get("instance"), now, now,
        ),
    )


def _row(row: sqlite3.Row) -> dict[str, Any]:
    out = dict(row)
    for column in JSON_COLUMNS:
        if isinstance(out.get(column), str):
            out[column] = json.loads(out[column])
    return out


def _one(cursor: sqlite3.Cursor) -> dict[str, Any] | None:
    row = cursor.fetchone()
    return _row(row) if row is not None else None


def _all(cursor: sqlite3.Cursor) -> list[dict[str, Any]]:
    return [_row(r) for r in cursor.fetchall()]
