"""Faults injected into a real agent and controller: the agent's state directory full, the
network between them cut, and cut for longer than the node certificate lasts.

Each test mounts or cuts something real (a tmpfs, a network namespace) and undoes it in
teardown whatever happened, so a failed test leaves no mount or namespace behind.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import shlex
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.harness import read_counter
from tests.harness.agents import AgentProcess, agent_command, join_agent, running_on, wait_for
from tests.test_agent_integration import submit, wait_task

pytestmark = pytest.mark.integration


def counter_command(path: Path) -> list[str]:
    """A workload that counts into ``path`` ten times a second, for as long as it runs."""
    return ["sh", "-c", f"i=0; while :; do i=$((i+1)); echo $i > {shlex.quote(str(path))}; sleep 0.1; done"]


def create_process(controller: Any, agent: AgentProcess, name: str, command: list[str]) -> dict[str, Any]:
    return wait_task(controller, submit(controller, agent.node_id, "process.create",
                                        {"name": name, "kind": "process", "options": {"command": command}})["id"])


def counting(path: Path) -> bool:
    """Whether the workload counting into ``path`` still counts."""
    before = read_counter(path)
    return bool(wait_for(lambda: read_counter(path) > before, f"{path} to count on", limit=30))


@pytest.fixture
def workloads(tmp_path: Path) -> Iterator[Path]:
    """A directory for the test's workloads' files; whatever still runs with it on its command
    line is killed at teardown (process instances outlive their agent by design)."""
    directory = tmp_path / "workloads"
    directory.mkdir()
    yield directory
    for proc in psutil.process_iter(["cmdline"]):
        if any(str(directory) in arg for arg in proc.info["cmdline"] or ()):
            with contextlib.suppress(psutil.Error):
                proc.kill()


# -- the state directory full ---------------------------------------------------------------


@pytest.fixture
def small_state_dir() -> Iterator[Callable[[AgentProcess], None]]:
    """``move(agent)``: put a joined, stopped agent's state directory on a 4 MiB tmpfs of its own
    (its files copied over). Every mount is lazily unmounted at teardown, busy or not."""
    mounted: list[Path] = []

    def move(agent: AgentProcess) -> None:
        saved = agent.workdir / "state-before-tmpfs"
        shutil.copytree(agent.state_dir, saved)
        subprocess.run(  # noqa: S603 - fixed argument list
            ["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "kumo-test-state", str(agent.state_dir)],
            check=True, capture_output=True)
        mounted.append(agent.state_dir)
        shutil.copytree(saved, agent.state_dir, dirs_exist_ok=True)

    yield move
    for path in mounted:
        subprocess.run(["umount", "--lazy", str(path)], check=False, capture_output=True)  # noqa: S603 - fixed list


def fill(directory: Path) -> Path:
    """Write zeros into ``directory/filler`` until the filesystem has no room left."""
    filler = directory / "filler"
    with filler.open("wb") as f:
        try:
            while True:
                f.write(bytes(1 << 16))
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def assert_nothing_half_written(state_dir: Path) -> None:
    """No temporary file left, every journal line whole, every record whole JSON."""
    leftovers = [p for p in state_dir.rglob("*") if ".tmp-" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"
    for line in (state_dir / "tasks.journal").read_text().splitlines():
        json.loads(line)
    for record in state_dir.rglob("record.json"):
        json.loads(record.read_text())
    key = serialization.load_pem_private_key((state_dir / "node.key").read_bytes(), password=None)
    cert = x509.load_pem_x509_certificate((state_dir / "node.crt").read_bytes())
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki), "node.key and node.crt differ"


@pytest.mark.reliability("process create and certificate renewal, agent state directory",
                         "state directory full (4 MiB tmpfs)")
def test_a_full_state_directory_fails_tasks_clearly_and_the_agent_recovers(
        controller_factory, kumo_agent, small_state_dir, workloads):
    """Certificates last 12 s here, so a renewal (due at two thirds) meets the full disk too."""
    controller = controller_factory(node_cert_ttl=12)
    agent = kumo_agent(start=False, controller=controller)
    small_state_dir(agent)
    agent.start()
    assert create_process(controller, agent, "before", counter_command(workloads / "before"))["state"] == "succeeded"

    filler = fill(agent.state_dir)
    failed = create_process(controller, agent, "during", counter_command(workloads / "during"))
    assert (failed["state"], failed["code"]) == ("failed", "no-space"), failed
    assert f"cannot write {agent.state_dir}/" in failed["error"] and "free space there" in failed["error"], failed
    # Not started, or killed when its record could not be written: nothing runs unrecorded.
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(workloads / "during") in " ".join(p.info["cmdline"] or ())]
    assert running_on(agent, "during") is None
    assert counting(workloads / "before")
    agent.wait_log("certificate renewal: cannot write", timeout=30)
    assert agent.node()["state"] == "ready"
    assert_nothing_half_written(agent.state_dir)

    renewed = agent.log_text().count("renewed the node certificate")
    filler.unlink()
    agent.wait_log("renewed the node certificate", timeout=30, count=renewed + 1)
    assert create_process(controller, agent, "after", counter_command(workloads / "after"))["state"] == "succeeded"
    agent.restart()  # nothing lost: both instances are adopted from their records, still counting
    wait_for(lambda: running_on(agent, "before") and running_on(agent, "after"), "both instances adopted")
    assert counting(workloads / "before") and counting(workloads / "after")
    assert "Traceback" not in agent.log_text()
    assert_nothing_half_written(agent.state_dir)


# -- a network partition ----------------------------------------------------------------------


def scrape(agent: AgentProcess) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{agent.metrics_port}/metrics", timeout=10) as answer:  # noqa: S310
        return answer.read().decode()


def alert_check(directory: Path) -> tuple[Path, Path]:
    """(a check script, the flag file that makes it report CRITICAL while it exists)."""
    flag, check = directory / "broken", directory / "check_flag"
    check.write_text(f'#!/bin/sh\nif [ -e {flag} ]; then echo "FLAG CRITICAL"; exit 2; fi\necho "FLAG OK"\n')
    check.chmod(0o755)
    return check, flag


@pytest.mark.reliability("agent with a workload, a task queued, an alert firing",
                         "network partition to the controller (iptables DROP)")
def test_a_partitioned_node_keeps_working_alerts_locally_and_runs_queued_tasks_once_after(
        controller, kumo_agent, network_partition, workloads):
    """The partition is held until the controller lists the node unreachable (3 heartbeats of
    1 s missed), the agent has given up on its session (``controller_timeout: 3``, the long
    poll's 5 s wait on top) and a re-registration has failed too: it outlasts every timeout
    on both sides, as a partition of minutes does with the default intervals (10 s heartbeats,
    30 s polls, 20 s request timeout), in about 15 s."""
    partition = network_partition(controller)
    check, flag = alert_check(workloads)
    agent = kumo_agent(settings={"controller": partition.url, "controller_timeout": 3}, plugins={"monitoring": {
        "default_probes": False,
        "probes": [{"name": "flag", "type": "command", "interval": 0.5, "command": [str(check)]}],
        "rules": [{"name": "flag-set", "probe": "flag", "status": "critical", "for": 1}],
    }})
    assert create_process(controller, agent, "worker", counter_command(workloads / "worker"))["state"] == "succeeded"

    partition.cut()
    wait_for(lambda: agent.node()["state"] == "unreachable", "the controller to see the node unreachable")
    queued = submit(controller, agent.node_id, "process.create",
                    {"name": "queued", "kind": "process", "options": {"command": counter_command(workloads / "queued")}})
    flag.touch()
    # The alert fires on the node with no controller to tell: it waits in the outbox.
    wait_for(lambda: 'kumo_alerts_firing{rule="flag-set"} 1.0' in (text := scrape(agent))
             and "kumo_alert_outbox_transitions 1.0" in text, "the alert to fire locally", limit=30)
    agent.wait_log(f"controller {partition.url} unreachable (", timeout=30)
    agent.wait_log("controller: next attempt in", timeout=30, count=2)
    assert counting(workloads / "worker")
    # Likely handed to a long poll the partition had already cut: "delivered" into the void
    # until the node registers again, which puts it back in the queue.
    assert controller.admin("GET", f"/v1/tasks/{queued['id']}")["state"] in ("pending", "delivered")

    partition.heal()
    done = wait_task(controller, queued["id"], timeout=90)
    assert done["state"] == "succeeded", done
    agent.wait_ready()
    assert counting(workloads / "queued") and counting(workloads / "worker")
    alerts = wait_for(lambda: controller.admin("GET", "/v1/alerts")["alerts"], "the alert to reach the controller")
    assert [(a["rule"], a["state"], a["node"]) for a in alerts] == [("flag-set", "firing", agent.node_id)]
    # Once each: one queued process, one run in the journal, one alert transition stored.
    assert len([p for p in psutil.process_iter(["cmdline"])
                if str(workloads / "queued") in " ".join(p.info["cmdline"] or ())]) == 1
    journal = [json.loads(line) for line in (agent.state_dir / "tasks.journal").read_text().splitlines()]
    assert [e["event"] for e in journal if e["task_id"] == queued["id"]] == ["started", "done"]
    assert len(controller.sql("SELECT id FROM alerts")) == 1


# -- a partition longer than the node certificate's lifetime -----------------------------------


@pytest.mark.reliability("agent with a workload and a queued task",
                         "partition longer than the node certificate's lifetime, then a re-join")
def test_a_node_whose_certificate_expired_in_a_partition_joins_again_as_itself(
        controller_factory, kumo_agent, network_partition, workloads):
    """Certificates last 12 s here (``node_cert_ttl``), so the renewal due at two thirds of
    that falls inside the partition, which lasts until the certificate has expired: what a
    partition longer than a day does with the default lifetime."""
    controller = controller_factory(node_cert_ttl=12)
    partition = network_partition(controller)
    agent = kumo_agent(controller=controller, settings={"controller": partition.url, "controller_timeout": 3})
    assert create_process(controller, agent, "worker", counter_command(workloads / "worker"))["state"] == "succeeded"

    partition.cut()
    agent.wait_log("the node certificate expired", timeout=60)
    queued = submit(controller, agent.node_id, "process.create",
                    {"name": "queued", "kind": "process", "options": {"command": counter_command(workloads / "queued")}})
    attempts = agent.log_text().count("controller: next attempt in")
    partition.heal()
    # Locked out (the controller refuses the expired certificate in the handshake), but still
    # running, trying again with backoff rather than spinning, having said once what to do;
    # the workload never noticed.
    agent.wait_log("controller: next attempt in", count=attempts + 2)
    assert agent.proc is not None and agent.proc.poll() is None
    assert agent.log_text().count("the node certificate expired") == 1
    assert "run `kumo-agent join --force --token JOIN` here and restart the agent" in agent.log_text()
    status = subprocess.run([*agent_command(), "status", "--state-dir", str(agent.state_dir)],  # noqa: S603
                            capture_output=True, text=True, env=agent.env, check=False)
    assert status.returncode == 1 and "certificate  EXPIRED at" in status.stdout, status
    assert "run `kumo-agent join --force --token JOIN` here and restart the agent" in status.stdout
    assert counting(workloads / "worker")
    assert agent.node()["state"] == "unreachable"

    joined = join_agent(controller, agent.state_dir, agent.env, force=True)
    assert joined.returncode == 0 and f"joined as node {agent.node_id};" in joined.stdout, joined.stderr
    agent.restart()
    assert [node["id"] for node in controller.admin("GET", "/v1/nodes")["nodes"]] == [agent.node_id]
    assert running_on(agent, "worker") and counting(workloads / "worker")
    assert wait_task(controller, queued["id"])["state"] == "succeeded"
    assert counting(workloads / "queued")
    assert (agent.state_dir / "node.key").stat().st_mode & 0o777 == 0o600
    status = subprocess.run([*agent_command(), "status", "--state-dir", str(agent.state_dir), "--output", "json"],  # noqa: S603
                            capture_output=True, text=True, env=agent.env, check=False)
    assert status.returncode == 0 and json.loads(status.stdout)["node_id"] == agent.node_id, status


def test_only_the_holder_of_a_node_key_joins_again_as_that_node_and_a_removed_node_never(controller, tmp_path):
    """What a token holder, or a compromised node, could try with ``previous``: another node's
    certificate without its key, a proof replayed with another token, a certificate from
    another CA, an admin's certificate; and a removed node coming back. Each is refused."""
    from agent.enroll import rejoin_proof
    from controller.pki import CertificateAuthority
    from tests.test_controller import csr_for, enroll_node, token

    node_id, (cert_path, key_path) = enroll_node(controller, tmp_path)
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)

    def rejoin(proof_key: Any, proof_cert: Any, signed_token: str | None = None) -> tuple[int, Any]:
        new_key = ec.generate_private_key(ec.SECP256R1())
        csr, spent = csr_for(new_key), token(controller)
        return controller.call("POST", "/v1/enroll", {
            "token": spent, "csr": csr, "hostname": "h1",
            "previous": rejoin_proof(proof_key, proof_cert, signed_token or spent, csr),
        }, port=controller.enroll_port)

    status, answer = rejoin(ec.generate_private_key(ec.SECP256R1()), cert)
    assert (status, answer["error"]) == (403, f"previous.signature was not made with node {node_id}'s key over "
                                              "this token and CSR")
    assert rejoin(key, cert, signed_token=token(controller))[0] == 403
    foreign = CertificateAuthority.create("Not Kumo")
    forged = foreign.issue_node(key.public_key(), node_id, datetime.timedelta(hours=1), None)
    assert rejoin(key, forged)[1]["error"] == "previous.certificate was not issued by this controller's CA"
    admin = x509.load_pem_x509_certificate(controller.admin_cert[0].read_bytes())
    admin_key = serialization.load_pem_private_key(controller.admin_cert[1].read_bytes(), password=None)
    assert rejoin(admin_key, admin)[1]["error"] == "previous.certificate is not a node's certificate (its role: admin)"

    status, answer = rejoin(key, cert)
    assert (status, answer["node_id"]) == (201, node_id), answer
    controller.admin("DELETE", f"/v1/nodes/{node_id}")
    status, answer = rejoin(key, cert)
    assert status == 403 and answer["error"].startswith(f"node {node_id} was removed, for good"), answer
    assert [n["id"] for n in controller.admin("GET", "/v1/nodes")["nodes"] if n["state"] != "removed"] == []


# -- the controller killed during an enrollment ----------------------------------------------


@pytest.mark.reliability("enrollment (kumo-agent join)",
                         "controller kill -9 as the request reaches it; and once it committed, its answer dropped")
def test_a_join_cut_by_a_controller_kill_ends_with_its_one_node_and_the_agent_runs(controller, kumo_agent):
    """A proxy on the enrollment port kills the controller mid-enrollment and restarts it
    before the agent's connection ends. Whether or not the controller had committed, the
    agent's own retry (same token, same key) ends with one node per agent, its own."""
    from tests.harness.enrollcut import EnrollmentCutter

    def crash() -> None:
        controller.kill()
        controller.start()

    agents = {}
    for at in ("request", "answer"):
        with EnrollmentCutter(controller.enroll_port, at, crash) as cutter:
            agents[at] = kumo_agent(controller=controller, enroll_port=cutter.port, start=False)
        assert cutter.fired.is_set(), at
        stderr = agents[at].join_stderr
        assert "no answer to the enrollment request" in stderr and "trying again in 1 s with the same token and key" in stderr, stderr
    ids = {agent.node_id for agent in agents.values()}
    assert len(ids) == 2 and {node["id"] for node in controller.admin("GET", "/v1/nodes")["nodes"]} == ids
    assert {row["node_id"] for row in controller.sql("SELECT node_id FROM certificates")} == ids
    assert [row["uses_left"] for row in controller.sql("SELECT uses_left FROM tokens")] == [0, 0]
    for agent in agents.values():
        assert not (agent.state_dir / "node.key.pending").exists()
        assert (agent.state_dir / "node.key").stat().st_mode & 0o777 == 0o600
    # The worst case: the node was committed and its answer never came. Its agent runs.
    agents["answer"].start()
    assert agents["answer"].node()["state"] == "ready"
