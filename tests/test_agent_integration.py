"""The real agent (``kumo-agent`` subprocesses) against the real controller process and real TLS."""

from __future__ import annotations

import datetime
import json
import re
import signal
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.enroll import cert_validity
from tests.harness import free_port
from tests.harness.agents import agent_command, join_agent, wait_for, write_plugin_distribution

pytestmark = pytest.mark.integration

# A third-party plugin, installed through a real entry point (a *.dist-info on PYTHONPATH).
# Its task appends a line to a file, so a test can count how often a task really ran.
COUNTER_PLUGIN = '''
"""Test plugin: counter.append appends payload["line"] to the configured file."""
import asyncio
import dataclasses
import os

from agent.sdk import Fingerprint, TaskError, hookimpl, parse_section


@dataclasses.dataclass
class Settings:
    output: str


class CounterPlugin:
    settings = None

    @hookimpl
    def kumo_configure(self, section, source):
        self.settings = parse_section(Settings, section, source)

    @hookimpl
    def kumo_fingerprint(self):
        return Fingerprint(True, attributes={"counter": True})

    @hookimpl
    def kumo_task_kinds(self):
        return ["counter.append"]

    @hookimpl
    async def kumo_handle_task(self, kind, payload, task_id):
        release = payload.get("wait_for")
        while release and not os.path.exists(release):
            await asyncio.sleep(0.1)
        if payload.get("fail"):
            raise TaskError("asked to fail: " + payload["line"], code="bad-request")
        await asyncio.to_thread(self._append, payload["line"])
        return {"line": payload["line"]}

    def _append(self, line):
        with open(self.settings.output, "a") as f:
            f.write(line + "\\n")
'''


@pytest.fixture
def counter(tmp_path):
    """(pythonpath, plugins section, output file) for the counter plugin."""
    site = write_plugin_distribution(tmp_path / "site", "counter", COUNTER_PLUGIN, "kumo_counter:CounterPlugin")
    output = tmp_path / "counted.txt"
    return [site], {"counter": {"output": str(output)}}, output


def wait_task(controller, task_id: str, timeout: float = 60.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        task = controller.admin("GET", f"/v1/tasks/{task_id}")
        if task["state"] in ("succeeded", "failed"):
            return task
        time.sleep(0.2)
    raise AssertionError(f"task {task_id} not finished: {task}")


def submit(controller, node: str, kind: str, payload: dict, key: str | None = None) -> dict:
    body = {"node": node, "kind": kind, "payload": payload}
    if key:
        body["idempotency_key"] = key
    return controller.admin("POST", "/v1/tasks", body)


def test_join_then_run_makes_a_ready_node(controller, kumo_agent):
    agent = kumo_agent()
    node = agent.wait_ready()
    assert re.fullmatch(r"n-[0-9a-f]{12}", agent.node_id)
    # The node's facts come from the agent core, whatever plugins it runs.
    assert "host" not in node["plugins"]
    assert node["facts"]["vcpu_overcommit"] == 4.0
    assert node["facts"]["cpus"] >= 1 and node["facts"]["memory_bytes"] > 0
    assert isinstance(node["facts"]["kvm_device"], bool)
    assert (agent.state_dir / "node.key").stat().st_mode & 0o777 == 0o600
    assert (agent.state_dir / "plugins" / "process").stat().st_mode & 0o777 == 0o700
    assert "connected as node" in agent.log_text()
    # Heartbeats carry what the node measures; kumoctl shows it beside the reservations.
    usage = wait_for(lambda: agent.node().get("usage"), "a heartbeat with usage")
    assert 0 <= usage["node"]["cpu_busy"] <= 1 and usage["node"]["memory_total_bytes"] > 0
    from tests.test_instances import kumoctl

    shown = kumoctl(controller, "nodes", "show", agent.node_id).stdout
    assert re.search(r"usage:\s+CPU \d+% busy, [\d.]+ of [\d.]+ GiB used, load", shown), shown
    table = kumoctl(controller, "nodes", "top", "--sort", "memory").stdout.splitlines()
    assert re.match(rf"{agent.node_id}\s+ready\s+\d+%\s+[\d.]+\s+\d+ / \d+\s+0 / ", table[1]), table


def test_join_refuses_a_ca_hash_mismatch_before_sending_the_token(controller, tmp_path):
    join = controller.admin("POST", "/v1/tokens", {"ttl_seconds": 600, "uses": 1})["join"]
    prefix, port, token, ca_hash, urls = join.split(":", 4)
    wrong = ("0" if ca_hash[0] != "0" else "1") + ca_hash[1:]
    state = tmp_path / "state"
    refused = subprocess.run(  # noqa: S603
        [*agent_command(), "join", "--token", f"{prefix}:{port}:{token}:{wrong}:{urls}", "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert refused.returncode != 0
    assert "refusing to join" in refused.stderr and "token was NOT sent" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert not (state / "node.key").exists() and not (state / "join.json").exists()
    # The single-use token is still unused: the controller never saw it.
    accepted = subprocess.run(  # noqa: S603
        [*agent_command(), "join", "--token", join, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert accepted.returncode == 0, accepted.stderr
    # An identity is never silently replaced.
    again = join_agent(controller, state)
    assert again.returncode != 0 and "--force" in again.stderr


def test_join_tries_controller_first_then_the_listed_ones_and_records_them_all(controller, tmp_path):
    join = controller.admin("POST", "/v1/tokens", {"ttl_seconds": 600, "uses": 1})["join"]
    nobody = f"https://127.0.0.1:{free_port()}"
    state = tmp_path / "state"
    joined = subprocess.run(  # noqa: S603
        [*agent_command(), "join", "--controller", nobody, "--token", join, "--state-dir", str(state)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert joined.returncode == 0, joined.stderr
    assert json.loads((state / "join.json").read_text())["controllers"] == [nobody, controller.url]


@pytest.mark.reliability("agent on two controllers", "its controller stopped")
def test_agent_moves_to_another_controller_with_its_identity_and_tasks(controller_factory, postgres, kumo_agent, counter,
                                                                       tmp_path):
    site, plugins, output = counter
    first = controller_factory(init_args=["--database", postgres.database()])
    second = controller_factory(share_with=first)
    agent = kumo_agent(controller=first, plugins=plugins, pythonpath=site, start=False)
    # The join string named both controllers: the one that made the token first.
    assert json.loads((agent.state_dir / "join.json").read_text())["controllers"] == [first.url, second.url]
    config = yaml.safe_load(agent.config_path.read_text())
    agent.config_path.write_text(yaml.safe_dump({**config, "controller": [first.url, second.url]}))
    agent.start()
    release = tmp_path / "release"
    running = submit(first, agent.node_id, "counter.append", {"line": "across", "wait_for": str(release)}, key="k-across")
    agent.wait_log("running on plugin counter")
    first.kill()
    agent.wait_log(f"controller {second.url}: connected as node")
    agent.controller = second
    agent.wait_ready(since=time.time())  # heartbeats reach the second controller
    # The task delivered by the dead controller kept running; its result reaches the other.
    release.touch()
    done = wait_task(second, running["id"])
    assert (done["state"], done["result"]) == ("succeeded", {"line": "across"}), done
    assert wait_task(second, submit(second, agent.node_id, "counter.append", {"line": "on-b"})["id"])["state"] == "succeeded"
    assert output.read_text().splitlines() == ["across", "on-b"]
    log = agent.log_text()
    assert log.count("unreachable (") == 1, log
    assert f"controller {first.url} unreachable (" in log and f"); using {second.url}" in log, log
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
    assert f'kumo_agent_controller{{url="{second.url}"}} 1.0' in metrics
    assert f'kumo_agent_controller{{url="{first.url}"}} 0.0' in metrics


def test_malformed_join_string_is_a_clear_error(tmp_path):
    result = subprocess.run(  # noqa: S603
        [*agent_command(), "join", "--token", "kumo2:x", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert result.returncode != 0
    assert "malformed join string" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "text, expected",
    [
        ("state_dir: /x\nplugins: [\n", r"{p}: line \d+, column \d+: invalid YAML"),
        ("state_dir: /x\nmetrcs: {}\n", r"{p}: metrcs: unknown key \(allowed keys: "),
        ("plugins:\n  kvmm: {uri: 'qemu:///system'}\n", r"{p}: plugins.kvmm: no plugin named 'kvmm' is installed \(installed plugins: .*process"),
        ("plugins:\n  counter: {}\n", r"{p}: plugins.counter.output: required key is missing"),
    ],
)
def test_config_errors_stop_the_agent_naming_file_and_key(tmp_path, counter, text, expected):
    site, _, _ = counter
    config = tmp_path / "agent.yaml"
    config.write_text(text)
    env = {"PYTHONPATH": f"{site[0]}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(  # noqa: S603
        [*agent_command(), "run", "--config", str(config)], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode != 0
    assert re.search(expected.format(p=re.escape(str(config))), result.stderr), result.stderr
    assert "Traceback" not in result.stderr


def test_run_before_join_says_how_to_join(tmp_path):
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path / "empty"), "metrics": {"listen": None}}))
    result = subprocess.run(  # noqa: S603
        [*agent_command(), "run", "--config", str(config)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 2
    assert "holds no node identity: run `kumo-agent join" in result.stderr
    assert "Traceback" not in result.stderr


def test_plugins_command_lists_builtin_and_third_party_plugins(tmp_path, counter):
    site, plugins, _ = counter
    config = tmp_path / "agent.yaml"
    config.write_text(json.dumps({"state_dir": str(tmp_path), "plugins": plugins}))
    env = {"PYTHONPATH": f"{site[0]}:{Path(__file__).resolve().parents[1]}", "PATH": "/usr/bin:/bin"}
    result = subprocess.run(  # noqa: S603
        [*agent_command(), "plugins", "--config", str(config), "--output", "json"],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)["plugins"]}
    assert rows["counter"]["available"] is True and rows["counter"]["task_kinds"] == ["counter.append"]
    assert rows["process"]["available"] is True and "process.create" in rows["process"]["task_kinds"]
    assert "host" not in rows


def test_tasks_run_on_their_plugin_and_failures_carry_the_message(controller, kumo_agent, counter):
    site, plugins, output = counter
    agent = kumo_agent(plugins=plugins, pythonpath=site)
    assert agent.node()["plugins"]["counter"]["available"] is True
    ok = wait_task(controller, submit(controller, agent.node_id, "counter.append", {"line": "one"})["id"])
    assert ok["state"] == "succeeded" and ok["result"] == {"line": "one"}
    failed = wait_task(controller, submit(controller, agent.node_id, "counter.append", {"line": "two", "fail": True})["id"])
    assert (failed["state"], failed["code"]) == ("failed", "bad-request")
    assert failed["error"] == "asked to fail: two"
    unknown = wait_task(controller, submit(controller, agent.node_id, "nosuch.thing", {})["id"])
    assert unknown["state"] == "failed"
    assert unknown["error"].startswith("no plugin on this node handles task kind nosuch.thing; installed plugins: ")
    assert "counter" in unknown["error"] and "process" in unknown["error"]
    assert output.read_text() == "one\n"
    # Tasks run side by side: two blocked tasks are both running before either finishes.
    release = output.with_name("release")
    both = [submit(controller, agent.node_id, "counter.append", {"line": n, "wait_for": str(release)}) for n in ("a", "b")]
    agent.wait_log("running on plugin counter", count=4)
    release.touch()
    assert [wait_task(controller, t["id"])["state"] for t in both] == ["succeeded", "succeeded"]


def test_restarted_agent_keeps_its_node_id_and_stays_ready(controller, kumo_agent):
    agent = kumo_agent()
    node_id = agent.node_id
    agent.restart()
    assert json.loads((agent.state_dir / "join.json").read_text())["node_id"] == node_id
    assert agent.wait_ready()["id"] == node_id
    assert agent.log_text().count("connected as node") == 2


@pytest.mark.reliability("task delivery", "controller kill -9 with tasks queued")
def test_controller_crash_backoff_and_delivery_of_queued_tasks_once_each(controller, kumo_agent, counter):
    site, plugins, output = counter
    agent = kumo_agent(plugins=plugins, pythonpath=site)
    agent.stop()
    queued = [submit(controller, agent.node_id, "counter.append", {"line": f"q{i}"}, key=f"k-{i}") for i in range(4)]
    controller.kill()
    agent.start(wait_ready=False)
    # Several attempts, spaced further and further apart, but the state change is logged once.
    agent.wait_log("controller: next attempt in", count=5)
    controller.start()
    agent.wait_log("connected as node", count=2)
    for task in queued:
        assert wait_task(controller, task["id"])["state"] == "succeeded"
    assert sorted(output.read_text().splitlines()) == ["q0", "q1", "q2", "q3"]
    log = agent.log_text()
    assert log.count("unreachable (") == 1, log
    delays = [float(d) for d in re.findall(r"next attempt in ([\d.]+) s", log)]
    assert max(delays[3:]) > max(delays[:1]), delays


@pytest.mark.reliability("task execution", "agent stopped mid-task")
def test_task_cut_off_by_a_stop_is_reported_interrupted_not_rerun(controller, kumo_agent, counter, tmp_path):
    site, plugins, output = counter
    agent = kumo_agent(plugins=plugins, pythonpath=site, settings={"tasks": {"shutdown_grace": 0.5}})
    release = tmp_path / "release"
    task = submit(controller, agent.node_id, "counter.append", {"line": "cut", "wait_for": str(release)})
    agent.wait_log("running on plugin counter")
    agent.restart()
    done = wait_task(controller, task["id"])
    assert (done["state"], done["code"]) == ("failed", "interrupted"), done
    assert "outcome is unknown" in done["error"]
    assert not output.exists()


@pytest.mark.reliability("task execution", "result lost on the way back, task redelivered")
def test_redelivered_task_is_answered_from_the_journal(controller, kumo_agent, counter, tmp_path):
    site, plugins, output = counter
    agent = kumo_agent(plugins=plugins, pythonpath=site)
    release = tmp_path / "release"
    task = submit(controller, agent.node_id, "counter.append", {"line": "once", "wait_for": str(release)}, key="k-once")
    agent.wait_log("running on plugin counter")
    # The controller dies while the task runs; the task finishes and its result is journalled
    # but cannot be reported; then the agent crashes too.
    controller.kill()
    agent.wait_log("unreachable (")
    release.write_text("go")
    journal = agent.state_dir / "tasks.journal"
    deadline = time.monotonic() + 30
    while '"event": "done"' not in (journal.read_text() if journal.exists() else ""):
        assert time.monotonic() < deadline, agent.log_tail()
        time.sleep(0.1)
    agent.kill()
    # Both come back: registration puts the delivered task back to pending, it is delivered
    # again, and the journal answers it: the plugin does not run it a second time.
    controller.start()
    agent.start()
    agent.wait_log("already ran; reporting the journalled result")
    done = wait_task(controller, task["id"])
    assert (done["state"], done["result"]) == ("succeeded", {"line": "once"})
    assert output.read_text() == "once\n"


def test_removed_node_stops_the_agent(controller, kumo_agent):
    agent = kumo_agent()
    controller.admin("DELETE", f"/v1/nodes/{agent.node_id}")
    assert agent.proc.wait(60) == 3
    assert "refused node" in agent.log_text() and "Re-join" in agent.log_text()


@pytest.mark.slow
def test_short_lived_certificate_is_renewed_without_a_token(controller_factory, kumo_agent):
    # Renewed two thirds into its life (about 8 s): time enough to start and register first.
    agent = kumo_agent(controller=controller_factory(node_cert_ttl=12))
    first = x509.load_pem_x509_certificate((agent.state_dir / "node.crt").read_bytes())
    agent.wait_log("renewed the node certificate", timeout=60)
    renewed = x509.load_pem_x509_certificate((agent.state_dir / "node.crt").read_bytes())
    assert renewed.serial_number != first.serial_number
    assert (agent.state_dir / "node.key").stat().st_mode & 0o777 == 0o600
    # Still accepted after the first certificate expired: the session uses the new one.
    expiry = cert_validity(first)[1].timestamp()
    while time.time() < expiry + 2:
        time.sleep(1)
    agent.wait_ready(since=expiry + 1)
    assert "unreachable (" not in agent.log_text()


def _scraper_pki(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A scraper CA and a client certificate it signed: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "scrapers")])

    def cert(subject, key, ca):
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )

    key = ec.generate_private_key(ec.SECP256R1())
    pem = serialization.Encoding.PEM
    paths = tmp_path / "scraper-ca.crt", tmp_path / "scraper.crt", tmp_path / "scraper.key"
    paths[0].write_bytes(cert(ca_name, ca_key, True).public_bytes(pem))
    paths[1].write_bytes(cert(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "prometheus")]), key, False).public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return paths


def test_metrics_plain_and_behind_client_certificates(controller, kumo_agent, tmp_path):
    agent = kumo_agent()
    body = urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10).read().decode()
    assert "kumo_agent_controller_connected 1.0" in body
    assert 'kumo_agent_plugin_available{plugin="process"} 1.0' in body
    # One by-state family for every kind, zeros included.
    assert 'kumo_instances{kind="process",state="running"} 0.0' in body
    assert "kumo_process_instances" not in body and "kumo_kvm_instances" not in body
    assert "kumo_agent_heartbeat_duration_seconds_bucket" in body or "kumo_agent_heartbeat_duration_seconds_count" in body
    agent.stop()

    ca, cert, key = _scraper_pki(tmp_path)
    port = free_port()
    text = agent.config_path.read_text().replace(f"127.0.0.1:{agent.metrics_port}", f"127.0.0.1:{port}")
    agent.config_path.write_text(text.replace("metrics:\n", f"metrics:\n  client_ca: {ca}\n"))
    agent.start()
    ctx = ssl.create_default_context(cafile=str(agent.state_dir / "ca.crt"))
    ctx.check_hostname = False  # the node certificate names the node id, not 127.0.0.1
    with pytest.raises((ssl.SSLError, ConnectionError, urllib.error.URLError)):
        urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx).read()
    ctx.load_cert_chain(cert, key)
    body = urllib.request.urlopen(f"https://127.0.0.1:{port}/metrics", timeout=10, context=ctx).read().decode()
    assert "kumo_agent_tasks_total" in body or "# HELP kumo_agent_tasks_total" in body
    assert "kumo_agent_controller_connected" in body


def test_sigterm_stops_cleanly_with_exit_zero(controller, kumo_agent):
    agent = kumo_agent()
    agent.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait(30) == 0
    assert "stopped (exit 0)" in agent.log_text()
