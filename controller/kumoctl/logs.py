"""``kumoctl logging``: where every node's logs are forwarded (the rsyslog plugin)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from .arguments import OUTPUT, Group
from .client import Client
from .errors import CommandError
from .output import print_json, print_table

NAME = "logging"
HELP = "where every node's logs are forwarded (rsyslog)"


def cmd_logging_set(client: Client, args: argparse.Namespace) -> int:
    if args.disable == (args.target is not None):
        raise CommandError("give either --target HOST:PORT or --disable")
    body: dict[str, Any] = {"target": args.target, "protocol": args.protocol, "tls": args.tls}
    if args.peer:
        body["peer"] = args.peer
    if args.node:
        body["node"] = args.node
    if args.force:
        body["force"] = True
    answer = client.call("PUT", "/v1/logging", body)
    where = f"node {args.node}" if args.node else "the fleet"
    what = f"{args.protocol}{'+tls' if args.tls else ''} to {args.target}" if args.target else "no forwarding"
    print(f"log forwarding for {where}: {what}; sent to {len(answer['tasks'])} node(s)")
    return 0


def cmd_logging_unset(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("DELETE", f"/v1/logging/nodes/{quote(args.node, safe='')}")
    print(f"node {args.node} follows the fleet setting again; sent to {len(answer['tasks'])} node(s)")
    return 0


def cmd_logging_show(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", "/v1/logging")
    if args.output == "json":
        print_json(answer)
        return 0

    def describe(setting: Mapping[str, Any] | None) -> str:
        if not setting or not setting.get("target"):
            return "no forwarding"
        return f"{setting['protocol']}{'+tls' if setting['tls'] else ''} {setting['target']}"

    print(f"fleet: {describe(answer['fleet'])}")
    rows = [
        [node, describe(setting), "override" if node in answer["overrides"] else "fleet"]
        for node, setting in sorted(answer["effective"].items())
    ]
    print_table(["NODE", "FORWARDING", "FROM"], rows, empty="no nodes")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("set", cmd_logging_set, "set the log collector for the fleet or one node")
    sub.add_argument("--target", metavar="HOST:PORT", help="the collector")
    sub.add_argument("--disable", action="store_true", help="stop forwarding")
    sub.add_argument("--protocol", choices=("relp", "tcp"), default="relp", help="default: relp (acknowledged)")
    sub.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                     help="TLS with the nodes' Kumo certificates (default: on)")
    sub.add_argument("--peer", metavar="NAME", help="the collector's certificate name (default: the target host)")
    sub.add_argument("--node", help="only this node (an override of the fleet setting)")
    sub.add_argument("--force", action="store_true",
                     help="apply it even where forwarding is suspended (rsyslog's restart loses what it has in flight)")
    group.leaf("unset", cmd_logging_unset, "drop a node's override").add_argument("--node", required=True)
    group.leaf("show", cmd_logging_show, "show the fleet setting and each node's", [OUTPUT])
