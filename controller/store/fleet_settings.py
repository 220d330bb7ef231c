"""The store's fleet settings (log forwarding...): one JSON document per key, the same for
every controller."""

from __future__ import annotations

import json
from typing import Any

from controller.store.queries import Queries


class FleetSettingQueries(Queries):
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
