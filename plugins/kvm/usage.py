"""What each VM uses, from libvirt's bulk domain stats: one call for every domain of the
connection per scrape, whatever the number of VMs (``virsh domstats`` makes the same call).

Blocking (a libvirt call): call it from a worker thread.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from agent.sdk import InstanceUsage


def domain_usage(libvirt: Any, conn: Any, names: Collection[str]) -> dict[str, InstanceUsage]:
    """The usage of the running domains among ``names``."""
    stats = (libvirt.VIR_DOMAIN_STATS_CPU_TOTAL | libvirt.VIR_DOMAIN_STATS_BALLOON
             | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
    # NOWAIT: a domain busy with a job (a migration) answers what it can instead of holding
    # the scrape until the job ends.
    flags = libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_ACTIVE | libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT
    found = {}
    for dom, params in conn.getAllDomainStats(stats, flags):
        name = dom.name()  # read from the object: no call to libvirtd
        if name in names:
            found[name] = usage_from_stats(params)
    return found


def usage_from_stats(params: Mapping[str, Any]) -> InstanceUsage:
    """One domain's stats record (``cpu.time``, ``balloon.*``, ``net.N.*``, ``block.N.*``)."""
    cpu = params.get("cpu.time")  # nanoseconds
    rss = params.get("balloon.rss")  # KiB, QEMU's resident set: the guest's memory as the host holds it
    maximum = params.get("balloon.maximum")  # KiB, the guest's memory
    return InstanceUsage(
        cpu_seconds=None if cpu is None else cpu / 1e9,
        memory_bytes=None if rss is None else rss * 1024,
        memory_limit_bytes=None if maximum is None else maximum * 1024,
        network_receive_bytes=_sum(params, "net", "rx.bytes"),
        network_transmit_bytes=_sum(params, "net", "tx.bytes"),
        network_receive_packets=_sum(params, "net", "rx.pkts"),
        network_transmit_packets=_sum(params, "net", "tx.pkts"),
        block_read_bytes=_sum(params, "block", "rd.bytes"),
        block_write_bytes=_sum(params, "block", "wr.bytes"),
        block_read_operations=_sum(params, "block", "rd.reqs"),
        block_write_operations=_sum(params, "block", "wr.reqs"),
    )


def _sum(params: Mapping[str, Any], group: str, key: str) -> int | None:
    """``group.N.key`` summed over the domain's devices; None when no device reports it (a
    user-mode network has no host interface to count)."""
    values = [params[f"{group}.{i}.{key}"] for i in range(params.get(f"{group}.count", 0))
              if f"{group}.{i}.{key}" in params]
    return sum(values) if values else None
