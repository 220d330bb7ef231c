"""The store's registry of controller processes: which ones serve the fleet now, so that
the others can tell a live one (and its URL) from one that died."""

from __future__ import annotations

import time
from typing import Any

from controller.store.queries import Queries


class ControllerQueries(Queries):
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
