"""The store's tasks: queued once per idempotency key, claimed by the long-poll of their
node's agent, ended with the plugin's result or error, cancelled, and looked up by
instance."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

from controller.store.database import Tx
from controller.store.queries import Queries, all_decoded, decoded, page_before, select_sql


class TaskQueries(Queries):
    async def add_task(self, task: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Insert ``task``; with an idempotency key already used on that node, return that task."""
        async with self._tx() as tx:
            created = await insert_task(tx, task)
            row = await tx.one(
                "SELECT * FROM tasks WHERE node=? AND idempotency_key=?", task["node"], task["idempotency_key"]
            )
            return decoded(row), created  # type: ignore[return-value]

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
        return sorted(all_decoded(rows), key=lambda t: t["created_at"])

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
            task = decoded(await tx.one("SELECT * FROM tasks WHERE id=? AND node=?", task_id, node_id))
            if task is None:
                return None
            if task["state"] in ("succeeded", "failed"):
                return task  # a repeated report (the agent retried after a lost answer)
            await tx.execute(
                "UPDATE tasks SET state=?, result=?, error=?, code=?, updated_at=? WHERE id=?",
                outcome["state"], json.dumps(outcome.get("result") or {}), outcome.get("error"),
                outcome.get("code"), time.time(), task_id,
            )
            task = decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task_id))
            assert task is not None
            if task["instance"] and forget_instance(task):
                await tx.execute("DELETE FROM instances WHERE name=? AND node=?", task["instance"], node_id)
            tx.notify({"event": "task", "id": task_id})
            return task

    async def get_task(self, task_id: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task_id))

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
        page_before(before, clauses, args)
        async with self._tx() as tx:
            return all_decoded(await tx.all(select_sql("tasks", clauses, "created_at DESC, id DESC", limit), *args, limit))

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

    async def latest_instance_task(self, name: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return decoded(await tx.one("SELECT * FROM tasks WHERE instance=? ORDER BY created_at DESC LIMIT 1", name))

    async def instance_tasks(self, name: str, since: float) -> list[dict[str, Any]]:
        """The tasks about instance ``name`` created since ``since``, oldest first."""
        async with self._tx() as tx:
            return all_decoded(await tx.all(
                "SELECT * FROM tasks WHERE instance=? AND created_at >= ? ORDER BY created_at", name, since))


async def insert_task(tx: Tx, task: dict[str, Any]) -> bool:
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
