"""The store's alerts: every transition a node reported, once each (the node may send one
twice), each alert's latest one, and which are still to be forwarded."""

from __future__ import annotations

import json
import time
from typing import Any

from controller.store.queries import Queries, all_decoded, limit_args, select_sql


class AlertQueries(Queries):
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
            return all_decoded(await tx.all(select_sql("alerts", clauses, "received_at DESC, node DESC, id DESC", limit),
                                             *args, *limit_args(limit)))

    async def unforwarded_alerts(self, limit: int) -> list[dict[str, Any]]:
        async with self._tx() as tx:
            return all_decoded(
                await tx.all("SELECT * FROM alerts WHERE forwarded=0 ORDER BY received_at, node, id LIMIT ?", limit)
            )

    async def mark_forwarded(self, keys: list[tuple[str, str]]) -> None:
        async with self._tx() as tx:
            await tx.executemany("UPDATE alerts SET forwarded=1 WHERE node=? AND id=?", keys)
