"""``kumoctl ui``: sign in to the web interface, list and revoke its sessions."""

from __future__ import annotations

import argparse
import os
import sys
import webbrowser

from .arguments import OUTPUT, Group
from .client import Client
from .output import print_json, print_table

NAME = "ui"
HELP = "the web interface: a single-use sign-in link (the default), its sessions"


def cmd_ui_signin(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", "/v1/ui/signin", {})
    print(answer["url"])
    print(f"# signs one browser in, once, until {answer['expires_at']}; keep it to yourself", file=sys.stderr)
    # Only where a graphical browser can be: without a display, webbrowser would start a
    # text one in this terminal.
    if not getattr(args, "no_open", False) and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        webbrowser.open(answer["url"])
    return 0


def cmd_ui_sessions(client: Client, args: argparse.Namespace) -> int:
    sessions = client.call("GET", "/v1/ui/sessions")["sessions"]
    if args.output == "json":
        print_json(sessions)
        return 0
    rows = []
    for s in sessions:
        status = "revoked" if s["revoked_at"] else "used" if s["used_at"] else "active" if s["kind"] == "session" else "unused"
        rows.append([s["id"], "sign-in link" if s["kind"] == "signin" else "session", s["name"], status,
                     s["remote"] or "", s["created_at"], s["expires_at"]])
    print_table(["ID", "KIND", "ADMIN", "STATUS", "FROM", "CREATED", "EXPIRES"], rows,
                empty="no web sessions or sign-in links (kumoctl ui makes one)")
    return 0


def cmd_ui_revoke(client: Client, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/v1/ui/sessions/{args.id}")
    print(f"revoked {args.id}")
    return 0


def default(parser: argparse.ArgumentParser) -> None:
    """``kumoctl ui`` alone signs in."""
    parser.set_defaults(func=cmd_ui_signin)
    parser.add_argument("--no-open", action="store_true", help="only print the link, do not open a browser")


def register(group: Group) -> None:
    group.actions.required = False
    sub = group.leaf("signin", cmd_ui_signin, "print a single-use sign-in link (and open it where a browser can)")
    sub.add_argument("--no-open", action="store_true", help="only print the link, do not open a browser")
    group.leaf("sessions", cmd_ui_sessions, "list the web sessions and unused sign-in links", [OUTPUT])
    sub = group.leaf("revoke", cmd_ui_revoke, "end a web session (or withdraw a sign-in link) at once")
    sub.add_argument("id", help="the session's or link's id, from kumoctl ui sessions")
