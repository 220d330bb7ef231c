"""The pieces every command group's parser is built from: argument types, the options many
commands share, and :class:`Group`, which adds a group's subcommands."""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from .config import CONFIG_ENV

DEFAULT_WAIT = 600.0

_DURATION_PART = re.compile(r"(\d+)([smhdw])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> int:
    """``90`` (seconds), ``30m``, ``2h``, ``1d``, ``1h30m`` → seconds (argparse type)."""
    text = text.strip().lower()
    if text.isdigit():
        seconds = int(text)
    elif text and _DURATION_PART.sub("", text) == "":
        seconds = sum(int(n) * _DURATION_UNITS[u] for n, u in _DURATION_PART.findall(text))
    else:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration: use a number of seconds or e.g. 30m, 2h, 1d, 1h30m"
        )
    if seconds <= 0:
        raise argparse.ArgumentTypeError("the duration must be longer than zero")
    return seconds


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def option_pair(text: str) -> tuple[str, Any]:
    """``KEY=VALUE``; VALUE is JSON when it parses as JSON (10, true, [..]), else a string."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


# Options shared by many commands, as argparse parent parsers.
COMMON = argparse.ArgumentParser(add_help=False)
# SUPPRESS: a --config given after the subcommand must not be reset by the others.
COMMON.add_argument(
    "--config",
    default=argparse.SUPPRESS,
    metavar="FILE",
    help=f"kumoctl.yaml to use (default: ${CONFIG_ENV}, ./kumoctl.yaml, ~/.config/kumo/kumoctl.yaml)",
)
OUTPUT = argparse.ArgumentParser(add_help=False)
OUTPUT.add_argument(
    "-o",
    "--output",
    choices=("table", "json"),
    default="table",
    help="output format (default: table)",
)
WAITING = argparse.ArgumentParser(add_help=False)
WAITING.add_argument("--no-wait", action="store_true", help="return once the task is queued")
WAITING.add_argument(
    "--timeout",
    type=parse_duration,
    default=int(DEFAULT_WAIT),
    metavar="DURATION",
    help=f"how long to wait for the task (default: {DEFAULT_WAIT:g}s)",
)

Command = Callable[..., int]  # (Client, argparse.Namespace) -> exit status


class Group:
    """One command group (``kumoctl nodes ...``): each :meth:`leaf` is a subcommand."""

    def __init__(self, actions: argparse._SubParsersAction):
        self.actions = actions

    def leaf(self, name: str, func: Command, help: str,
             parents: Sequence[argparse.ArgumentParser] = ()) -> argparse.ArgumentParser:
        """Add subcommand ``name`` running ``func``; its parser, to add its own arguments."""
        sub = self.actions.add_parser(name, help=help, description=help, parents=[COMMON, *parents])
        sub.set_defaults(func=func)
        return sub
