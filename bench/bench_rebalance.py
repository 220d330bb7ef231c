#!/usr/bin/env python3
"""The rebalancer on a skewed fleet: how many migrations it makes against the fewest any plan
could, how many rounds it takes to converge, the spread of the nodes' CPU before and after,
and, carried out for real, the time a move takes against CRIU's own dump and restore.

Planning, on a simulated fleet: each round the real planner (controller.rebalancer.plan)
reads a window of samples, its first wave is carried out at once, and the next round
samples again. Instances use a fixed number of cores each, drawn from a seeded generator,
so a run is repeatable.

Moves, for real: a controller and three agents on this machine (sampling every second over a
4-second window), three process instances that each burn 0.2 cores placed on the first node.
The thresholds are set from what a burner measures on this machine at the time (a busy
machine gives each less), and the controller restarted with them, so that two burners keep
a node busy and one does not; then ``apply`` rounds until one starts nothing, as ``kumoctl
rebalance apply`` runs them, each a real CRIU migration through the controller. The nodes'
shares are the controller's own samples (each node's median over a window). A move's time is the migration's: pre-flight,
dump, transfer through the controller with sha256 at both ends, restore, the destination's
report of the instance running and the source's clean-up; the baseline is a raw
``criu dump`` + ``criu restore`` of the same program, measured in the same run.

The lower bound on the migrations any plan needs: every node over the threshold must lose
at least as many instances as it takes of its largest to bring it under (for the real fleet,
from the instances' measured use). The fewest rounds any plan could take follow from it: a
round moves at most one instance off each node and ``max_in_flight`` in all. Targets: at
most 1.2 times the fewest migrations, converged within 3 rounds (a round that moves nothing
ends it); when the limits themselves need more rounds than 3, the rounds are judged against
the fewest the limits allow.

    bench/bench_rebalance.py [--nodes 20] [--hot 4] [--instances 12] [--seed 1] [--max-in-flight 4] [--quick]

``--quick`` plans the simulated fleet only (no root, no CRIU: what tests/test_bench_rebalance.py runs).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.reaper import set_child_subreaper  # noqa: E402
from controller.rebalancer import Instance, Node, Policy, plan  # noqa: E402
from tests.harness import read_counter  # noqa: E402
from tests.harness.agents import CONNECTED, running_on, start_agent, wait_for  # noqa: E402
from tests.harness.burners import BURNER, DUTY, PY  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402
from tests.harness.criu import SBIN_PATH, criu_status  # noqa: E402

POLICY = Policy(cpu_high=0.8, margin=0.1, window=60.0, interval=10.0, max_in_flight=4)
CPUS = 16
REAL_NODES = 3
REAL_WINDOW = 4  # seconds; a sample every second
RAW_ROUNDS = 5

Placed = dict[str, tuple[str, float]]  # instance -> (node, cores)


def fleet(nodes: int, hot: int, per_node: int, seed: int) -> Placed:
    """``hot`` nodes run ``per_node`` busy instances (90-110% of the node in all), the others a
    third as many light ones."""
    rng = random.Random(seed)
    placed: Placed = {}
    for n in range(nodes):
        count = per_node if n < hot else per_node // 3
        target = CPUS * (rng.uniform(0.9, 1.1) if n < hot else rng.uniform(0.1, 0.3))
        weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
        for i, weight in enumerate(weights):
            placed[f"n{n:03d}-i{i:02d}"] = (f"n{n:03d}", round(target * weight / sum(weights), 3))
    return placed


def loads(placed: Placed, cpus: dict[str, int]) -> dict[str, float]:
    out = dict.fromkeys(cpus, 0.0)
    for node, cores in placed.values():
        out[node] += cores / cpus[node]
    return out


def sheds(placed: Placed, cpus: dict[str, int], cpu_high: float) -> dict[str, int]:
    """The fewest moves off each node: a node over ``cpu_high`` sheds its largest instances until under it."""
    counts = dict.fromkeys(cpus, 0)
    for node, load in loads(placed, cpus).items():
        sizes = sorted((cores for where, cores in placed.values() if where == node), reverse=True)
        while load > cpu_high and sizes:
            load -= sizes.pop(0) / cpus[node]
            counts[node] += 1
    return counts


def bounds(placed: Placed, cpus: dict[str, int], policy: Policy) -> tuple[int, int]:
    """(the fewest migrations any plan needs, the fewest rounds): a round moves one instance
    off a node at most, and ``max_in_flight`` in all."""
    counts = sheds(placed, cpus, policy.cpu_high)
    total = sum(counts.values())
    return total, max(-(-total // policy.max_in_flight), *counts.values())


def spread(shares: dict[str, float]) -> float:
    return max(shares.values()) - min(shares.values())


def simulated(nodes: int, hot: int, per_node: int, seed: int, policy: Policy, max_rounds: int = 20
              ) -> dict[str, float]:
    placed = fleet(nodes, hot, per_node, seed)
    cpus = {f"n{n:03d}": CPUS for n in range(nodes)}
    before = loads(placed, cpus)
    lower, fewest = bounds(placed, cpus, policy)
    now, moves, rounds = 0.0, 0, 0
    history: dict[str, list[tuple[float, float]]] = {node: [] for node in before}
    # A window of samples before the first round.
    for _ in range(int(policy.window / policy.interval) + 1):
        now += policy.interval
        for node, load in loads(placed, cpus).items():
            history[node].append((now, load))
    while rounds < max_rounds:
        rounds += 1
        result = plan(
            [Node(node, CPUS, tuple(samples[-12:])) for node, samples in history.items()],
            [Instance(name, "process", node, cores, None, {other: None for other in before if other != node})
             for name, (node, cores) in placed.items()],
            policy, now,
        )
        wave = [move for move in result.moves if move.wave == 1]
        for move in wave:
            placed[move.instance] = (move.destination, placed[move.instance][1])
        moves += len(wave)
        now += policy.interval
        for node, load in loads(placed, cpus).items():
            history[node].append((now, load))
        if not wave:
            break
    after = loads(placed, cpus)
    return {"spread_before": spread(before), "spread_after": spread(after),
            "stdev_before": statistics.pstdev(before.values()), "stdev_after": statistics.pstdev(after.values()),
            "moves": moves, "minimum": lower, "rounds": rounds - 1, "fewest": fewest,
            "over_after": sum(1 for load in after.values() if load > policy.cpu_high)}


def measured(ctl: ControllerProcess, nodes: list[str], since: float) -> tuple[dict[str, float], dict[str, float]]:
    """(each node's share, each instance's cores): medians of the controller's samples after ``since``."""
    rows = ctl.sql("SELECT node, cpu, instances FROM rebalance_samples WHERE at > ?", since)
    shares = {node: statistics.median(row["cpu"] for row in rows if row["node"] == node) for node in nodes}
    cores: dict[str, list[float]] = {}
    for row in rows:
        for name, used in json.loads(row["instances"]).items():
            cores.setdefault(name, []).append(used)
    return shares, {name: statistics.median(values) for name, values in cores.items()}


def raw_round(criu: str, work: Path, n: int) -> float:
    """Seconds for a raw ``criu dump`` and ``criu restore -d`` of a burner started here."""
    image, counter = work / f"raw-{n}", work / f"raw-{n}.count"
    image.mkdir()
    proc = subprocess.Popen([PY, "-c", BURNER, str(counter)], stdin=subprocess.DEVNULL,  # noqa: S603
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    wait_for(lambda: read_counter(counter) > 3, "the raw burner to count")
    started = time.perf_counter()
    subprocess.run([criu, "dump", "-t", str(proc.pid), "-D", str(image), "-o", "dump.log"], check=True)  # noqa: S603
    proc.wait()
    pidfile = image / "restore.pid"
    subprocess.run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log", "--pidfile", str(pidfile)],  # noqa: S603
                   check=True)
    seconds = time.perf_counter() - started
    pid = int(pidfile.read_text())
    os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # this process is the subreaper: the orphan is ours to reap
        os.waitpid(pid, 0)
    shutil.rmtree(image)
    return seconds


def calibrated(ctl: ControllerProcess, agents: list[Any], burners: dict[str, Path]) -> dict[str, Any]:
    """Restart the controller with thresholds set from what the burners use on this machine
    now (a busy machine gives each less than its nominal 0.2 cores); the rebalancing policy.
    Two burners keep a node over ``cpu_high``, one does not, each by a third of a burner or
    more; a destination takes one, never two."""
    since = time.time()
    wait_for(lambda: len(ctl.sql("SELECT DISTINCT at FROM rebalance_samples WHERE at > ?", since)) > REAL_WINDOW,
             "a window of samples of the burners", limit=60)
    _, cores = measured(ctl, [agent.node_id for agent in agents], since)
    share = statistics.median(cores[name] for name in burners) / (os.cpu_count() or 1)
    config = yaml.safe_load(ctl.config_path.read_text())
    config["rebalance"].update(cpu_high=round(1.5 * share, 4), margin=round(0.3 * share, 4))
    ctl.config_path.write_text(yaml.safe_dump(config))
    connected = [agent.log_text().count(CONNECTED) for agent in agents]
    ctl.stop()
    ctl.start()
    for agent, count in zip(agents, connected, strict=True):
        agent.wait_log(CONNECTED, timeout=60, count=count + 1)
    # A node's first report to a controller has no CPU rates (they are taken between two):
    # the window starts after it.
    back = time.time()
    wait_for(lambda: len(ctl.sql("SELECT DISTINCT at FROM rebalance_samples WHERE at > ?", back)) > REAL_WINDOW + 1,
             "a window of samples after the restart", limit=60)
    return {**config["rebalance"], "burner": share * (os.cpu_count() or 1)}


def real() -> dict[str, Any]:
    """Three burners on one of three real nodes, rebalanced by real migrations (see the docstring)."""
    ok, why = criu_status()
    if not ok:
        sys.exit(f"bench_rebalance: {why} (scripts/deps/30-criu.sh); --quick plans the simulated fleet only")
    criu = shutil.which("criu", path=SBIN_PATH)
    assert criu is not None
    set_child_subreaper(True)
    with tempfile.TemporaryDirectory(prefix="kumo-bench-rebalance-") as tmp:
        work = Path(tmp)
        # Until the burners are measured, nothing counts as busy.
        ctl = ControllerProcess(work / "controller", {"log_level": "info", "rebalance": {
            "interval": 1, "window": REAL_WINDOW, "cpu_high": 1.0, "max_in_flight": 2, "cooldown": 3600,
            "retry_after": 3600}})
        ctl.start()
        agents: list[Any] = []
        burners: dict[str, Path] = {}
        try:
            for label in "abc"[:REAL_NODES]:
                (work / label).mkdir()
                agents.append(start_agent(ctl, work / label, settings={"log_level": "info"}))
            hot, nodes = agents[0], [agent.node_id for agent in agents]
            for i in range(1, REAL_NODES + 1):
                name, path = f"burn-{i}", work / f"burn-{i}.count"
                ctl.admin("POST", "/v1/instances", {"name": name, "kind": "process", "node": hot.node_id, "vcpus": 1,
                                                    "memory_mib": 64, "options": {"command": [PY, "-c", BURNER, str(path)]}})
                burners[name] = path
            wait_for(lambda: all(running_on(hot, name) for name in burners), "the burners to run", limit=60)
            policy = calibrated(ctl, agents, burners)
            wait_for(lambda: any(node["id"] == hot.node_id and node["sustained"]
                                 for node in ctl.admin("GET", "/v1/rebalance/plan")["nodes"]),
                     f"node {hot.node_id} to be busy for a whole window", limit=120)
            before, cores = measured(ctl, nodes, time.time() - REAL_WINDOW)
            cpus = {node: os.cpu_count() or 1 for node in nodes}
            lower, fewest = bounds({name: (hot.node_id, cores.get(name, 0.0)) for name in burners}, cpus,
                                   Policy(policy["cpu_high"], max_in_flight=policy["max_in_flight"]))
            started, rounds, seconds = time.perf_counter(), 0, []
            while (answer := ctl.admin("POST", "/v1/rebalance/apply", {}))["decisions"]:
                decisions = answer["decisions"]
                rounds += 1
                for decision in decisions:
                    if not decision["migration"]:
                        sys.exit(f"bench_rebalance: a move was refused: {decision}")
                    path = f"/v1/migrations/{decision['migration']}"
                    doc = wait_for(lambda path=path: (m := ctl.admin("GET", path))["state"] != "running" and m,
                                   f"migration {decision['migration']} to end", limit=120, interval=0.05)
                    if doc["state"] != "succeeded":
                        sys.exit(f"bench_rebalance: migration {doc['id']} failed: {doc['error']}")
                    seconds.append(doc["seconds"])
            converged = time.perf_counter() - started
            if not rounds:
                sys.exit(f"bench_rebalance: the first round moved nothing: {answer['summary']}; nodes {answer['nodes']}; "
                         f"refused {answer['refused']}")
            moved = time.time()
            wait_for(lambda: len(ctl.sql("SELECT DISTINCT at FROM rebalance_samples WHERE at > ?", moved))
                     > REAL_WINDOW, "a window of samples after the moves", limit=60)
            after, _ = measured(ctl, nodes, moved)
            counts = {name: read_counter(path) for name, path in burners.items()}
            wait_for(lambda: all(read_counter(path) > counts[name] for name, path in burners.items()),
                     "every burner to go on counting")
            raw = [raw_round(criu, work, n) for n in range(RAW_ROUNDS)]
        finally:
            for name in burners:
                ctl.delete_instance(name)
            for agent in agents:
                agent.stop()
            ctl.stop()
    return {"policy": policy, "hot": hot.node_id, "before": before, "after": after, "moves": len(seconds),
            "minimum": lower, "rounds": rounds, "fewest": fewest, "converged": converged, "moves_s": seconds, "move": statistics.median(seconds),
            "raw": statistics.median(raw), "over_after": sum(1 for s in after.values() if s > policy["cpu_high"])}


def verdicts(figures: dict[str, Any], max_in_flight: int) -> str:
    moves, minimum, rounds, fewest = figures["moves"], figures["minimum"], figures["rounds"], figures["fewest"]
    ratio = moves / minimum if minimum else 1.0
    if rounds <= 3:
        target = "met"
    elif rounds <= fewest:
        target = f"not met, and no plan could: the limits need {fewest}"
    else:
        target = "not met"
    return (f"migrations: {moves} against a lower bound of {minimum}: {ratio:.2f}x "
            f"(target <= 1.2x: {'met' if ratio <= 1.2 else 'not met'})\n"
            f"rounds that moved something: {rounds}; the fewest any plan could take, one move per node and "
            f"{max_in_flight} in all a round: {fewest} (target <= 3: {target})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20, help="simulated nodes in the fleet (default 20)")
    parser.add_argument("--hot", type=int, default=4, help="simulated nodes that start over the threshold (default 4)")
    parser.add_argument("--instances", type=int, default=12, help="instances on each hot simulated node (default 12)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    parser.add_argument("--max-in-flight", type=int, default=POLICY.max_in_flight,
                        help=f"the simulated fleet's migrations at once (default {POLICY.max_in_flight})")
    parser.add_argument("--quick", action="store_true", help="plan the simulated fleet only: no agents, no CRIU")
    args = parser.parse_args()
    if args.max_in_flight < 1:
        parser.error(f"--max-in-flight must be at least 1, not {args.max_in_flight}")
    policy = dataclasses.replace(POLICY, max_in_flight=args.max_in_flight)
    figures = simulated(args.nodes, args.hot, args.instances, args.seed, policy)
    print(f"simulated fleet: {args.nodes} nodes of {CPUS} CPUs, {args.hot} skewed; policy {policy}")
    print(f"node CPU spread (max - min share): {figures['spread_before']:.0%} -> {figures['spread_after']:.0%}; "
          f"standard deviation {figures['stdev_before']:.0%} -> {figures['stdev_after']:.0%}; "
          f"nodes still over {policy.cpu_high:.0%}: {figures['over_after']}")
    print(verdicts(figures, policy.max_in_flight))
    if args.quick:
        return 0
    found = real()
    policy = found["policy"]
    print(f"\nreal fleet: {REAL_NODES} agents on this machine ({os.cpu_count()} CPUs each), {REAL_NODES} burners of "
          f"{DUTY} cores (measured at {policy['burner']:.2f} each) on {found['hot']}; cpu_high {policy['cpu_high']:.1%}, margin {policy['margin']:.1%}, "
          f"window {REAL_WINDOW} s")
    print(f"node CPU spread (max - min of the measured shares): {spread(found['before']):.1%} -> "
          f"{spread(found['after']):.1%}; nodes still over {policy['cpu_high']:.1%}: {found['over_after']}")
    print(verdicts(found, policy["max_in_flight"]) + f"; converged in {found['converged']:.1f} s")
    print(f"time per move (median of {found['moves']}: {', '.join(f'{s:.2f}' for s in found['moves_s'])}): "
          f"{found['move']:.2f} s; raw criu dump + restore of the same "
          f"program (median of {RAW_ROUNDS}): {found['raw']:.2f} s: {found['move'] / found['raw']:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
