"""The migrations this controller drives, while it drives them, and the steps that both ways
of moving an instance (:mod:`controller.services.migrations`, stop-and-copy;
:mod:`controller.services.live`, live) take alike.

What a running migration holds here: its document (the store has the last one written), its
driving task, and the controller's end of its data path, which the HTTP handlers
(controller/api/migration.py) splice the nodes' requests into: the :class:`Relay` of a
stop-and-copy's image stream or the :class:`Tunnel` of a live migration's hypervisor
connections. It stands apart so that the two drivers and the handlers share it without
importing one another.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
import weakref
from collections.abc import Awaitable
from typing import Any

PREFLIGHT_TIMEOUT = 30.0
CRIU_TIMEOUT = 660.0  # the plugin's own criu timeout (600 s) plus slack
TRANSFER_TIMEOUT = 6 * 3600.0  # the stall timeout below is what ends a stuck transfer
STALL_TIMEOUT = 60.0
ABORT_GRACE = 30.0  # how long an aborted transfer waits for the other end's task to answer
CLEANUP_TIMEOUT = 60.0
RELAY_DEPTH = 64  # chunks held between the source's upload and the destination's download
# A live migration's tunnels: the agents send at most 256 KiB a message (plugins/checkpoint/
# tunnels.py), so a bigger one is a node trying to make the controller buffer it whole.
TUNNEL_MESSAGE_MAX = 1 << 20
# Its hypervisors open one connection per channel; a few more are retries. Each one makes
# the destination open a local connection, so a source may not open them without bound.
TUNNEL_CONNECTIONS_MAX = 8
PROGRESS_KEYS_MAX = 16
PROGRESS_KEY_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}\Z")
# A tunnel's peer that takes no message for this long is frozen (a stopped agent): the
# connection ends, rather than hold the other end and the migration until the peer returns.
TUNNEL_SEND_TIMEOUT = 30.0


class RelayAborted(Exception):
    """The transfer was given up; the message says why."""


class Relay:
    """One image stream from the source's PUT to the destination's GET."""

    def __init__(self, source: str, destination: str):
        self.source = source
        self.destination = destination
        self.chunks: asyncio.Queue[bytes | None] = asyncio.Queue(RELAY_DEPTH)
        self.total: int | None = None
        self.sent = 0  # bytes received from the source
        self.received = 0  # bytes handed to the destination
        self.attached = asyncio.Event()
        self.delivered = asyncio.Event()
        self.aborted = asyncio.Event()
        self.error: str | None = None

    def abort(self, reason: str) -> None:
        if self.error is None:
            self.error = reason
        self.aborted.set()

    async def until(self, awaitable: Awaitable[Any], stalled: str) -> Any:
        """Await ``awaitable`` unless the transfer is aborted or nothing happens for STALL_TIMEOUT."""
        if self.aborted.is_set():
            if asyncio.iscoroutine(awaitable):
                awaitable.close()
            raise RelayAborted(self.error)
        waiter = asyncio.ensure_future(awaitable)
        abort = asyncio.ensure_future(self.aborted.wait())
        try:
            done, _ = await asyncio.wait({waiter, abort}, timeout=STALL_TIMEOUT, return_when=asyncio.FIRST_COMPLETED)
        finally:
            abort.cancel()
        if waiter in done:
            return waiter.result()
        waiter.cancel()
        if not done:
            self.abort(f"the transfer stalled: {stalled} for {STALL_TIMEOUT:.0f} s")
        raise RelayAborted(self.error)


class Tunnel:
    """The tunnels of one live migration between its source and destination (see
    controller/api/migration.py for the websockets that use it)."""

    def __init__(self, source: str, destination: str):
        self.source = source
        self.destination = destination
        # The destination's first word on its control websocket: its definition and channels.
        self.ready: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.control: Any = None  # the destination's control websocket, while it is open
        # Connection number -> its channel and the destination's websocket for it, once joined.
        self.waiting: dict[str, tuple[str, asyncio.Future[Any]]] = {}
        self.opened = 0
        self.open = 0  # the tunnelled connections now open
        self.live = False  # the source may open connections: its move was asked
        self.bytes = 0  # carried either way, all channels
        self.progress: dict[str, Any] = {}  # the source's latest figures
        self.ended = asyncio.Event()

    def report(self, figures: Any) -> None:
        """Keep the source's progress figures (short names, numbers or short words): they are
        shown to admins, and the source may be compromised. The byte counts are the
        controller's own."""
        if isinstance(figures, dict):
            self.progress = {key: value for key, value in list(figures.items())[:PROGRESS_KEYS_MAX]
                             if isinstance(key, str) and PROGRESS_KEY_RE.match(key) and not key.startswith("bytes_")
                             and (value is None or isinstance(value, (int, float))
                                  or isinstance(value, str) and len(value) <= 40)}

    async def end(self, how: str) -> None:
        """Tell the destination how the move ended (``finished`` or ``failed``)."""
        self.ended.set()
        if self.control is not None and not self.control.closed:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.control.send_str(json.dumps({"end": how})), TUNNEL_SEND_TIMEOUT)


class Migrations:
    """The migrations this controller process is driving (which instance each holds is in the
    store, shared by every controller: see Store.begin_migration)."""

    def __init__(self) -> None:
        self.relays: dict[str, Relay] = {}
        self.tunnels: dict[str, Tunnel] = {}
        self.running: dict[str, asyncio.Task[None]] = {}
        self.docs: dict[str, dict[str, Any]] = {}


_MIGRATIONS: weakref.WeakKeyDictionary[Any, Migrations] = weakref.WeakKeyDictionary()


def migrations(ctl: Any) -> Migrations:
    if ctl not in _MIGRATIONS:
        _MIGRATIONS[ctl] = Migrations()
    return _MIGRATIONS[ctl]


async def record_phase(ctl: Any, doc: dict[str, Any], phase: str) -> None:
    doc["phase"] = phase
    await ctl.store.put_migration(doc)


def fail(doc: dict[str, Any], task: dict[str, Any], what: str) -> None:
    """Record why the migration failed; its state turns ``failed`` only when it ends
    (:func:`controller.services.migrations.start_migration`'s driver), so that no client
    reads an outcome before the rollback has made one."""
    code = task.get("code") or "failed"
    doc.update(error=f"{what}: {task.get('error') or 'no error given'}", code=code)


async def running_on(ctl: Any, nodes: list[str], name: str, kind: str, since: float) -> str | None:
    """The first of ``nodes`` whose report made after ``since`` lists the instance running,
    waiting a few heartbeats for one; None when none does. Older reports do not count: what
    the store kept from before (a dead controller's last flush) may show the source running
    an instance that its checkpoint has since stopped."""
    deadline = time.monotonic() + max(10.0, 5 * ctl.settings.heartbeat_interval)
    while time.monotonic() < deadline:
        for node_id in nodes:
            if await _reports_running(ctl, node_id, name, kind, since):
                return node_id
        await asyncio.sleep(0.2)
    return None


async def reports_running(ctl: Any, node_id: str, name: str, kind: str, since: float,
                          poll: float = 0.2) -> bool | None:
    """Whether the first report ``node_id`` makes after ``since`` lists the instance running,
    waiting a few heartbeats for one and reading the store every ``poll`` seconds; None when
    it makes none (it may run it all the same). A removed node runs nothing: an admin
    removes a node whose host is gone."""
    deadline = time.monotonic() + max(10.0, 5 * ctl.settings.heartbeat_interval)
    while time.monotonic() < deadline:
        answer = await _reports_running(ctl, node_id, name, kind, since)
        if answer is not None:
            return answer
        await asyncio.sleep(poll)
    return None


async def _reports_running(ctl: Any, node_id: str, name: str, kind: str, since: float) -> bool | None:
    row = await ctl.store.get_node(node_id)
    if row is None or row.get("removed"):
        return False
    view = ctl.node_view(row)
    if (view["last_seen"] or 0) < since:
        return None
    return any(i.get("name") == name and i.get("kind") == kind and i.get("state") == "running"
               for i in view["instances"])


async def within(future: asyncio.Future[dict[str, Any]], timeout: float) -> dict[str, Any] | None:
    """The task ``future`` waits for, or None when it does not end within ``timeout``."""
    done, _ = await asyncio.wait({future}, timeout=timeout)
    return future.result() if done else None
