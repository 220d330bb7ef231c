"""Instances: VMs, containers and processes, placed by the scheduler and run by a node's plugin.

The controller keeps what was asked for (the spec) and where it went; the node's plugin
reports what is true (the state, in heartbeats). Every operation is a task
``<kind>.<operation>`` on the instance's node, so a node that is down gets it when it is
back. The spec is passed to the plugin as the create payload: each plugin validates its
own fields, so a new instance kind needs no change here.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

from agent.sdk import KIND_RE
from controller import rebalancer, scheduler
from controller.services import Refused, images
from controller.services.tasks import new_task, submit
from controller.store.database import StoreError

NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\Z")
DEFAULT_VCPUS = 1
DEFAULT_MEMORY_MIB = 256
CONTROLLER_OPTIONS = {"pin", "checkpoint_keep"}  # kept by the controller, never sent to the kind's plugin


async def fleet(ctl: Any, samples: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Every node as the scheduler sees it: live state plus what is already placed on it, and
    ``instances_busy``: why the rebalancer finds it busy (see :mod:`controller.rebalancer`),
    or None. ``samples``: the rebalancer's, when the caller has read them already."""
    rules, now = rebalancer.Policy.of(ctl.settings.rebalance), time.time()
    if samples is None:
        samples = await ctl.store.rebalance_samples(now - rules.window - rules.interval)
    series: dict[str, list[tuple[float, float]]] = {}
    for sample in samples:
        series.setdefault(sample["node"], []).append((sample["at"], sample["cpu"]))
    committed: dict[str, dict[str, float]] = {}
    for row in await ctl.store.list_instances():
        use = committed.setdefault(row["node"], {"vcpus": 0, "memory_mib": 0})
        use["vcpus"] += row["spec"].get("vcpus", 0)
        use["memory_mib"] += row["spec"].get("memory_mib", 0)
    nodes = []
    for row in await ctl.store.list_nodes():
        view = ctl.node_view(row)
        view["committed"] = committed.get(row["id"], {"vcpus": 0, "memory_mib": 0})
        low, busy = rebalancer.busy(series.get(row["id"], ()), rules, now)
        view["instances_busy"] = (
            f"node's instances used over {rules.cpu_high:.0%} of its CPUs in every sample of the last "
            f"{rules.window:g} s (at least {low:.0%}), as measured: the rebalancer moves load off it"
        ) if busy else None
        nodes.append(view)
    return nodes


def checked_keep(keep: Any, what: str) -> int:
    """``keep``, a number of checkpoints to keep; 400 naming ``what`` unless it is an integer >= 1."""
    if not isinstance(keep, int) or isinstance(keep, bool) or keep < 1:
        raise Refused(400, f"{what} must be an integer >= 1 (the checkpoints kept), got {keep!r:.40}")
    return keep


async def get(ctl: Any, name: str) -> dict[str, Any]:
    """The instance's record; 404 when there is none."""
    # A name no create accepts names nothing, and a NUL is no PostgreSQL text: not asked.
    row = await ctl.store.get_instance(name) if NAME_RE.match(name) else None
    if row is None:
        raise Refused(404, f"no instance {name!r}: see `kumoctl instances list`")
    return row


async def refuse_if_migrating(ctl: Any, name: str) -> None:
    """409 while a migration holds the instance: nothing else may start, stop or delete it."""
    current = await ctl.store.active_migration(name)
    if current is not None:
        busy(name, current)


def busy(name: str, migration_id: str) -> None:
    raise Refused(409, f"instance {name} is being migrated (GET /v1/migrations/{migration_id}); wait until it ends")


async def create(ctl: Any, name: str, kind: str, spec: dict[str, Any], pinned: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Place a new instance and queue its create task: (its record, the task). ``spec`` is
    everything the kind's plugin gets besides the name and kind (vcpus and memory_mib set),
    but the options that are the controller's: ``pin`` (true: the rebalancer never moves
    it) and ``checkpoint_keep`` (the checkpoints its node keeps after each checkpoint)."""
    options = spec.get("options") if isinstance(spec.get("options"), dict) else {}
    pin = options.get("pin", False)
    if not isinstance(pin, bool):
        raise Refused(400, f"options.pin must be true or false (true: the rebalancer never moves it), got {pin!r:.40}")
    keep = options.get("checkpoint_keep")
    if keep is not None:
        checked_keep(keep, "options.checkpoint_keep")
    if CONTROLLER_OPTIONS & set(options):
        spec = {**spec, "options": {k: v for k, v in options.items() if k not in CONTROLLER_OPTIONS}}
    if not NAME_RE.match(name):
        raise Refused(400, f"name must be 1-63 lowercase letters, digits or '-' (not first or last), got {name!r}")
    if not KIND_RE.match(kind):
        raise Refused(400, f"kind must be an instance kind such as kvm, lxc or process, got {kind!r}")
    if spec["vcpus"] < 1 or spec["memory_mib"] < 1:
        raise Refused(400, "vcpus and memory_mib must be positive")
    if await ctl.store.get_instance(name) is not None:
        raise Refused(409, f"an instance named {name!r} already exists; choose another name or delete it first")
    catalogue = await _catalogue_image(ctl, kind, spec)
    request = {"kind": kind, "vcpus": spec["vcpus"], "memory_mib": spec["memory_mib"], "node": pinned,
               "image_sha256": spec.get("image_sha256")}
    nodes = await fleet(ctl)
    if pinned and not any(n["id"] == pinned for n in nodes):
        raise Refused(404, f"no node {pinned!r} to pin the instance to: see `kumoctl nodes list`")
    chosen, reasons = scheduler.place(request, nodes, ctl.settings.placement_cpu_busy_max)
    if chosen is None:
        if not nodes:
            raise Refused(409, "no node is enrolled: join one with `kumo-agent join` first")
        why = "; ".join(f"{node}: {reason}" for node, reason in sorted(reasons.items()))
        raise Refused(409, f"no node can run this {kind} instance: {why}", reasons=reasons)
    if catalogue is not None:
        catalogue["held"] = catalogue["sha256"] in scheduler.images_held(next(n for n in nodes if n["id"] == chosen))
    payload = {"name": name, "kind": kind, **spec}
    task = new_task(chosen, f"{kind}.create", payload, key=f"create:{name}:{uuid.uuid4().hex}", instance=name)
    try:
        stored = await ctl.store.add_instance(
            {"name": name, "kind": kind, "node": chosen, "spec": spec, "reasons": reasons, "image": catalogue,
             "pinned": pin, "checkpoint_keep": keep}, task
        )
    except StoreError as exc:
        raise Refused(409, f"{exc}; choose another name or delete it first") from None
    return await get(ctl, name), stored


async def _catalogue_image(ctl: Any, kind: str, spec: dict[str, Any]) -> dict[str, Any] | None:
    """When ``spec["image"]`` names a catalogue image (not a path or URL on the node): resolve
    it now, once, and have the node pull that digest from its controller; what is recorded."""
    image = spec.get("image")
    if not isinstance(image, str) or not image or image.startswith("/") or "://" in image:
        return None
    row = await images.for_instance(ctl, kind, image)
    given = spec.get("image_sha256")
    if isinstance(given, str) and given.lower() != row["sha256"]:
        raise Refused(400, f"image {image} is {row['sha256']} in the catalogue, not the image_sha256 given ({given:.80})")
    spec["image"] = f"{images.CATALOGUE_PREFIX}{row['name']}:{row['version']}"
    spec["image_sha256"] = row["sha256"]
    return {key: row[key] for key in ("name", "version", "kind", "sha256", "size_bytes")}


async def operate(ctl: Any, row: dict[str, Any], operation: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Queue ``<kind>.<operation>`` for the instance on its node; the stored task."""
    await refuse_if_migrating(ctl, row["name"])
    node = await ctl.store.get_node(row["node"])
    if node is None or node["removed"]:
        raise Refused(409, f"instance {row['name']} was on node {row['node']}, which was removed")
    payload = {"name": row["name"], "kind": row["kind"], **(extra or {})}
    task, _ = await submit(ctl, new_task(row["node"], f"{row['kind']}.{operation}", payload, instance=row["name"]))
    return task


async def delete(ctl: Any, row: dict[str, Any]) -> dict[str, Any] | None:
    """Queue the instance's delete; None when its node was removed and only the record was left
    (it is gone at once)."""
    node = await ctl.store.get_node(row["node"])
    if node is None or node["removed"]:
        await ctl.store.delete_instance(row["name"])
        return None
    return await operate(ctl, row, "delete")
