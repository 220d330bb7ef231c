#!/usr/bin/env python3
"""The rebalancer's planning on a skewed simulated fleet: how many migrations it makes against
the fewest any plan could, how many rounds it takes to converge, and the spread of the nodes'
CPU before and after.

Simulated nodes stand in for the planning side (the moves themselves are the migrations
bench_migration.py and tests/test_rebalance.py measure): each round the real planner
(controller.rebalancer.plan) reads a window of samples, its first wave is carried out at
once, and the next round samples again. Instances use a fixed number of cores each, drawn
from a seeded generator, so a run is repeatable.

The baseline is a lower bound on the migrations any plan needs: every node over the
threshold must lose at least as many instances as it takes of its largest to bring it under.
Targets: at most 1.2 times that, converged within 3 rounds (a round that moves nothing).

    bench/bench_rebalance.py [--nodes 20] [--hot 4] [--instances 12] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.rebalancer import Instance, Node, Policy, plan  # noqa: E402

POLICY = Policy(cpu_high=0.8, margin=0.1, window=60.0, interval=10.0, max_in_flight=4)
CPUS = 16


def fleet(nodes: int, hot: int, per_node: int, seed: int) -> dict[str, tuple[str, float]]:
    """instance -> (node, cores): ``hot`` nodes run ``per_node`` busy instances (90-110% of the
    node in all), the others a third as many light ones."""
    rng = random.Random(seed)
    placed: dict[str, tuple[str, float]] = {}
    for n in range(nodes):
        count = per_node if n < hot else per_node // 3
        target = CPUS * (rng.uniform(0.9, 1.1) if n < hot else rng.uniform(0.1, 0.3))
        weights = [rng.uniform(0.5, 1.5) for _ in range(count)]
        for i, weight in enumerate(weights):
            placed[f"n{n:03d}-i{i:02d}"] = (f"n{n:03d}", round(target * weight / sum(weights), 3))
    return placed


def loads(placed: dict[str, tuple[str, float]], nodes: int) -> dict[str, float]:
    out = {f"n{n:03d}": 0.0 for n in range(nodes)}
    for node, cores in placed.values():
        out[node] += cores / CPUS
    return out


def minimum_moves(placed: dict[str, tuple[str, float]], nodes: int) -> int:
    """A lower bound: each node over cpu_high sheds its largest instances until under it."""
    total = 0
    for node, load in loads(placed, nodes).items():
        sizes = sorted((cores for where, cores in placed.values() if where == node), reverse=True)
        while load > POLICY.cpu_high and sizes:
            load -= sizes.pop(0) / CPUS
            total += 1
    return total


def run(nodes: int, hot: int, per_node: int, seed: int, max_rounds: int = 20) -> dict[str, float]:
    placed = fleet(nodes, hot, per_node, seed)
    before = loads(placed, nodes)
    lower = minimum_moves(placed, nodes)
    now, moves, rounds = 0.0, 0, 0
    history: dict[str, list[tuple[float, float]]] = {node: [] for node in before}
    # A window of samples before the first round.
    for _ in range(int(POLICY.window / POLICY.interval) + 1):
        now += POLICY.interval
        for node, load in loads(placed, nodes).items():
            history[node].append((now, load))
    while rounds < max_rounds:
        rounds += 1
        result = plan(
            [Node(node, CPUS, tuple(samples[-12:])) for node, samples in history.items()],
            [Instance(name, "process", node, cores, None, {other: None for other in before if other != node})
             for name, (node, cores) in placed.items()],
            POLICY, now,
        )
        wave = [move for move in result.moves if move.wave == 1]
        for move in wave:
            placed[move.instance] = (move.destination, placed[move.instance][1])
        moves += len(wave)
        now += POLICY.interval
        for node, load in loads(placed, nodes).items():
            history[node].append((now, load))
        if not wave:
            break
    after = loads(placed, nodes)
    return {"spread_before": max(before.values()) - min(before.values()),
            "spread_after": max(after.values()) - min(after.values()),
            "stdev_before": statistics.pstdev(before.values()), "stdev_after": statistics.pstdev(after.values()),
            "moves": moves, "minimum": lower, "rounds": rounds,
            "over_after": sum(1 for load in after.values() if load > POLICY.cpu_high)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=20, help="nodes in the fleet (default 20)")
    parser.add_argument("--hot", type=int, default=4, help="nodes that start over the threshold (default 4)")
    parser.add_argument("--instances", type=int, default=12, help="instances on each hot node (default 12)")
    parser.add_argument("--seed", type=int, default=1, help="random seed (default 1)")
    args = parser.parse_args()
    figures = run(args.nodes, args.hot, args.instances, args.seed)
    print(f"fleet: {args.nodes} nodes of {CPUS} CPUs, {args.hot} skewed; policy {POLICY}")
    print(f"node CPU spread (max - min share): {figures['spread_before']:.0%} -> {figures['spread_after']:.0%}; "
          f"standard deviation {figures['stdev_before']:.0%} -> {figures['stdev_after']:.0%}; "
          f"nodes still over {POLICY.cpu_high:.0%}: {figures['over_after']}")
    ratio = figures["moves"] / figures["minimum"] if figures["minimum"] else 1.0
    print(f"migrations: {figures['moves']} against a lower bound of {figures['minimum']}: {ratio:.2f}x "
          f"(target <= 1.2x: {'met' if ratio <= 1.2 else 'not met'})")
    converged = figures["rounds"] - 1  # the last round is the one that finds nothing to move
    print(f"rounds that moved something: {converged} (target <= 3: {'met' if converged <= 3 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
