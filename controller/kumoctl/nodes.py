"""``kumoctl nodes``: enrolled nodes, their facts and plugins, draining and removal."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

from . import top
from .arguments import DEFAULT_WAIT, OUTPUT, Group, parse_duration
from .client import Client
from .errors import EXIT_ERROR
from .output import ago, cell, gib, print_fields, print_json, print_table
from .waiting import migration_failure, migration_mode, wait_for_migration

NAME = "nodes"
HELP = "enrolled nodes"


def _node_kinds(node: Mapping[str, Any]) -> list[str]:
    kinds: set[str] = set()
    for fp in (node.get("plugins") or {}).values():
        if fp.get("available"):
            kinds.update(fp.get("kinds") or ())
    return sorted(kinds)


def cmd_nodes_list(client: Client, args: argparse.Namespace) -> int:
    nodes = client.pages("/v1/nodes", "nodes")
    if args.output == "json":
        print_json(nodes)
        return 0
    rows = []
    for node in sorted(nodes, key=lambda n: (n.get("hostname") or "", n["id"])):
        facts = node.get("facts") or {}
        state = node.get("state", "?") + (",drained" if node.get("drained") else "")
        memory = f"{gib(facts.get('memory_available_bytes'))}/{gib(facts.get('memory_bytes'))}"
        rows.append(
            [
                node["id"],
                node.get("hostname"),
                state,
                _node_kinds(node),
                facts.get("cpus"),
                memory,
                len(node.get("instances") or ()),
                ago(node.get("last_seen")),
            ]
        )
    print_table(
        ["ID", "HOSTNAME", "STATE", "KINDS", "CPUS", "MEM FREE/GIB", "INSTANCES", "LAST SEEN"],
        rows,
        empty="no nodes enrolled yet: kumoctl token create, then kumo-agent join on the node",
    )
    return 0


def cmd_nodes_show(client: Client, args: argparse.Namespace) -> int:
    node = client.call("GET", f"/v1/nodes/{quote(args.id, safe='')}")
    if args.output == "json":
        print_json(node)
        return 0
    print_fields(
        [
            ("id", node["id"]),
            ("hostname", node.get("hostname")),
            ("state", node.get("state")),
            ("drained", bool(node.get("drained"))),
            ("last seen", f"{node.get('last_seen') or '-'} ({ago(node.get('last_seen'))})"),
            ("kinds", _node_kinds(node)),
            ("capacity", _capacity_line(node)),
            ("usage", _usage_line((node.get("usage") or {}).get("node") or {})),
        ]
    )
    facts = node.get("facts") or {}
    if facts:
        print("\nfacts:")
        for key in sorted(facts):
            print(f"  {key}: {cell(facts[key])}")
    print("\nplugins:")
    plugins = node.get("plugins") or {}
    print_table(
        ["  NAME", "AVAILABLE", "KINDS", "REASON"],
        [
            [f"  {n}", p.get("available"), p.get("kinds"), p.get("reason")]
            for n, p in sorted(plugins.items())
        ],
        empty="  none reported",
    )
    print("\ninstances:")
    measured = (node.get("usage") or {}).get("instances") or {}
    print_table(
        ["  NAME", "KIND", "STATE", "CPU", "MEMORY MiB"],
        [
            [f"  {i.get('name')}", i.get("kind"), i.get("state"), *_instance_usage(measured.get(i.get("name")) or {})]
            for i in node.get("instances") or ()
        ],
        empty="  none",
    )
    return 0


def _capacity_line(node: Mapping[str, Any]) -> str:
    """What the scheduler counts on, and a claim beyond it waiting for an admin."""
    capacity = node.get("capacity") or {}
    line = (f"{capacity['cpus']} CPUs, {capacity['memory_bytes'] / 2**30:.1f} GiB"
            if "cpus" in capacity and "memory_bytes" in capacity else "not reported yet")
    claimed = capacity.get("claimed")
    if claimed:
        more = ", ".join(f"{v / 2**30:.1f} GiB" if k == "memory_bytes" else f"{v} CPUs" for k, v in sorted(claimed.items()))
        line += f" (the node now claims {more}: kumoctl nodes accept {node['id']} if it was upgraded)"
    return line


def _usage_line(usage: Mapping[str, Any]) -> str:
    """What the node last measured, beside what was reserved on it (the scheduler's view)."""
    if not usage:
        return "not reported"
    memory = f"{usage['memory_used_bytes'] / 2**30:.1f} of {usage['memory_total_bytes'] / 2**30:.1f} GiB used" \
        if "memory_used_bytes" in usage and "memory_total_bytes" in usage else "memory not measured"
    cpu = f"CPU {usage['cpu_busy']:.0%} busy" if "cpu_busy" in usage else "CPU not measured"
    load = f"load {usage['load1']:.2f}" if "load1" in usage else ""
    return ", ".join(part for part in (cpu, memory, load) if part)


def _instance_usage(figures: Mapping[str, Any]) -> list[str]:
    cpu = f"{figures['cpu_cores']:.2f} cores" if "cpu_cores" in figures else "-"
    memory = f"{figures['memory_bytes'] / 2**20:.0f}" if "memory_bytes" in figures else "-"
    if "memory_limit_bytes" in figures:
        memory += f" / {figures['memory_limit_bytes'] / 2**20:.0f}"
    return [cpu, memory]


def cmd_nodes_drain(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/v1/nodes/{quote(args.id, safe='')}/drain")
    evacuation = answer.get("evacuation") or {"moving": [], "staying": []}
    moved = [wait_for_migration(client, m, args.timeout) for m in evacuation["moving"]]
    if args.output == "json":
        print_json({"node": args.id, "moved": moved, "staying": evacuation["staying"]})
        return EXIT_ERROR if any(m["state"] != "succeeded" for m in moved) else 0
    print(f"node {args.id} drained: no new instances will be placed on it")
    failed = 0
    for migration in moved:
        if migration["state"] == "succeeded":
            print(f"moved {migration['instance']} to {migration['destination']} ({migration_mode(migration)})")
        else:
            failed += 1
            print(f"could not move {migration['instance']}: {migration_failure(migration)}")
    for stay in evacuation["staying"]:
        print(f"{stay['name']} stays on {args.id}: {stay['reason']}")
    return EXIT_ERROR if failed else 0


def cmd_nodes_undrain(client: Client, args: argparse.Namespace) -> int:
    client.call("POST", f"/v1/nodes/{quote(args.id, safe='')}/undrain")
    print(f"node {args.id} accepts new instances again")
    return 0


def cmd_nodes_accept(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/v1/nodes/{quote(args.id, safe='')}/accept")
    capacity = answer["capacity"]
    print(f"node {args.id} is counted with {capacity.get('cpus')} CPUs and "
          f"{(capacity.get('memory_bytes') or 0) / 2**30:.1f} GiB from now on")
    return 0


def cmd_nodes_remove(client: Client, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/v1/nodes/{quote(args.id, safe='')}")
    print(
        f"node {args.id} removed: its certificate is revoked; it must join again with a new token"
    )
    return 0


def cmd_nodes_top(client: Client, args: argparse.Namespace) -> int:
    return top.run(client, args, top.node_rows, top.print_nodes)


def register(group: Group) -> None:
    group.leaf("list", cmd_nodes_list, "list nodes with their state, kinds and free memory", [OUTPUT])
    top.add_arguments(group.leaf("top", cmd_nodes_top, "what each node uses (measured) beside what is reserved on it",
                                 [OUTPUT]), top.SORT_NODES)
    group.leaf(
        "show", cmd_nodes_show, "show one node's facts, plugins and instances", [OUTPUT]
    ).add_argument("id", help="node id (n-...)")
    sub = group.leaf(
        "drain", cmd_nodes_drain,
        "place no new instances on a node and migrate off what can move (live where both nodes can)", [OUTPUT]
    )
    sub.add_argument("id", help="node id")
    sub.add_argument(
        "--timeout",
        type=parse_duration,
        default=int(DEFAULT_WAIT),
        metavar="DURATION",
        help=f"how long to wait for each migration (default: {DEFAULT_WAIT:g}s)",
    )
    group.leaf("undrain", cmd_nodes_undrain, "let a drained node take new instances").add_argument(
        "id", help="node id"
    )
    group.leaf("accept", cmd_nodes_accept,
               "count a node with the CPUs and memory it now reports (it claimed more than at its first "
               "registration)").add_argument("id", help="node id")
    group.leaf(
        "remove", cmd_nodes_remove, "remove a node and revoke its certificate at once"
    ).add_argument("id", help="node id")
