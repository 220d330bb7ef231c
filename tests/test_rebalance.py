"""The rebalancer against the real thing: a controller, real agents on this machine (three,
or two), process instances that burn CPU (a fixed duty cycle each) all placed on one node, moved
by real CRIU migrations.

Every node here is this one machine, so each node's own busy figure is the same; what
differs between nodes, and what the rebalancer goes by, is the share of a node's CPUs its
instances use. The thresholds are set from one burner's share (see :func:`settings`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import read_counter
from tests.harness.agents import reported, running_on, wait_for
from tests.harness.burners import BURNER, DUTY, PY
from tests.harness.criu import SBIN_PATH
from tests.test_migration import _pids_mentioning, kumoctl

pytestmark = pytest.mark.integration

HEARTBEAT = "heartbeat: "  # what an agent logs (debug) after each heartbeat

IDLE = """
import sys, time
i = 0
while True:
    i += 1
    with open(sys.argv[1], "w") as f:
        f.write(str(i))
    time.sleep(0.1)
"""


def settings(**extra: Any) -> dict[str, Any]:
    """Four burners make a node busy even when the machine is (each measured at a little over
    a quarter of its nominal share); a destination takes one burner, never two."""
    share = DUTY / os.cpu_count()  # one burner's share of a node's CPUs
    return {"rebalance": {"interval": 1, "window": 4, "cpu_high": round(1.15 * share, 4),
                          "margin": round(0.1 * share, 4), "max_in_flight": 2, "cooldown": 3600,
                          "retry_after": 3600, **extra}}


@pytest.fixture
def fleet(criu_required, controller_factory, kumo_agent, tmp_path):
    """``start(agents, **rebalance settings)`` → (controller, agents, burn); everything this test
    started is deleted or killed afterwards."""
    made: list[str] = []
    started: dict[str, Any] = {}

    def start(agents: list[dict[str, Any]], **extra: Any) -> tuple[Any, list[Any], Any]:
        controller = started["controller"] = controller_factory(**settings(**extra))
        nodes = [kumo_agent(controller=controller, **options) for options in agents]

        def burn(agent: Any, name: str, pin: bool = False, program: str = BURNER) -> Path:
            """Run ``program`` (counting into a file) as instance ``name``, on ``agent`` or where
            the scheduler chooses (``agent`` None); the file it counts into."""
            path = tmp_path / f"{name}.count"
            options: dict[str, Any] = {"command": [PY, "-c", program, str(path)]}
            if pin:
                options["pin"] = True
            body = {"name": name, "kind": "process", "vcpus": 1, "memory_mib": 64, "options": options}
            node = controller.admin("POST", "/v1/instances", {**body, "node": agent.node_id} if agent else body)[
                "instance"]["node"]
            made.append(name)
            on = next(agent for agent in nodes if agent.node_id == node)
            wait_for(lambda: running_on(on, name) and read_counter(path) > 3, f"{name} to count")
            return path

        return controller, nodes, burn

    yield start
    for name in made:
        with contextlib.suppress(AssertionError):
            started["controller"].admin("DELETE", f"/v1/instances/{name}")
    for pid in _pids_mentioning(str(tmp_path)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def where(controller: Any, names: list[str]) -> dict[str, str]:
    return {name: controller.admin("GET", f"/v1/instances/{name}")["node"] for name in names}


def busy(controller: Any, node_id: str) -> dict[str, Any]:
    """The plan once it finds ``node_id`` busy over a whole window."""
    return wait_for(lambda: (plan := controller.admin("GET", "/v1/rebalance/plan")) and any(
        n["id"] == node_id and n["sustained"] for n in plan["nodes"]) and plan,
        f"node {node_id} to be busy for a whole window", limit=60)


def rounds(controller: Any, count: int) -> None:
    """Wait until the controller has sampled (and, in auto mode, run a round) ``count`` more times."""
    since = time.time()
    wait_for(lambda: controller.sql("SELECT COUNT(DISTINCT at) AS n FROM rebalance_samples WHERE at > ?",
                                    since)[0]["n"] >= count, f"{count} rebalancing rounds", limit=60)


def spread(controller: Any, nodes: list[str], since: float) -> tuple[float, dict[str, float]]:
    """(max - min, each node's figure) of the share of its CPUs each node's instances used, as
    the controller sampled it after ``since``: the median of each node's samples, so that a
    restore's burst or a sample missing a just-moved instance does not count."""
    rows = controller.sql("SELECT node, cpu FROM rebalance_samples WHERE at > ?", since)
    shares = {node: statistics.median(row["cpu"] for row in rows if row["node"] == node) for node in nodes}
    return max(shares.values()) - min(shares.values()), shares


def keeps_counting(counters: dict[str, Path], before: dict[str, int]) -> None:
    for name, path in counters.items():
        floor = before[name] + 3
        wait_for(lambda path=path, floor=floor: read_counter(path) > floor, f"{name} to go on counting from {floor - 3}")


def test_apply_moves_busy_instances_once_and_leaves_the_pinned_one(fleet):
    start = fleet
    controller, (a, b, c), burn = start([{}, {}, {}])
    counters = {name: burn(a, name) for name in ("hot-1", "hot-2", "hot-3")}
    counters["hot-pinned"] = burn(a, "hot-pinned", pin=True)
    assert controller.admin("GET", "/v1/instances/hot-pinned")["pinned"] is True
    status, answer = controller.call("POST", "/v1/instances", {"name": "bad-pin", "kind": "process",
                                     "options": {"command": ["true"], "pin": "yes"}}, cert=controller.admin_cert)
    assert status == 400 and "options.pin must be true or false" in answer["error"], answer

    plan = busy(controller, a.node_id)
    assert plan["moves"] and all(m["source"] == a.node_id for m in plan["moves"]), plan
    # A node the rebalancer finds busy takes no new instance, though its vCPUs are not all reserved.
    burn(None, "newcomer", program=IDLE)
    placement = controller.admin("GET", "/v1/instances/newcomer")["placement"]
    assert placement["node"] != a.node_id
    assert "the rebalancer moves load off it" in placement["filtered"][a.node_id], placement
    assert "hot-pinned" not in [m["instance"] for m in plan["moves"]]
    status, out, err = kumoctl(controller, "rebalance", "plan")
    assert status == 0, err
    assert f"off {a.node_id}" in out and "WAVE" in out, out

    before = {name: read_counter(path) for name, path in counters.items()}
    nodes = [agent.node_id for agent in (a, b, c)]
    spread_before, shares_before = spread(controller, nodes, time.time() - settings()["rebalance"]["window"])
    status, out, err = kumoctl(controller, "rebalance", "apply")
    assert status == 0, err + out
    applied = time.time()
    placed = where(controller, list(counters))
    moved = {name: node for name, node in placed.items() if node != a.node_id}
    assert moved and set(moved.values()) <= {b.node_id, c.node_id}, (placed, out)
    assert placed["hot-pinned"] == a.node_id
    for name, node in moved.items():
        assert f"{name} {a.node_id} -> {node}: succeeded" in out, out
    agents = {agent.node_id: agent for agent in (a, b, c)}
    for name, node in placed.items():
        assert running_on(agents[node], name), f"{name} runs on {node}"
        assert [agent.node_id for agent in (a, b, c) if running_on(agent, name)] == [node], "exactly once"
    keeps_counting(counters, before)

    history = controller.admin("GET", "/v1/rebalance/history")["entries"]
    assert sorted(e["instance"] for e in history) == sorted(moved)
    assert {(e["trigger"], e["state"], e["source"]) for e in history} == {("apply", "succeeded", a.node_id)}
    status, out, err = kumoctl(controller, "rebalance", "history")
    assert status == 0 and all(name in out for name in moved), err + out
    status, out, err = kumoctl(controller, "rebalance", "history", "--output", "json")
    assert status == 0 and sorted(e["instance"] for e in json.loads(out)) == sorted(moved), err + out

    # Over the following rounds nothing moves: not back, not on.
    for _ in range(5):
        assert controller.admin("POST", "/v1/rebalance/apply", {})["decisions"] == []
        rounds(controller, 1)
    assert where(controller, list(counters)) == placed
    # The nodes' measured shares converged: four burners against none became two against one
    # each (a quarter of the spread, nominally; on a busy machine every burner slows alike).
    spread_after, shares_after = spread(controller, nodes, applied)
    assert spread_after < 0.6 * spread_before, (shares_before, shares_after)


def failing_criu(directory: Path) -> Path:
    """A criu whose restores fail while ``directory/fail`` exists."""
    real = shutil.which("criu", path=SBIN_PATH)
    script = directory / "criu"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = restore ] && [ -e {directory}/fail ]; then echo "Error (test): injected restore failure" >&2; '
        "exit 1; fi\n"
        f'exec {real} "$@"\n'
    )
    script.chmod(0o755)
    return script


@pytest.mark.reliability("automatic rebalancing", "every CRIU restore on one destination fails")
def test_auto_mode_moves_on_and_a_failed_move_is_not_retried(fleet, tmp_path):
    start = fleet
    wrappers = []
    for side in ("x", "y"):
        (tmp_path / side).mkdir()
        wrappers.append(failing_criu(tmp_path / side))
    controller, (a, x, y), burn = start(
        [{}, {"plugins": {"checkpoint": {"criu": str(wrappers[0])}}},
         {"plugins": {"checkpoint": {"criu": str(wrappers[1])}}}], mode="auto")
    # Ties between equally idle destinations go to the smaller node id: that one fails.
    broken, healthy = sorted((x, y), key=lambda agent: agent.node_id)
    (tmp_path / ("x" if broken is x else "y") / "fail").touch()
    counters = {name: burn(a, name) for name in ("auto-1", "auto-2", "auto-3", "auto-4")}

    def settled() -> list[dict[str, Any]] | None:
        entries = controller.admin("GET", "/v1/rebalance/history")["entries"]
        states = {(e["destination"], e["state"]) for e in entries}
        return entries if (broken.node_id, "failed") in states and (healthy.node_id, "succeeded") in states else None

    wait_for(settled, "a failed move to one node and a successful one to the other", limit=120)
    entries = wait_for(lambda: (found := controller.admin("GET", "/v1/rebalance/history")["entries"]) and all(
        e["state"] != "running" for e in found) and found, "the migrations to end")
    [failed] = [e for e in entries if e["state"] == "failed"]
    assert failed["trigger"] == "auto" and "injected restore failure" in failed["error"], failed
    assert f"restored on node {a.node_id}" in failed["outcome"], failed
    before = {name: read_counter(path) for name, path in counters.items()}
    # Rounds go on every second: the failed instance is not tried again, nor the failing node.
    rounds(controller, 6)
    entries = controller.admin("GET", "/v1/rebalance/history")["entries"]
    assert [e["id"] for e in entries if e["state"] == "failed"] == [failed["id"]]
    assert {(e["destination"], e["state"]) for e in entries if e["id"] != failed["id"]} == {
        (healthy.node_id, "succeeded")}, entries
    plan = controller.admin("GET", "/v1/rebalance/plan")
    assert all(m["destination"] != broken.node_id for m in plan["moves"]), plan
    placed = where(controller, list(counters))
    assert placed[failed["instance"]] == a.node_id
    for name, node in placed.items():
        assert [agent.node_id for agent in (a, x, y) if running_on(agent, name)] == [node], "exactly once"
    keeps_counting(counters, before)


@pytest.mark.reliability("rebalancing", "destination agent frozen as apply starts, then kill -9")
def test_a_destination_that_dies_mid_rebalance_leaves_every_instance_running_once(fleet):
    start = fleet
    controller, (a, x), burn = start([{}, {}])
    counters = {name: burn(a, name) for name in ("die-1", "die-2", "die-3", "die-4")}
    busy(controller, a.node_id)
    # Frozen just after a heartbeat, X is ready for the controller for a few seconds more:
    # apply chooses it, and it never takes part in what follows.
    beats = x.log_text().count(HEARTBEAT)
    wait_for(lambda: x.log_text().count(HEARTBEAT) > beats, "a heartbeat of X")
    x.proc.send_signal(signal.SIGSTOP)
    [decision] = controller.admin("POST", "/v1/rebalance/apply", {})["decisions"]
    x.kill()
    assert decision["destination"] == x.node_id and decision["migration"], decision
    done = wait_for(lambda: (m := controller.admin("GET", f"/v1/migrations/{decision['migration']}"))[
        "state"] != "running" and m, "the migration to end")
    assert done["state"] == "failed" and done["code"] == "node-unreachable", done
    assert f"node {x.node_id} has not reported" in done["error"], done
    assert f"restored on node {a.node_id}" in done["outcome"], done

    for name, path in counters.items():
        assert controller.admin("GET", f"/v1/instances/{name}")["node"] == a.node_id
        wait_for(lambda name=name: running_on(a, name), f"{name} to run on A")
        assert len(_pids_mentioning(str(path))) == 1, f"{name} runs exactly once"
    before = {name: read_counter(path) for name, path in counters.items()}
    keeps_counting(counters, before)

    # Back, X has nothing of it, and the rebalancer, finding A busy again, does not try again.
    x.start()
    assert reported(x, decision["instance"]) is None
    assert not list((x.state_dir / "plugins" / "checkpoint").rglob(".incoming-*"))
    busy(controller, a.node_id)
    answer = controller.admin("POST", "/v1/rebalance/apply", {})
    assert answer["decisions"] == [] and answer["moves"] == [], answer
    reasons = {r["instance"]: r["reason"] for r in answer["refused"]}
    assert "its last rebalancing move failed" in reasons.pop(decision["instance"]), reasons
    assert all(f"a rebalancing move of {decision['instance']} to it failed" in why for why in reasons.values()), reasons
    assert [e["migration"] for e in controller.admin("GET", "/v1/rebalance/history")["entries"]] == [
        decision["migration"]]
    assert x.log_text().count("(checkpoint.receive): running") <= 1, "the given-up transfer was not handed out again"
