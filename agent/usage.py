"""What the node and its instances use: the ``kumo_instance_*`` metric families and the usage
summary a heartbeat carries.

Per-instance figures come from the drivers that implement the contract's optional
:meth:`agent.sdk.UsageMeter.usage`, read at scrape (or heartbeat) time from a worker thread:
nothing polls in the background, and a kind that measures nothing simply has no series.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import psutil

from agent.sdk import InstanceUsage

if TYPE_CHECKING:
    from agent.instances import Drivers

# The labels of every family; Prometheus stores a target's own ``instance`` label beside
# them, so this one arrives as ``exported_instance`` unless the scrape honours labels.
LABELS = ("instance", "kind")

# (InstanceUsage field, family name, help, counter?)
_FAMILIES = (
    ("cpu_seconds", "kumo_instance_cpu_seconds",
     "CPU time the instance has used since it started, in seconds.", True),
    ("memory_bytes", "kumo_instance_memory_bytes",
     "Memory the instance holds now (a cgroup's working set, a VM's QEMU resident set, a process tree's RSS), in bytes.",
     False),
    ("memory_limit_bytes", "kumo_instance_memory_limit_bytes",
     "Memory the instance may hold at most, in bytes (no series when it is unlimited).", False),
    ("network_receive_bytes", "kumo_instance_network_receive_bytes",
     "Bytes the instance's network interfaces received.", True),
    ("network_transmit_bytes", "kumo_instance_network_transmit_bytes",
     "Bytes the instance's network interfaces sent.", True),
    ("network_receive_packets", "kumo_instance_network_receive_packets",
     "Packets the instance's network interfaces received.", True),
    ("network_transmit_packets", "kumo_instance_network_transmit_packets",
     "Packets the instance's network interfaces sent.", True),
    ("block_read_bytes", "kumo_instance_block_read_bytes",
     "Bytes the instance read from block devices.", True),
    ("block_write_bytes", "kumo_instance_block_write_bytes",
     "Bytes the instance wrote to block devices.", True),
    ("block_read_operations", "kumo_instance_block_read_operations",
     "Read operations the instance sent to block devices.", True),
    ("block_write_operations", "kumo_instance_block_write_operations",
     "Write operations the instance sent to block devices.", True),
)


def usage_families(usage: Mapping[str, Mapping[str, InstanceUsage]]) -> list[Any]:
    """The ``kumo_instance_*`` families of ``{kind: {name: usage}}``: one series per instance
    and measured field; a family with no series is left out."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    families = []
    for field, name, text, counter in _FAMILIES:
        family = (CounterMetricFamily if counter else GaugeMetricFamily)(name, text, labels=LABELS)
        for kind, instances in sorted(usage.items()):
            for instance, measured in sorted(instances.items()):
                value = getattr(measured, field)
                if value is not None:
                    family.add_metric([instance, kind], float(value))
        if family.samples:
            families.append(family)
    return families


class NodeUsage:
    """The usage summary a heartbeat carries. Make one at start-up and keep it: each
    :meth:`summary` reports the node's CPU busy fraction since the previous one (the first,
    since this object was made)."""

    def __init__(self) -> None:
        self._cpu = psutil.cpu_times()

    async def summary(self, drivers: Drivers) -> dict[str, Any]:
        """``{"node": {...}, "instances": {name: {...}}}``, JSON-able; reads off the event loop.

        ``node``: ``cpu_busy`` (0 to 1, all CPUs together), ``cpus``, ``memory_used_bytes``
        (total less available), ``memory_total_bytes``, ``load1``, ``load5``, ``load15``.
        ``instances``: every running instance whose kind measures usage, with its ``kind``,
        ``cpu_seconds`` (a counter: the controller takes the rate between heartbeats) and
        ``memory_bytes``, and ``memory_limit_bytes`` when it has a limit; a figure the kind
        cannot measure is left out.
        """
        return await asyncio.to_thread(self._summary, drivers)

    def _summary(self, drivers: Drivers) -> dict[str, Any]:
        before, self._cpu = self._cpu, psutil.cpu_times()
        memory = psutil.virtual_memory()
        load1, load5, load15 = os.getloadavg()
        node = {
            "cpu_busy": round(busy_fraction(before, self._cpu), 4),
            "cpus": psutil.cpu_count(logical=True) or 1,
            "memory_used_bytes": memory.total - memory.available,
            "memory_total_bytes": memory.total,
            "load1": load1,
            "load5": load5,
            "load15": load15,
        }
        instances: dict[str, dict[str, Any]] = {}
        for kind, measured in drivers.usage().items():
            for name, usage in measured.items():
                instances[name] = {"kind": kind, **_summarised(usage)}
        return {"node": node, "instances": instances}


def _summarised(usage: InstanceUsage) -> dict[str, Any]:
    shown = {"cpu_seconds": usage.cpu_seconds, "memory_bytes": usage.memory_bytes,
             "memory_limit_bytes": usage.memory_limit_bytes}
    return {key: value for key, value in shown.items() if value is not None}


def busy_fraction(before: Any, after: Any) -> float:
    """The share of CPU time between two ``psutil.cpu_times()`` that was not idle (0 to 1)."""
    # iowait waits for a disk with nothing to run: idle for placement, as top counts it.
    idle_fields = ("idle", "iowait")
    spent = {field: getattr(after, field) - getattr(before, field) for field in after._fields}
    # guest time is already inside user time on Linux: counting it again would pass 100 %.
    total = sum(value for field, value in spent.items() if field not in ("guest", "guest_nice"))
    if total <= 0:
        return 0.0
    idle = sum(spent.get(field, 0.0) for field in idle_fields)
    return min(1.0, max(0.0, (total - idle) / total))

