"""``kumoctl alerts``: the alerts the nodes' monitoring rules raised, each in its latest state."""

from __future__ import annotations

import argparse
from urllib.parse import urlencode

from .arguments import OUTPUT, Group
from .client import Client
from .output import print_json, print_table

NAME = "alerts"
HELP = "alerts raised by the nodes' monitoring rules"


def cmd_alerts_list(client: Client, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("node", args.node)) if v}
    alerts = client.pages("/v1/alerts" + (f"?{urlencode(query)}" if query else ""), "alerts")
    if args.output == "json":
        print_json(alerts)
        return 0
    rows = [
        [
            a["rule"], a["state"], a["severity"], a["node"],
            ",".join(f"{k}={v}" for k, v in sorted(a["labels"].items())),
            a["starts_at"], a["annotations"].get("summary", ""),
        ]
        for a in alerts
    ]
    print_table(["RULE", "STATE", "SEVERITY", "NODE", "LABELS", "SINCE", "SUMMARY"], rows, empty="no alerts")
    return 0


def register(group: Group) -> None:
    sub = group.leaf("list", cmd_alerts_list, "list each alert's latest state", [OUTPUT])
    sub.add_argument("--state", choices=("firing", "resolved"), help="only alerts in this state")
    sub.add_argument("--node", help="only this node's alerts")
