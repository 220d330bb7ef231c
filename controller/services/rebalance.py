"""Rebalancing: sampling what the nodes' instances use, planning, and carrying moves out.

One controller samples (a singleton: :func:`loop`, under the store's lock named
:data:`SINGLETON`): every ``rebalance.interval`` seconds it reads each ready node's last
report and stores the share of the node's CPUs its instances used and each instance's
cores, keeping one window of them. Samples live in the store, so any controller can plan,
and a controller taking the work over after a failover goes on with the same window.

:func:`plan` turns the samples, the instances' records and the recent decisions into the
planner's inputs (:mod:`controller.rebalancer`): why an instance may not move at all, and
every node it may not go to with the scheduler's reason. :func:`apply` runs one round: it
plans and starts the first wave's moves through the one migration path
(:func:`controller.services.migrations.start_migration`, whose pre-flight may still refuse),
recording every decision. A round holds the store's lease :data:`LEASE`, so that rounds
asked for on several controllers (an admin's apply, the automatic mode) never exceed the
limits together. In ``auto`` mode the sampling controller runs a round after each sample.

An instance whose move failed, or was refused when it was started, is not tried again for
``retry_after`` seconds (its history says why), nor is the node a move failed to a
destination meanwhile; an instance that was moved stays for ``cooldown``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import logging
import statistics
import time
import uuid
from typing import Any

from controller import rebalancer, scheduler
from controller.services import Refused, instances, iso, migrations

log = logging.getLogger("kumo.controller.rebalance")

SINGLETON = "sampling usage for rebalancing"
LEASE = "rebalance-round"
LEASE_SECONDS = 300.0  # longer than a round's pre-flights; a controller dying mid-round frees it then
LEASE_WAIT = 30.0  # how long an admin's apply waits for another round to end


async def sample(ctl: Any) -> None:
    """Store one sample of every ready node: its instances' share of its CPUs and their cores."""
    now, settings = time.time(), ctl.settings.rebalance
    samples = []
    for row in await ctl.store.list_nodes():
        view = ctl.node_view(row)
        if view["state"] != "ready" or not view["usage"]:
            continue
        cores = {name: float(figures["cpu_cores"]) for name, figures in (view["usage"].get("instances") or {}).items()
                 if isinstance(figures.get("cpu_cores"), int | float)}
        samples.append((view["id"], now, round(sum(cores.values()) / _cpus(view), 4), cores))
    await ctl.store.add_rebalance_samples(samples, now - settings.window - 2 * settings.interval)


def _cpus(node: dict[str, Any]) -> int:
    return int((node.get("facts") or {}).get("cpus") or 1)


async def plan(ctl: Any) -> dict[str, Any]:
    """What a round would do now, as the API shows it."""
    return _shown(*await _plan(ctl))


async def _plan(ctl: Any) -> tuple[rebalancer.Plan, rebalancer.Policy]:
    settings, now = ctl.settings.rebalance, time.time()
    rules = rebalancer.Policy.of(settings)
    samples = await ctl.store.rebalance_samples(now - settings.window - settings.interval)
    fleet = [node for node in await instances.fleet(ctl, samples) if node["state"] == "ready"]
    by_id = {node["id"]: node for node in fleet}
    series: dict[str, list[tuple[float, float]]] = {}
    used: dict[str, list[float]] = {}
    for row in samples:
        series.setdefault(row["node"], []).append((row["at"], row["cpu"]))
        for name, cores in row["instances"].items():
            used.setdefault(name, []).append(cores)
    nodes = [rebalancer.Node(node["id"], _cpus(node), tuple(series.get(node["id"], ()))) for node in fleet]
    active = await ctl.store.active_migrations()
    moving = {doc["instance"] for doc in active}
    recent = await _recent(ctl, now)
    latest: dict[str, dict[str, Any]] = {}
    for entry in recent:
        latest.setdefault(entry["instance"], entry)
    avoided = _avoided(recent, settings.retry_after, now)
    candidates = []
    for row in await ctl.store.list_instances():
        if row["node"] not in by_id:
            continue
        cores = used.get(row["name"])
        candidates.append(rebalancer.Instance(
            row["name"], row["kind"], row["node"], statistics.median(cores) if cores else None,
            _refused(ctl, row, by_id[row["node"]], moving, latest.get(row["name"]), now),
            {node["id"]: avoided.get(node["id"]) or migrations.cannot_receive(node, row["kind"]) or scheduler.unfit(
                migrations.move_request(row, None), node, ctl.settings.placement_cpu_busy_max)
             for node in fleet if node["id"] != row["node"]},
        ))
    in_flight = [(doc["source"], doc["destination"]) for doc in active]
    return rebalancer.plan(nodes, candidates, rules, now, in_flight), rules


async def _recent(ctl: Any, now: float) -> list[dict[str, Any]]:
    """The decisions within the cool-down or retry period, newest first, with their migrations' states."""
    settings = ctl.settings.rebalance
    return [await _with_outcome(ctl, entry)
            for entry in await ctl.store.rebalance_history(since=now - max(settings.cooldown, settings.retry_after))]


def _avoided(recent: list[dict[str, Any]], retry_after: float, now: float) -> dict[str, str]:
    """Nodes a rebalancing move failed to within ``retry_after``: not destinations meanwhile, so
    that a node that cannot restore what it receives does not fail one instance after another."""
    avoided = {}
    for entry in recent:
        if entry["state"] == "failed" and entry["at"] + retry_after > now:
            avoided.setdefault(entry["destination"], (
                f"a rebalancing move of {entry['instance']} to it failed at {iso(entry['at'])} "
                f"({entry.get('error')}); not a destination before {iso(entry['at'] + retry_after)}"))
    return avoided


async def _with_outcome(ctl: Any, entry: dict[str, Any]) -> dict[str, Any]:
    """``entry`` with its migration's state, error and outcome (``state``: ``refused`` when it
    never started, ``unknown`` when the migration's record was pruned)."""
    if entry.get("migration") is None:
        entry["state"] = "refused"
        return entry
    doc = migrations.migrations(ctl).docs.get(entry["migration"]) or await ctl.store.get_migration(entry["migration"])
    entry.update(state=(doc or {}).get("state", "unknown"), error=(doc or {}).get("error"),
                 outcome=(doc or {}).get("outcome"))
    return entry


def _refused(ctl: Any, row: dict[str, Any], node: dict[str, Any], moving: set[str], last: dict[str, Any] | None,
             now: float) -> str | None:
    """Why the rebalancer may not move this instance at all now, or None."""
    settings = ctl.settings.rebalance
    if row.get("pinned"):
        return "pinned (created with --option pin=true)"
    pattern = next((p for p in settings.exclude if fnmatch.fnmatchcase(row["name"], p)), None)
    if pattern is not None:
        return f"excluded by rebalance.exclude in controller.yaml ({pattern!r})"
    if row["name"] in moving:
        return "it is being migrated"
    reported = next((i for i in node["instances"] if i.get("name") == row["name"]), None)
    state = (reported or {}).get("state", "unknown")
    if state != "running":
        return f"it is {state}: only a running instance is moved"
    blockers = ((reported or {}).get("details") or {}).get("checkpoint_blockers") or []
    if blockers:
        return "pre-flight: " + "; ".join(f"{b.get('message')} [{b.get('code')}]" for b in blockers
                                          if isinstance(b, dict))
    cannot = migrations.unsupported(node, row["node"], row["kind"])
    if cannot is not None:
        return f"not checkpointable: {cannot}"
    if last is not None:
        if last["state"] in ("refused", "failed"):
            until = last["at"] + settings.retry_after
            if now < until:
                why = last.get("refused") or last.get("error") or "it failed"
                return f"its last rebalancing move {last['state']} ({why}); not tried again before {iso(until)}"
        elif now < last["at"] + settings.cooldown:
            return f"the rebalancer moved it at {iso(last['at'])}; it stays until {iso(last['at'] + settings.cooldown)}"
    return None


async def apply(ctl: Any, trigger: str, wait: float = LEASE_WAIT) -> dict[str, Any]:
    """Run one round (``trigger``: ``apply`` or ``auto``): start the plan's first wave.

    Returns the plan and the decisions made, each as recorded in the history. 409 when
    another round holds the lease for longer than ``wait`` seconds.
    """
    holder = f"{ctl.id}:{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + wait
    while not await ctl.store.take_lease(LEASE, holder, LEASE_SECONDS):
        if time.monotonic() >= deadline:
            raise Refused(409, "another rebalancing round is running (the automatic mode or another admin's "
                               "apply); try again in a moment")
        await asyncio.sleep(0.5)
    try:
        result, rules = await _plan(ctl)
        decisions = []
        for move in result.moves:
            if move.wave != 1:
                continue
            decisions.append(await _start(ctl, move, trigger))
    finally:
        await asyncio.shield(ctl.store.release_lease(LEASE, holder))
    return {**_shown(result, rules), "decisions": decisions}


async def _start(ctl: Any, move: rebalancer.Move, trigger: str) -> dict[str, Any]:
    """Start one planned move and record the decision, whether it started or was refused."""
    entry: dict[str, Any] = {**dataclasses.asdict(move), "at": time.time(), "trigger": trigger,
                             "controller": ctl.id, "migration": None, "refused": None}
    del entry["wave"]
    row = await ctl.store.get_instance(move.instance)
    try:
        if row is None or row["node"] != move.source:
            raise Refused(409, f"instance {move.instance} is no longer on node {move.source}")
        doc = await migrations.start_migration(ctl, row, move.destination)
        entry["migration"] = doc["id"]
        log.info("rebalancing: moving %s from %s to %s (migration %s): %s", move.instance, move.source,
                 move.destination, doc["id"], move.reason)
    except Refused as exc:
        entry["refused"] = exc.message
        log.info("rebalancing: moving %s from %s to %s was refused: %s", move.instance, move.source,
                 move.destination, exc.message)
    await ctl.store.add_rebalance_entry(entry)
    return await _with_outcome(ctl, entry)


async def history(ctl: Any, limit: int, before: int | None) -> list[dict[str, Any]]:
    """Decisions, newest first, each with how its migration went."""
    return [_shown_entry(await _with_outcome(ctl, entry)) for entry in await ctl.store.rebalance_history(limit, before)]


def _shown_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "at": iso(entry["at"])}


def _shown(result: rebalancer.Plan, rules: rebalancer.Policy) -> dict[str, Any]:
    return {
        "summary": result.summary,
        "policy": dataclasses.asdict(rules),
        "nodes": [dataclasses.asdict(status) for status in result.nodes],
        "moves": [dataclasses.asdict(move) for move in result.moves],
        "refused": [dataclasses.asdict(refusal) for refusal in result.refused],
    }


async def loop(ctl: Any) -> None:
    """The singleton's work: sample every interval and, in ``auto`` mode, run a round."""
    settings = ctl.settings.rebalance
    tick = time.monotonic()
    while True:
        try:
            await sample(ctl)
            if settings.mode == "auto":
                result = await apply(ctl, "auto", wait=0)
                log.log(logging.INFO if result["decisions"] else logging.DEBUG, "rebalancing round: %s; refused: %s",
                        result["summary"], "; ".join(f"{r['instance']}: {r['reason']}" for r in result["refused"]))
        except Refused as exc:
            log.info("rebalancing round skipped: %s", exc.message)
        except Exception:
            log.exception("rebalancing round failed; trying again in %g s", settings.interval)
        # A sample every interval, not every interval plus the work: the planner counts a
        # window covered only if its samples are that close (a late one starts its own tick).
        tick = max(tick + settings.interval, time.monotonic())
        await asyncio.sleep(tick - time.monotonic())
