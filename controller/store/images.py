"""The store's image catalogue: one row per image (a form of a name's version), and the
aliases that name them; an image that instances use is never deleted."""

from __future__ import annotations

import time
from typing import Any

from controller.store.database import StoreError
from controller.store.queries import Queries, select_sql


class ImageQueries(Queries):
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
            return await tx.all(select_sql("images", clauses, "name, created_at, kind", None), *args)

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
