"""Instances: VMs, containers and processes, placed by the scheduler and run by a node's plugin.

The controller keeps what was asked for (the spec) and where it went; the node's plugin
reports what is true (the state, in heartbeats). Every operation is a task
``<kind>.<operation>`` on the instance's node, so a node that is down gets it when it is
back. The spec is passed to the plugin as the create payload: each plugin validates its
own fields, so a new instance kind needs no change here.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from aiohttp import web

from agent.sdk import KIND_RE
from controller import scheduler
from controller.api import ApiError, Route, field, iso, json_body, page_query, paged, reply, state
from controller.api.tasks import new_task, submit
from controller.api.tasks import shown as shown_task
from controller.store import StoreError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
SEED_FIELDS = ("user_data", "network_config", "vendor_data")
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256


async def fleet(ctl: Any) -> list[dict[str, Any]]:
    """Every node as the scheduler sees it: live state plus what is already placed on it."""
    committed: dict[str, dict[str, float]] = {}
    for row in await ctl.store.list_instances():
        use = committed.setdefault(row["node"], {"vcpus": 0, "memory_mib": 0})
        use["vcpus"] += row["spec"].get("vcpus", 0)
        use["memory_mib"] += row["spec"].get("memory_mib", 0)
    nodes = []
    for row in await ctl.store.list_nodes():
        view = ctl.node_view(row)
        view["committed"] = committed.get(row["id"], {"vcpus": 0, "memory_mib": 0})
        nodes.append(view)
    return nodes


async def shown(ctl: Any, row: dict[str, Any]) -> dict[str, Any]:
    node = await ctl.store.get_node(row["node"])
    reported = next(
        (i for i in (ctl.node_view(node)["instances"] if node else []) if i.get("name") == row["name"] and i.get("kind") == row["kind"]),
        None,
    )
    if reported is not None:
        current = reported["state"]
    else:
        last = await ctl.store.latest_instance_task(row["name"])
        current = "creating" if last and last["kind"].endswith(".create") and last["state"] in ("pending", "delivered") else "unknown"
    spec = {k: v for k, v in row["spec"].items() if k not in SEED_FIELDS}
    return {
        **spec,
        "name": row["name"],
        "kind": row["kind"],
        "node": row["node"],
        "state": current,
        "seeded": any(row["spec"].get(k) for k in SEED_FIELDS),
        "details": (reported or {}).get("details") or {},
        "placement": {"node": row["node"], "filtered": row["reasons"]},
        "created_at": iso(row["created_at"]),
    }


async def _instance(ctl: Any, name: str) -> dict[str, Any]:
    row = await ctl.store.get_instance(name)
    if row is None:
        raise ApiError(404, f"no instance {name!r}: see `kumoctl instances list`")
    return row


async def create(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    name = field(data, "name", str)
    kind = field(data, "kind", str)
    if not NAME_RE.match(name):
        raise ApiError(400, f"name must be 1-63 lowercase letters, digits or '-' (not first or last), got {name!r}")
    if not KIND_RE.match(kind):
        raise ApiError(400, f"kind must be an instance kind such as kvm, lxc or process, got {kind!r}")
    vcpus = field(data, "vcpus", int, required=False, default=DEFAULT_VCPUS)
    memory = field(data, "memory_mib", int, required=False, default=DEFAULT_MEMORY_MIB)
    if vcpus < 1 or memory < 1:
        raise ApiError(400, "vcpus and memory_mib must be positive")
    pinned = field(data, "node", str, required=False)
    spec = {k: v for k, v in data.items() if k not in ("name", "kind", "node")}
    spec.update(vcpus=vcpus, memory_mib=memory)
    if await ctl.store.get_instance(name) is not None:
        raise ApiError(409, f"an instance named {name!r} already exists; choose another name or delete it first")
    request_ = {"kind": kind, "vcpus": vcpus, "memory_mib": memory, "node": pinned}
    nodes = await fleet(ctl)
    if pinned and not any(n["id"] == pinned for n in nodes):
        raise ApiError(404, f"no node {pinned!r} to pin the instance to: see `kumoctl nodes list`")
    chosen, reasons = scheduler.place(request_, nodes, ctl.settings.placement_cpu_busy_max)
    if chosen is None:
        if not nodes:
            raise ApiError(409, "no node is enrolled: join one with `kumo-agent join` first")
        why = "; ".join(f"{node}: {reason}" for node, reason in sorted(reasons.items()))
        raise ApiError(409, f"no node can run this {kind} instance: {why}", reasons=reasons)
    payload = {"name": name, "kind": kind, **spec}
    task = new_task(chosen, f"{kind}.create", payload, key=f"create:{name}:{uuid.uuid4().hex}", instance=name)
    try:
        stored = await ctl.store.add_instance(
            {"name": name, "kind": kind, "node": chosen, "spec": spec, "reasons": reasons}, task
        )
    except StoreError as exc:
        raise ApiError(409, f"{exc}; choose another name or delete it first") from None
    return reply({"instance": await shown(ctl, await _instance(ctl, name)), "task": shown_task(stored)}, 201)


async def list_instances(request: web.Request) -> web.Response:
    ctl = state(request)
    limit, after = page_query(request)
    rows, following = paged(await ctl.store.list_instances(limit + 1, after), limit, lambda row: row["name"])
    return reply({"instances": [await shown(ctl, row) for row in rows], "next": following})


async def show(request: web.Request) -> web.Response:
    from controller.api import migration  # here, not at the top: migration builds on this module

    ctl = state(request)
    row = await _instance(ctl, request.match_info["name"])
    instance = await shown(ctl, row)
    return reply({**instance, "migration": await migration.modes(ctl, row, instance)})


async def operate(ctl: Any, row: dict[str, Any], operation: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Queue ``<kind>.<operation>`` for the instance on its node; the stored task."""
    from controller.api import migration  # here, not at the top: migration builds on this module

    await migration.refuse_if_migrating(ctl, row["name"])
    node = await ctl.store.get_node(row["node"])
    if node is None or node["removed"]:
        raise ApiError(409, f"instance {row['name']} was on node {row['node']}, which was removed")
    payload = {"name": row["name"], "kind": row["kind"], **(extra or {})}
    task, _ = await submit(ctl, new_task(row["node"], f"{row['kind']}.{operation}", payload, instance=row["name"]))
    return task


def _operation(operation: str, fields: dict[str, type]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        ctl = state(request)
        row = await _instance(ctl, request.match_info["name"])
        data = await json_body(request)
        extra = {}
        for key, kind in fields.items():
            value = field(data, key, kind, required=False)
            if value is not None:
                extra[key] = value
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} for {operation} (allowed: {', '.join(fields) or 'none'})")
        task = await operate(ctl, row, operation, extra)
        return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)

    handler.__name__ = f"instance_{operation}"
    return handler


async def delete(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await _instance(ctl, request.match_info["name"])
    node = await ctl.store.get_node(row["node"])
    if node is None or node["removed"]:
        # Nothing can run on a removed node: the record is all that is left.
        await ctl.store.delete_instance(row["name"])
        return reply({"instance": None, "task": None})
    task = await operate(ctl, row, "delete")
    return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)


INSTANCE = "/v1/instances/{name}"
ROUTES = [
    Route("POST", "/v1/instances", create, "admin",
          "Place and create an instance; 409 with the reason per node when none fits.",
          {"name": "lowercase DNS label", "kind": "kvm, lxc, process...", "vcpus": "integer (default 1)",
           "memory_mib": "integer (default 256)", "node": "pin to this node, optional",
           "image": "path or https URL (kvm, lxc)", "image_sha256": "hex, required for URLs",
           "user_data": "cloud-config text", "network_config": "network config v2 text", "vendor_data": "text",
           "options": "object, kind-specific", "*": "other kind-specific fields, validated by the node's plugin"}),
    Route("GET", "/v1/instances", list_instances, "admin",
          "Instances by name, with their node and reported state, a page at a time (?limit=&after=NEXT)."),
    Route("GET", INSTANCE, show, "admin", "One instance, where it landed and why other nodes were filtered out."),
    Route("POST", INSTANCE + "/start", _operation("start", {}), "admin", "Start a stopped instance."),
    Route("POST", INSTANCE + "/stop", _operation("stop", {"timeout": (int, float)}), "admin",
          "Graceful stop, forced after timeout seconds.", {"timeout": "seconds, optional"}),
    Route("POST", INSTANCE + "/console", _operation("console", {"bytes": int}), "admin",
          "Fetch the end of the serial console log (the task's result.log).", {"bytes": "integer, optional"}),
    Route("DELETE", INSTANCE, delete, "admin", "Delete the instance and its disks on its node."),
]
