"""Log forwarding as a fleet setting: one collector for every node, with per-node overrides.

The setting is stored once; each node gets it as an ``rsyslog.configure`` task whose
idempotency key carries the setting's version, so a node that registers again is not sent
the same setting twice, and a node that was down gets the latest one when it is back.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.sdk import ConfigError
from controller.api import ApiError, Route, field, json_body, reject_unknown, reply, state
from controller.api.tasks import shown as shown_task
from controller.services.tasks import new_task, submit
from controller.settings import split_address

KEY = "logging"
PROTOCOLS = ("relp", "tcp")


async def current(ctl: Any) -> dict[str, Any]:
    return await ctl.store.get_setting(KEY) or {"version": 0, "fleet": None, "nodes": {}}


def effective(setting: dict[str, Any], node_id: str) -> dict[str, Any] | None:
    return setting["nodes"].get(node_id, setting["fleet"])


async def push(ctl: Any, node_ids: list[str], force: bool = False) -> list[dict[str, Any]]:
    """Send each node (that runs the rsyslog plugin) its effective setting; the tasks made.
    ``force`` has rsyslog restarted even where forwarding is suspended (see plugins/rsyslog.py)."""
    setting = await current(ctl)
    if setting["version"] == 0:
        return []
    made = []
    for node_id in node_ids:
        row = await ctl.store.get_node(node_id)
        if row is None or row["removed"] or "rsyslog" not in ctl.node_view(row)["plugins"]:
            continue
        target = effective(setting, node_id) or {"target": None, "protocol": "relp", "tls": True, "peer": None}
        payload = {**target, "force": True} if force else dict(target)
        task, created = await submit(
            ctl, new_task(node_id, "rsyslog.configure", payload, key=f"logging:v{setting['version']}")
        )
        if created:
            made.append(task)
    return made


def _parse(data: dict[str, Any]) -> dict[str, Any]:
    target = field(data, "target", str, required=False)
    if target is not None:
        host, _, _ = target.rpartition(":")
        try:
            split_address(target, "target")
        except ConfigError as exc:
            raise ApiError(400, str(exc)) from None
        if not host or any(ch.isspace() or ch in "\"'\\" for ch in host):
            raise ApiError(400, f"target: expected HOST:PORT with a host name or address, got {target!r}")
    protocol = field(data, "protocol", str, required=False, default="relp")
    if protocol not in PROTOCOLS:
        raise ApiError(400, f"protocol must be relp or tcp, got {protocol!r}")
    return {
        "target": target,
        "protocol": protocol,
        "tls": field(data, "tls", bool, required=False, default=True),
        "peer": field(data, "peer", str, required=False),
    }


async def show(request: web.Request) -> web.Response:
    ctl = state(request)
    setting = await current(ctl)
    nodes = await ctl.store.list_nodes()
    return reply({
        "version": setting["version"],
        "fleet": setting["fleet"],
        "overrides": setting["nodes"],
        "effective": {row["id"]: effective(setting, row["id"]) for row in nodes},
    })


async def set_logging(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"target", "protocol", "tls", "peer", "node", "force"})
    node = field(data, "node", str, required=False)
    force = field(data, "force", bool, required=False, default=False)
    value = _parse(data)
    setting = await current(ctl)
    if node is not None:
        row = await ctl.store.get_node(node)
        if row is None or row["removed"]:
            raise ApiError(404, f"no node {node!r}: see `kumoctl nodes list`")
        setting["nodes"][node] = value
    else:
        setting["fleet"] = value
    setting["version"] += 1
    await ctl.store.put_setting(KEY, setting)
    targets = [node] if node else [row["id"] for row in await ctl.store.list_nodes()]
    tasks = await push(ctl, targets, force)
    return reply({"setting": value, "node": node, "tasks": [shown_task(t) for t in tasks]})


async def clear_override(request: web.Request) -> web.Response:
    ctl = state(request)
    node = request.match_info["id"]
    setting = await current(ctl)
    if setting["nodes"].pop(node, None) is None:
        raise ApiError(404, f"node {node} has no log forwarding override")
    setting["version"] += 1
    await ctl.store.put_setting(KEY, setting)
    tasks = await push(ctl, [node])
    return reply({"setting": setting["fleet"], "node": node, "tasks": [shown_task(t) for t in tasks]})


ROUTES = [
    Route("GET", "/v1/logging", show, "admin", "The fleet's log forwarding setting, overrides and each node's effective one."),
    Route("PUT", "/v1/logging", set_logging, "admin",
          "Set where logs go, for the fleet or (with node) for one node; pushed to nodes at once.",
          {"target": "HOST:PORT or null (no forwarding)", "protocol": "relp (default) or tcp",
           "tls": "boolean (default true)", "peer": "collector certificate name, optional", "node": "node id, optional",
           "force": "boolean (default false): restart rsyslog even where forwarding is suspended, losing what is in flight"}),
    Route("DELETE", "/v1/logging/nodes/{id}", clear_override, "admin", "Drop a node's override: it follows the fleet setting."),
]
