"""kumoctl: its parsing helpers, then the real console script against the real controller."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import io
import ipaddress
import json
import os
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controller import kumoctl
from controller.kumoctl import arguments, output
from controller.kumoctl.config import CONFIG_ENV
from tests.harness import free_port


def run_kumoctl(
    *args: str, config: Path | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The installed ``kumoctl`` console script of the interpreter running the tests."""
    script = Path(sys.executable).with_name("kumoctl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "controller.kumoctl"]
    environment = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    environment.update(env or {})
    if config is not None:
        command += ["--config", str(config)]
    return subprocess.run(  # noqa: S603 - fixed argument list
        [*command, *args], capture_output=True, text=True, timeout=60, env=environment, check=False
    )


def assert_clean_failure(result: subprocess.CompletedProcess[str], *phrases: str) -> None:
    """Non-zero exit, one message on stderr naming ``phrases``, nothing on stdout, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("kumoctl: "), result.stderr
    for phrase in phrases:
        assert phrase in result.stderr, result.stderr
    assert result.stdout == ""


# --- helpers ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90),
        ("45s", 45),
        ("30m", 1800),
        ("2h", 7200),
        ("1d", 86400),
        ("1h30m", 5400),
        ("1W", 604800),
    ],
)
def test_durations(text, seconds):
    assert arguments.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "10x", "m", "0", "0m", "-5", "1.5h"])
def test_bad_durations_are_rejected(text):
    with pytest.raises(argparse.ArgumentTypeError):
        arguments.parse_duration(text)


def test_options_are_json_when_they_parse_else_strings():
    assert arguments.option_pair("disk_gib=10") == ("disk_gib", 10)
    assert arguments.option_pair("nested=true") == ("nested", True)
    assert arguments.option_pair("cpu_model=host-passthrough") == ("cpu_model", "host-passthrough")
    assert arguments.option_pair("cmdline=a=b") == ("cmdline", "a=b")
    with pytest.raises(argparse.ArgumentTypeError):
        arguments.option_pair("novalue")


def test_ago():
    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert output.ago("2026-01-01T11:59:55Z", now) == "5s ago"
    assert output.ago("2026-01-01T11:58:00+00:00", now) == "2m ago"
    assert output.ago("2026-01-01T09:00:00", now) == "3h ago"
    assert output.ago(None, now) == "never"
    assert output.ago("yesterday", now) == "yesterday"


def test_every_command_and_subcommand_has_help(capsys):
    commands = {
        "token": ["create"],
        "nodes": ["list", "top", "show", "drain", "undrain", "accept", "remove"],
        "tasks": ["list", "show"],
        "instances": ["create", "list", "top", "show", "start", "stop", "delete", "checkpoint", "restore", "checkpoints",
                      "migrate", "console"],
        "logging": ["set", "unset", "show"],
        "alerts": ["list"],
        "certificate": ["create"],
    }
    for group, leaves in commands.items():
        for argv in ([group, "--help"], *([group, leaf, "--help"] for leaf in leaves)):
            with pytest.raises(SystemExit) as exit_info:
                kumoctl.main(argv)
            assert exit_info.value.code == 0, argv
            assert "usage: kumoctl" in capsys.readouterr().out


def test_usage_errors_exit_2_without_traceback():
    result = run_kumoctl("nodes", "frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr and "Traceback" not in result.stderr
    result = run_kumoctl("token", "create", "--ttl", "soon")
    assert result.returncode == 2
    assert "not a duration" in result.stderr


# --- configuration errors (no controller needed) ------------------------------------------


def test_missing_config_file(tmp_path):
    result = run_kumoctl("nodes", "list", config=tmp_path / "nope.yaml")
    assert_clean_failure(result, "nope.yaml", "does not exist")


def test_missing_config_from_the_environment(tmp_path):
    result = run_kumoctl("nodes", "list", env={"KUMOCTL_CONFIG": str(tmp_path / "env.yaml")})
    assert_clean_failure(result, "env.yaml", "$KUMOCTL_CONFIG")


def test_no_config_anywhere(tmp_path):
    result = subprocess.run(  # noqa: S603 - fixed argument list
        [sys.executable, "-m", "controller.kumoctl", "nodes", "list"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={
            "HOME": str(tmp_path),
            "PATH": os.environ["PATH"],
            "PYTHONPATH": str(Path(kumoctl.__file__).parents[2]),
        },
        check=False,
    )
    assert_clean_failure(result, "no kumoctl config found", "KUMOCTL_CONFIG")


@pytest.mark.parametrize(
    ("text", "phrase"),
    [
        ("controller: [unclosed", "invalid YAML"),
        ("- a list\n", "expected a mapping"),
        ("controller: https://h:1\nca: a\ncert: b\n", "key: expected a non-empty string"),
        ("controller: http://h:1\nca: a\ncert: b\nkey: c\n", "controller: expected an https://HOST:PORT URL or a list of them"),
        ("controller: [https://h:1, h:2]\nca: a\ncert: b\nkey: c\n", "controller[1]: expected an https://HOST:PORT URL, got 'h:2'"),
        ("controller: https://h:1\nca: a\ncert: b\nkey: c\ncolour: red\n", "unknown key 'colour'"),
        ("controller: https://h:1\nca: a\ncert: b\nkey: c\n", "ca: cannot load"),
    ],
)
def test_bad_config_files(tmp_path, text, phrase):
    config = tmp_path / "kumoctl.yaml"
    config.write_text(text)
    assert_clean_failure(run_kumoctl("nodes", "list", config=config), str(config), phrase)


# --- instance commands against a stand-in API ----------------------------------------------
# The instance flows (create and wait, console) need a node plugin doing real work; these
# tests pin what kumoctl sends and how it waits and reports, over real mutual TLS.


def _name(role: str, cn: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kumo"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
            x509.NameAttribute(NameOID.COMMON_NAME, cn),
        ]
    )


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and an admin client certificate."""
    directory = tmp_path_factory.mktemp("pki")
    now = dt.datetime.utcnow()
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("ca", "Kumo CA"))
        .issuer_name(_name("ca", "Kumo CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, role, san in (("server", "controller", True), ("admin", "admin", False)):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(role, name))
            .issuer_name(ca.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if san:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False,
            )
        (directory / f"{name}.key").write_bytes(_pem_key(key))
        (directory / f"{name}.crt").write_bytes(
            builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)
        )
    return directory


class StandIn:
    """An HTTPS API on a thread answering the instance routes from canned state."""

    def __init__(self, pki: Path):
        self.pki = pki
        self.port = free_port()
        self.requests: list[tuple[str, str, object]] = []
        self.polls: dict[str, int] = {}
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None

    def config(self, directory: Path) -> Path:
        path = directory / "kumoctl.yaml"
        path.write_text(
            f"controller: https://127.0.0.1:{self.port}\nca: {self.pki / 'ca.crt'}\n"
            f"cert: {self.pki / 'admin.crt'}\nkey: {self.pki / 'admin.key'}\n"
        )
        return path

    def task(self, task_id: str) -> dict:
        # Each task is pending twice, then ends: "fail-*" instances fail, the rest succeed.
        polls = self.polls[task_id] = self.polls.get(task_id, -1) + 1
        name, verb = task_id.split(":")
        state = "pending" if polls < 2 else "failed" if name.startswith("fail") else "succeeded"
        result = self.result(name, verb) if state == "succeeded" else {}
        error = "image checksum mismatch: expected abc, got def" if state == "failed" else None
        return {
            "id": task_id,
            "node": "n-000000000001",
            "kind": f"process.{verb}",
            "state": state,
            "result": result,
            "error": error,
            "code": "image-checksum" if error else None,
        }

    @staticmethod
    def result(name: str, verb: str) -> dict:
        """What every kind's node answers: "box*" instances are containers with a liblxc log,
        "stubborn*" ones had to be forced to stop."""
        kind = "lxc" if name.startswith("box") else "process"
        if verb == "delete":
            return {"name": name, "kind": kind, "state": "deleted"}
        if verb == "console":
            logs = {"lxc": f"lxc log of {name}\n", "empty": ""} if kind == "lxc" else {}
            if name.startswith("evil"):  # a guest that writes terminal escapes to its console
                return {"name": name, "kind": kind, "log": "\x1b]0;owned\x07\x1b[2Jhi\rover\r\n", "logs": {}}
            return {"name": name, "kind": kind, "log": f"console of {name}\nline two", "logs": logs}
        result = {"name": name, "kind": kind, "state": "stopped" if verb == "stop" else "running", "details": {}}
        if verb == "stop":
            result["forced"] = name.startswith("stubborn")
        return result

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json() if request.can_read_body else None
        self.requests.append((request.method, request.path, body))
        parts = request.path.strip("/").split("/")
        if request.path == "/v1/instances" and request.method == "POST":
            if body["name"] == "taken":
                return web.json_response(
                    {"error": "an instance named taken exists; pick another name"}, status=409
                )
            instance = {
                "name": body["name"],
                "kind": body["kind"],
                "node": "n-000000000001",
                "state": "creating",
            }
            return web.json_response(
                {"instance": instance, "task": self.task(f"{body['name']}:create")}, status=202
            )
        if request.path == "/v1/instances":
            # Two pages of one: kumoctl follows "next".
            name = "web" if "after" not in request.query else "worker"
            instance = {"name": name, "kind": "process", "node": "n-000000000001", "state": "running", "vcpus": 1,
                        "memory_mib": 64}
            return web.json_response({"instances": [instance], "next": "web" if name == "web" else None})
        if parts[:2] == ["v1", "tasks"]:
            return web.json_response(self.task(parts[2]))
        if parts[:2] == ["v1", "instances"] and len(parts) == 4:
            return web.json_response({"task": self.task(f"{parts[2]}:{parts[3]}")}, status=202)
        if parts[:2] == ["v1", "instances"] and request.method == "DELETE":
            return web.json_response({"task": self.task(f"{parts[2]}:delete")}, status=202)
        return web.json_response({"error": f"no route {request.path}"}, status=404)

    def start(self) -> None:
        context = ssl.create_default_context(
            ssl.Purpose.CLIENT_AUTH, cafile=str(self.pki / "ca.crt")
        )
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_cert_chain(str(self.pki / "server.crt"), str(self.pki / "server.key"))
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=context)
        self.loop.run_until_complete(site.start())
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture
def stand_in(pki):
    server = StandIn(pki)
    server.start()
    yield server
    server.stop()


def test_instances_create_sends_the_request_waits_and_says_where(stand_in, tmp_path):
    (tmp_path / "user-data").write_text("#cloud-config\nhostname: web\n")
    result = run_kumoctl(
        "instances",
        "create",
        "web",
        "--kind",
        "process",
        "--vcpus",
        "1",
        "--memory",
        "64",
        "--user-data",
        str(tmp_path / "user-data"),
        "--option",
        'command=["sleep", "60"]',
        "--option",
        "cwd=/tmp",
        config=stand_in.config(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "instance web (process, 1 vCPU, 64 MiB) is on node n-000000000001\n"
    method, path, body = stand_in.requests[0]
    assert (method, path) == ("POST", "/v1/instances")
    assert body == {
        "name": "web",
        "kind": "process",
        "vcpus": 1,
        "memory_mib": 64,
        "user_data": "#cloud-config\nhostname: web\n",
        "options": {"command": ["sleep", "60"], "cwd": "/tmp"},
    }
    assert [p for m, p, _ in stand_in.requests[1:]] == ["/v1/tasks/web:create"] * 2


def test_instances_create_no_wait_returns_at_once(stand_in, tmp_path):
    result = run_kumoctl(
        "instances",
        "create",
        "web",
        "--kind",
        "kvm",
        "--vcpus",
        "2",
        "--memory",
        "512",
        "--node",
        "n-000000000001",
        "--no-wait",
        config=stand_in.config(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    assert "create task web:create is pending" in result.stdout
    assert len(stand_in.requests) == 1 and stand_in.requests[0][2]["node"] == "n-000000000001"


def test_failed_task_is_an_error_with_the_plugin_message(stand_in, tmp_path):
    result = run_kumoctl(
        "instances",
        "create",
        "fail-1",
        "--kind",
        "kvm",
        "--vcpus",
        "1",
        "--memory",
        "64",
        config=stand_in.config(tmp_path),
    )
    assert_clean_failure(result, "creating fail-1", "image checksum mismatch", "[image-checksum]")


def test_controller_error_sentence_reaches_stderr(stand_in, tmp_path):
    result = run_kumoctl(
        "instances",
        "create",
        "taken",
        "--kind",
        "kvm",
        "--vcpus",
        "1",
        "--memory",
        "64",
        config=stand_in.config(tmp_path),
    )
    assert_clean_failure(result, "an instance named taken exists; pick another name (HTTP 409)")


@pytest.mark.parametrize(
    ("verb", "method"), [("start", "POST"), ("stop", "POST"), ("delete", "DELETE")]
)
def test_instance_operations_wait_for_their_task(stand_in, tmp_path, verb, method):
    result = run_kumoctl("instances", verb, "web", config=stand_in.config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"instance web {verb}")
    assert stand_in.requests[0][0] == method


def test_console_prints_the_log_from_the_task_result(stand_in, tmp_path):
    result = run_kumoctl("instances", "console", "web", config=stand_in.config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "console of web\nline two\n"


def test_console_prints_the_other_logs_after_the_console(stand_in, tmp_path):
    result = run_kumoctl("instances", "console", "box", config=stand_in.config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "console of box\nline two\n\n==> lxc log <==\nlxc log of box\n"


def test_what_guests_and_nodes_wrote_reaches_the_terminal_without_escape_sequences(stand_in, tmp_path):
    result = run_kumoctl("instances", "console", "evil", config=stand_in.config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    # A serial console's CR LF ends a line; a CR alone would overwrite it: escaped.
    assert result.stdout == "\\x1b]0;owned\\x07\\x1b[2Jhi\\x0dover\n"


def test_a_forced_stop_says_so(stand_in, tmp_path):
    result = run_kumoctl("instances", "stop", "stubborn", config=stand_in.config(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout == "instance stubborn stopped (forced: it did not stop gracefully in time)\n"
    result = run_kumoctl("instances", "stop", "web", config=stand_in.config(tmp_path))
    assert result.stdout == "instance web stopped\n"


def test_instances_list_table_and_json(stand_in, tmp_path):
    config = stand_in.config(tmp_path)
    table = run_kumoctl("instances", "list", config=config)
    assert table.returncode == 0, table.stderr
    header, row, second = table.stdout.splitlines()
    assert header.split() == ["NAME", "KIND", "NODE", "STATE", "VCPUS", "MEMORY/MIB", "IMAGE"]
    assert row.split() == ["web", "process", "n-000000000001", "running", "1", "64", "-"]
    assert second.split()[0] == "worker"  # from the second page
    assert [p for m, p, _ in stand_in.requests] == ["/v1/instances", "/v1/instances"]
    listed = run_kumoctl("instances", "list", "--output", "json", config=config)
    assert [i["name"] for i in json.loads(listed.stdout)] == ["web", "worker"]


def test_gets_move_past_a_controller_that_is_down_and_changes_do_not(stand_in, tmp_path):
    down, up = f"https://127.0.0.1:{free_port()}", f"https://127.0.0.1:{stand_in.port}"
    config = stand_in.config(tmp_path)
    config.write_text(config.read_text().replace(f"controller: {up}", f"controller: [{down}, {up}]"))
    listed = run_kumoctl("instances", "list", config=config)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[0] == "web"
    assert f"cannot connect to the controller at {down}: connection refused" in listed.stderr
    assert f"trying {up}" in listed.stderr
    # A change is not sent twice: the admin decides whether to repeat it.
    assert_clean_failure(run_kumoctl("instances", "start", "web", config=config),
                         f"cannot connect to the controller at {down}")
    assert [method for method, _, _ in stand_in.requests] == ["GET", "GET"]  # the list's two pages


def test_a_client_certificate_from_another_ca_is_refused(stand_in, tmp_path, tmp_path_factory):
    foreign = tmp_path / "foreign.key"
    key = ec.generate_private_key(ec.SECP256R1())
    foreign.write_bytes(_pem_key(key))
    now = dt.datetime.utcnow()
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("admin", "mallory"))
        .issuer_name(_name("admin", "mallory"))
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "foreign.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    config = tmp_path / "foreign.yaml"
    config.write_text(
        f"controller: https://127.0.0.1:{stand_in.port}\nca: {stand_in.pki / 'ca.crt'}\n"
        f"cert: {tmp_path / 'foreign.crt'}\nkey: {foreign}\n"
    )
    assert_clean_failure(run_kumoctl("instances", "list", config=config), "refused the TLS session")


def test_top_shows_what_is_used_beside_what_is_reserved_sorted():
    from controller.kumoctl import top

    nodes = [
        {"id": "n-a", "state": "ready", "facts": {"cpus": 2, "vcpu_overcommit": 4.0, "memory_bytes": 4 << 30},
         "instances": [{"name": "web"}], "usage": {
             "node": {"cpu_busy": 0.2, "load1": 0.5, "memory_used_bytes": 1 << 30, "memory_total_bytes": 4 << 30},
             "instances": {"web": {"kind": "process", "cpu_cores": 0.25, "memory_bytes": 64 << 20}}}},
        {"id": "n-b", "state": "ready", "facts": {"cpus": 2, "vcpu_overcommit": 4.0, "memory_bytes": 4 << 30},
         "instances": [], "usage": {"node": {"cpu_busy": 0.9, "load1": 1.9, "memory_used_bytes": 3 << 30,
                                             "memory_total_bytes": 4 << 30}, "instances": {}}},
        {"id": "n-c", "state": "unreachable", "facts": {}, "instances": []},
    ]
    instances = [{"name": "web", "kind": "process", "node": "n-a", "state": "running", "vcpus": 2, "memory_mib": 128},
                 {"name": "db", "kind": "lxc", "node": "n-b", "state": "creating", "vcpus": 1, "memory_mib": 256}]
    rows = top.node_rows(nodes, instances)
    assert [(r["node"], r["vcpus_reserved"], r["vcpus_capacity"]) for r in rows] == [
        ("n-a", 2, 8.0), ("n-b", 1, 8.0), ("n-c", 0, None)]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        top.print_nodes(rows, "cpu")
    lines = buffer.getvalue().splitlines()
    assert lines[0].split()[:3] == ["NODE", "STATE", "CPU"]
    assert [line.split()[0] for line in lines[1:]] == ["n-b", "n-a", "n-c"]  # busiest first, unmeasured last
    assert lines[2].split()[2:] == ["20%", "0.50", "1024", "/", "4096", "2", "/", "8", "1"]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        top.print_instances(top.instance_rows(nodes, instances), "cpu")
    assert [line.split()[:1] + line.split()[4:] for line in buffer.getvalue().splitlines()[1:]] == [
        ["web", "0.25", "/", "2", "64", "/", "128"], ["db", "-", "/", "1", "-", "/", "256"]]
