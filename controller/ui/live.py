"""Live pages: one server-sent-event stream per open page, fed by the controller's events.

The stream does not carry the data: it names what changed (``nodes``, ``instances``,
``tasks``, ``migrations``, ``alerts``) and the page fetches the one list it shows again,
so an idle fleet costs an open socket and a comment every :data:`KEEPALIVE` seconds, and a
busy one at most one message per :data:`GATHER` seconds per page, never a request per row.

What changed comes from the store's events (every controller's changes, over LISTEN/NOTIFY
on PostgreSQL, in-process on SQLite) and from this controller's heartbeats
(:attr:`controller.app.Controller.watchers`); two things have no event and are looked at
once a second in memory: a node that stopped heart-beating turns unreachable, and a
migration this controller relays has moved more bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from typing import Any

from aiohttp import web

from controller.services.inflight import migrations
from controller.store.database import Event

KEEPALIVE = 15.0
GATHER = 0.2  # a burst of events (a heartbeat and a task's end) becomes one message
TICK = 1.0
ALL = frozenset({"nodes", "instances", "tasks", "migrations", "alerts"})
TOPICS: dict[str, frozenset[str]] = {
    "tasks": frozenset({"tasks", "instances"}),
    "task": frozenset({"tasks", "instances", "migrations"}),
    "certificate": frozenset({"nodes"}),
    "removed": frozenset({"nodes", "instances"}),
    "drained": frozenset({"nodes"}),
    "alerts": frozenset({"alerts", "nodes"}),
    "live": frozenset({"nodes", "instances"}),
    "migration": frozenset({"migrations", "instances"}),
}
HUB = "kumo.live"


class Stream:
    """One open page."""

    def __init__(self, session_id: str):
        self.session_id = session_id
        self.pending: set[str] = set()
        self.wake = asyncio.Event()
        self.closed = False

    def push(self, topics: frozenset[str]) -> None:
        self.pending |= topics
        self.wake.set()

    def close(self) -> None:
        self.closed = True
        self.wake.set()


class Hub:
    """Every open page of this listener, told of changes."""

    def __init__(self, ctl: Any):
        self.ctl = ctl
        self.streams: set[Stream] = set()
        self._ready: dict[str, bool] = {}

    def on_event(self, event: Event | None) -> None:
        if event is not None and event.get("event") == "ui-revoked":
            for stream in self.streams:
                if stream.session_id == event["id"]:
                    stream.close()
            return
        topics = ALL if event is None else TOPICS.get(event.get("event", ""), frozenset())
        if topics:
            for stream in self.streams:
                stream.push(topics)

    def _tick(self) -> None:
        limit = 3 * self.ctl.settings.heartbeat_interval
        now = time.time()
        ready = {node: now - live.get("last_seen", 0) <= limit for node, live in self.ctl.live.items()}
        changed = ready != self._ready
        self._ready = ready
        if changed:
            self.on_event({"event": "live"})
        if migrations(self.ctl).relays:
            self.on_event({"event": "migration"})

    async def tick_loop(self) -> None:
        while True:
            await asyncio.sleep(TICK)
            if self.streams:
                self._tick()

    def close_all(self) -> None:
        for stream in self.streams:
            stream.close()

    async def stream(self, response: web.StreamResponse, session_id: str, expires_at: float) -> None:
        """Write change events to ``response`` until the page goes, the session ends or the
        controller stops."""
        stream = Stream(session_id)
        self.streams.add(stream)
        try:
            await response.write(b"retry: 2000\n\n")
            while not stream.closed and time.time() < expires_at:
                try:
                    async with asyncio.timeout(KEEPALIVE):  # not wait_for: see postgres._while_alive
                        await stream.wake.wait()
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await asyncio.sleep(GATHER)
                stream.wake.clear()
                topics, stream.pending = sorted(stream.pending), set()
                if topics and not stream.closed:
                    await response.write(f"event: change\ndata: {json.dumps({'topics': topics})}\n\n".encode())
        except ConnectionError:
            pass  # the page went away
        finally:
            self.streams.discard(stream)


def hub(app: web.Application) -> Hub:
    return app[HUB]


def attach(app: web.Application, ctl: Any) -> None:
    """Feed a hub for ``app`` from the controller's events; its pages close on shutdown."""
    live = Hub(ctl)
    app[HUB] = live
    ctl.store.subscribe(live.on_event)
    ctl.watchers.append(live.on_event)

    async def ticking(_: web.Application) -> Any:
        task = asyncio.create_task(live.tick_loop(), name="kumo-ui-live")
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    async def closing(_: web.Application) -> None:
        live.close_all()

    app.cleanup_ctx.append(ticking)
    app.on_shutdown.append(closing)
