"""The store's instances: each one's record (kind, node, spec, image) from its create task
on, moved between nodes by migrations, deleted with its last task."""

from __future__ import annotations

import json
import time
from typing import Any

from controller.store.database import StoreError
from controller.store.queries import Queries, all_decoded, decoded, limit_args, select_sql
from controller.store.tasks import insert_task


class InstanceQueries(Queries):
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
            await insert_task(tx, task)
            return decoded(await tx.one("SELECT * FROM tasks WHERE id=?", task["id"]))  # type: ignore[return-value]

    async def get_instance(self, name: str) -> dict[str, Any] | None:
        async with self._tx() as tx:
            return decoded(await tx.one("SELECT * FROM instances WHERE name=?", name))

    async def list_instances(self, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
        """Instances by name; ``limit`` of them after the name ``after`` (a page), or all."""
        clauses, args = (["name > ?"], [after]) if after is not None else ([], [])
        async with self._tx() as tx:
            return all_decoded(await tx.all(select_sql("instances", clauses, "name", limit), *args, *limit_args(limit)))

    async def delete_instance(self, name: str) -> None:
        async with self._tx() as tx:
            await tx.execute("DELETE FROM instances WHERE name=?", name)

    async def move_instance(self, name: str, source: str, destination: str) -> bool:
        """Move the instance's record, only from the node the caller believes it is on."""
        async with self._tx() as tx:
            return await tx.execute("UPDATE instances SET node=? WHERE name=? AND node=?", destination, name, source) == 1
