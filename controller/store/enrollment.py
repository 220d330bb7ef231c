"""The store's join tokens and the nodes' certificates: spending a token to enroll or
rejoin a node, answering the same join again when its answer was lost, and the serials
a node may still present. Removing a node ends all of it (:mod:`controller.store.nodes`)."""

from __future__ import annotations

import time
from typing import Literal

from controller.store.database import Tx
from controller.store.queries import Queries

TokenCheck = Literal["ok", "unknown", "expired", "used"]
# How long after a join its answer can still be asked for again, at least (a controller
# killed before the answer left it has this long to come back).
JOIN_RETRY_SECONDS = 600


class EnrollmentQueries(Queries):
    async def add_token(self, token_hash: str, expires_at: float, uses: int) -> None:
        async with self._tx() as tx:
            await tx.execute("INSERT INTO tokens VALUES (?, ?, ?, ?)", token_hash, expires_at, uses, time.time())

    async def token_status(self, token_hash: str) -> TokenCheck:
        """Whether the token could enroll a node now, without spending it."""
        async with self._tx() as tx:
            return await _token_status(tx, token_hash)

    async def enroll(
        self, token_hash: str, key_hash: str, node_id: str, hostname: str, serial: str, expires_at: float
    ) -> TokenCheck:
        """Spend one use of the token and create the node, in one transaction; the node
        remembers the token and key for :meth:`joined_before`."""
        async with self._tx() as tx:
            # Spending first: with two controllers, the row lock makes the second wait and
            # then see the use gone.
            spent = await tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash=? AND uses_left > 0 AND expires_at > ?",
                token_hash, time.time(),
            )
            if not spent:
                return await _token_status(tx, token_hash)
            await tx.execute("INSERT INTO nodes (id, hostname, created_at) VALUES (?, ?, ?)", node_id, hostname, time.time())
            await _remember_join(tx, node_id, token_hash, key_hash)
            await tx.execute("INSERT INTO certificates VALUES (?, ?, ?)", serial, node_id, expires_at)
            tx.notify({"event": "certificate", "node": node_id, "serial": serial})
            return "ok"

    async def rejoin(
        self, token_hash: str, key_hash: str, node_id: str, serial: str, expires_at: float
    ) -> TokenCheck | Literal["removed"]:
        """Spend one use of the token and give the existing ``node_id`` a new certificate, in
        one transaction; "removed" when the node is gone: removal is final."""
        async with self._tx() as tx:
            known = await tx.all("SELECT id FROM nodes WHERE id=? AND removed=0", node_id)
            if not known:
                return "removed"
            spent = await tx.execute(
                "UPDATE tokens SET uses_left = uses_left - 1 WHERE hash=? AND uses_left > 0 AND expires_at > ?",
                token_hash, time.time(),
            )
            if not spent:
                return await _token_status(tx, token_hash)
            # Removed since the check above: the token stays spent, the node stays out.
            if not await _add_certificate(tx, node_id, serial, expires_at):
                return "removed"
            await _remember_join(tx, node_id, token_hash, key_hash)
            return "ok"

    async def joined_before(self, token_hash: str, key_hash: str) -> str | None:
        """The node that joined with this token and key within the retry window (see
        :func:`_remember_join`), not removed since; None otherwise."""
        async with self._tx() as tx:
            row = await tx.one(
                "SELECT id FROM nodes WHERE join_token=? AND join_key=? AND join_retry_until > ? AND removed=0",
                token_hash, key_hash, time.time(),
            )
        return None if row is None else row["id"]

    async def add_certificate(self, node_id: str, serial: str, expires_at: float) -> bool:
        """Record a renewed certificate; False (nothing recorded) when the node was removed,
        even by a removal that committed a moment ago: removal is final."""
        async with self._tx() as tx:
            return await _add_certificate(tx, node_id, serial, expires_at)

    async def valid_serials(self, node_id: str | None = None) -> dict[str, set[str]]:
        """Serials of the certificates each node (or just ``node_id``) may still use."""
        sql = "SELECT c.node_id, c.serial FROM certificates c JOIN nodes n ON n.id = c.node_id WHERE n.removed = 0"
        async with self._tx() as tx:
            rows = await (tx.all(sql + " AND n.id = ?", node_id) if node_id else tx.all(sql))
        out: dict[str, set[str]] = {}
        for row in rows:
            out.setdefault(row["node_id"], set()).add(row["serial"])
        return out


async def _token_status(tx: Tx, token_hash: str) -> TokenCheck:
    row = await tx.one("SELECT expires_at, uses_left FROM tokens WHERE hash=?", token_hash)
    if row is None:
        return "unknown"
    if row["expires_at"] <= time.time():
        return "expired"
    if row["uses_left"] <= 0:
        return "used"
    return "ok"


async def _remember_join(tx: Tx, node_id: str, token_hash: str, key_hash: str) -> None:
    """Let the same join (token and key) get ``node_id`` again if its answer is lost: until
    the token expires, and at least JOIN_RETRY_SECONDS after this join."""
    floor = time.time() + JOIN_RETRY_SECONDS
    await tx.execute(
        "UPDATE nodes SET join_token=?, join_key=?, join_retry_until=(SELECT CASE WHEN expires_at > ? "
        "THEN expires_at ELSE ? END FROM tokens WHERE hash=?) WHERE id=?",
        token_hash, key_hash, floor, floor, token_hash, node_id,
    )


async def _add_certificate(tx: Tx, node_id: str, serial: str, expires_at: float) -> bool:
    """Record a certificate of ``node_id`` unless the node was removed; whether it was."""
    added = await tx.execute(
        "INSERT INTO certificates SELECT CAST(? AS TEXT), id, CAST(? AS DOUBLE PRECISION) FROM nodes "
        "WHERE id=? AND removed=0",
        serial, expires_at, node_id,
    )
    # Keep only certificates still valid: renewals would otherwise pile up forever.
    await tx.execute("DELETE FROM certificates WHERE node_id=? AND expires_at < ?", node_id, time.time())
    if added:
        tx.notify({"event": "certificate", "node": node_id, "serial": serial})
    return added == 1
