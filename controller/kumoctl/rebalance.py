"""``kumoctl rebalance plan|apply|history``: moving instances off nodes whose instances stay
busy, by live checkpoint/restore (see the controller's ``rebalance`` settings)."""

from __future__ import annotations

import argparse
from typing import Any

from .arguments import OUTPUT, WAITING, Group, positive_int
from .client import Client
from .output import print_json, print_table, short
from .waiting import migration_failure, wait_for_migration

NAME = "rebalance"
HELP = "move instances off nodes whose instances stay busy: the plan, carrying it out, the decisions made"


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) else "-"


def print_plan(plan: dict[str, Any]) -> None:
    policy = plan["policy"]
    print(f"{plan['summary']}\n")
    print(f"nodes (the share of their CPUs their instances use; busy: over {policy['cpu_high']:.0%} in every "
          f"sample of the last {policy['window']:g} s):")
    print_table(
        ["NODE", "CPUS", "NOW", "LOWEST IN WINDOW", "BUSY", "AFTER"],
        [[n["id"], n["cpus"], _share(n["load"]), _share(n["low"]), n["sustained"], _share(n["after"])]
         for n in plan["nodes"]],
        empty="no ready node",
    )
    if plan["moves"]:
        print("\nmoves (wave 1 starts now, a later wave once the one before it has ended):")
        print_table(
            ["WAVE", "INSTANCE", "FROM", "TO", "CORES", "FROM AFTER", "TO AFTER"],
            [[m["wave"], m["instance"], m["source"], m["destination"], f"{m['cpu']:.2f}",
              f"{_share(m['source_before'])} -> {_share(m['source_after'])}",
              f"{_share(m['destination_before'])} -> {_share(m['destination_after'])}"] for m in plan["moves"]],
            empty="",
        )
        for move in plan["moves"]:
            print(f"  {move['instance']}: {move['reason']}")
    if plan["refused"]:
        print("\nstaying on a busy node:")
        print_table(["INSTANCE", "NODE", "WHY"], [[r["instance"], r["node"], r["reason"]] for r in plan["refused"]],
                    empty="")


def cmd_rebalance_plan(client: Client, args: argparse.Namespace) -> int:
    plan = client.call("GET", "/v1/rebalance/plan")
    if args.output == "json":
        print_json(plan)
    else:
        print_plan(plan)
    return 0


def _decision_line(entry: dict[str, Any]) -> str:
    where = f"{entry['instance']} {entry['source']} -> {entry['destination']}"
    if entry.get("refused"):
        return f"{where}: refused: {entry['refused']}"
    if entry.get("state") == "failed":
        return f"{where}: failed: {migration_failure(entry)}"
    return f"{where}: {entry.get('state')} (migration {entry['migration']})"


def cmd_rebalance_apply(client: Client, args: argparse.Namespace) -> int:
    """One round, or (waiting) rounds until one has nothing to start: each round starts a wave."""
    decisions: list[dict[str, Any]] = []
    while True:
        answer = client.call("POST", "/v1/rebalance/apply", {})
        if not decisions and args.output != "json":
            print(answer["summary"])
        if not answer["decisions"]:
            break
        for entry in answer["decisions"]:
            if entry.get("migration") and not args.no_wait:
                migration = wait_for_migration(client, {**entry, "id": entry["migration"], "state": "running"},
                                               args.timeout)
                entry.update(state=migration["state"], error=migration.get("error"), code=migration.get("code"),
                             outcome=migration.get("outcome"))
            decisions.append(entry)
            if args.output != "json":
                print(_decision_line(entry))
        if args.no_wait or args.once:
            break
    if args.output == "json":
        print_json(decisions)
    elif not decisions:
        print("nothing moved")
    return 0


def cmd_rebalance_history(client: Client, args: argparse.Namespace) -> int:
    entries = client.pages("/v1/rebalance/history", "entries", most=args.limit)
    if args.output == "json":
        print_json(entries)
        return 0
    print_table(
        ["TIME", "TRIGGER", "INSTANCE", "FROM", "TO", "CORES", "OUTCOME", "WHY"],
        [[e["at"], e["trigger"], e["instance"], e["source"], e["destination"], f"{e['cpu']:.2f}",
          "refused" if e.get("refused") else f"{e.get('state')} ({e['migration']})",
          short(e.get("refused") or e.get("error") or e["reason"], 100)] for e in entries],
        empty="no rebalancing decision yet: kumoctl rebalance plan",
    )
    return 0


def register(group: Group) -> None:
    group.leaf("plan", cmd_rebalance_plan,
               "print the migrations a rebalancing round would make and why, and what it would not move", [OUTPUT])
    sub = group.leaf("apply", cmd_rebalance_apply,
                     "carry the plan out: a round at a time until one moves nothing, waiting for each wave's "
                     "migrations", [WAITING, OUTPUT])
    sub.add_argument("--once", action="store_true", help="one round only (the first wave), waiting for it")
    sub = group.leaf("history", cmd_rebalance_history, "the rebalancer's decisions, newest first", [OUTPUT])
    sub.add_argument("--limit", type=positive_int, default=50, help="how many entries (default: 50)")
