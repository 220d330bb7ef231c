"""``kumoctl tasks``: the tasks the controller handed to nodes."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlencode

from .arguments import OUTPUT, Group, positive_int
from .client import Client
from .output import ago, print_block, print_fields, print_json, print_table, short

NAME = "tasks"
HELP = "tasks the controller handed to nodes"


def cmd_tasks_list(client: Client, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("node", args.node), ("state", args.state)) if v}
    path = "/v1/tasks" + (f"?{urlencode(query)}" if query else "")
    tasks = client.pages(path, "tasks", most=args.limit)
    if args.output == "json":
        print_json(tasks)
        return 0
    rows = [
        [
            t["id"],
            t.get("node"),
            t.get("kind"),
            t.get("state"),
            ago(t.get("updated_at")),
            short(t.get("error")),
        ]
        for t in sorted(tasks, key=lambda t: t.get("created_at") or "")
    ]
    print_table(["ID", "NODE", "KIND", "STATE", "UPDATED", "ERROR"], rows, empty="no tasks")
    return 0


def cmd_tasks_show(client: Client, args: argparse.Namespace) -> int:
    task = client.call("GET", f"/v1/tasks/{quote(args.id, safe='')}")
    if args.output == "json":
        print_json(task)
        return 0
    _print_task(task)
    return 0


def _print_task(task: Mapping[str, Any]) -> None:
    print_fields(
        [
            (k, task.get(k))
            for k in ("id", "node", "kind", "state", "idempotency_key", "created_at", "updated_at")
        ]
        + [(k, task.get(k)) for k in ("error", "code") if task.get(k)]
    )
    for key in ("payload", "result"):
        if task.get(key):
            print_block(key, task[key])


def register(group: Group) -> None:
    sub = group.leaf("list", cmd_tasks_list, "list the newest tasks, oldest of them first", [OUTPUT])
    sub.add_argument("--node", help="only this node's tasks")
    sub.add_argument("--limit", type=positive_int, default=200, help="how many of the newest (default: 200)")
    sub.add_argument(
        "--state",
        choices=("pending", "delivered", "succeeded", "failed"),
        help="only tasks in this state",
    )
    group.leaf(
        "show", cmd_tasks_show, "show one task with its payload and result", [OUTPUT]
    ).add_argument("id", help="task id")
