"""``kumo-agent``: ``join`` a controller, ``run`` the agent, list ``plugins``.

Errors go to stderr as one sentence and a non-zero exit, never a traceback (those go to the
agent log at debug level, for bugs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Any

from agent.pluginmanager import Hooks, PluginLoadError, make_plugin_manager
from agent.sdk import ConfigError
from agent.settings import (
    DEFAULT_CONFIG,
    DEFAULT_STATE_DIR,
    AgentSettings,
    JoinError,
    controller_url,
    load_settings,
)

log = logging.getLogger("agent")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, JoinError, PluginLoadError) as exc:
        print(f"kumo-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kumo-agent", description="The Kumo node agent.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = f"agent config file (default {DEFAULT_CONFIG}, read when present)"

    join = sub.add_parser("join", help="enroll this node with a controller (once)")
    join.add_argument("--controller", action="append", default=[], metavar="URL",
                      help="https://HOST:PORT of a controller's API, tried before (and kept with) the ones the "
                           "join string lists; repeatable")
    join.add_argument("--token", required=True, metavar="JOIN", help="the join string from `kumoctl token create`")
    join.add_argument("--state-dir", type=Path, help=f"where the identity goes (default: config's state_dir or {DEFAULT_STATE_DIR})")
    join.add_argument("--config", type=Path, help=config_help)
    join.add_argument("--force", action="store_true",
                      help="replace an existing node identity; a node the controller knows (e.g. one whose certificate "
                           "expired) joins again as itself, keeping its id, tasks and instances")
    join.set_defaults(func=_join)

    run = sub.add_parser("run", help="run the agent (SIGTERM stops it; workloads keep running)")
    run.add_argument("--config", type=Path, help=config_help)
    run.set_defaults(func=_run)

    plugins = sub.add_parser("plugins", help="list the installed plugins and what each can do here")
    plugins.add_argument("--config", type=Path, help=config_help)
    plugins.add_argument("--output", choices=("table", "json"), default="table")
    plugins.set_defaults(func=_plugins)
    return parser


def _settings(args: argparse.Namespace) -> AgentSettings:
    return load_settings(args.config, required=args.config is not None)


def _join(args: argparse.Namespace) -> int:
    from agent.enroll import join

    controllers = []
    for url in args.controller:
        try:
            controllers.append(controller_url(url))
        except ValueError as exc:
            raise JoinError(f"--controller: {exc}") from None
    state_dir = args.state_dir or _settings(args).state_dir
    record = join(controllers, args.token, state_dir, force=args.force)
    print(f"joined as node {record.node_id}; controllers {', '.join(record.controllers)}; identity in {state_dir}")
    again = "restart the agent (its running instances are adopted)" if args.force else "start the agent"
    print(f"{again}: kumo-agent run{f' --config {args.config}' if args.config else ''}")
    return 0


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # aiohttp's access and client internals are noise at debug level for an agent log.
    logging.getLogger("aiohttp").setLevel(max(logging.INFO, logging.getLogger().level))


def _load_plugins(settings: AgentSettings) -> Hooks:
    from agent.runtime import configure_plugins

    hooks = Hooks(make_plugin_manager())
    configure_plugins(hooks, settings)
    return hooks


def _run(args: argparse.Namespace) -> int:
    from agent.runtime import Runtime

    settings = _settings(args)
    _setup_logging(settings.log_level)
    hooks = _load_plugins(settings)
    return asyncio.run(Runtime(settings, hooks).run())


def _plugins(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _setup_logging("warning")
    hooks = _load_plugins(settings)
    from agent.runtime import probe_plugins

    fingerprints, owners = asyncio.run(probe_plugins(hooks, settings))
    rows: list[dict[str, Any]] = []
    for name in hooks.plugin_names():
        fp = fingerprints.get(name)
        rows.append(
            {
                "name": name,
                "available": bool(fp and fp.available),
                "reason": fp.reason if fp else "no fingerprint",
                "kinds": list(fp.kinds) if fp else [],
                "task_kinds": sorted(k for k, owner in owners.items() if owner == name),
                "attributes": dict(fp.attributes) if fp else {},
            }
        )
    if args.output == "json":
        print(json.dumps({"plugins": rows}, indent=2, default=str))
        return 0
    table = [["PLUGIN", "AVAILABLE", "KINDS", "TASK KINDS", "REASON"]]
    for row in rows:
        table.append(
            [
                row["name"],
                "yes" if row["available"] else "no",
                ",".join(row["kinds"]) or "-",
                ",".join(row["task_kinds"]) or "-",
                row["reason"] or "-",
            ]
        )
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]) - 1)]
    for r in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=False)) + "  " + r[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
