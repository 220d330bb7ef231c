"""Rebalancing: which instances move where, and why. A pure function over measurements.

``plan(nodes, instances, policy, now, in_flight)`` reads what the nodes' instances used over
the window and returns the moves it would make, each with the figures that justify it, and
for every instance of a node left too busy the reason it stays. It changes nothing: the
controller's service (controller/services/rebalance.py) gathers the inputs and carries the
moves out through the migration service.

The measure. A node's load is the share of its CPUs its instances use, as the nodes measure
them (each instance's CPU seconds per second, ``cpu_cores``). It is what moving instances
can change: a node busy with work outside Kumo does not get less busy by losing an
instance, and that work is already kept off by the scheduler's limit on the node's measured
CPU (``placement_cpu_busy_max``), which every destination passes.

The policy:

- a node is a source only when every sample of the last ``window`` seconds put it over
  ``cpu_high`` (sustained, not a burst);
- a move must leave its destination below ``cpu_high - margin``, so a destination never
  becomes a source (hysteresis: nothing moves back and forth);
- at most ``max_in_flight`` migrations at once fleet-wide and one per node (as source or
  destination), counting those already running;
- an instance that cannot move (pinned, excluded, cooling down, not checkpointable, known
  pre-flight blockers) comes with its reason from the caller, as does every destination it
  cannot go to (the scheduler's filters: drained, memory, kind...);
- from each busy node, the move that brings it under ``cpu_high`` if one does, else the one
  that takes off the most, leaving the two nodes' loads as even as possible.

Moves come in waves: a wave respects the limits, and the next one would start when it has
ended. Projections go by the instances the controller places on each node and each
instance's use over the window, so a move planned in one wave counts in the next.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any


@dataclasses.dataclass(frozen=True)
class Policy:
    cpu_high: float = 0.8
    margin: float = 0.1
    window: float = 300.0
    interval: float = 30.0  # between samples: a window is covered by samples from its first interval on
    max_in_flight: int = 2

    @classmethod
    def of(cls, settings: Any) -> Policy:
        """The policy of controller.yaml's ``rebalance`` table."""
        return cls(settings.cpu_high, settings.margin, settings.window, settings.interval, settings.max_in_flight)


@dataclasses.dataclass(frozen=True)
class Node:
    id: str
    cpus: int
    samples: Sequence[tuple[float, float]]  # (time, share of its CPUs its instances used), oldest first


@dataclasses.dataclass(frozen=True)
class Instance:
    name: str
    kind: str
    node: str
    cpu: float | None  # cores used over the window (the median: a restore's burst is not its use); None: not measured
    refused: str | None = None  # why it may not move at all
    destinations: Mapping[str, str | None] = dataclasses.field(default_factory=dict)  # node -> why not (None: may)


@dataclasses.dataclass
class NodeStatus:
    id: str
    cpus: int
    load: float  # what its instances use, from their figures over the window
    low: float | None  # the least share measured over the window
    sustained: bool  # over cpu_high in every sample of a covered window
    after: float = 0.0  # load once the plan is carried out


@dataclasses.dataclass
class Move:
    instance: str
    kind: str
    source: str
    destination: str
    wave: int
    cpu: float
    source_before: float
    source_after: float
    destination_before: float
    destination_after: float
    reason: str


@dataclasses.dataclass
class Refusal:
    instance: str
    node: str
    reason: str


@dataclasses.dataclass
class Plan:
    nodes: list[NodeStatus]
    moves: list[Move]
    refused: list[Refusal]
    summary: str


def plan(nodes: Sequence[Node], instances: Sequence[Instance], policy: Policy, now: float,
         in_flight: Sequence[tuple[str, str | None]] = ()) -> Plan:
    """The moves that would even out ``nodes`` (see the module's docstring). ``in_flight``:
    (source, destination) of the migrations running now."""
    cpus = {node.id: max(1, node.cpus) for node in nodes}
    where = {inst.name: inst.node for inst in instances if inst.node in cpus}
    load = {node_id: 0.0 for node_id in cpus}
    for inst in instances:
        if inst.name in where and inst.cpu:
            load[inst.node] += inst.cpu / cpus[inst.node]
    statuses = {node.id: _status(node, load[node.id], policy, now) for node in nodes}
    hot = [node_id for node_id, status in statuses.items() if status.sustained]
    ceiling = policy.cpu_high - policy.margin
    moves: list[Move] = []
    moved: set[str] = set()
    busy = {node for pair in in_flight for node in pair if node}
    budget = policy.max_in_flight - len(in_flight)
    wave = 1
    while True:
        started, waiting = 0, False
        for source in sorted(hot, key=lambda n: (-load[n], n)):
            if load[source] <= policy.cpu_high:
                continue
            if source in busy or budget <= 0:
                waiting = True  # for a migration of this wave (or one running) to end
                continue
            best = _best_move(source, instances, where, moved, busy, load, cpus, ceiling, policy.cpu_high)
            if best is None:
                continue
            inst, destination, after_source, after_destination = best
            moves.append(Move(
                inst.name, inst.kind, source, destination, wave, round(inst.cpu or 0.0, 4),
                round(load[source], 4), round(after_source, 4), round(load[destination], 4),
                round(after_destination, 4),
                _why(statuses[source], inst, destination, after_source, after_destination, policy),
            ))
            load[source], load[destination] = after_source, after_destination
            where[inst.name] = destination
            moved.add(inst.name)
            busy |= {source, destination}
            budget -= 1
            started += 1
        if not started and not waiting:
            break
        wave, busy, budget = wave + 1, set(), policy.max_in_flight
    for node_id, status in statuses.items():
        status.after = round(load[node_id], 4)
    refused = [
        Refusal(inst.name, inst.node, _why_not(inst, load, cpus, ceiling))
        for inst in sorted(instances, key=lambda i: (i.node, i.name))
        if inst.node in hot and inst.name not in moved and load[inst.node] > policy.cpu_high
    ]
    return Plan(sorted(statuses.values(), key=lambda s: s.id), moves, refused,
                _summary(statuses, hot, moves, refused, policy))


def _status(node: Node, load: float, policy: Policy, now: float) -> NodeStatus:
    low, sustained = busy(node.samples, policy, now)
    return NodeStatus(node.id, node.cpus, round(load, 4), low, sustained)


def busy(samples: Sequence[tuple[float, float]], policy: Policy, now: float) -> tuple[float | None, bool]:
    """(the least share in the window, or None without samples; whether every sample of a
    covered window is over ``cpu_high``) for one node's ``samples``."""
    window = [(at, share) for at, share in samples if at >= now - policy.window]
    if not window:
        return None, False
    low = round(min(share for _, share in window), 4)
    # Samples come every interval, give or take the event loop's lateness: the first must be
    # within an interval and a half of the window's start, so that a sample taken a few
    # milliseconds late does not leave the window uncovered.
    covered = window[0][0] <= now - policy.window + 1.5 * policy.interval and len(window) >= 2
    return low, covered and low > policy.cpu_high


def _best_move(source: str, instances: Sequence[Instance], where: Mapping[str, str], moved: set[str],
               busy: set[str], load: Mapping[str, float], cpus: Mapping[str, int], ceiling: float,
               high: float) -> tuple[Instance, str, float, float] | None:
    """The move off ``source`` that brings it under ``high`` if one does, else the one that
    takes off the most; ties go to the more even result, then to names (a stable answer)."""
    options = []
    for inst in instances:
        if where.get(inst.name) != source or inst.name in moved or inst.refused or not inst.cpu:
            continue
        after_source = load[source] - inst.cpu / cpus[source]
        for destination, why in inst.destinations.items():
            if why is not None or destination in busy or destination not in cpus or destination == source:
                continue
            after_destination = load[destination] + inst.cpu / cpus[destination]
            if after_destination >= ceiling:
                continue
            still_over = after_source > high
            rank = (still_over, after_source if still_over else 0.0, max(after_source, after_destination),
                    after_destination, inst.name, destination)
            options.append((rank, (inst, destination, after_source, after_destination)))
    return min(options, key=lambda option: option[0])[1] if options else None


def _why(status: NodeStatus, inst: Instance, destination: str, after_source: float, after_destination: float,
         policy: Policy) -> str:
    return (f"node {status.id}'s instances used over {policy.cpu_high:.0%} of its {status.cpus} CPUs for "
            f"{policy.window:g} s (at least {status.low:.0%}); moving {inst.name} ({inst.cpu:.2f} cores) leaves it at "
            f"{after_source:.0%} and node {destination} at {after_destination:.0%}, below "
            f"{policy.cpu_high - policy.margin:.0%}")


def _why_not(inst: Instance, load: Mapping[str, float], cpus: Mapping[str, int], ceiling: float) -> str:
    """Why ``inst`` stays on its busy node, in one sentence."""
    if inst.refused:
        return inst.refused
    if inst.cpu is None:
        return "its CPU use is not measured yet (it needs two heartbeats on one node)"
    if inst.cpu <= 0:
        return "it uses no CPU: moving it would not make its node less busy"
    reasons = []
    for destination, why in sorted(inst.destinations.items()):
        if destination == inst.node or destination not in cpus:
            continue
        if why is None:  # else the plan would have moved it in a later wave
            why = f"would be at {load[destination] + inst.cpu / cpus[destination]:.0%} with it, not below {ceiling:.0%}"
        reasons.append(f"{destination}: {why}")
    return "no node can take it: " + ("; ".join(reasons) if reasons else "there is no other node")


def _summary(statuses: Mapping[str, NodeStatus], hot: list[str], moves: list[Move], refused: list[Refusal],
             policy: Policy) -> str:
    if not hot:
        measured = [status for status in statuses.values() if status.low is not None]
        busiest = max(measured, key=lambda status: (status.low, status.id), default=None)
        return (f"no node's instances stayed over {policy.cpu_high:.0%} of its CPUs for {policy.window:g} s"
                + (f" (the busiest, {busiest.id}, at least {busiest.low:.0%})" if busiest else "")
                + ": nothing to move")
    waves = max((m.wave for m in moves), default=0)
    busy = ", ".join(sorted(hot))
    if not moves:
        return f"node {busy} stayed over {policy.cpu_high:.0%}, but nothing on it can move (see refused)"
    left = sorted({r.node for r in refused})
    return (f"{len(moves)} move(s) in {waves} wave(s) off {busy}"
            + (f"; {', '.join(left)} stays over {policy.cpu_high:.0%} (see refused)" if left else ""))
