"""Placement: which node runs a new instance. A pure function over the nodes' reported state.

``place(request, nodes)`` filters the nodes, keeping for every node it drops one sentence
that says why (the API returns them when nothing fits, so an admin sees what to fix), then
spreads the instance onto the least loaded node that is left.

A node is the ``GET /v1/nodes`` shape plus ``committed``: the vCPUs and memory of the
instances the controller has already placed there, running or still being created.

Memory. ``facts.memory_available_bytes`` is what the kernel had free at the node's last
fingerprint; it already lacks the memory of guests that were running then, but not of the
ones placed since. Subtracting ``committed`` from it would count the running guests twice,
so the two figures are checked separately. Committed memory is a reservation against the
node's total (``memory_bytes``; memory is not overcommitted): that covers guests placed
but not started yet. The request must also fit in what is available now: that covers the
host's own processes and anything running outside Kumo. Free memory is the smaller of the
two.

Images. A node reports the images its cache holds (``images.held``, digests). Between nodes
equally loaded, an instance made from an image (``image_sha256``) goes to one that already
holds it: its create starts at once instead of after a pull. Spreading comes first: a pull
costs once, a crowded node for as long as its instances run.

CPU. A node takes at most ``cpus × vcpu_overcommit`` vCPUs (node fact ``vcpu_overcommit``,
default :data:`DEFAULT_VCPU_OVERCOMMIT`: guests rarely keep every vCPU busy).

Measured usage. Reservations say what was promised, not what is used: with overcommit the
norm, a node whose reservations look free may be busy. A node reports what it measures in
its heartbeats (``usage``): one whose CPU is busier than ``cpu_busy_max`` takes nothing new,
and between nodes with the same share of their vCPUs reserved the less busy one wins (one
heartbeat's figure is too noisy to outweigh reservations). Measured free memory (total less
used, from the last heartbeat) is fresher than the fingerprint's and is used when the node
reports it. A node the rebalancer finds busy (``instances_busy``: its instances stayed over
its threshold for a whole window, see controller/rebalancer.py) takes no new instance either,
unless the request names it: placing there would only give the rebalancer more to move.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

DEFAULT_VCPU_OVERCOMMIT = 4.0
DEFAULT_CPU_BUSY_MAX = 0.9
MIB = 1024 * 1024


def place(
    request: Mapping[str, Any], nodes: list[Mapping[str, Any]], cpu_busy_max: float = DEFAULT_CPU_BUSY_MAX
) -> tuple[str | None, dict[str, str]]:
    """Choose the node for ``request`` (``kind``, ``vcpus``, ``memory_mib``, optional ``node``
    and ``image_sha256``).

    Returns the chosen node id (None when no node fits) and, for every node that was
    dropped, the reason in one sentence. Among the nodes that fit, the one with the fewest
    committed vCPUs relative to its vCPU capacity wins; ties go to a node holding the image,
    then to the least busy CPU as measured, then to the most free memory, then to the
    smallest id so the answer is stable.
    """
    reasons: dict[str, str] = {}
    candidates: list[tuple[float, bool, float, float, str]] = []
    image = request.get("image_sha256")
    for node in nodes:
        node_id = str(node["id"])
        reason = unfit(request, node, cpu_busy_max)
        if reason:
            reasons[node_id] = reason
            continue
        load = _committed(node, "vcpus") / _vcpu_capacity(node)
        lacks_image = bool(image) and image not in images_held(node)
        candidates.append((load, lacks_image, _cpu_busy(node) or 0.0, -_free_memory_mib(node), node_id))
    if not candidates:
        return None, reasons
    return min(candidates)[-1], reasons


def images_held(node: Mapping[str, Any]) -> set[str]:
    """The digests of the images the node last reported holding."""
    return set((node.get("images") or {}).get("held") or ())


def unfit(request: Mapping[str, Any], node: Mapping[str, Any], cpu_busy_max: float) -> str | None:
    """The first filter that drops ``node``, as a sentence, or None when it fits (the
    rebalancer asks it of every destination)."""
    node_id = node["id"]
    pinned = request.get("node")
    if pinned and pinned != node_id:
        return f"the instance is pinned to node {pinned}"
    state = node.get("state")
    if state != "ready":
        return f"node is {state or 'in an unknown state'}, not ready"
    if node.get("drained"):
        return "node is drained (kumoctl nodes undrain to accept new instances)"
    kind = request["kind"]
    plugin_reason = _kind_unsupported(kind, node.get("plugins") or {})
    if plugin_reason:
        return plugin_reason
    facts = node.get("facts") or {}
    if not facts.get("cpus") or not facts.get("memory_bytes"):
        return "node has not reported its CPU count and memory yet"
    wanted_mib = int(request["memory_mib"])
    free_mib = _free_memory_mib(node)
    if wanted_mib > free_mib:
        return f"not enough free memory: {wanted_mib} MiB wanted, {free_mib:.0f} MiB free"
    wanted_vcpus = int(request["vcpus"])
    capacity = _vcpu_capacity(node)
    committed = _committed(node, "vcpus")
    if committed + wanted_vcpus > capacity:
        ratio = _overcommit(facts)
        return (
            f"not enough vCPUs: {wanted_vcpus} wanted, {committed:g} of {capacity:g} committed "
            f"({facts['cpus']} CPUs × overcommit {ratio:g})"
        )
    busy = _cpu_busy(node)
    if busy is not None and busy > cpu_busy_max:
        return (f"node's CPU is {busy:.0%} busy as measured, above the {cpu_busy_max:.0%} placement limit "
                f"(although {committed:g} of {capacity:g} vCPUs are committed)")
    if node.get("instances_busy") and not pinned:
        return f"{node['instances_busy']} (although {committed:g} of {capacity:g} vCPUs are committed)"
    return None


def _usage(node: Mapping[str, Any]) -> Mapping[str, Any]:
    return (node.get("usage") or {}).get("node") or {}


def _cpu_busy(node: Mapping[str, Any]) -> float | None:
    busy = _usage(node).get("cpu_busy")
    return float(busy) if isinstance(busy, int | float) else None


def _kind_unsupported(kind: str, plugins: Mapping[str, Any]) -> str | None:
    """Why no plugin on the node can run ``kind`` now, or None when one can.

    A plugin that is unavailable may not list the kinds it cannot run, so a plugin named
    after the kind counts as offering it: its reason is the useful message.
    """
    offering = {
        name: fp for name, fp in plugins.items() if kind in (fp.get("kinds") or ()) or name == kind
    }
    if not offering:
        return f"no plugin on the node runs {kind} instances"
    if any(fp.get("available") for fp in offering.values()):
        return None
    return "; ".join(
        f"plugin {name} is unavailable: {fp.get('reason') or 'no reason given'}"
        for name, fp in sorted(offering.items())
    )


def _overcommit(facts: Mapping[str, Any]) -> float:
    ratio = facts.get("vcpu_overcommit")
    return float(ratio) if ratio else DEFAULT_VCPU_OVERCOMMIT


def _vcpu_capacity(node: Mapping[str, Any]) -> float:
    facts = node.get("facts") or {}
    return float(facts["cpus"]) * _overcommit(facts)


def _committed(node: Mapping[str, Any], key: str) -> float:
    return float((node.get("committed") or {}).get(key, 0))


def _free_memory_mib(node: Mapping[str, Any]) -> float:
    facts, usage = node.get("facts") or {}, _usage(node)
    total = facts["memory_bytes"] / MIB
    if "memory_used_bytes" in usage and "memory_total_bytes" in usage:
        available = (usage["memory_total_bytes"] - usage["memory_used_bytes"]) / MIB
    else:
        available = facts.get("memory_available_bytes", facts["memory_bytes"]) / MIB
    return max(0.0, min(available, total - _committed(node, "memory_mib")))
