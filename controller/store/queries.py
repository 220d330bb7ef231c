"""What every group of the store's queries shares: the database they run on, and how rows
are selected and decoded.

Rows are plain dicts, times epoch seconds, JSON columns decoded.
"""

from __future__ import annotations

import json
from contextlib import AbstractAsyncContextManager
from typing import Any

from controller.store.database import Database, Tx

JSON_COLUMNS = ("facts", "plugins", "instances", "usage", "capacity", "payload", "result", "spec", "reasons", "labels", "annotations", "doc",
                "image", "images")


class Queries:
    """The base of each group of queries that :class:`controller.store.Store` is made of.
    Each method is one transaction."""

    def __init__(self, db: Database):
        self.db = db

    def _tx(self) -> AbstractAsyncContextManager[Tx]:
        return self.db.transaction()


def select_sql(table: str, clauses: list[str], order: str, limit: int | None) -> str:
    """SELECT * with fixed clauses (never user input: values go as parameters)."""
    where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
    return f"SELECT * FROM {table}{where} ORDER BY {order}" + (" LIMIT ?" if limit is not None else "")  # noqa: S608


def page_before(before: tuple[float, str] | None, clauses: list[str], args: list[Any]) -> None:
    """Add to ``clauses`` and ``args`` what starts a newest-first page after ``before``
    (the last row's created_at and id)."""
    if before is not None:
        clauses.append("(created_at < ? OR (created_at = ? AND id < ?))")
        args += [before[0], before[0], before[1]]


def limit_args(limit: int | None) -> list[int]:
    return [] if limit is None else [limit]


def decoded(row: dict[str, Any] | None) -> dict[str, Any] | None:
    if row is None:
        return None
    for column in JSON_COLUMNS:
        if isinstance(row.get(column), str):
            row[column] = json.loads(row[column])
    return row


def all_decoded(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [decoded(row) for row in rows]  # type: ignore[misc]
