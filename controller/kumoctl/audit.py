"""``kumoctl audit``: who changed what in the fleet, from the controller's audit log."""

from __future__ import annotations

import argparse

from .arguments import OUTPUT, Group, positive_int
from .client import Client
from .output import print_json, print_table

NAME = "audit"
HELP = "the audit log: every admin action that changed something, who made it, how it ended"


def cmd_audit_list(client: Client, args: argparse.Namespace) -> int:
    entries = client.pages("/v1/audit", "entries", most=args.limit)
    if args.output == "json":
        print_json(entries)
        return 0
    rows = [[e["at"], f"{e['role']} {e['name']}", e["serial"], e["method"], e["path"], e["status"], e["error"] or ""]
            for e in entries]
    print_table(["TIME", "WHO", "CERTIFICATE", "METHOD", "PATH", "STATUS", "ERROR"], rows, empty="no admin actions yet")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("list", cmd_audit_list, "list the newest admin actions, newest first", [OUTPUT])
    sub.add_argument("--limit", type=positive_int, default=50, help="how many entries (default: 50)")
