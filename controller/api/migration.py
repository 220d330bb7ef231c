"""Checkpoint, restore and migration over HTTP, and the image relay's endpoints.

The decisions (pre-flight, the migration's steps, rollback, takeover) are
:mod:`controller.services.migrations`'s and :mod:`controller.services.live`'s; here
requests are parsed and answers rendered, and the two ends of a migration's image stream
meet: the source's ``PUT`` and the destination's ``GET`` of
``/v1/nodes/{id}/migrations/{mid}/image``, relayed through the driving controller's
:class:`~controller.services.inflight.Relay` (or forwarded to the controller that drives
it, ``/v1/relay/...``); and a live migration's tunnelled connections are spliced through
its :class:`~controller.services.inflight.Tunnel`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import aiohttp
from aiohttp import web

from controller.api import (
    ApiError,
    Route,
    field,
    json_body,
    page_query,
    paged,
    reject_unknown,
    reply,
    state,
    time_cursor,
)
from controller.api.instances import shown
from controller.api.tasks import shown as shown_task
from controller.services import checkpoints, inflight, instances, live, migrations

log = logging.getLogger("kumo.controller.migration")


async def checkpoint(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    data = await json_body(request)
    reject_unknown(data, {"leave_running"})
    task = await migrations.checkpoint(ctl, row, field(data, "leave_running", bool, required=False, default=False))
    return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)


async def restore(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    data = await json_body(request)
    reject_unknown(data, {"checkpoint"})
    task = await migrations.restore(ctl, row, field(data, "checkpoint", str, required=False))
    return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)


async def list_checkpoints(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    return reply({"instance": row["name"], "node": row["node"], "checkpoints": await checkpoints.listing(ctl, row)})


async def delete_checkpoint(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    return reply(await checkpoints.remove(ctl, row, request.match_info["id"]))


async def prune_checkpoints(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    data = await json_body(request)
    reject_unknown(data, {"keep"})
    return reply(await checkpoints.prune(ctl, row, field(data, "keep", int)))


async def migrate(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    data = await json_body(request)
    reject_unknown(data, {"to", "live", "max_downtime_ms", "converge_timeout", "on_no_converge"})
    options = None
    if field(data, "live", bool, required=False, default=False):
        options = live.live_options(field(data, "max_downtime_ms", int, required=False),
                                    field(data, "converge_timeout", (int, float), required=False),
                                    field(data, "on_no_converge", str, required=False))
    elif set(data) & {"max_downtime_ms", "converge_timeout", "on_no_converge"}:
        raise ApiError(400, "max_downtime_ms, converge_timeout and on_no_converge are options of a live migration: "
                            "add \"live\": true")
    doc = await migrations.start_migration(ctl, row, field(data, "to", str, required=False), options)
    return reply({"migration": public(ctl, doc)}, 202)


async def list_migrations(request: web.Request) -> web.Response:
    ctl = state(request)
    limit, after = page_query(request)
    docs, following = paged(await migrations.listing(ctl, request.query.get("state"), limit + 1, time_cursor(after)),
                            limit, lambda doc: f"{doc['listed_at']!r}/{doc['id']}")
    return reply({"migrations": [public(ctl, doc) for doc in docs], "next": following})


async def show_migration(request: web.Request) -> web.Response:
    ctl = state(request)
    doc = inflight.migrations(ctl).docs.get(request.match_info["id"]) or await ctl.store.get_migration(request.match_info["id"])
    if doc is None:
        raise ApiError(404, f"no migration {request.match_info['id']!r}")
    return reply(public(ctl, doc))


def public(ctl: Any, doc: dict[str, Any]) -> dict[str, Any]:
    """The migration as the API shows it, with the relay's live byte counts."""
    out = {**doc, "progress": dict(doc["progress"])}
    out.pop("controller", None)
    out.pop("listed_at", None)
    tunnel = inflight.migrations(ctl).tunnels.get(doc["id"])
    if tunnel is not None:
        out["progress"].update(tunnel.progress, bytes_sent=tunnel.bytes)
    relay = inflight.migrations(ctl).relays.get(doc["id"])
    if relay is not None:
        out["progress"].update(bytes_sent=relay.sent, bytes_received=relay.received)
        if relay.total is not None:
            out["progress"]["bytes_total"] = relay.total
    return out


async def _relay(request: web.Request, role: str) -> inflight.Relay | str:
    """This controller's relay for the migration, or the URL to forward the stream to when
    another controller drives it."""
    ctl = state(request)
    migration_id, node_id = request.match_info["mid"], request.match_info["id"]
    relay = inflight.migrations(ctl).relays.get(migration_id)
    if relay is not None:
        if node_id != (relay.source if role == "source" else relay.destination):
            raise ApiError(403, f"node {node_id} is not the {role} of migration {migration_id}")
        return relay
    doc = await ctl.store.get_migration(migration_id)
    forwarded = request.path.startswith("/v1/relay/")  # never forwarded twice
    if doc is None or doc["state"] != "running" or doc["controller"] == ctl.id or forwarded:
        raise ApiError(404, f"migration {migration_id} has no transfer in progress")
    if node_id != doc[role]:
        raise ApiError(403, f"node {node_id} is not the {role} of migration {migration_id}")
    url = await ctl.controller_url(doc["controller"])
    if url is None:
        raise ApiError(503, f"the controller driving migration {migration_id} is not running; the migration will "
                            "be recorded as interrupted")
    return f"{url}/v1/relay/{migration_id}/{node_id}"


async def _stream(request: web.Request) -> Any:
    async for chunk in request.content.iter_any():
        yield chunk


async def _forward_upload(request: web.Request, target: str) -> web.Response:
    size = request.headers.get("X-Kumo-Size")
    try:
        async with state(request).peers().put(target, data=_stream(request),
                                              headers={"X-Kumo-Size": size} if size else {}) as answer:
            return reply(await answer.json(content_type=None), answer.status)
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        raise ApiError(502, f"forwarding the image to the controller driving the migration failed: "
                            f"{exc or type(exc).__name__}") from None


async def _forward_download(request: web.Request, target: str) -> web.StreamResponse:
    try:
        upstream = await state(request).peers().get(target)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ApiError(502, f"the controller driving the migration cannot be reached: {exc or type(exc).__name__}") from None
    async with upstream:
        if upstream.status != 200:
            return reply(await upstream.json(content_type=None), upstream.status)
        response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
        if upstream.content_length is not None:
            response.content_length = upstream.content_length
        await response.prepare(request)
        try:
            async for chunk in upstream.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
        except (aiohttp.ClientError, TimeoutError, OSError):
            # The answer has begun: cutting the connection is how the destination learns of it.
            if request.transport is not None:
                request.transport.close()
        return response


async def upload_image(request: web.Request) -> web.Response:
    relay = await _relay(request, "source")
    if isinstance(relay, str):
        return await _forward_upload(request, relay)
    if relay.attached.is_set():
        raise ApiError(409, "the image of this migration is already being sent")
    size = request.headers.get("X-Kumo-Size", "")
    relay.total = int(size) if size.isdigit() else None
    relay.attached.set()
    try:
        # request.content streams: client_max_size limits request.read(), not this.
        async for chunk in request.content.iter_any():
            if relay.chunks.full():
                await relay.until(relay.chunks.put(chunk), "the destination took nothing")
            else:
                relay.chunks.put_nowait(chunk)
            relay.sent += len(chunk)
        await relay.until(relay.chunks.put(None), "the destination took nothing")
        await relay.until(relay.delivered.wait(), "the destination did not take the rest")
    except inflight.RelayAborted as exc:
        raise ApiError(409, f"the transfer was aborted: {exc}") from None
    except BaseException as exc:
        relay.abort(f"the stream from node {relay.source} broke: {exc or type(exc).__name__}")
        raise
    return reply({"bytes": relay.sent})


async def download_image(request: web.Request) -> web.StreamResponse:
    relay = await _relay(request, "destination")
    if isinstance(relay, str):
        return await _forward_download(request, relay)
    try:
        await relay.until(relay.attached.wait(), f"node {relay.source} did not start sending")
    except inflight.RelayAborted as exc:
        raise ApiError(409, f"the transfer was aborted: {exc}") from None
    response = web.StreamResponse(headers={"Content-Type": "application/x-tar"})
    if relay.total is not None:
        response.content_length = relay.total
    await response.prepare(request)
    try:
        while True:
            if relay.chunks.empty():
                chunk = await relay.until(relay.chunks.get(), f"node {relay.source} sent nothing")
            else:
                chunk = relay.chunks.get_nowait()
            if chunk is None:
                break
            await response.write(chunk)
            relay.received += len(chunk)
        await response.write_eof()
    except asyncio.CancelledError:
        relay.abort(f"node {relay.destination} went away during the transfer")
        raise
    except (inflight.RelayAborted, OSError) as exc:
        relay.abort(f"node {relay.destination} went away during the transfer: {exc}")
        # The answer has begun: cutting the connection is how the destination learns of it.
        if request.transport is not None:
            request.transport.close()
        return response
    relay.delivered.set()
    return response


def _tunnel(request: web.Request) -> tuple[inflight.Tunnel, str]:
    """The live migration's tunnel and the role of the node asking (``source`` or
    ``destination``); 403 for any other node, 404 when this controller drives no such
    migration in progress (its ends are given the driving controller's URL), 409 for the
    source before its move was asked."""
    migration_id, node_id = request.match_info["mid"], request.match_info["id"]
    tunnel = inflight.migrations(state(request)).tunnels.get(migration_id)
    if tunnel is None or tunnel.ended.is_set():
        raise ApiError(404, f"this controller drives no live migration {migration_id} in progress")
    if node_id not in (tunnel.source, tunnel.destination):
        raise ApiError(403, f"node {node_id} is not an end of migration {migration_id}")
    if node_id == tunnel.source and not tunnel.live:
        raise ApiError(409, f"migration {migration_id} is not in its live phase: its source opens nothing yet")
    return tunnel, "source" if node_id == tunnel.source else "destination"


async def live_control(request: web.Request) -> web.WebSocketResponse:
    """A live migration's control websocket: the destination says it is ready and is told of
    each tunnelled connection and of the end; the source reports progress."""
    tunnel, role = _tunnel(request)
    if role == "destination" and tunnel.control is not None:
        raise ApiError(409, f"node {tunnel.destination} is already attached to migration {request.match_info['mid']}")
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=CONTROL_MESSAGE_MAX)
    await ws.prepare(request)
    if role == "destination":
        tunnel.control = ws
    try:
        async for message in ws:
            if message.type != aiohttp.WSMsgType.TEXT:
                break
            try:
                said = json.loads(message.data)
            except ValueError:
                break
            if role == "destination" and not tunnel.ready.done() and isinstance(said, dict):
                tunnel.ready.set_result(said)
            elif role == "source" and isinstance(said, dict):
                tunnel.report(said.get("progress"))
    finally:
        if role == "destination":
            tunnel.control = None
            if not tunnel.ready.done():
                tunnel.ready.set_exception(inflight.RelayAborted(f"node {tunnel.destination} went away"))
            for _, waiting in tunnel.waiting.values():
                waiting.cancel()
    return ws


async def live_channel(request: web.Request) -> web.WebSocketResponse:
    """One tunnelled connection: the source opens it, the destination joins it (``?conn=``)
    when told to, and the controller splices the two."""
    tunnel, role = _tunnel(request)
    channel = request.match_info["channel"]
    ws = web.WebSocketResponse(heartbeat=30.0, max_msg_size=inflight.TUNNEL_MESSAGE_MAX)
    if role == "destination":
        conn = request.query.get("conn", "")
        wanted, joining = tunnel.waiting.get(conn, (None, None))
        if joining is None or joining.done() or wanted != channel:
            raise ApiError(404, f"no tunnelled connection of channel {channel!r:.40} waits for this one")
        del tunnel.waiting[conn]  # joined once: a replay of its number finds nothing
        await ws.prepare(request)
        done = asyncio.Event()
        if joining.done():  # the source gave up meanwhile
            await ws.close()
            return ws
        joining.set_result(((ws, request), done))
        await done.wait()
        return ws
    control = tunnel.control
    if control is None or control.closed or not tunnel.ready.done():
        raise ApiError(409, f"node {tunnel.destination} is not ready for the migration's connections")
    if channel not in tunnel.ready.result().get("channels", ()):
        raise ApiError(404, f"the destination offers no channel {channel!r:.40}")
    if tunnel.open >= inflight.TUNNEL_CONNECTIONS_MAX:
        raise ApiError(429, f"migration {request.match_info['mid']} has {tunnel.open} tunnelled connections open, "
                            f"the most it may: close one first")
    tunnel.opened += 1
    tunnel.open += 1
    try:
        conn = str(tunnel.opened)
        joining = asyncio.get_running_loop().create_future()
        tunnel.waiting[conn] = (channel, joining)
        await ws.prepare(request)
        try:
            await asyncio.wait_for(control.send_str(json.dumps({"channel": channel, "conn": conn})),
                                   inflight.TUNNEL_SEND_TIMEOUT)
            other, done = await asyncio.wait_for(joining, inflight.STALL_TIMEOUT)
        except (asyncio.CancelledError, TimeoutError, ConnectionError):
            tunnel.waiting.pop(conn, None)
            await ws.close()
            return ws
        try:
            await _splice(tunnel, (ws, request), other)
        finally:
            done.set()
    finally:
        tunnel.open -= 1
    return ws


End = tuple[web.WebSocketResponse, web.Request]  # a tunnelled connection's websocket on one node


async def _splice(tunnel: inflight.Tunnel, one: End, other: End) -> None:
    async def pump(src: End, dst: End) -> None:
        (reading, _), (writing, peer) = src, dst
        async for message in reading:
            if message.type != aiohttp.WSMsgType.BINARY:
                break
            try:
                await asyncio.wait_for(writing.send_bytes(message.data), inflight.TUNNEL_SEND_TIMEOUT)
            except TimeoutError:
                # A peer that takes nothing (its agent stopped) would hold this connection, and
                # the other end with it, until it came back. A close would wait for it too: its
                # connection is cut outright.
                log.warning("migration %s: node %s took no tunnelled data for %g s: its connection is cut",
                            peer.match_info["mid"], peer.match_info["id"], inflight.TUNNEL_SEND_TIMEOUT)
                if peer.transport is not None:
                    peer.transport.abort()
                return
            tunnel.bytes += len(message.data)

    pumps = [asyncio.ensure_future(pump(one, other)), asyncio.ensure_future(pump(other, one))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in pumps:
            task.cancel()
        # Either end closing closes the other: that is how a hypervisor learns its peer is gone.
        for ws, _ in (one, other):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)


CONTROL_MESSAGE_MAX = 64 * 1024  # readiness (a domain definition) and progress figures
INSTANCE = "/v1/instances/{name}"
IMAGE = "/v1/nodes/{id}/migrations/{mid}/image"
RELAY = "/v1/relay/{mid}/{id}"
LIVE = "/v1/nodes/{id}/migrations/{mid}/live"
ROUTES = [
    Route("POST", INSTANCE + "/checkpoint", checkpoint, "admin",
          "Checkpoint an instance: CRIU for processes and containers, the kind's own save for VMs "
          "(pre-flight first: 409 with the blockers).",
          {"leave_running": "true to keep it running after the dump (default false: it stops)"}),
    Route("POST", INSTANCE + "/restore", restore, "admin", "Restore an instance from its latest or a given checkpoint.",
          {"checkpoint": "checkpoint id (GET .../checkpoints), optional: default the latest"}),
    Route("GET", INSTANCE + "/checkpoints", list_checkpoints, "admin",
          "The instance's checkpoints on its node, newest first: id, created_at, size_bytes, kind, leave_running, "
          "latest (what a restore without an id takes)."),
    Route("DELETE", INSTANCE + "/checkpoints/{id}", delete_checkpoint, "admin",
          "Remove one checkpoint; 404 when its node has none of that id. Answers the removed id and the latest left."),
    Route("POST", INSTANCE + "/checkpoints/prune", prune_checkpoints, "admin",
          "Keep the latest checkpoint and the newest others, keep in all; remove the rest.",
          {"keep": "integer >= 1"}),
    Route("POST", INSTANCE + "/migrate", migrate, "admin",
          "Move a running instance to another node (checkpoint, transfer, restore; or, live, while it runs); "
          "409 with the blockers.",
          {"to": "node id, or null to let the scheduler choose",
           "live": "true to move it while it runs (kinds whose nodes publish live_kinds)",
           "max_downtime_ms": "live: the longest pause for the last copy (default 300)",
           "converge_timeout": "live: seconds before a copy that does not converge counts as never converging "
                               "(default 120)",
           "on_no_converge": "live: stop-and-copy (pause it to finish) or abort (it stays on the source; default)"}),
    Route("GET", "/v1/migrations", list_migrations, "admin",
          "Migrations, newest first, a page at a time (?state=running|succeeded|failed&limit=&after=NEXT); "
          "ended ones are kept for the retention period."),
    Route("GET", "/v1/migrations/{id}", show_migration, "admin", "A migration: its phase, progress and outcome."),
    Route("PUT", IMAGE, upload_image, "node", "The source node streams a migration's checkpoint (a tar)."),
    Route("GET", LIVE, live_control, "node",
          "Websocket: a live migration's control channel (the destination's readiness and orders, the source's "
          "progress)."),
    Route("GET", LIVE + "/{channel}", live_channel, "node",
          "Websocket: one connection of a live migration's hypervisors, tunnelled from the source to the "
          "destination (which joins with ?conn=)."),
    Route("GET", IMAGE, download_image, "node", "The destination node reads a migration's checkpoint as it arrives."),
    Route("PUT", RELAY, upload_image, "controller",
          "Another controller forwards the image its node sends (this controller drives the migration)."),
    Route("GET", RELAY, download_image, "controller",
          "Another controller forwards the image to its node (this controller drives the migration)."),
]
