"""The tunnels of a live migration, through the controller.

A kind's hypervisors (two libvirtds and their qemus) migrate a running instance over
connections they open themselves; Kumo's nodes have no route to each other, only their
mutual-TLS sessions to the controller. So on the source, this module listens on one unix
socket per channel the destination named (``<sockets>/<channel>.sock``, in a directory
only root and the hypervisor reach), and each connection accepted there becomes a
websocket to the controller (``/v1/nodes/<source>/migrations/<id>/live/<channel>``). The
controller tells the destination over its control websocket
(``/v1/nodes/<destination>/migrations/<id>/live``), which opens the matching websocket
(``.../live/<channel>?conn=<n>``) and connects it to its local target; the controller then
splices the two. The source's control websocket carries the migration's progress.

Both ends attach to the controller driving the migration (its URL comes in the task),
with the node's own certificate: the controller lets a node into the tunnels of a
migration only as its source or destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import LivePrepared, PluginContext, TaskError
from plugins.checkpoint.transfer import MIGRATION_RE

log = logging.getLogger(__name__)

CHUNK = 256 * 1024
# The controller refuses bigger messages in a tunnel; it forwards the other end's as they
# came, so none is larger than CHUNK from a sound node.
MESSAGE_MAX = 4 * CHUNK
CHANNEL_RE = re.compile(r"^[a-z]{1,16}\Z")  # a channel names a socket file on the source
CONNECT_TIMEOUT = 30.0


class Session:
    """The websockets of one end of one migration, to the controller driving it."""

    def __init__(self, context: PluginContext, controller: str, migration: str):
        if not MIGRATION_RE.match(migration):
            raise TaskError(f"payload.migration must be a migration id, got {migration!r:.60}", code="bad-request")
        if not controller.startswith("https://"):
            raise TaskError(f"payload.controller must be an https URL, got {controller!r:.80}", code="bad-request")
        if context.identity is None:
            raise TaskError("this agent has no controller identity to open a tunnel with", code="no-controller")
        self.context = context
        self.base = f"{controller.rstrip('/')}/v1/nodes/{context.identity.node_id}/migrations/{migration}/live"
        self.session: Any = None
        self.tls: Any = None

    async def __aenter__(self) -> Session:
        import aiohttp

        assert self.context.identity is not None
        self.tls = await asyncio.to_thread(self.context.identity.client_tls_context)
        self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()

    async def open(self, suffix: str = "", **query: str) -> Any:
        import aiohttp

        try:
            return await self.session.ws_connect(self.base + suffix, params=query or None, ssl=self.tls,
                                                 max_msg_size=MESSAGE_MAX, heartbeat=30.0)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            raise TaskError(f"the migration's tunnel through the controller cannot be opened: "
                            f"{exc or type(exc).__name__}", code="transfer-failed") from exc


async def splice(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ws: Any,
                 inbound: Callable[[bytes], bytes] | None = None) -> None:
    """Carry bytes both ways between a local connection and a websocket until either ends;
    those from the websocket through ``inbound`` (see :class:`agent.sdk.LivePrepared`)."""
    import aiohttp

    async def out() -> None:
        while data := await reader.read(CHUNK):
            await ws.send_bytes(data)

    async def back() -> None:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            try:
                data = inbound(message.data) if inbound else message.data
            except ValueError as exc:
                log.warning("checkpoint: a tunnelled connection of the live migration was closed: %s", exc)
                break
            writer.write(data)
            await writer.drain()

    pumps = [asyncio.ensure_future(out()), asyncio.ensure_future(back())]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        with contextlib.suppress(Exception):
            await ws.close()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


@contextlib.asynccontextmanager
async def source_tunnels(session: Session, sockets: Path, channels: list[str]) -> AsyncIterator[Any]:
    """Listen on ``sockets/<channel>.sock`` for each channel, every connection tunnelled to
    the destination; yields the control websocket (for progress)."""
    conns: set[asyncio.Task[None]] = set()

    def accept(channel: str) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def tunnel(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            conns.add(task)
            try:
                ws = await session.open(f"/{channel}")
                await splice(reader, writer, ws)
            except TaskError as exc:
                log.warning("checkpoint: %s", exc)
                writer.close()
            finally:
                conns.discard(task)

        return tunnel

    control = await session.open()
    servers = []
    try:
        for channel in channels:
            servers.append(await asyncio.start_unix_server(accept(channel), path=str(sockets / f"{channel}.sock")))
        yield control
    finally:
        for server in servers:
            server.close()
        for task in list(conns):
            task.cancel()
        await control.close()


async def destination_tunnels(session: Session, ready: Mapping[str, Any], prepared: LivePrepared) -> str | None:
    """Tell the controller the destination is ``ready``, then connect each tunnelled
    connection it announces to its channel's local target (through the channel's filter),
    until it says the migration ended (how: "finished" or "failed") or goes away (None)."""
    import aiohttp

    conns: set[asyncio.Task[None]] = set()
    targets = prepared.targets

    async def connect(channel: str, conn: str) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(str(targets[channel]))
        except OSError as exc:
            log.warning("checkpoint: the live migration's %s target %s refused: %s", channel, targets[channel], exc)
            return
        try:
            ws = await session.open(f"/{channel}", conn=conn)
        except TaskError as exc:  # the source's hypervisor sees its connection close
            log.warning("checkpoint: %s", exc)
            writer.close()
            return
        make_filter = prepared.filters.get(channel)
        await splice(reader, writer, ws, make_filter() if make_filter else None)

    control = await session.open()
    try:
        await control.send_str(json.dumps(ready))
        async for message in control:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            order = json.loads(message.data)
            if "end" in order:
                return str(order["end"])
            if order.get("channel") in targets:
                task = asyncio.ensure_future(connect(order["channel"], str(order["conn"])))
                conns.add(task)
                task.add_done_callback(conns.discard)
    finally:
        for task in list(conns):
            task.cancel()
        await control.close()
    return None
