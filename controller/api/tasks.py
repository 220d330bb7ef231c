"""Tasks: the unit of work a node runs. Persisted before they are acknowledged.

``POST /v1/tasks`` is the low-level door (any kind, any node); instances and log settings
make their tasks through :func:`controller.services.tasks.submit` too. Kinds are
``<plugin>.<operation>``; a kind no plugin on the node handles is still accepted and fails
on the node with the list of what is installed, so third-party plugins need nothing
registered here.
"""

from __future__ import annotations

import re
from typing import Any

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
from controller.services import iso
from controller.services.tasks import new_task, submit

KIND_RE = re.compile(r"^[a-z0-9_-]{1,64}\.[a-z0-9_.-]{1,64}\Z")
STATES = ("pending", "delivered", "succeeded", "failed")


def shown(task: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": task["id"], "node": task["node"], "kind": task["kind"], "payload": task["payload"],
        "idempotency_key": task["idempotency_key"], "state": task["state"], "result": task["result"],
        "error": task["error"], "code": task["code"], "created_at": iso(task["created_at"]),
        "updated_at": iso(task["updated_at"]),
    }


async def create_task(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"node", "kind", "payload", "idempotency_key"})
    node = field(data, "node", str)
    kind = field(data, "kind", str)
    payload = field(data, "payload", dict, required=False, default={})
    key = field(data, "idempotency_key", str, required=False)
    if not KIND_RE.match(kind):
        raise ApiError(400, f"kind must look like <plugin>.<operation> (e.g. kvm.start), got {kind!r}")
    if key is not None and not 0 < len(key) <= 200:
        raise ApiError(400, "idempotency_key must be 1 to 200 characters")
    row = await ctl.store.get_node(node)
    if row is None:
        raise ApiError(404, f"no node {node!r}: see `kumoctl nodes list`")
    if row["removed"]:
        raise ApiError(409, f"node {node} was removed; it runs nothing more")
    task, created = await submit(ctl, new_task(node, kind, payload, key))
    return reply(shown(task), 201 if created else 200)


async def list_tasks(request: web.Request) -> web.Response:
    ctl = state(request)
    task_state = request.query.get("state")
    if task_state is not None and task_state not in STATES:
        raise ApiError(400, f"state must be one of {', '.join(STATES)}, got {task_state!r}")
    limit, after = page_query(request)
    rows, following = paged(await ctl.store.list_tasks(request.query.get("node"), task_state, limit + 1,
                                                       time_cursor(after)), limit,
                            lambda t: f"{t['created_at']!r}/{t['id']}")
    return reply({"tasks": [shown(t) for t in rows], "next": following})


async def show_task(request: web.Request) -> web.Response:
    ctl = state(request)
    task = await ctl.store.get_task(request.match_info["id"])
    if task is None:
        raise ApiError(404, f"no task {request.match_info['id']!r}")
    return reply(shown(task))


ROUTES = [
    Route("POST", "/v1/tasks", create_task, "admin", "Queue a task on a node (an existing idempotency key returns its task).",
          {"node": "node id", "kind": "<plugin>.<operation>", "payload": "object", "idempotency_key": "string, optional"}),
    Route("GET", "/v1/tasks", list_tasks, "admin", "Tasks, newest first, a page at a time (?node=&state=&limit=&after=NEXT)."),
    Route("GET", "/v1/tasks/{id}", show_task, "admin", "One task and how it ended."),
]
