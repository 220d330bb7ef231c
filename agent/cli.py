"""``kumo-agent``: ``join`` a controller, ``run`` the agent, list ``plugins``, show its ``status``.

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
    NODE_CERT,
    REJOIN_ADVICE,
    AgentSettings,
    JoinError,
    NotJoined,
    controller_url,
    load_settings,
    read_join_record,
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

    status = sub.add_parser("status", help="this node's id, controllers and certificate; exit 1 once it expired")
    status.add_argument("--config", type=Path, help=config_help)
    status.add_argument("--state-dir", type=Path, help=f"the agent's state (default: config's state_dir or {DEFAULT_STATE_DIR})")
    status.add_argument("--output", choices=("table", "json"), default="table")
    status.set_defaults(func=_status)

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


def _status(args: argparse.Namespace) -> int:
    """What the state directory says, without the running agent: a node locked out by an
    expired certificate is told how to come back even when nothing else answers."""
    import datetime

    from agent.certinfo import certificate_validity

    state_dir = args.state_dir or _settings(args).state_dir
    try:
        record = read_join_record(state_dir)
        _, not_after = certificate_validity(state_dir / NODE_CERT)
    except NotJoined as exc:
        raise JoinError(str(exc)) from None
    except (OSError, ValueError) as exc:
        raise JoinError(f"cannot read the node certificate: {exc}; re-join with `kumo-agent join --force --token JOIN`") from None
    expired = not_after <= datetime.datetime.now(datetime.UTC)
    advice = f"the certificate has expired, so the controller refuses this node. {REJOIN_ADVICE}." if expired else None
    if args.output == "json":
        print(json.dumps({"node_id": record.node_id, "controllers": list(record.controllers),
                          "certificate_expires_at": not_after.isoformat(), "expired": expired, "advice": advice}, indent=2))
    else:
        print(f"node         {record.node_id}")
        print(f"controllers  {', '.join(record.controllers)}")
        print(f"certificate  {'EXPIRED at' if expired else 'valid until'} {not_after.isoformat()}")
        if advice:
            print(f"\n{advice}")
    return 1 if expired else 0


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
