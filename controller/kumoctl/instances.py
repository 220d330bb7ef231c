"""``kumoctl instances``: create, list, show, start, stop, delete and read the console of
instances of any kind; checkpoint, restore and migrate come from :mod:`.migration`.

Every kind's node answers the same shapes: create, start and stop give the instance as
``{"name", "kind", "state", "details"}`` (stop adds ``"forced"``), delete
``{"name", "kind", "state": "deleted"}``, console ``{"name", "kind", "log", "logs"}`` where
``logs`` holds the instance's other logs by name (a container's liblxc log is ``lxc``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from . import migration, top
from .arguments import OUTPUT, WAITING, Command, Group, option_pair, parse_duration, positive_int
from .client import Client
from .errors import CommandError
from .output import mib, print_block, print_fields, print_json, print_table
from .waiting import wait_for_task

NAME = "instances"
HELP = "virtual machines and containers"


def _read_text(path: str | None, what: str) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text()
    except OSError as exc:
        raise CommandError(f"{what} file {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise CommandError(f"{what} file {path}: not UTF-8 text") from None


def cmd_instances_create(client: Client, args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "name": args.name,
        "kind": args.kind,
        "vcpus": args.vcpus,
        "memory_mib": args.memory,
        "options": dict(args.option or ()),
    }
    optional = {
        "image": args.image,
        "image_sha256": args.image_sha256,
        "user_data": _read_text(args.user_data, "--user-data"),
        "network_config": _read_text(args.network_config, "--network-config"),
        "node": args.node,
    }
    body.update({k: v for k, v in optional.items() if v is not None})
    answer = client.call("POST", "/v1/instances", body)
    task = answer["task"]
    node = (answer.get("instance") or {}).get("node") or task.get("node")
    if args.no_wait:
        print(
            f"instance {args.name}: placed on node {node}; create task {task['id']} is {task['state']}"
        )
        return 0
    catalogue = (answer.get("instance") or {}).get("catalogue")
    detail = _pull_progress(client, args.name) if catalogue and not catalogue.get("held") else None
    wait_for_task(client, task, f"creating {args.name} on {node}", args.timeout, detail)
    print(
        f"instance {args.name} ({args.kind}, {args.vcpus} vCPU, {args.memory} MiB) is on node {node}"
        + (f", from image {catalogue['name']}:{catalogue['version']}" if catalogue else "")
    )
    return 0


def _pull_progress(client: Client, name: str) -> Any:
    """What the spinner says while the node pulls the instance's image, as its heartbeats tell."""
    path = f"/v1/instances/{quote(name, safe='')}"

    def detail() -> str:
        pull = (client.call("GET", path).get("catalogue") or {}).get("pull")
        if not pull or not pull.get("total"):
            return ""
        return f", pulling its image {mib(pull['bytes'])}/{mib(pull['total'])} MiB"

    return detail


def cmd_instances_list(client: Client, args: argparse.Namespace) -> int:
    instances = client.pages("/v1/instances", "instances")
    if args.output == "json":
        print_json(instances)
        return 0
    rows = [
        [
            i.get("name"),
            i.get("kind"),
            i.get("node"),
            i.get("state"),
            i.get("vcpus"),
            i.get("memory_mib"),
            i.get("image"),
        ]
        for i in sorted(instances, key=lambda i: i.get("name") or "")
    ]
    print_table(
        ["NAME", "KIND", "NODE", "STATE", "VCPUS", "MEMORY/MIB", "IMAGE"],
        rows,
        empty="no instances: kumoctl instances create --help",
    )
    return 0


def cmd_instances_show(client: Client, args: argparse.Namespace) -> int:
    instance = client.call("GET", f"/v1/instances/{quote(args.name, safe='')}")
    if args.output == "json":
        print_json(instance)
        return 0
    simple = [
        (k, v) for k, v in instance.items() if not isinstance(v, dict | list) or k == "options"
    ]
    print_fields(sorted(simple))
    privileged = (instance.get("details") or {}).get("privileged")
    if isinstance(privileged, bool):  # a container: is its root the host's root?
        print_fields([("privileged", privileged)])
    catalogue = instance.get("catalogue")
    if catalogue:
        where = "already on the node" if catalogue.get("held") else "pulled by the node from the controller"
        print_fields([("catalogue image", f"{catalogue['name']}:{catalogue['version']} ({where})")])
    for key, value in sorted(instance.items()):
        if isinstance(value, dict | list) and key != "options" and value:
            print_block(key, value)
    return 0


def _instance_operation(verb: str, done: str) -> Command:
    def command(client: Client, args: argparse.Namespace) -> int:
        name = quote(args.name, safe="")
        if verb == "delete":
            answer = client.call("DELETE", f"/v1/instances/{name}")
        else:
            answer = client.call("POST", f"/v1/instances/{name}/{verb}")
        task = answer["task"]
        if task is None:
            print(f"instance {args.name}: its node was removed; the record is deleted")
            return 0
        if args.no_wait:
            print(f"instance {args.name}: {verb} task {task['id']} is {task['state']}")
            return 0
        task = wait_for_task(client, task, f"{verb} {args.name}", args.timeout)
        forced = (task.get("result") or {}).get("forced")
        print(f"instance {args.name} {done}" + (" (forced: it did not stop gracefully in time)" if forced else ""))
        return 0

    return command


def cmd_instances_console(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/v1/instances/{quote(args.name, safe='')}/console")
    task = wait_for_task(
        client, answer["task"], f"fetching the console of {args.name}", args.timeout
    )
    result = task.get("result") or {}
    _write_log(result.get("log") or "")
    for name, text in sorted((result.get("logs") or {}).items()):
        if text:
            print(f"\n==> {name} log <==")
            _write_log(text)
    return 0


def _write_log(text: str) -> None:
    # A serial console (a VM's) ends its lines with CR LF: plain newlines, not "\\x0d" at every end.
    text = text.replace("\r\n", "\n")
    sys.stdout.write(text if text.endswith("\n") or not text else text + "\n")


def cmd_instances_top(client: Client, args: argparse.Namespace) -> int:
    return top.run(client, args, top.instance_rows, top.print_instances)


def register(group: Group) -> None:
    _register_create(group)
    group.leaf("list", cmd_instances_list, "list instances and where they run", [OUTPUT])
    top.add_arguments(group.leaf("top", cmd_instances_top, "what each instance uses (measured) beside its reservation",
                                 [OUTPUT]), top.SORT_INSTANCES)
    group.leaf("show", cmd_instances_show, "show one instance", [OUTPUT]).add_argument("name")
    for verb, done, help in (
        ("start", "started", "start a stopped instance"),
        ("stop", "stopped", "stop a running instance"),
        ("delete", "deleted", "delete an instance and its disks"),
    ):
        group.leaf(verb, _instance_operation(verb, done), help, [WAITING]).add_argument("name")
    migration.register(group)
    sub = group.leaf("console", cmd_instances_console, "print an instance's console log and its other logs")
    sub.add_argument("name")
    sub.add_argument(
        "--timeout",
        type=parse_duration,
        default=60,
        metavar="DURATION",
        help="how long to wait for the node to answer (default: 60s)",
    )


def _register_create(group: Group) -> None:
    sub = group.leaf(
        "create",
        cmd_instances_create,
        "create an instance; the scheduler picks the node unless --node pins it",
        [WAITING],
    )
    sub.add_argument("name", help="instance name, unique in the fleet")
    sub.add_argument("--kind", required=True, help="instance kind: kvm, lxc...")
    sub.add_argument("--image", help="catalogue image (NAME, NAME:VERSION, alias; see kumoctl images list), "
                                     "or an https URL or path the node can fetch")
    sub.add_argument("--image-sha256", metavar="HEX", help="expected SHA-256 of the image")
    sub.add_argument("--vcpus", type=positive_int, required=True, metavar="N", help="virtual CPUs")
    sub.add_argument(
        "--memory", type=positive_int, required=True, metavar="MIB", help="memory in MiB"
    )
    sub.add_argument("--user-data", metavar="FILE", help="cloud-init user-data file")
    sub.add_argument("--network-config", metavar="FILE", help="cloud-init network-config file")
    sub.add_argument("--node", help="pin the instance to this node id")
    sub.add_argument(
        "--option",
        type=option_pair,
        action="append",
        metavar="KEY=VALUE",
        help="plugin option; VALUE is JSON if it parses (10, true), else a string; repeatable",
    )
