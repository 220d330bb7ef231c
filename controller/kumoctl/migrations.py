"""``kumoctl migrations``: the migrations the controllers ran and are running."""

from __future__ import annotations

import argparse
from urllib.parse import urlencode

from .arguments import OUTPUT, Group, positive_int
from .client import Client
from .output import ago, print_json, print_table, short

NAME = "migrations"
HELP = "migrations of instances between nodes, running and ended"


def cmd_migrations_list(client: Client, args: argparse.Namespace) -> int:
    path = "/v1/migrations" + (f"?{urlencode({'state': args.state})}" if args.state else "")
    docs = client.pages(path, "migrations", most=args.limit)
    if args.output == "json":
        print_json(docs)
        return 0
    rows = []
    for m in sorted(docs, key=lambda m: m.get("created_at") or ""):
        progress = m.get("progress") or {}
        rows.append([m["id"], m.get("instance"), m.get("source"), m.get("destination") or "?", m.get("state"),
                     m.get("phase"),
                     # A relay counts what reached the destination; a live migration's tunnels what they carried.
                     progress.get("bytes_received") or progress.get("bytes_sent") or 0, ago(m.get("created_at")),
                     short(m.get("outcome") or m.get("error"))])
    print_table(["ID", "INSTANCE", "FROM", "TO", "STATE", "PHASE", "BYTES", "STARTED", "OUTCOME"], rows,
                empty="no migrations")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("list", cmd_migrations_list, "list the newest migrations, oldest of them first", [OUTPUT])
    sub.add_argument("--limit", type=positive_int, default=200, help="how many of the newest (default: 200)")
    sub.add_argument("--state", choices=("running", "succeeded", "failed"), help="only migrations in this state")
