"""kumoctl: the admin's command line for a Kumo controller.

It reads a small YAML file (``controller``, ``ca``, ``cert``, ``key``; ``kumo-controller
init`` writes one as ``DIR/kumoctl.yaml``) and talks HTTPS to the controller's API with the
admin client certificate. Listing commands print tables, or JSON with ``--output json``.
Every error goes to stderr as one sentence with a non-zero exit status, never a traceback.

Only the standard library and PyYAML are imported, and the TLS modules only when a
command talks to the controller, so ``--help`` and typos answer at once.

The package, by concern: ``config`` (kumoctl.yaml), ``client`` (the HTTPS client),
``output`` (tables, fields, JSON), ``arguments`` (argument types and shared options),
``waiting`` (following tasks and migrations), and one module per command group, each
declaring its own subcommands: ``tokens``, ``nodes``, ``tasks``, ``instances`` (with
``migration``), ``migrations``, ``images``, ``rebalance``, ``logs``, ``alerts``, ``certificates``, ``audit``, ``ui``. This module is the entry point.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from . import (
    alerts,
    audit,
    certificates,
    images,
    instances,
    logs,
    migrations,
    nodes,
    rebalance,
    tasks,
    tokens,
    ui,
)
from .arguments import COMMON, Group
from .client import Client
from .config import load_config
from .errors import EXIT_ERROR, EXIT_INTERRUPTED, CommandError
from .output import PrintableStream, printable

GROUPS = (tokens, nodes, tasks, instances, migrations, images, rebalance, logs, alerts, certificates, audit, ui)


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every leaf's ``func`` takes (Client, Namespace) → exit status."""
    parser = argparse.ArgumentParser(
        prog="kumoctl",
        description="Administer a Kumo controller: join tokens, nodes, tasks, instances, rebalancing, logging and alerts.",
        parents=[COMMON],
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)
    for module in GROUPS:
        sub = commands.add_parser(module.NAME, help=module.HELP, description=module.HELP, parents=[COMMON])
        module.register(Group(sub.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)))
        if hasattr(module, "default"):  # the group does something without a subcommand
            module.default(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kumoctl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    client = None
    stdout, sys.stdout = sys.stdout, PrintableStream(sys.stdout)  # type: ignore[assignment]
    try:
        client = Client(load_config(getattr(args, "config", None)))
        return args.func(client, args)
    except CommandError as exc:
        print(f"kumoctl: {printable(str(exc))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (head, less) went away: not an error worth a message. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        sys.stdout = stdout
        if client is not None:
            client.close()
