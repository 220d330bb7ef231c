"""``kumoctl nodes top`` and ``kumoctl instances top``: what the fleet really uses.

Both read what the nodes measured in their last heartbeats (``usage`` in ``GET
/v1/nodes``) beside what the controller reserved for the instances it placed, so an admin
sees at once where reservations and use part ways. ``--watch SECONDS`` redraws until ^C.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

from .client import Client
from .output import print_json, print_table

SORT_NODES = {"cpu": "CPU", "memory": "MEMORY", "load": "LOAD", "reserved": "RESERVED", "name": "NODE"}
SORT_INSTANCES = {"cpu": "CPU", "memory": "MEMORY", "name": "NAME", "node": "NODE"}


def node_rows(nodes: list[dict[str, Any]], instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    reserved: dict[str, int] = {}
    for instance in instances:
        reserved[instance["node"]] = reserved.get(instance["node"], 0) + int(instance.get("vcpus") or 0)
    rows = []
    for node in nodes:
        usage = (node.get("usage") or {}).get("node") or {}
        facts = node.get("facts") or {}
        rows.append({
            "node": node["id"], "state": node.get("state"), "cpu_busy": usage.get("cpu_busy"),
            "load1": usage.get("load1"), "memory_used_bytes": usage.get("memory_used_bytes"),
            "memory_total_bytes": usage.get("memory_total_bytes") or facts.get("memory_bytes"),
            "vcpus_reserved": reserved.get(node["id"], 0),
            "vcpus_capacity": (facts.get("cpus") or 0) * (facts.get("vcpu_overcommit") or 0) or None,
            "instances": len(node.get("instances") or ()),
        })
    return rows


def instance_rows(nodes: list[dict[str, Any]], instances: list[dict[str, Any]]) -> list[dict[str, Any]]:
    measured = {name: figures for node in nodes
                for name, figures in ((node.get("usage") or {}).get("instances") or {}).items()}
    rows = []
    for instance in instances:
        figures = measured.get(instance["name"]) or {}
        rows.append({
            "name": instance["name"], "kind": instance.get("kind"), "node": instance.get("node"),
            "state": instance.get("state"), "cpu_cores": figures.get("cpu_cores"), "vcpus": instance.get("vcpus"),
            "memory_bytes": figures.get("memory_bytes"), "memory_mib": instance.get("memory_mib"),
        })
    return rows


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else -1.0


def _percent(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) else "-"


def _mib(value: Any) -> str:
    return f"{value / 2**20:.0f}" if isinstance(value, int | float) else "-"


def print_nodes(rows: list[dict[str, Any]], sort: str) -> None:
    key: Callable[[dict[str, Any]], Any] = {
        "cpu": lambda r: -_number(r["cpu_busy"]), "memory": lambda r: -_number(r["memory_used_bytes"]),
        "load": lambda r: -_number(r["load1"]), "reserved": lambda r: -r["vcpus_reserved"],
        "name": lambda r: r["node"],
    }[sort]
    print_table(
        ["NODE", "STATE", "CPU", "LOAD", "MEMORY MiB", "RESERVED vCPU", "INSTANCES"],
        [[r["node"], r["state"], _percent(r["cpu_busy"]), "-" if r["load1"] is None else f"{r['load1']:.2f}",
          f"{_mib(r['memory_used_bytes'])} / {_mib(r['memory_total_bytes'])}",
          f"{r['vcpus_reserved']} / {r['vcpus_capacity']:g}" if r["vcpus_capacity"] else str(r["vcpus_reserved"]),
          r["instances"]] for r in sorted(rows, key=key)],
        empty="no nodes enrolled yet",
    )


def print_instances(rows: list[dict[str, Any]], sort: str) -> None:
    key: Callable[[dict[str, Any]], Any] = {
        "cpu": lambda r: -_number(r["cpu_cores"]), "memory": lambda r: -_number(r["memory_bytes"]),
        "name": lambda r: r["name"], "node": lambda r: (r["node"] or "", r["name"]),
    }[sort]
    print_table(
        ["NAME", "KIND", "NODE", "STATE", "CPU cores / vCPU", "MEMORY MiB / reserved"],
        [[r["name"], r["kind"], r["node"], r["state"],
          f"{'-' if r['cpu_cores'] is None else format(r['cpu_cores'], '.2f')} / {r['vcpus']}",
          f"{_mib(r['memory_bytes'])} / {r['memory_mib']}"] for r in sorted(rows, key=key)],
        empty="no instances",
    )


def run(client: Client, args: argparse.Namespace, rows: Callable[..., list[dict[str, Any]]],
        show: Callable[[list[dict[str, Any]], str], None]) -> int:
    """Fetch, print; with --watch, again every so many seconds until interrupted."""
    while True:
        found = rows(client.pages("/v1/nodes", "nodes"), client.pages("/v1/instances", "instances"))
        if args.output == "json":
            print_json(found)
        else:
            if args.watch and sys.stdout.isatty():
                print("\x1b[H\x1b[2J", end="")  # our own escape sequence: clear the screen between frames
            show(found, args.sort)
        if not args.watch:
            return 0
        sys.stdout.flush()
        try:
            time.sleep(args.watch)
        except KeyboardInterrupt:
            return 0


def add_arguments(parser: argparse.ArgumentParser, sorts: dict[str, str]) -> None:
    parser.add_argument("--sort", choices=sorted(sorts), default="cpu", help="sort by this column (default: cpu)")
    parser.add_argument("--watch", type=float, metavar="SECONDS", help="redraw every SECONDS until interrupted")
