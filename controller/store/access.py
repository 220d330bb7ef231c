"""The store's record of who, besides nodes, may call the controller and what they did:
admin and scraper certificates, the web interface's single-use sign-in links and the
browser sessions they become, and the audit log."""

from __future__ import annotations

import time
from typing import Any

from controller.store.enrollment import TokenCheck
from controller.store.queries import Queries, limit_args, select_sql


class AccessQueries(Queries):
    # Admin and scraper certificates.

    async def add_client_certificate(self, serial: str, role: str, name: str, expires_at: float) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO client_certificates VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT (serial) DO NOTHING",
                serial, role, name, expires_at, time.time(),
            )

    async def list_client_certificates(self, limit: int | None = None,
                                       after: tuple[float, str] | None = None) -> list[dict[str, Any]]:
        """Admin and scraper certificates oldest first; ``after`` (created_at, serial) starts
        after that certificate (a page)."""
        clauses, args = ([], []) if after is None else (
            ["(created_at > ? OR (created_at = ? AND serial > ?))"], [after[0], after[0], after[1]])
        async with self._tx() as tx:
            return await tx.all(select_sql("client_certificates", clauses, "created_at, serial", limit), *args,
                                *limit_args(limit))

    async def revoke_client_certificate(self, serial: str) -> bool:
        """Revoke an admin or scraper certificate; False when no such certificate was issued."""
        async with self._tx() as tx:
            found = await tx.execute(
                "UPDATE client_certificates SET revoked_at = COALESCE(revoked_at, ?) WHERE serial=?", time.time(), serial
            )
            if found:
                tx.notify({"event": "revoked", "serial": serial})
            return found == 1

    async def revoked_serials(self) -> set[str]:
        async with self._tx() as tx:
            rows = await tx.all("SELECT serial FROM client_certificates WHERE revoked_at IS NOT NULL")
        return {row["serial"] for row in rows}

    # The web interface: single-use sign-in links and the browser sessions they become.

    async def add_ui_signin(self, signin_id: str, secret_hash: str, name: str, expires_at: float) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO ui_sessions (id, hash, kind, name, created_at, expires_at) VALUES (?, ?, 'signin', ?, ?, ?)",
                signin_id, secret_hash, name, time.time(), expires_at,
            )

    async def redeem_ui_signin(self, secret_hash: str, session: dict[str, Any]) -> TokenCheck:
        """Spend a sign-in link and open ``session`` (id, hash, expires_at, remote) in its
        name, in one transaction: a link opens one session, however many browsers race."""
        now = time.time()
        async with self._tx() as tx:
            row = await tx.one(
                "UPDATE ui_sessions SET used_at=? WHERE hash=? AND kind='signin' AND used_at IS NULL "
                "AND revoked_at IS NULL AND expires_at > ? RETURNING name",
                now, secret_hash, now,
            )
            if row is None:
                found = await tx.one("SELECT expires_at, used_at FROM ui_sessions WHERE hash=? AND kind='signin'",
                                     secret_hash)
                if found is None:
                    return "unknown"
                return "used" if found["used_at"] is not None else "expired"
            await tx.execute(
                "INSERT INTO ui_sessions (id, hash, kind, name, created_at, expires_at, remote) "
                "VALUES (?, ?, 'session', ?, ?, ?, ?)",
                session["id"], session["hash"], row["name"], now, session["expires_at"], session["remote"],
            )
            return "ok"

    async def ui_session(self, secret_hash: str) -> dict[str, Any] | None:
        """The browser session whose cookie hashes to ``secret_hash``, if it is still valid."""
        async with self._tx() as tx:
            return await tx.one(
                "SELECT id, name, expires_at FROM ui_sessions WHERE hash=? AND kind='session' "
                "AND revoked_at IS NULL AND expires_at > ?",
                secret_hash, time.time(),
            )

    async def list_ui_sessions(self) -> list[dict[str, Any]]:
        """Sign-in links and sessions not yet expired, oldest first (never their hashes)."""
        async with self._tx() as tx:
            return await tx.all(
                "SELECT id, kind, name, created_at, expires_at, used_at, revoked_at, remote FROM ui_sessions "
                "WHERE expires_at > ? ORDER BY created_at, id",
                time.time(),
            )

    async def revoke_ui_session(self, session_id: str) -> bool:
        """End a session (or withdraw an unused link) at once; False when there is no such id."""
        async with self._tx() as tx:
            found = await tx.execute(
                "UPDATE ui_sessions SET revoked_at = COALESCE(revoked_at, ?) WHERE id=?", time.time(), session_id
            )
            if found:
                tx.notify({"event": "ui-revoked", "id": session_id})
            return found == 1

    # The audit log.

    async def add_audit(self, entry: dict[str, Any]) -> None:
        async with self._tx() as tx:
            await tx.execute(
                "INSERT INTO audit (at, role, name, serial, method, path, status, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                entry["at"], entry["role"], entry["name"], entry["serial"], entry["method"], entry["path"],
                entry["status"], entry["error"],
            )

    async def list_audit(self, limit: int, before: int | None = None) -> list[dict[str, Any]]:
        """The newest ``limit`` entries (older than the entry ``before``), newest first."""
        clauses, args = (["id < ?"], [before]) if before is not None else ([], [])
        async with self._tx() as tx:
            return await tx.all(select_sql("audit", clauses, "id DESC", limit), *args, limit)
