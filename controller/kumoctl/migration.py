"""``kumoctl instances checkpoint|restore|checkpoints|migrate``: checkpoints of processes and
containers (CRIU) and of VMs (libvirt's save), on one node or moved to another; the
checkpoints an instance's node keeps, by id."""

from __future__ import annotations

import argparse
import sys
from typing import Any
from urllib.parse import quote

from .arguments import OUTPUT, WAITING, Group, positive_int
from .client import Client
from .errors import EXIT_ERROR, CommandError
from .output import mib, print_json, print_table
from .waiting import migration_failure, migration_mode, wait_for_migration, wait_for_task


def cmd_instances_checkpoint(client: Client, args: argparse.Namespace) -> int:
    answer = client.call(
        "POST",
        f"/v1/instances/{quote(args.name, safe='')}/checkpoint",
        {"leave_running": args.leave_running},
    )
    task = answer["task"]
    if args.no_wait:
        print(f"instance {args.name}: checkpoint task {task['id']} is {task['state']}")
        return 0
    task = wait_for_task(client, task, f"checkpointing {args.name}", args.timeout)
    result = task.get("result") or {}
    if args.output == "json":
        print_json(task)
        return 0
    after = "it keeps running" if args.leave_running else "it is stopped until restored"
    print(
        f"instance {args.name} checkpointed on node {task['node']} as {result.get('checkpoint')} "
        f"({mib(result.get('size_bytes'))} MiB); {after}"
    )
    return 0


def cmd_instances_restore(client: Client, args: argparse.Namespace) -> int:
    body = {"checkpoint": args.checkpoint} if args.checkpoint else {}
    answer = client.call("POST", f"/v1/instances/{quote(args.name, safe='')}/restore", body)
    task = answer["task"]
    if args.no_wait:
        print(f"instance {args.name}: restore task {task['id']} is {task['state']}")
        return 0
    task = wait_for_task(client, task, f"restoring {args.name}", args.timeout)
    result = task.get("result") or {}
    if args.output == "json":
        print_json(task)
        return 0
    print(
        f"instance {args.name} restored on node {task['node']} from checkpoint {result.get('checkpoint')}"
        + (f" (pid {result['pid']})" if result.get("pid") is not None else "")
    )
    return 0


def cmd_instances_checkpoints(client: Client, args: argparse.Namespace) -> int:
    path = f"/v1/instances/{quote(args.name, safe='')}/checkpoints"
    if args.delete is not None:
        answer = client.call("DELETE", f"{path}/{quote(args.delete, safe='')}")
        if args.output == "json":
            print_json(answer)
        else:
            print(f"checkpoint {answer['removed']} of {args.name} removed; latest: {answer.get('latest') or 'none'}")
        return 0
    if args.keep is not None:
        answer = client.call("POST", f"{path}/prune", {"keep": args.keep})
        if args.output == "json":
            print_json(answer)
            return 0
        print(f"{len(answer['removed'])} checkpoint(s) of {args.name} removed")
        checkpoints = answer["checkpoints"]
    else:
        checkpoints = client.call("GET", path)["checkpoints"]
        if args.output == "json":
            print_json(checkpoints)
            return 0
    print_table(
        ["ID", "CREATED", "MIB", "KIND", "LATEST"],
        [(c["id"], c.get("created_at"), mib(c.get("size_bytes")), c.get("kind"), c.get("latest")) for c in checkpoints],
        f"instance {args.name} has no checkpoints",
    )
    return 0


def cmd_instances_migrate(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"to": args.to}
    if args.live:
        body.update(live=True, max_downtime_ms=args.max_downtime, converge_timeout=args.converge_timeout,
                    on_no_converge=args.on_no_converge)
    elif (args.max_downtime, args.converge_timeout, args.on_no_converge) != (None, None, None):
        raise CommandError("--max-downtime, --converge-timeout and --on-no-converge go with --live")
    answer = client.call("POST", f"/v1/instances/{quote(args.name, safe='')}/migrate", body)
    migration = answer["migration"]
    if args.no_wait:
        print(
            f"instance {args.name}: migration {migration['id']} to node "
            f"{migration['destination']} started (GET /v1/migrations/{migration['id']})"
        )
        return 0
    migration = wait_for_migration(client, migration, args.timeout)
    if args.output == "json":
        print_json(migration)
        return 0 if migration["state"] == "succeeded" else EXIT_ERROR
    if migration["state"] != "succeeded":
        raise CommandError(f"migrating {args.name} failed: {migration_failure(migration)}")
    progress = migration.get("progress") or {}
    if migration.get("mode") == "live":
        how = (f"{migration_mode(migration)}, paused {progress.get('downtime_ms')} ms, "
               f"{mib(progress.get('bytes_sent'))} MiB through the controller")
    else:
        how = f"{mib(progress.get('bytes_received'))} MiB transferred, sha256 checked"
    print(
        f"instance {args.name} now runs on node {migration['destination']} (moved from "
        f"{migration['source']} in {migration.get('seconds') or 0:.1f} s, {how})"
    )
    outcome = migration.get("outcome") or ""
    if "failed" in outcome:
        print(f"warning: {outcome}", file=sys.stderr)
    return 0



def register(group: Group) -> None:
    """Add the commands to the ``instances`` group."""
    sub = group.leaf(
        "checkpoint",
        cmd_instances_checkpoint,
        "checkpoint an instance: CRIU for a process or container, libvirt's save for a VM "
        "(stops it unless --leave-running)",
        [WAITING, OUTPUT],
    )
    sub.add_argument("name")
    sub.add_argument("--leave-running", action="store_true",
                     help="keep it running after the dump (a VM pauses while it is saved and restored)")
    sub = group.leaf(
        "restore",
        cmd_instances_restore,
        "restore a stopped instance from its latest checkpoint",
        [WAITING, OUTPUT],
    )
    sub.add_argument("name")
    sub.add_argument("--checkpoint", metavar="ID",
                     help="the checkpoint to restore (kumoctl instances checkpoints NAME), default the latest")
    sub = group.leaf(
        "checkpoints",
        cmd_instances_checkpoints,
        "list an instance's checkpoints on its node, newest first (LATEST: what a restore takes by "
        "default), remove one or prune them",
        [OUTPUT],
    )
    sub.add_argument("name")
    pick = sub.add_mutually_exclusive_group()
    pick.add_argument("--delete", metavar="ID", help="remove this checkpoint")
    pick.add_argument("--keep", metavar="N", type=positive_int,
                      help="keep the latest and the newest others, N in all; remove the rest")
    sub = group.leaf(
        "migrate",
        cmd_instances_migrate,
        "move a running instance to another node (checkpoint, transfer, restore; with --live, while it runs)",
        [WAITING, OUTPUT],
    )
    sub.add_argument("name")
    sub.add_argument("--to", metavar="NODE", help="destination node id (default: the scheduler chooses)")
    sub.add_argument("--live", action="store_true",
                     help="move it while it runs: memory and disk are copied through the controller, then it "
                          "pauses for the last copy (kinds that support it: see kumoctl instances show)")
    sub.add_argument("--max-downtime", metavar="MS", type=positive_int,
                     help="--live: the longest pause allowed for the last copy, in milliseconds (default 300)")
    sub.add_argument("--converge-timeout", metavar="SECONDS", type=positive_int,
                     help="--live: how long the copy may run before the instance counts as never converging "
                          "(it dirties memory faster than it is copied; default 120)")
    sub.add_argument("--on-no-converge", choices=("stop-and-copy", "abort"),
                     help="--live: then pause it so the copy finishes (stop-and-copy) or give up and leave it "
                          "running on its node (abort, the default)")
