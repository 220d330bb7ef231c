"""The controller's HTTPS listeners, with a TLS read buffer sized to what a connection carries.

asyncio's TLS layer (``asyncio.sslproto.SSLProtocol``, Python 3.11 and later) gives every
connection a read buffer of ``max_size`` (256 KiB) when it is made. A controller holds two
mostly idle connections per agent (a long-poll and the heartbeats' keep-alive), so at
10,000 agents that buffer alone would cost 5 GiB. :class:`GrowingTLS` starts each connection
with a small buffer and doubles it whenever a read fills it, up to 64 KiB: an idle agent
connection keeps a few KiB; an upload (an image, a migration's checkpoint) reaches 64 KiB
within a few reads.

Why not up to asyncio's 256 KiB: the protocol also decrypts each TLS record (16 KiB of data
at most) with ``SSLObject.read(max_size)``, which allocates ``max_size`` bytes and shrinks
them. At 256 KiB glibc keeps growing and trimming its heap for those (a 200 MiB upload
made ~1,300 brk calls; 4 at 64 KiB), and uploads growing to 256 KiB measured ~15 % slower
than asyncio's stock protocol. At 64 KiB bench/bench_tls.py measures them as fast or faster.

:func:`serve` is ``loop.create_server(..., ssl=context)`` with that protocol between the
socket and aiohttp: the loop serves plain TCP and each connection's protocol is a
:class:`GrowingTLS` wrapping the application's, which is what the loop itself does for
``ssl=`` with the stock class.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable

INITIAL_BUFFER = 4 * 1024  # a handshake flight or a heartbeat fits in one or two reads
FULL_BUFFER = 64 * 1024  # see above: larger is no faster, and at 256 KiB slower


class GrowingTLS(sslproto.SSLProtocol):
    """asyncio's server-side TLS protocol, reading into a buffer that grows with the traffic."""

    max_size = INITIAL_BUFFER  # what the base class allocates per connection

    def buffer_updated(self, nbytes: int) -> None:
        # A read that filled the buffer means more is waiting: the next read gets twice the
        # room (``max_size`` is what the base class's get_buffer sizes the buffer to). It never
        # shrinks: a connection that carried an upload keeps its buffer until it closes.
        if nbytes >= self.max_size and self.max_size < FULL_BUFFER:
            self.max_size = min(2 * self.max_size, FULL_BUFFER)
        super().buffer_updated(nbytes)


async def serve(app_protocol: Callable[[], asyncio.Protocol], host: str, port: int, context: ssl.SSLContext,
                shutdown_timeout: float) -> asyncio.AbstractServer:
    """Listen on ``host:port`` for TLS connections served by ``app_protocol``'s protocols;
    ``shutdown_timeout``: seconds a closing connection waits for the client's TLS close."""
    loop = asyncio.get_running_loop()

    def connection() -> GrowingTLS:
        return GrowingTLS(loop, app_protocol(), context, None, server_side=True, ssl_shutdown_timeout=shutdown_timeout)

    return await loop.create_server(connection, host, port)
