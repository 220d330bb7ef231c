"""kumoctl: the admin's command line for a Kumo controller.

It reads a small YAML file (``controller``, ``ca``, ``cert``, ``key``; ``kumo-controller
init`` writes one as ``DIR/kumoctl.yaml``) and talks HTTPS to the controller's API with the
admin client certificate. Listing commands print tables, or JSON with ``--output json``.
Every error goes to stderr as one sentence with a non-zero exit status, never a traceback.

Only the standard library and PyYAML are imported, and the TLS modules only when a
command talks to the controller, so ``--help`` and typos answer at once.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

CONFIG_ENV = "KUMOCTL_CONFIG"
CONFIG_KEYS = ("controller", "ca", "cert", "key")
REQUEST_TIMEOUT = 30.0
DEFAULT_WAIT = 600.0
GIB = 1024**3
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130


class CommandError(Exception):
    """A failure to report to the user as one sentence on stderr (no traceback)."""


class ApiError(CommandError):
    """The controller answered with an HTTP error; the message is its ``error`` sentence."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{message} (HTTP {status})")
        self.status = status


# --- configuration ----------------------------------------------------------------------


class Config:
    """Where the controller is and the admin's credentials; paths resolved next to the file."""

    def __init__(self, source: Path, controller: str, ca: Path, cert: Path, key: Path):
        self.source = source
        self.controller = controller
        self.ca = ca
        self.cert = cert
        self.key = key


def config_candidates(explicit: str | None) -> list[Path]:
    """The config files to try, in order: --config, $KUMOCTL_CONFIG, ./, ~/.config/kumo/."""
    if explicit:
        return [Path(explicit)]
    if os.environ.get(CONFIG_ENV):
        return [Path(os.environ[CONFIG_ENV])]
    return [Path("kumoctl.yaml"), Path.home() / ".config" / "kumo" / "kumoctl.yaml"]


def load_config(explicit: str | None) -> Config:
    """Find and validate the config; every problem is a CommandError naming the file."""
    import yaml

    candidates = config_candidates(explicit)
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        if explicit or os.environ.get(CONFIG_ENV):
            source = "--config" if explicit else f"${CONFIG_ENV}"
            raise CommandError(f"config file {candidates[0]} (from {source}) does not exist")
        tried = " or ".join(str(p) for p in candidates)
        raise CommandError(
            f"no kumoctl config found at {tried}: pass --config FILE or set {CONFIG_ENV} "
            "(kumo-controller init writes DIR/kumoctl.yaml)"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise CommandError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}:" if mark else ""
        problem = getattr(exc, "problem", None) or "not YAML"
        raise CommandError(f"{path}:{where} invalid YAML: {problem}") from None
    if not isinstance(data, dict):
        raise CommandError(f"{path}: expected a mapping with the keys {', '.join(CONFIG_KEYS)}")
    unknown = sorted(set(map(str, data)) - set(CONFIG_KEYS))
    if unknown:
        raise CommandError(f"{path}: unknown key {unknown[0]!r}; allowed: {', '.join(CONFIG_KEYS)}")
    for key in CONFIG_KEYS:
        if not isinstance(data.get(key), str) or not data[key]:
            raise CommandError(f"{path}: {key}: expected a non-empty string, got {data.get(key)!r}")
    url = urlsplit(data["controller"])
    if url.scheme != "https" or not url.hostname:
        raise CommandError(
            f"{path}: controller: expected an https://HOST:PORT URL, got {data['controller']!r}"
        )
    base = path.parent
    return Config(
        source=path,
        controller=data["controller"].rstrip("/"),
        ca=base / data["ca"],
        cert=base / data["cert"],
        key=base / data["key"],
    )


# --- the HTTPS client -------------------------------------------------------------------


class Client:
    """JSON over one keep-alive HTTPS connection, authenticated with the admin certificate."""

    def __init__(self, config: Config):
        import http.client
        import ssl

        self._http = http.client
        self._ssl = ssl
        self.config = config
        url = urlsplit(config.controller)
        self.host = url.hostname or ""
        self.port = url.port or 443
        try:
            context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(config.ca))
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(
                f"{config.source}: ca: cannot load {config.ca}: {_os_reason(exc)}"
            ) from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(config.cert), str(config.key))
        except (OSError, ssl.SSLError) as exc:
            raise CommandError(
                f"{config.source}: cannot load the client certificate {config.cert} "
                f"with key {config.key}: {_os_reason(exc)}"
            ) from None
        self._context = context
        self._conn: Any = None
        self._used = False

    def call(self, method: str, path: str, body: Any = None) -> Any:
        """Send one request; return the decoded JSON answer or raise CommandError/ApiError."""
        payload = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        while True:
            conn, reused = self._connection()
            try:
                conn.request(method, path, body=payload, headers=headers)
                response = conn.getresponse()
                raw = response.read()
                break
            except (self._http.RemoteDisconnected, BrokenPipeError, ConnectionResetError) as exc:
                self.close()
                # A keep-alive connection the server closed while idle: retry on a fresh
                # one. A reset on a fresh connection is the server refusing our certificate.
                if not reused:
                    raise CommandError(self._network_message(exc)) from None
            except (OSError, self._http.HTTPException) as exc:
                self.close()
                raise CommandError(self._network_message(exc)) from None
        self._used = True
        try:
            data = json.loads(raw) if raw else None
        except ValueError:
            snippet = raw[:200].decode(errors="replace").strip()
            raise CommandError(
                f"the controller answered {method} {path} with HTTP {response.status} and a "
                f"body that is not JSON: {snippet!r}"
            ) from None
        if response.status >= 400:
            message = data.get("error") if isinstance(data, dict) else None
            raise ApiError(
                response.status, message or f"{method} {path} failed with {response.reason}"
            )
        return data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> tuple[Any, bool]:
        """The connection, and whether it already carried a request (it may have gone stale)."""
        if self._conn is None:
            self._conn = self._http.HTTPSConnection(
                self.host, self.port, context=self._context, timeout=REQUEST_TIMEOUT
            )
            self._used = False
        return self._conn, self._used

    def _network_message(self, exc: BaseException) -> str:
        ssl = self._ssl
        where = f"the controller at {self.config.controller}"
        if isinstance(exc, ssl.SSLCertVerificationError):
            return (
                f"{where} presented a certificate that does not verify against {self.config.ca}: "
                f"{exc.verify_message}; check 'ca' in {self.config.source}"
            )
        if isinstance(exc, ssl.SSLError | ConnectionResetError | BrokenPipeError):
            return (
                f"{where} refused the TLS session ({_os_reason(exc)}): is {self.config.cert} "
                f"an admin certificate issued by this controller's CA?"
            )
        if isinstance(exc, ConnectionRefusedError):
            return f"cannot connect to {where}: connection refused; is kumo-controller running?"
        if isinstance(exc, TimeoutError):
            return f"{where} did not answer within {REQUEST_TIMEOUT:g} s"
        if isinstance(exc, OSError) and exc.__class__.__name__ == "gaierror":
            return f"cannot resolve the controller's host name {self.host!r}: {_os_reason(exc)}"
        return f"cannot talk to {where}: {_os_reason(exc)}"


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror and not exc.__class__.__name__.startswith("SSL"):
        return exc.strerror
    reason = getattr(exc, "reason", None)
    return str(reason or exc) or exc.__class__.__name__


# --- output -----------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Iterable[Sequence[Any]], empty: str) -> None:
    """Left-aligned columns, two spaces apart; ``empty`` is printed when there are no rows."""
    cells = [[_cell(v) for v in row] for row in rows]
    if not cells:
        print(empty)
        return
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


def print_json(data: Any) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def print_fields(pairs: Iterable[tuple[str, Any]]) -> None:
    pairs = list(pairs)
    width = max(len(k) for k, _ in pairs) + 1
    for key, value in pairs:
        print(f"{key + ':':<{width}} {_cell(value)}")


def _cell(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, list | tuple):
        return ",".join(map(str, value)) or "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def ago(timestamp: str | None, now: dt.datetime | None = None) -> str:
    """``2026-01-01T10:00:00Z`` → ``5s ago``; unparsable timestamps are shown as they are."""
    if not timestamp:
        return "never"
    try:
        then = dt.datetime.fromisoformat(timestamp)
    except ValueError:
        return timestamp
    if then.tzinfo is None:
        then = then.replace(tzinfo=dt.UTC)
    seconds = int(((now or dt.datetime.now(dt.UTC)) - then).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit} ago"
    return f"{seconds}s ago"


def gib(value: Any) -> str:
    return f"{value / GIB:.1f}" if isinstance(value, int | float) else "?"


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


# --- commands ---------------------------------------------------------------------------


def cmd_token_create(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", "/v1/tokens", {"ttl_seconds": args.ttl, "uses": args.uses})
    join = answer["join"]
    print(join)
    uses = answer.get("uses", args.uses)
    print(
        f"# valid until {answer.get('expires_at', '?')} for {uses} join{'s' if uses != 1 else ''}; "
        f"on the new node run:\n"
        f"kumo-agent join --controller {client.config.controller} --token {join}",
        file=sys.stderr,
    )
    return 0


def _node_kinds(node: Mapping[str, Any]) -> list[str]:
    kinds: set[str] = set()
    for fp in (node.get("plugins") or {}).values():
        if fp.get("available"):
            kinds.update(fp.get("kinds") or ())
    return sorted(kinds)


def cmd_nodes_list(client: Client, args: argparse.Namespace) -> int:
    nodes = client.call("GET", "/v1/nodes")["nodes"]
    if args.output == "json":
        print_json(nodes)
        return 0
    rows = []
    for node in sorted(nodes, key=lambda n: (n.get("hostname") or "", n["id"])):
        facts = node.get("facts") or {}
        state = node.get("state", "?") + (",drained" if node.get("drained") else "")
        memory = f"{gib(facts.get('memory_available_bytes'))}/{gib(facts.get('memory_bytes'))}"
        rows.append(
            [
                node["id"],
                node.get("hostname"),
                state,
                _node_kinds(node),
                facts.get("cpus"),
                memory,
                len(node.get("instances") or ()),
                ago(node.get("last_seen")),
            ]
        )
    print_table(
        ["ID", "HOSTNAME", "STATE", "KINDS", "CPUS", "MEM FREE/GIB", "INSTANCES", "LAST SEEN"],
        rows,
        empty="no nodes enrolled yet: kumoctl token create, then kumo-agent join on the node",
    )
    return 0


def cmd_nodes_show(client: Client, args: argparse.Namespace) -> int:
    node = client.call("GET", f"/v1/nodes/{quote(args.id, safe='')}")
    if args.output == "json":
        print_json(node)
        return 0
    print_fields(
        [
            ("id", node["id"]),
            ("hostname", node.get("hostname")),
            ("state", node.get("state")),
            ("drained", bool(node.get("drained"))),
            ("last seen", f"{node.get('last_seen') or '-'} ({ago(node.get('last_seen'))})"),
            ("kinds", _node_kinds(node)),
        ]
    )
    facts = node.get("facts") or {}
    if facts:
        print("\nfacts:")
        for key in sorted(facts):
            print(f"  {key}: {_cell(facts[key])}")
    print("\nplugins:")
    plugins = node.get("plugins") or {}
    print_table(
        ["  NAME", "AVAILABLE", "KINDS", "REASON"],
        [
            [f"  {n}", p.get("available"), p.get("kinds"), p.get("reason")]
            for n, p in sorted(plugins.items())
        ],
        empty="  none reported",
    )
    print("\ninstances:")
    print_table(
        ["  NAME", "KIND", "STATE"],
        [
            [f"  {i.get('name')}", i.get("kind"), i.get("state")]
            for i in node.get("instances") or ()
        ],
        empty="  none",
    )
    return 0


def cmd_nodes_drain(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/v1/nodes/{quote(args.id, safe='')}/drain")
    evacuation = answer.get("evacuation") or {"moving": [], "staying": []}
    moved = [wait_for_migration(client, m, args.timeout) for m in evacuation["moving"]]
    if args.output == "json":
        print_json({"node": args.id, "moved": moved, "staying": evacuation["staying"]})
        return EXIT_ERROR if any(m["state"] != "succeeded" for m in moved) else 0
    print(f"node {args.id} drained: no new instances will be placed on it")
    failed = 0
    for migration in moved:
        if migration["state"] == "succeeded":
            print(f"moved {migration['instance']} to {migration['destination']}")
        else:
            failed += 1
            print(f"could not move {migration['instance']}: {_migration_failure(migration)}")
    for stay in evacuation["staying"]:
        print(f"{stay['name']} stays on {args.id}: {stay['reason']}")
    return EXIT_ERROR if failed else 0


def cmd_nodes_undrain(client: Client, args: argparse.Namespace) -> int:
    client.call("POST", f"/v1/nodes/{quote(args.id, safe='')}/undrain")
    print(f"node {args.id} accepts new instances again")
    return 0


def cmd_nodes_remove(client: Client, args: argparse.Namespace) -> int:
    client.call("DELETE", f"/v1/nodes/{quote(args.id, safe='')}")
    print(
        f"node {args.id} removed: its certificate is revoked; it must join again with a new token"
    )
    return 0


def cmd_tasks_list(client: Client, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("node", args.node), ("state", args.state)) if v}
    path = "/v1/tasks" + (f"?{urlencode(query)}" if query else "")
    tasks = client.call("GET", path)["tasks"]
    if args.output == "json":
        print_json(tasks)
        return 0
    rows = [
        [
            t["id"],
            t.get("node"),
            t.get("kind"),
            t.get("state"),
            ago(t.get("updated_at")),
            _short(t.get("error")),
        ]
        for t in sorted(tasks, key=lambda t: t.get("created_at") or "")
    ]
    print_table(["ID", "NODE", "KIND", "STATE", "UPDATED", "ERROR"], rows, empty="no tasks")
    return 0


def _short(text: str | None, limit: int = 60) -> str | None:
    if not text or len(text) <= limit:
        return text
    return text[: limit - 1] + "…"


def cmd_tasks_show(client: Client, args: argparse.Namespace) -> int:
    task = client.call("GET", f"/v1/tasks/{quote(args.id, safe='')}")
    if args.output == "json":
        print_json(task)
        return 0
    _print_task(task)
    return 0


def _print_task(task: Mapping[str, Any]) -> None:
    print_fields(
        [
            (k, task.get(k))
            for k in ("id", "node", "kind", "state", "idempotency_key", "created_at", "updated_at")
        ]
        + [(k, task.get(k)) for k in ("error", "code") if task.get(k)]
    )
    for key in ("payload", "result"):
        if task.get(key):
            print(f"{key}:")
            for line in json.dumps(task[key], indent=2, sort_keys=True).splitlines():
                print(f"  {line}")


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
    wait_for_task(client, task, f"creating {args.name} on {node}", args.timeout)
    print(
        f"instance {args.name} ({args.kind}, {args.vcpus} vCPU, {args.memory} MiB) is on node {node}"
    )
    return 0


def cmd_instances_list(client: Client, args: argparse.Namespace) -> int:
    instances = client.call("GET", "/v1/instances")["instances"]
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
    for key, value in sorted(instance.items()):
        if isinstance(value, dict | list) and key != "options" and value:
            print(f"{key}:")
            for line in json.dumps(value, indent=2, sort_keys=True).splitlines():
                print(f"  {line}")
    return 0


def _instance_operation(verb: str, done: str) -> Callable[[Client, argparse.Namespace], int]:
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
        wait_for_task(client, task, f"{verb} {args.name}", args.timeout)
        print(f"instance {args.name} {done}")
        return 0

    return command


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
        f"instance {args.name} checkpointed on node {task['node']} to {result.get('image')} "
        f"({mib(result.get('size_bytes'))} MiB); {after}"
    )
    return 0


def cmd_instances_restore(client: Client, args: argparse.Namespace) -> int:
    body = {"image": args.image} if args.image else {}
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
        f"instance {args.name} restored on node {task['node']} from {result.get('image')} "
        f"(pid {result.get('pid')})"
    )
    return 0


def cmd_instances_migrate(client: Client, args: argparse.Namespace) -> int:
    answer = client.call(
        "POST", f"/v1/instances/{quote(args.name, safe='')}/migrate", {"to": args.to}
    )
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
        raise CommandError(f"migrating {args.name} failed: {_migration_failure(migration)}")
    progress = migration.get("progress") or {}
    print(
        f"instance {args.name} now runs on node {migration['destination']} (moved from "
        f"{migration['source']} in {migration.get('seconds') or 0:.1f} s, "
        f"{mib(progress.get('bytes_received'))} MiB transferred, sha256 checked)"
    )
    outcome = migration.get("outcome") or ""
    if "failed" in outcome:
        print(f"warning: {outcome}", file=sys.stderr)
    return 0


def _migration_failure(migration: Mapping[str, Any]) -> str:
    code = f" [{migration['code']}]" if migration.get("code") else ""
    outcome = f"; {migration['outcome']}" if migration.get("outcome") else ""
    return f"{migration.get('error') or 'no error given'}{code}{outcome}"


def mib(value: Any) -> str:
    return f"{(value or 0) / 1024**2:.1f}"


def cmd_instances_console(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("POST", f"/v1/instances/{quote(args.name, safe='')}/console")
    task = wait_for_task(
        client, answer["task"], f"fetching the console of {args.name}", args.timeout
    )
    log = (task.get("result") or {}).get("log") or ""
    sys.stdout.write(log if log.endswith("\n") or not log else log + "\n")
    return 0


def cmd_logging_set(client: Client, args: argparse.Namespace) -> int:
    if args.disable == (args.target is not None):
        raise CommandError("give either --target HOST:PORT or --disable")
    body: dict[str, Any] = {"target": args.target, "protocol": args.protocol, "tls": args.tls}
    if args.peer:
        body["peer"] = args.peer
    if args.node:
        body["node"] = args.node
    answer = client.call("PUT", "/v1/logging", body)
    where = f"node {args.node}" if args.node else "the fleet"
    what = f"{args.protocol}{'+tls' if args.tls else ''} to {args.target}" if args.target else "no forwarding"
    print(f"log forwarding for {where}: {what}; sent to {len(answer['tasks'])} node(s)")
    return 0


def cmd_logging_unset(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("DELETE", f"/v1/logging/nodes/{quote(args.node, safe='')}")
    print(f"node {args.node} follows the fleet setting again; sent to {len(answer['tasks'])} node(s)")
    return 0


def cmd_logging_show(client: Client, args: argparse.Namespace) -> int:
    answer = client.call("GET", "/v1/logging")
    if args.output == "json":
        print_json(answer)
        return 0

    def describe(setting: Mapping[str, Any] | None) -> str:
        if not setting or not setting.get("target"):
            return "no forwarding"
        return f"{setting['protocol']}{'+tls' if setting['tls'] else ''} {setting['target']}"

    print(f"fleet: {describe(answer['fleet'])}")
    rows = [
        [node, describe(setting), "override" if node in answer["overrides"] else "fleet"]
        for node, setting in sorted(answer["effective"].items())
    ]
    print_table(["NODE", "FORWARDING", "FROM"], rows, empty="no nodes")
    return 0


def cmd_alerts_list(client: Client, args: argparse.Namespace) -> int:
    query = {k: v for k, v in (("state", args.state), ("node", args.node)) if v}
    alerts = client.call("GET", "/v1/alerts" + (f"?{urlencode(query)}" if query else ""))["alerts"]
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


def cmd_certificate_create(client: Client, args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import CertificateSigningRequestBuilder, Name, NameAttribute
    from cryptography.x509.oid import NameOID

    out = Path(args.out)
    key_path, cert_path, ca_path = out / f"{args.name}.key", out / f"{args.name}.crt", out / "ca.crt"
    if key_path.exists():
        raise CommandError(f"{key_path} already exists; remove it or choose another --name")
    key = ec.generate_private_key(ec.SECP256R1())
    csr = CertificateSigningRequestBuilder().subject_name(Name([NameAttribute(NameOID.COMMON_NAME, args.name)]))
    pem = csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()
    answer = client.call("POST", "/v1/certificates", {"role": args.role, "name": args.name, "csr": pem})
    out.mkdir(parents=True, exist_ok=True)
    # The key is made here and written 0600 from the start; only the CSR went to the controller.
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_text(answer["certificate"])
    ca_path.write_text(answer["ca"])
    print(f"{args.role} certificate for {args.name}: {cert_path}, key {key_path}, CA {ca_path}")
    return 0


_SPINNER = "|/-\\"
FINAL_STATES = ("succeeded", "failed")


def wait_for_task(
    client: Client, task: Mapping[str, Any], doing: str, timeout: float
) -> Mapping[str, Any]:
    """Poll a task until it ends; a spinner on stderr when it is a terminal. Failure raises."""
    show = sys.stderr.isatty()
    started = time.monotonic()
    delay = 0.2
    tick = 0
    try:
        while task["state"] not in FINAL_STATES:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise CommandError(
                    f"{doing}: task {task['id']} is still {task['state']} after {timeout:g} s; "
                    f"follow it with: kumoctl tasks show {task['id']}"
                )
            if show:
                sys.stderr.write(
                    f"\r{_SPINNER[tick % 4]} {doing}: task {task['state']} ({elapsed:.0f}s) "
                )
                sys.stderr.flush()
            tick += 1
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            task = client.call("GET", f"/v1/tasks/{quote(task['id'], safe='')}")
    except KeyboardInterrupt:
        if show:
            sys.stderr.write("\n")
        print(
            f"stopped waiting; task {task['id']} goes on: kumoctl tasks show {task['id']}",
            file=sys.stderr,
        )
        raise
    finally:
        if show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    if task["state"] == "failed":
        code = f" [{task['code']}]" if task.get("code") else ""
        raise CommandError(
            f"{doing} failed on node {task.get('node')}: {task.get('error') or 'no error given'}{code}"
        )
    return task


def _migration_line(migration: Mapping[str, Any], elapsed: float) -> str:
    progress = migration.get("progress") or {}
    phase = migration.get("phase") or "?"
    line = f"migrating {migration['instance']} {migration['source']} -> {migration['destination']}: {phase}"
    total = progress.get("bytes_total")
    if phase != "checkpoint" and total:
        done = progress.get("bytes_received") or 0
        line += f" {mib(done)}/{mib(total)} MiB ({min(100, 100 * done // total)}%)"
    return f"{line} {elapsed:.0f}s"


def wait_for_migration(
    client: Client, migration: Mapping[str, Any], timeout: float
) -> Mapping[str, Any]:
    """Poll a migration until it ends, its phase and bytes moved on stderr when it is a terminal."""
    show = sys.stderr.isatty()
    started = time.monotonic()
    path = f"/v1/migrations/{quote(migration['id'], safe='')}"
    try:
        while migration["state"] == "running":
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise CommandError(
                    f"migration {migration['id']} of {migration['instance']} is still in its "
                    f"{migration.get('phase')} phase after {timeout:g} s; follow it with GET {path}"
                )
            if show:
                sys.stderr.write(f"\r\033[K{_migration_line(migration, elapsed)}")
                sys.stderr.flush()
            time.sleep(0.2)
            migration = client.call("GET", path)
    except KeyboardInterrupt:
        if show:
            sys.stderr.write("\n")
        print(f"stopped waiting; migration {migration['id']} goes on: GET {path}", file=sys.stderr)
        raise
    if show:
        # The last line stays: how much moved and how long it took.
        final = {**migration, "phase": f"{migration['state']} (last phase: {migration.get('phase')})"}
        sys.stderr.write(f"\r\033[K{_migration_line(final, time.monotonic() - started)}\n")
        sys.stderr.flush()
    return migration


# --- argument parsing -------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole command tree; every leaf's ``func`` takes (Client, Namespace) → exit status."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a --config given after the subcommand must not be reset by the others.
    common.add_argument(
        "--config",
        default=argparse.SUPPRESS,
        metavar="FILE",
        help=f"kumoctl.yaml to use (default: ${CONFIG_ENV}, ./kumoctl.yaml, ~/.config/kumo/kumoctl.yaml)",
    )
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="output format (default: table)",
    )
    waiting = argparse.ArgumentParser(add_help=False)
    waiting.add_argument("--no-wait", action="store_true", help="return once the task is queued")
    waiting.add_argument(
        "--timeout",
        type=parse_duration,
        default=int(DEFAULT_WAIT),
        metavar="DURATION",
        help=f"how long to wait for the task (default: {DEFAULT_WAIT:g}s)",
    )

    parser = argparse.ArgumentParser(
        prog="kumoctl",
        description="Administer a Kumo controller: join tokens, nodes, tasks, instances, logging and alerts.",
        parents=[common],
    )
    groups = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    def group(name: str, help: str) -> argparse._SubParsersAction:
        sub = groups.add_parser(name, help=help, description=help, parents=[common])
        return sub.add_subparsers(title="subcommands", metavar="SUBCOMMAND", required=True)

    def leaf(actions: argparse._SubParsersAction, name: str, func: Callable, help: str, parents=()):
        sub = actions.add_parser(name, help=help, description=help, parents=[common, *parents])
        sub.set_defaults(func=func)
        return sub

    tokens = group("token", "join tokens for new nodes")
    sub = leaf(tokens, "create", cmd_token_create, "create a join token and print its join string")
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

    nodes = group("nodes", "enrolled nodes")
    leaf(
        nodes,
        "list",
        cmd_nodes_list,
        "list nodes with their state, kinds and free memory",
        [output],
    )
    leaf(
        nodes, "show", cmd_nodes_show, "show one node's facts, plugins and instances", [output]
    ).add_argument("id", help="node id (n-...)")
    sub = leaf(
        nodes,
        "drain",
        cmd_nodes_drain,
        "place no new instances on a node and migrate off what can move",
        [output],
    )
    sub.add_argument("id", help="node id")
    sub.add_argument(
        "--timeout",
        type=parse_duration,
        default=int(DEFAULT_WAIT),
        metavar="DURATION",
        help=f"how long to wait for each migration (default: {DEFAULT_WAIT:g}s)",
    )
    leaf(nodes, "undrain", cmd_nodes_undrain, "let a drained node take new instances").add_argument(
        "id", help="node id"
    )
    leaf(
        nodes, "remove", cmd_nodes_remove, "remove a node and revoke its certificate at once"
    ).add_argument("id", help="node id")

    tasks = group("tasks", "tasks the controller handed to nodes")
    sub = leaf(tasks, "list", cmd_tasks_list, "list tasks, oldest first", [output])
    sub.add_argument("--node", help="only this node's tasks")
    sub.add_argument(
        "--state",
        choices=("pending", "delivered", "succeeded", "failed"),
        help="only tasks in this state",
    )
    leaf(
        tasks, "show", cmd_tasks_show, "show one task with its payload and result", [output]
    ).add_argument("id", help="task id")

    instances = group("instances", "virtual machines and containers")
    sub = leaf(
        instances,
        "create",
        cmd_instances_create,
        "create an instance; the scheduler picks the node unless --node pins it",
        [waiting],
    )
    sub.add_argument("name", help="instance name, unique in the fleet")
    sub.add_argument("--kind", required=True, help="instance kind: kvm, lxc...")
    sub.add_argument("--image", help="image URL or path the node can fetch")
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
    leaf(instances, "list", cmd_instances_list, "list instances and where they run", [output])
    leaf(instances, "show", cmd_instances_show, "show one instance", [output]).add_argument("name")
    for verb, done, help in (
        ("start", "started", "start a stopped instance"),
        ("stop", "stopped", "stop a running instance"),
        ("delete", "deleted", "delete an instance and its disks"),
    ):
        leaf(instances, verb, _instance_operation(verb, done), help, [waiting]).add_argument("name")
    sub = leaf(
        instances,
        "checkpoint",
        cmd_instances_checkpoint,
        "checkpoint a process or container with CRIU (stops it unless --leave-running)",
        [waiting, output],
    )
    sub.add_argument("name")
    sub.add_argument("--leave-running", action="store_true", help="keep it running after the dump")
    sub = leaf(
        instances,
        "restore",
        cmd_instances_restore,
        "restore a stopped instance from its latest checkpoint",
        [waiting, output],
    )
    sub.add_argument("name")
    sub.add_argument("--image", metavar="DIR", help="a checkpoint directory on its node instead")
    sub = leaf(
        instances,
        "migrate",
        cmd_instances_migrate,
        "move a running instance to another node (checkpoint, transfer, restore)",
        [waiting, output],
    )
    sub.add_argument("name")
    sub.add_argument("--to", metavar="NODE", help="destination node id (default: the scheduler chooses)")
    sub = leaf(instances, "console", cmd_instances_console, "print an instance's console log")
    sub.add_argument("name")
    sub.add_argument(
        "--timeout",
        type=parse_duration,
        default=60,
        metavar="DURATION",
        help="how long to wait for the node to answer (default: 60s)",
    )

    logging_group = group("logging", "where every node's logs are forwarded (rsyslog)")
    sub = leaf(logging_group, "set", cmd_logging_set, "set the log collector for the fleet or one node")
    sub.add_argument("--target", metavar="HOST:PORT", help="the collector")
    sub.add_argument("--disable", action="store_true", help="stop forwarding")
    sub.add_argument("--protocol", choices=("relp", "tcp"), default="relp", help="default: relp (acknowledged)")
    sub.add_argument("--tls", action=argparse.BooleanOptionalAction, default=True,
                     help="TLS with the nodes' Kumo certificates (default: on)")
    sub.add_argument("--peer", metavar="NAME", help="the collector's certificate name (default: the target host)")
    sub.add_argument("--node", help="only this node (an override of the fleet setting)")
    leaf(logging_group, "unset", cmd_logging_unset, "drop a node's override").add_argument("--node", required=True)
    leaf(logging_group, "show", cmd_logging_show, "show the fleet setting and each node's", [output])

    alerts = group("alerts", "alerts raised by the nodes' monitoring rules")
    sub = leaf(alerts, "list", cmd_alerts_list, "list each alert's latest state", [output])
    sub.add_argument("--state", choices=("firing", "resolved"), help="only alerts in this state")
    sub.add_argument("--node", help="only this node's alerts")

    certificates = group("certificate", "client certificates from the Kumo CA")
    sub = leaf(certificates, "create", cmd_certificate_create,
               "make a key here and get it certified (e.g. for Prometheus to scrape the agents)")
    sub.add_argument("--role", choices=("scraper", "admin"), default="scraper", help="default: scraper")
    sub.add_argument("--name", required=True, help="name in the certificate, e.g. prometheus")
    sub.add_argument("--out", required=True, metavar="DIR", help="where NAME.key, NAME.crt and ca.crt go")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``kumoctl`` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    client = None
    try:
        client = Client(load_config(getattr(args, "config", None)))
        return args.func(client, args)
    except CommandError as exc:
        print(f"kumoctl: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader (head, less) went away: not an error worth a message. Point stdout at
        # /dev/null so the interpreter's final flush does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        if client is not None:
            client.close()


if __name__ == "__main__":
    sys.exit(main())
