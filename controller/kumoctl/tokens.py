"""``kumoctl token``: join tokens for new nodes."""

from __future__ import annotations

import argparse
import sys

from .arguments import Group, parse_duration, positive_int
from .client import Client

NAME = "token"
HELP = "join tokens for new nodes"


def cmd_token_create(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", "/v1/tokens", {"ttl_seconds": args.ttl, "uses": args.uses})
    join = answer["join"]
    print(join)
    uses = answer.get("uses", args.uses)
    print(
        f"# valid until {answer.get('expires_at', '?')} for {uses} join{'s' if uses != 1 else ''}; "
        f"on the new node run:\n"
        f"kumo-agent join --token {join}",
        file=sys.stderr,
    )
    return 0


def register(group: Group) -> None:
    sub = group.leaf("create", cmd_token_create, "create a join token and print its join string")
    sub.add_argument(
        "--ttl",
        type=parse_duration,
        default=3600,
        metavar="DURATION",
        help="how long the token is valid: 90s, 30m, 2h, 1d (default: 1h)",
    )
    sub.add_argument(
        "--uses",
        type=positive_int,
        default=1,
        metavar="N",
        help="how many nodes may join with it (default: 1)",
    )
