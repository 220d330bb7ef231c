"""How many connections a controller listener holds: in all, and from one client.

Each listener counts the connections it has admitted, by client: the certificate's role and
name on the API listener (many nodes may share one address behind NAT, and one certificate
must not take a fleet's worth of connections), the peer address on the others (no client
certificate there). A connection over either cap is not dropped unanswered: its first
request gets a 503 naming the cap and the setting that raises it, then it is closed. A
silent close would look like a network fault, and clients retry those at once; a 503 is an
answer they show (kumoctl) or back off from (agents). Connections already admitted keep
working. A refused connection that sends no request is closed after ``REFUSED_GRACE``.

The count is kept by a thin protocol in front of aiohttp's (asyncio calls it after the TLS
handshake, so the certificate is known), which passes every event through unchanged.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

REFUSED_GRACE = 10.0  # seconds a refused connection has to send the request its 503 answers


class ConnectionLimits:
    """The caps of one listener and the connections it holds."""

    def __init__(self, what: str, total: int, per_client: int):
        self.what = what  # the listener, for messages
        self.total = total
        self.per_client = per_client
        self.count = 0  # admitted connections
        self.open: collections.Counter[str] = collections.Counter()  # admitted connections by client
        # transport -> why it was refused (its first request is answered with that)
        self.refused: dict[asyncio.BaseTransport, str] = {}

    def factory(self, inner: Callable[[], asyncio.Protocol]) -> Callable[[], asyncio.Protocol]:
        """A protocol factory for ``loop.create_server`` counting what ``inner``'s protocols serve."""
        return lambda: _Counted(self, inner())

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client``; None, or why it is refused (then not counted)."""
        if self.count >= self.total:
            return (f"the controller's {self.what} listener already holds {self.total} connections "
                    "(max_connections in controller.yaml); retry shortly")
        if self.open[client] >= self.per_client:
            return (f"the controller's {self.what} listener already holds {self.per_client} connections from "
                    f"{client} (max_connections_per_client in controller.yaml); close idle ones or retry shortly")
        self.open[client] += 1
        self.count += 1
        return None

    def release(self, client: str) -> None:
        self.count -= 1
        self.open[client] -= 1
        if self.open[client] <= 0:
            del self.open[client]


def client_of(transport: asyncio.BaseTransport) -> str:
    """Who is at the other end: the client certificate's role and name, else the address."""
    cert = transport.get_extra_info("peercert")
    if cert:
        subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn)
        return f"{subject.get('organizationalUnitName', 'no role')} {subject.get('commonName', '')!r}"
    peer = transport.get_extra_info("peername")
    return f"address {peer[0]}" if peer else "an unknown address"


class _Counted(asyncio.Protocol):
    """aiohttp's protocol for one connection, counted against the listener's caps."""

    def __init__(self, limits: ConnectionLimits, inner: Any):
        self._limits = limits
        self._inner = inner
        self._client: str | None = None  # set while the connection is counted
        self._transport: asyncio.BaseTransport | None = None
        self._expire: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        client = client_of(transport)
        why = self._limits.admit(client)
        if why is None:
            self._client = client
        else:
            self._limits.refused[transport] = why
            self._expire = asyncio.get_running_loop().call_later(REFUSED_GRACE, transport.abort)  # type: ignore[attr-defined]
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._client is not None:
            self._limits.release(self._client)
            self._client = None
        if self._expire is not None:
            self._expire.cancel()
        self._limits.refused.pop(self._transport, None)  # type: ignore[arg-type]
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()
