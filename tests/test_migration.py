"""Checkpoint, restore and migration through the controller, with real CRIU and two real agents
on this machine (each its own state dir): a counter moves and keeps counting, blockers refuse
early, a failed restore on the destination leaves it running on the source, kumoctl shows the
progress and drain moves what can move."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

from tests.harness import read_counter
from tests.harness.agents import reported, running_on, wait_for
from tests.harness.criu import SBIN_PATH
from tests.test_checkpoint import COUNTER as STEADY_COUNTER

pytestmark = pytest.mark.integration

PY = "/usr/bin/python3"
# argv: the file it counts into, and optionally MiB of memory to hold (a bigger image).
COUNTER = """
import sys, time
ballast = bytearray(b"\\x01") * (int(sys.argv[2]) << 20) if len(sys.argv) > 2 else b""
i = 0
while True:
    i += 1
    with open(sys.argv[1], "w") as f:
        f.write(str(i))
    time.sleep(0.05)
"""
CONNECTED = """
import socket, sys, time
conn = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
while True:
    time.sleep(0.1)
"""


@pytest.fixture
def cluster(criu_required, controller, kumo_agent, tmp_path):
    """Two agents and a helper to start instances on them; every instance is deleted afterwards
    and any process still running from this test's directory is killed."""
    made: list[str] = []

    def create(agent: Any, name: str, argv: list[str]) -> None:
        controller.admin("POST", "/v1/instances", {
            "name": name, "kind": "process", "node": agent.node_id, "vcpus": 1, "memory_mib": 64,
            "options": {"command": argv},
        })
        made.append(name)
        wait_for(lambda: running_on(agent, name), f"{name} to run on {agent.node_id}")

    def counter(agent: Any, name: str) -> Path:
        path = tmp_path / f"{name}.count"
        create(agent, name, [PY, "-c", COUNTER, str(path)])
        wait_for(lambda: read_counter(path) >= 5, f"{name} to count")
        return path

    yield controller, kumo_agent, create, counter
    for name in made:
        with contextlib.suppress(AssertionError):
            controller.admin("DELETE", f"/v1/instances/{name}")
    for pid in _pids_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _pids_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes() and int(entry.name) != os.getpid():
                    pids.append(int(entry.name))
    return pids


def finished(controller: Any, migration_id: str) -> dict[str, Any]:
    return wait_for(
        lambda: (m := controller.admin("GET", f"/v1/migrations/{migration_id}"))["state"] != "running" and m,
        f"migration {migration_id} to end", limit=120,
    )


def test_a_counter_migrates_and_keeps_counting(cluster):
    controller, kumo_agent, _, counter = cluster
    a, b = kumo_agent(), kumo_agent()
    path = counter(a, "mover")
    pid = running_on(a, "mover")["details"]["pid"]

    answer = controller.admin("POST", "/v1/instances/mover/migrate", {"to": b.node_id})
    done = finished(controller, answer["migration"]["id"])
    assert done["state"] == "succeeded", str(done)
    assert done["node"] == b.node_id and done["progress"]["bytes_received"] == done["progress"]["bytes_total"] > 0
    assert len(done["sha256"]) == 64

    on_b = running_on(b, "mover")
    assert on_b and on_b["details"]["pid"] == pid, "CRIU restores a process under its own pid"
    assert controller.admin("GET", "/v1/instances/mover")["node"] == b.node_id
    wait_for(lambda: reported(a, "mover") is None, "node A to forget the instance")
    before = read_counter(path)
    later = wait_for(lambda: (n := read_counter(path)) > before + 3 and n, "the counter to go on counting on B")
    assert later > 5, "it continued from where it was, it did not start over"


def test_blockers_and_a_migration_to_its_own_node_are_refused_early(cluster, tmp_path):
    controller, kumo_agent, create, _ = cluster
    a, b = kumo_agent(), kumo_agent()
    with socket.create_server(("127.0.0.1", 0)) as server:
        create(a, "talker", [PY, "-c", CONNECTED, str(server.getsockname()[1])])
        peer, _ = server.accept()
        with peer:
            for path, body in (("migrate", {"to": b.node_id}), ("checkpoint", {})):
                status, answer = controller.call("POST", f"/v1/instances/talker/{path}", body, cert=controller.admin_cert)
                assert status == 409, answer
                assert [x["code"] for x in answer["blockers"]] == ["tcp-established"], answer
                assert "established TCP connection" in answer["error"]
            status, answer = controller.call("POST", "/v1/instances/talker/migrate", {"to": a.node_id},
                                             cert=controller.admin_cert)
            assert status == 409 and "already on node" in answer["error"]
            # A process moves only by stop-and-copy; live options need live.
            status, answer = controller.call("POST", "/v1/instances/talker/migrate", {"live": True},
                                             cert=controller.admin_cert)
            assert status == 409 and "cannot move process instances live" in answer["error"], answer
            status, answer = controller.call("POST", "/v1/instances/talker/migrate", {"max_downtime_ms": 100},
                                             cert=controller.admin_cert)
            assert status == 400 and '"live": true' in answer["error"], answer
            assert running_on(a, "talker") and controller.admin("GET", "/v1/instances/talker")["node"] == a.node_id


def test_a_failed_restore_on_the_destination_leaves_it_running_on_the_source(cluster, tmp_path):
    controller, kumo_agent, _, counter = cluster
    real = shutil.which("criu", path=SBIN_PATH)
    broken = tmp_path / "criu-that-cannot-restore"
    broken.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then echo "Error (test): injected restore failure" >&2; exit 1; fi\n'
        f'exec {real} "$@"\n'
    )
    broken.chmod(0o755)
    a, b = kumo_agent(), kumo_agent(plugins={"checkpoint": {"criu": str(broken)}})
    path = counter(a, "stayer")

    answer = controller.admin("POST", "/v1/instances/stayer/migrate", {"to": b.node_id})
    done = finished(controller, answer["migration"]["id"])
    assert done["state"] == "failed" and done["code"] == "restore-failed", done
    assert "injected restore failure" in done["error"]
    assert f"restored on node {a.node_id}" in done["outcome"]
    assert controller.admin("GET", "/v1/instances/stayer")["node"] == a.node_id
    wait_for(lambda: running_on(a, "stayer"), "the instance to run on A again")
    assert not running_on(b, "stayer")
    before = read_counter(path)
    wait_for(lambda: read_counter(path) > before + 3, "the counter to go on counting on A")


@pytest.mark.reliability("process migration", "destination agent frozen, then kill -9, mid-stream")
def test_a_destination_that_dies_mid_transfer_leaves_it_running_on_the_source(cluster, tmp_path):
    controller, kumo_agent, create, _ = cluster
    a, b = kumo_agent(), kumo_agent()
    path = tmp_path / "heavy.count"
    # Enough memory that its image takes a while to stream, so the test can catch it mid-way.
    create(a, "heavy", [PY, "-c", COUNTER, str(path), "512"])
    wait_for(lambda: read_counter(path) >= 5, "heavy to count")

    answer = controller.admin("POST", "/v1/instances/heavy/migrate", {"to": b.node_id})
    migration = f"/v1/migrations/{answer['migration']['id']}"
    progress = wait_for(lambda: (p := controller.admin("GET", migration)["progress"])["bytes_received"] > 0 and p,
                        "the image to start arriving on B", limit=120)
    b.proc.send_signal(signal.SIGSTOP)  # frozen mid-stream: what it has received stays as it is
    progress = controller.admin("GET", migration)["progress"]
    assert 0 < progress["bytes_received"] < progress["bytes_total"], progress
    b.kill()

    done = finished(controller, answer["migration"]["id"])
    # Given up once B is unreachable (a few heartbeats), as is the discard the rollback sends it.
    assert done["state"] == "failed" and done["code"] == "node-unreachable", done
    assert f"transfer (receiving on node {b.node_id}) failed: node {b.node_id} has not reported" in done["error"], done
    assert f"restored on node {a.node_id}" in done["outcome"], done
    assert controller.admin("GET", "/v1/instances/heavy")["node"] == a.node_id
    wait_for(lambda: running_on(a, "heavy"), "the instance to run on A again")
    before = read_counter(path)
    wait_for(lambda: read_counter(path) > before + 3, "the counter to go on counting on A")

    b.start()
    assert not running_on(b, "heavy") and reported(b, "heavy") is None
    images = b.state_dir / "plugins" / "checkpoint"
    assert not [p for p in images.rglob(".incoming-*")], "the half-received image was left on B"


@pytest.mark.reliability("process migration", "controller kill -9 after the checkpoint, restart")
def test_a_controller_killed_mid_transfer_ends_the_migration_when_it_restarts(cluster, tmp_path):
    # The migration's steps were in the dead process's memory; its record is in the store,
    # and the controller's next run takes it over from what the nodes report.
    controller, kumo_agent, create, _ = cluster
    a, b = kumo_agent(), kumo_agent()
    path = tmp_path / "big.count"
    create(a, "big", [PY, "-c", COUNTER, str(path), "200"])
    wait_for(lambda: read_counter(path) >= 5, "big to count")
    answer = controller.admin("POST", "/v1/instances/big/migrate", {"to": b.node_id})
    migration = f"/v1/migrations/{answer['migration']['id']}"
    wait_for(lambda: controller.admin("GET", migration)["phase"] != "checkpoint", "the checkpoint to be taken",
             limit=60, interval=0.02)
    controller.kill()
    controller.start()
    done = finished(controller, answer["migration"]["id"])
    # A source restored from the checkpoint says so at its next heartbeat, which may come
    # just after the end.
    runs_on = wait_for(lambda: [agent.node_id for agent in (a, b) if running_on(agent, "big")],
                       "big to be reported running", limit=10)
    assert len(runs_on) == 1, (done, runs_on)
    assert controller.admin("GET", "/v1/instances/big")["node"] == runs_on[0], done
    before = read_counter(path)
    wait_for(lambda: read_counter(path) > before + 3, "the counter to go on counting where it runs")


def kumoctl(controller: Any, *args: str, tty: bool = False) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of the real kumoctl; ``tty`` puts stderr on a terminal."""
    argv = [sys.executable, "-m", "controller.kumoctl", "--config", str(controller.kumoctl_config), *args]
    if not tty:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)  # noqa: S603
        return result.returncode, result.stdout, result.stderr
    master, slave = pty.openpty()
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, text=True) as proc:  # noqa: S603
        os.close(slave)
        err = b""
        with contextlib.suppress(OSError):  # EIO once the child has closed the terminal
            while chunk := os.read(master, 65536):
                err += chunk
        out = proc.stdout.read() if proc.stdout else ""
        proc.wait(180)
    os.close(master)
    return proc.returncode, out, err.decode(errors="replace")


def test_kumoctl_migrate_shows_progress_and_drain_moves_the_rest(cluster):
    controller, kumo_agent, _, counter = cluster
    a, b = kumo_agent(), kumo_agent()
    counter(a, "first")
    status, out, err = kumoctl(controller, "instances", "migrate", "first", "--to", b.node_id, tty=True)
    assert status == 0, err
    assert f"migrating first {a.node_id} -> {b.node_id}: succeeded" in err and "MiB (100%)" in err, err
    assert f"now runs on node {b.node_id}" in out

    counter(a, "second")
    status, out, err = kumoctl(controller, "nodes", "drain", a.node_id)
    assert status == 0, err
    assert f"moved second to {b.node_id} (stop-and-copy)" in out, out  # a process moves only so
    assert controller.admin("GET", "/v1/instances/second")["node"] == b.node_id
    assert running_on(b, "second")

    # Both are listed, newest first, with how they ended; bad input is named.
    status, out, err = kumoctl(controller, "migrations", "list", "--output", "json")
    assert status == 0, err
    listed = json.loads(out)
    assert [(m["instance"], m["source"], m["destination"], m["state"]) for m in listed] == [
        ("second", a.node_id, b.node_id, "succeeded"), ("first", a.node_id, b.node_id, "succeeded")]
    assert f"instance first runs on node {b.node_id}" in listed[1]["outcome"]
    status, out, err = kumoctl(controller, "migrations", "list", "--state", "running")
    assert status == 0 and "no migrations" in out, (out, err)
    status, answer = controller.call("GET", "/v1/migrations?state=done", cert=controller.admin_cert)
    assert status == 400 and "running, succeeded, failed" in answer["error"]
    page = controller.admin("GET", "/v1/migrations?limit=1")
    assert [m["instance"] for m in page["migrations"]] == ["second"] and page["next"]
    rest = controller.admin("GET", f"/v1/migrations?limit=1&after={quote(page['next'])}")
    assert [m["instance"] for m in rest["migrations"]] == ["first"] and rest["next"] is None


def _task_done(controller: Any, answer: dict[str, Any]) -> dict[str, Any]:
    task = wait_for(lambda: (t := controller.admin("GET", f"/v1/tasks/{answer['task']['id']}"))["state"]
                    in ("succeeded", "failed") and t, f"task {answer['task']['id']} to end")
    assert task["state"] == "succeeded", task
    return task


def test_checkpoints_are_kept_under_the_instance_listed_restored_by_id_pruned_and_deleted_with_it(cluster, tmp_path):
    controller, kumo_agent, _, _ = cluster
    a = kumo_agent()
    path = tmp_path / "keeper.count"
    controller.admin("POST", "/v1/instances", {
        "name": "keeper", "kind": "process", "node": a.node_id, "memory_mib": 64,
        # STEADY_COUNTER keeps its file open at a fixed size: an older checkpoint restores too.
        "options": {"command": [PY, "-c", STEADY_COUNTER, str(path)], "checkpoint_keep": 3}})
    assert controller.admin("GET", "/v1/instances/keeper")["checkpoint_keep"] == 3
    wait_for(lambda: read_counter(path) >= 3, "keeper to count")

    # Three checkpoints while it runs on, each bracketed by the count before and after it;
    # the first two three seconds (60 counts) apart, so that a restore of the first, however
    # long the machine takes to show it, cannot be mistaken for one of the second.
    taken = []
    for gap in (60, 2, 2):
        before = read_counter(path)
        task = _task_done(controller, controller.admin("POST", "/v1/instances/keeper/checkpoint",
                                                       {"leave_running": True}))
        taken.append((task["result"]["checkpoint"], before, read_counter(path)))
        wait_for(lambda until=taken[-1][2] + gap: read_counter(path) > until, "keeper to count on")
    listed = controller.admin("GET", "/v1/instances/keeper/checkpoints")["checkpoints"]
    assert [c["id"] for c in listed] == [t[0] for t in reversed(taken)], "all three kept (checkpoint_keep), newest first"
    assert [c["latest"] for c in listed] == [True, False, False]
    assert all(c["kind"] == "process" and c["size_bytes"] > 0 and c["created_at"] for c in listed)

    # The oldest, by id: the count goes on from where it was then.
    _task_done(controller, controller.admin("POST", "/v1/instances/keeper/stop", {"timeout": 5}))
    stopped_at = read_counter(path)
    oldest, before, after = taken[0]
    status, out, err = kumoctl(controller, "instances", "restore", "keeper", "--checkpoint", oldest)
    assert status == 0 and f"from checkpoint {oldest}" in out, (out, err)
    resumed = wait_for(lambda: (n := read_counter(path)) != stopped_at and n, "keeper to count again")
    assert before < resumed < taken[1][1], (before, resumed, after, taken[1])

    # Bad ids and counts are named; a missing one is 404.
    for method, url, body, code, words in (
        ("DELETE", "/v1/instances/keeper/checkpoints/..%2F..%2Fetc", None, 400, "is not a checkpoint id"),
        ("DELETE", "/v1/instances/keeper/checkpoints/20200101T000000.000000Z-000000", None, 404, "no checkpoint"),
        ("POST", "/v1/instances/keeper/checkpoints/prune", {"keep": 0}, 400, "keep must be an integer >= 1"),
        ("POST", "/v1/instances/keeper/restore", {"checkpoint": "/tmp"}, 400, "is not a checkpoint id"),
        ("GET", "/v1/instances/ghost/checkpoints", None, 404, "no instance 'ghost'"),
        ("POST", "/v1/instances", {"name": "bad-keep", "kind": "process", "options": {"checkpoint_keep": True}},
         400, "options.checkpoint_keep must be an integer >= 1"),
    ):
        status, answer = controller.call(method, url, body, cert=controller.admin_cert)
        assert status == code and words in answer["error"], (url, status, answer)

    status, out, err = kumoctl(controller, "instances", "checkpoints", "keeper", "--keep", "1")
    assert status == 0 and "2 checkpoint(s) of keeper removed" in out, (out, err)
    assert taken[2][0] in out and taken[0][0] not in out, "the latest is what is kept"
    status, out, err = kumoctl(controller, "instances", "checkpoints", "keeper", "--output", "json")
    assert status == 0 and [c["id"] for c in json.loads(out)] == [taken[2][0]], (out, err)

    controller.delete_instance("keeper")
    left = [str(p) for p in a.state_dir.rglob("*keeper*")]
    assert left == [], "the instance's checkpoints, logs and directory went with it"


async def test_an_aborted_relay_releases_both_ends_at_once():
    from controller.services.inflight import RELAY_DEPTH, Relay, RelayAborted

    relay = Relay("n-source", "n-destination")
    for _ in range(RELAY_DEPTH):
        relay.chunks.put_nowait(b"x")
    source = asyncio.ensure_future(relay.until(relay.chunks.put(b"y"), "the destination took nothing"))
    destination = asyncio.ensure_future(relay.until(relay.delivered.wait(), "nothing"))
    await asyncio.sleep(0.01)
    relay.abort("node n-destination went away during the transfer")
    for end in (source, destination):
        with pytest.raises(RelayAborted, match="went away"):
            await end
    with pytest.raises(RelayAborted):
        await relay.until(relay.chunks.get(), "nothing")


def test_the_kinds_a_node_can_move_are_what_its_checkpoint_plugin_publishes():
    from controller.services.migrations import checkpoint_kinds, unsupported

    node = {"plugins": {"checkpoint": {"available": True, "attributes": {"instance_kinds": ["lxc", "process"]}}}}
    assert checkpoint_kinds(node) == ["lxc", "process"]
    assert unsupported(node, "n-a", "process") is None
    assert unsupported(node, "n-a", "kvm") == "node n-a cannot checkpoint kvm instances (it can move: lxc, process)"
    without = {"plugins": {"kvm": {"available": True}}}
    assert checkpoint_kinds(without) == [] and checkpoint_kinds(None) == []
    assert unsupported(without, "n-b", "process") == "node n-b cannot checkpoint process instances (it can move: none)"


def test_the_kinds_a_node_can_move_live_and_the_live_options_are_checked():
    from controller.services import Refused
    from controller.services.live import cannot_live, live_options

    node = {"plugins": {"checkpoint": {"available": True, "attributes": {"live_kinds": ["kvm"]}}}}
    assert cannot_live(node, "n-a", "kvm") is None
    assert cannot_live(node, "n-a", "lxc") == "node n-a cannot move lxc instances live (its live kinds: kvm)"
    assert cannot_live(None, "n-b", "kvm") == "node n-b cannot move kvm instances live (its live kinds: none)"
    assert live_options(None, None, None) == {"max_downtime_ms": 300, "converge_timeout": 120.0,
                                              "on_no_converge": "abort"}
    for wrong, named in (((0, None, None), "max_downtime_ms"), ((None, 0, None), "converge_timeout"),
                         ((None, None, "postcopy"), "on_no_converge")):
        with pytest.raises(Refused, match=named):
            live_options(*wrong)
