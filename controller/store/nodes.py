"""The store's nodes: what each agent reports when it starts and in its heartbeats, its
capacity, draining, and removal (which revokes its certificates and fails its tasks)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from controller.store.queries import Queries, all_decoded, decoded, limit_args, select_sql


class NodeQueries(Queries):
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
            return decoded(await tx.one("SELECT * FROM nodes WHERE id=?", node_id))

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
            return all_decoded(await tx.all(select_sql("nodes", clauses, "id", limit), *args, *limit_args(limit)))

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
