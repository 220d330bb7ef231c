"""Nodes: what agents call about themselves, and what admins see and do to nodes.

A node's calls carry its certificate; the guard in ``controller/app.py`` has already checked
that it names the node in the path and has not been revoked.
"""

from __future__ import annotations

import datetime
import math
import time
from typing import Any

from aiohttp import web

from controller import pki
from controller.api import (
    ApiError,
    Route,
    field,
    json_body,
    logging_settings,
    migration,
    page_query,
    paged,
    reject_unknown,
    reply,
    reports,
    state,
)
from controller.services import iso, migrations
from controller.services.tasks import leaves_no_instance

MAX_POLL_WAIT = 60.0
CLAIM_LIMIT = 32


async def register(request: web.Request) -> web.Response:
    ctl = state(request)
    node_id = request.match_info["id"]
    data = await json_body(request)
    reject_unknown(data, {"hostname", "agent_version", "facts", "plugins", "metrics_url", "instances"})
    fields = {
        "hostname": reports.text(reports.MAX_TEXT)("hostname", field(data, "hostname", str)),
        "agent_version": reports.text(reports.MAX_TEXT)("agent_version", data.get("agent_version") or ""),
        "facts": reports.facts(data.get("facts")),
        "plugins": reports.plugins(data.get("plugins")) or {},
        "metrics_url": reports.metrics_url(data.get("metrics_url"), request.remote),
        "instances": reports.instances(data.get("instances")),
        "last_seen": time.time(),
    }
    await ctl.store.register_node(node_id, fields, capacity_of(fields["facts"]))
    ctl.live.pop(node_id, None)
    ctl.touch(node_id, fields["instances"], fields["plugins"])
    # A fresh agent process has no memory of tasks delivered to the one before it (its
    # poll, which comes after this, finds them pending again).
    await ctl.store.requeue_delivered(node_id)
    await logging_settings.push(ctl, [node_id])
    return reply({"heartbeat_interval": ctl.settings.heartbeat_interval, "poll_timeout": ctl.settings.poll_timeout})


def capacity_of(facts: dict[str, Any]) -> dict[str, Any]:
    return {key: facts[key] for key in ("cpus", "memory_bytes") if key in facts}


async def heartbeat(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"instances", "plugins", "usage", "images"})
    ctl.touch(request.match_info["id"], reports.instances(data.get("instances")), reports.plugins(data.get("plugins")),
              reports.usage(data.get("usage")), reports.images(data.get("images")))
    return reply({"ok": True})


async def poll_tasks(request: web.Request) -> web.Response:
    ctl = state(request)
    node_id = request.match_info["id"]
    try:
        wait = float(request.query.get("wait", "0"))
    except ValueError:
        wait = math.nan
    if not 0 <= wait:  # also NaN: a NaN deadline would park the poll in the event loop for ever
        raise ApiError(400, f"wait must be a number of seconds, 0 or more, got {request.query['wait']!r}")
    if wait and ctl.polls[node_id] >= (most := ctl.settings.max_polls_per_node):
        # An agent keeps one poll open; a node opening many would hold the controller's sockets.
        raise ApiError(429, f"node {node_id} already has {most} task polls waiting (max_polls_per_node in "
                            "controller.yaml); poll again when one returns")
    deadline = time.monotonic() + min(wait, MAX_POLL_WAIT)
    ctl.polls[node_id] += 1
    try:
        claimed = await _claim_until(ctl, request, node_id, deadline)
    finally:
        ctl.polls[node_id] -= 1
        if ctl.polls[node_id] <= 0:
            del ctl.polls[node_id]
    return reply({"tasks": [
        {"id": t["id"], "kind": t["kind"], "payload": t["payload"], "idempotency_key": t["idempotency_key"],
         "created_at": iso(t["created_at"])}
        for t in claimed
    ]})


async def _claim_until(ctl: Any, request: web.Request, node_id: str, deadline: float) -> list[dict[str, Any]]:
    """The node's pending tasks, claimed as soon as there are some or when ``deadline`` passes."""
    claimed: list[dict[str, Any]] = []
    while True:
        # An agent that went away while waiting must not take tasks with it: they would be
        # "delivered" to nobody until it registers again.
        if request.transport is None or request.transport.is_closing():
            break
        claimed = await ctl.store.claim_tasks(node_id, CLAIM_LIMIT)
        left = deadline - time.monotonic()
        if claimed or left <= 0 or ctl.stopping or node_id not in ctl.serials:
            break
        await ctl.wait_for_tasks(node_id, left)
    return claimed


async def task_result(request: web.Request) -> web.Response:
    ctl = state(request)
    node_id, task_id = request.match_info["id"], request.match_info["task_id"]
    data = await json_body(request)
    reject_unknown(data, {"state", "result", "error", "code"})
    outcome = {
        "state": field(data, "state", str),
        "result": field(data, "result", dict, required=False, default={}),
        "error": field(data, "error", str, required=False),
        "code": field(data, "code", str, required=False),
    }
    if outcome["state"] not in ("succeeded", "failed"):
        raise ApiError(400, f"state must be succeeded or failed, got {outcome['state']!r}")
    if await ctl.store.finish_task(task_id, node_id, outcome, leaves_no_instance) is None:
        raise ApiError(404, f"task {task_id} is not a task of node {node_id}")
    return reply({"ok": True})


async def renew(request: web.Request) -> web.Response:
    ctl = state(request)
    node_id = request.match_info["id"]
    data = await json_body(request)
    reject_unknown(data, {"csr"})
    try:
        public_key = pki.public_key_from_csr(field(data, "csr", str))
    except pki.CSRError as exc:
        raise ApiError(400, str(exc)) from None
    lifetime = datetime.timedelta(seconds=ctl.settings.node_cert_ttl)
    cert = ctl.ca.issue_node(public_key, node_id, lifetime, request.remote)
    serial = format(cert.serial_number, "x")
    # The store decides, not ctl.serials: a removal may have committed since the guard looked.
    if not await ctl.store.add_certificate(node_id, serial, time.time() + ctl.settings.node_cert_ttl):
        raise ApiError(403, f"node {node_id} was removed; join it again with a new token")
    return reply({"certificate": pki.pem(cert)})


# Admin side.


def shown(ctl: Any, row: dict[str, Any]) -> dict[str, Any]:
    view = ctl.node_view(row)
    view["last_seen"] = iso(view["last_seen"])
    return view


async def _node_row(ctl: Any, node_id: str) -> dict[str, Any]:
    row = await ctl.store.get_node(node_id)
    if row is None:
        raise ApiError(404, f"no node {node_id!r}: see `kumoctl nodes list`")
    return row


async def list_nodes(request: web.Request) -> web.Response:
    ctl = state(request)
    limit, after = page_query(request)
    match = request.query.get("q")
    if match is not None and not (len(match) <= 256 and match.isprintable()):
        raise ApiError(400, "q must be up to 256 printable characters: part of a node id or hostname")
    rows, following = paged(await ctl.store.list_nodes(limit=limit + 1, after=after, match=match), limit,
                            lambda row: row["id"])
    return reply({"nodes": [shown(ctl, row) for row in rows], "next": following})


async def show_node(request: web.Request) -> web.Response:
    ctl = state(request)
    return reply(shown(ctl, await _node_row(ctl, request.match_info["id"])))


async def _set_drained(request: web.Request, drained: bool) -> web.Response:
    ctl = state(request)
    node_id = request.match_info["id"]
    row = await _node_row(ctl, node_id)
    if row["removed"]:
        raise ApiError(409, f"node {node_id} was removed")
    await ctl.store.set_drained(node_id, drained)
    row["drained"] = drained
    view = shown(ctl, row)
    if drained:
        # What passes its pre-flight check moves off the node; the rest is reported.
        evacuation = await migrations.evacuate(ctl, node_id)
        view["evacuation"] = {**evacuation, "moving": [migration.public(ctl, doc) for doc in evacuation["moving"]]}
    return reply(view)


async def drain(request: web.Request) -> web.Response:
    return await _set_drained(request, True)


async def undrain(request: web.Request) -> web.Response:
    return await _set_drained(request, False)


async def accept(request: web.Request) -> web.Response:
    """Take the CPUs and memory the node now reports as its capacity (after an upgrade)."""
    ctl = state(request)
    row = await _node_row(ctl, request.match_info["id"])
    capacity = capacity_of(row.get("facts") or {})
    await ctl.store.set_capacity(row["id"], capacity)
    return reply({"id": row["id"], "capacity": capacity})


async def remove(request: web.Request) -> web.Response:
    ctl = state(request)
    node_id = request.match_info["id"]
    await _node_row(ctl, node_id)
    await ctl.store.remove_node(node_id, "the node was removed", "node-removed")
    return reply({"ok": True, "id": node_id})


NODE = "/v1/nodes/{id}"
ROUTES = [
    Route("POST", NODE + "/register", register, "node", "An agent (re)starts: its facts, plugins and instances.",
          {"hostname": "string", "agent_version": "string", "facts": "object", "plugins": "object: name -> fingerprint",
           "metrics_url": "string or null", "instances": "list of instance states"}),
    Route("POST", NODE + "/heartbeat", heartbeat, "node", "An agent is alive; its instances' states.",
          {"instances": "list of instance states", "plugins": "object, only when fingerprints changed",
           "usage": "object: what the node measures", "images": "object: held (digests), pulling (progress)"}),
    Route("GET", NODE + "/tasks", poll_tasks, "node", "Long-poll for tasks (?wait=seconds, at most 60)."),
    Route("POST", NODE + "/tasks/{task_id}/result", task_result, "node", "Report how a task ended.",
          {"state": "succeeded or failed", "result": "object", "error": "string or null", "code": "string or null"}),
    Route("POST", NODE + "/renew", renew, "node", "Trade a CSR for a fresh certificate of the same node.",
          {"csr": "PEM CSR, ECDSA P-256"}),
    Route("GET", "/v1/nodes", list_nodes, "admin",
          "Enrolled nodes by id, with state, plugins and instances, a page at a time (?limit=&after=NEXT); "
          "?q=TEXT keeps those whose id or hostname contains it."),
    Route("GET", NODE, show_node, "admin", "One node."),
    Route("POST", NODE + "/drain", drain, "admin",
          "Place nothing new on the node and migrate what can move: live where its kind and both nodes can, "
          "else by stop-and-copy (each migration's mode says which)."),
    Route("POST", NODE + "/undrain", undrain, "admin", "Let the scheduler place instances on the node again."),
    Route("POST", NODE + "/accept", accept, "admin",
          "Accept the CPUs and memory the node reports as its capacity (it claimed more than it first had)."),
    Route("DELETE", NODE, remove, "admin", "Remove the node and revoke its certificates at once."),
]
