"""Instances over HTTP: parse, authorise (the route's role) and render; the decisions are
:mod:`controller.services.instances`'s."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from agent.sdk import TaskError, problem_line, validate_network_config, validate_user_data
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
)
from controller.api.tasks import shown as shown_task
from controller.services import instances, iso, migrations

SEED_FIELDS = ("user_data", "network_config", "vendor_data")


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
    catalogue = row.get("image")
    if catalogue:
        pulling = ((node and ctl.node_view(node)["images"].get("pulling")) or {}).get(catalogue["sha256"])
        catalogue = {**catalogue, "pull": pulling}
    return {
        **spec,
        "name": row["name"],
        "kind": row["kind"],
        "node": row["node"],
        "state": current,
        "seeded": any(row["spec"].get(k) for k in SEED_FIELDS),
        "pinned": bool(row.get("pinned")),
        # The checkpoints its node keeps after each checkpoint; None: the node's default.
        "checkpoint_keep": row.get("checkpoint_keep"),
        "details": (reported or {}).get("details") or {},
        # The catalogue image it is made from; held: its node had it when it was placed;
        # pull: {bytes, total} while the node is pulling it.
        "catalogue": catalogue,
        "placement": {"node": row["node"], "filtered": row["reasons"]},
        "created_at": iso(row["created_at"]),
    }


async def create(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    name = field(data, "name", str)
    kind = field(data, "kind", str)
    spec = {k: v for k, v in data.items() if k not in ("name", "kind", "node")}
    spec.update(vcpus=field(data, "vcpus", int, required=False, default=instances.DEFAULT_VCPUS),
                memory_mib=field(data, "memory_mib", int, required=False, default=instances.DEFAULT_MEMORY_MIB))
    row, task = await instances.create(ctl, name, kind, spec, field(data, "node", str, required=False))
    return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 201)


async def list_instances(request: web.Request) -> web.Response:
    ctl = state(request)
    limit, after = page_query(request)
    rows, following = paged(await ctl.store.list_instances(limit + 1, after), limit, lambda row: row["name"])
    return reply({"instances": [await shown(ctl, row) for row in rows], "next": following})


async def show(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    instance = await shown(ctl, row)
    return reply({**instance, "migration": await migrations.modes(ctl, row, instance)})


def _operation(operation: str, fields: dict[str, type]) -> Any:
    async def handler(request: web.Request) -> web.Response:
        ctl = state(request)
        row = await instances.get(ctl, request.match_info["name"])
        data = await json_body(request)
        extra = {}
        for key, kind in fields.items():
            value = field(data, key, kind, required=False)
            if value is not None:
                extra[key] = value
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ApiError(400, f"unknown field {unknown[0]!r} for {operation} (allowed: {', '.join(fields) or 'none'})")
        task = await instances.operate(ctl, row, operation, extra)
        return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)

    handler.__name__ = f"instance_{operation}"
    return handler


async def delete(request: web.Request) -> web.Response:
    ctl = state(request)
    row = await instances.get(ctl, request.match_info["name"])
    task = await instances.delete(ctl, row)
    if task is None:  # its node was removed: the record was all that was left
        return reply({"instance": None, "task": None})
    return reply({"instance": await shown(ctl, row), "task": shown_task(task)}, 202)


async def check_seed(request: web.Request) -> web.Response:
    """Check seed data by the rules the node's cloudinit plugin applies at create, without
    creating anything: the web interface's user-data editor shows the line and reason."""
    data = await json_body(request)
    reject_unknown(data, set(SEED_FIELDS))
    try:
        for key in SEED_FIELDS:
            if key == "network_config" and data.get(key) is not None:
                validate_network_config(data[key])
            elif data.get(key) is not None:
                validate_user_data(field(data, key, str), what=key)
    except TaskError as exc:
        return reply({"valid": False, "error": str(exc), "line": problem_line(exc)})
    return reply({"valid": True, "error": None, "line": None})


INSTANCE = "/v1/instances/{name}"
ROUTES = [
    Route("POST", "/v1/instances", create, "admin",
          "Place and create an instance; 409 with the reason per node when none fits.",
          {"name": "lowercase DNS label", "kind": "kvm, lxc, process...", "vcpus": "integer (default 1)",
           "memory_mib": "integer (default 256)", "node": "pin to this node, optional",
           "image": "catalogue image (NAME, NAME:VERSION, alias or sha256), or a path or https URL on the node "
                    "(kvm, lxc)",
           "image_sha256": "hex, required for URLs",
           "user_data": "cloud-config text", "network_config": "network config v2 text", "vendor_data": "text",
           "options": "object, kind-specific; pin: true keeps the rebalancer from moving it; checkpoint_keep: "
                      "the checkpoints its node keeps after each checkpoint (default the node's)", "*": "other kind-specific fields, validated by the node's plugin"}),
    Route("POST", "/v1/cloud-config/check", check_seed, "admin",
          "Check user data, vendor data and network config as a create would, without creating: "
          "valid, or the error with its line.",
          {"user_data": "cloud-config text", "network_config": "network config v1 or v2 (text or object)",
           "vendor_data": "text"}),
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
