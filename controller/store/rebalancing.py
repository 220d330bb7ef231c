"""The store's side of rebalancing: samples of the nodes' usage, the decisions taken, and
the lease that lets one controller at a time run a round."""

from __future__ import annotations

import json
import time
from typing import Any

from controller.store.queries import Queries, all_decoded, limit_args, select_sql


class RebalancingQueries(Queries):
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
            return all_decoded(await tx.all("SELECT * FROM rebalance_samples WHERE at >= ? ORDER BY at, node", since))

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
            rows = all_decoded(await tx.all(select_sql("rebalance_history", clauses, "id DESC", limit), *args,
                                             *limit_args(limit)))
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
