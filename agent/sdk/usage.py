"""What an instance uses, and the readers kinds share to measure it without forking.

:class:`InstanceUsage` is what a driver's optional ``usage()`` answers per instance (see
:class:`agent.sdk.UsageMeter`). The readers here are for kinds whose instances are process
trees, in a cgroup of their own (:class:`Cgroups`, a container) or not
(:func:`process_tree_usage`, a plain process), and for kinds with a network namespace of
their own (:func:`netns_usage`). Each reads a few small files of /proc and /sys/fs/cgroup:
they block, briefly, so call them from a worker thread, never on the event loop.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

# cgroup v1 writes "no limit" as the largest page-aligned counter (PAGE_COUNTER_MAX pages).
_NO_LIMIT_V1 = 1 << 62
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclasses.dataclass(frozen=True)
class InstanceUsage:
    """What one running instance uses, in base units; None where the kind cannot measure it.

    Counters (``cpu_seconds`` and the ``network_*`` and ``block_*`` fields) count from the
    instance's start (a VM's, a container's) and may start again from zero when it restarts.
    ``memory_bytes`` is what the instance holds now (a cgroup's working set: usage less
    inactive file cache; a VM's QEMU resident set; a process tree's summed RSS) and
    ``memory_limit_bytes`` what it may hold (None when unlimited). ``receive`` is traffic to
    the instance, ``transmit`` from it. Block I/O is what reached the block layer.
    """

    cpu_seconds: float | None = None
    memory_bytes: int | None = None
    memory_limit_bytes: int | None = None
    network_receive_bytes: int | None = None
    network_transmit_bytes: int | None = None
    network_receive_packets: int | None = None
    network_transmit_packets: int | None = None
    block_read_bytes: int | None = None
    block_write_bytes: int | None = None
    block_read_operations: int | None = None
    block_write_operations: int | None = None

    def to_json(self) -> dict[str, float | int]:
        """The measured fields only."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def join(self, other: InstanceUsage) -> InstanceUsage:
        """This usage with the fields it lacks taken from ``other`` (a cgroup's and a network
        namespace's figures of one container)."""
        return InstanceUsage(**{**other.to_json(), **self.to_json()})


class Cgroups:
    """The host's cgroup mounts, read once (:meth:`read`), and the usage of a process's cgroup.

    Works on cgroup v1 (cpuacct, memory and blkio controllers, each where the host mounts
    it, alone or co-mounted), on cgroup v2, and on hybrid hosts where some controllers are
    v1 and the rest sit on the unified hierarchy.
    """

    CONTROLLERS = ("cpuacct", "memory", "blkio")

    def __init__(self, v1: Mapping[str, tuple[Path, str]], v2: tuple[Path, str] | None,
                 v2_controllers: Iterable[str] = (), proc: Path = Path("/proc")):
        self.v1 = dict(v1)  # controller -> (mount point, the mount's root within the hierarchy)
        self.v2 = v2
        self.v2_controllers = frozenset(v2_controllers)
        self.proc = proc

    @classmethod
    def read(cls, proc: Path = Path("/proc")) -> Cgroups:
        """From this process's mountinfo."""
        v1: dict[str, tuple[Path, str]] = {}
        v2: tuple[Path, str] | None = None
        controllers: list[str] = []
        try:
            lines = (proc / "self/mountinfo").read_text().splitlines()
        except OSError:
            lines = []
        for line in lines:
            left, _, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if len(fields) < 5 or len(tail) < 3:
                continue
            root, mountpoint, fstype = fields[3], Path(fields[4]), tail[0]
            if fstype == "cgroup":
                for name in cls.CONTROLLERS:
                    if name in tail[2].split(","):
                        v1.setdefault(name, (mountpoint, root))
            elif fstype == "cgroup2" and v2 is None:
                v2 = (mountpoint, root)
                try:
                    controllers = (mountpoint / "cgroup.controllers").read_text().split()
                except OSError:
                    controllers = []
        return cls(v1, v2, controllers, proc)

    def paths(self, pid: int, enclosing: str | None = None) -> dict[str, Path]:
        """The directory of each controller's cgroup of ``pid`` (``"v2"`` for the unified one).

        ``enclosing``: the name of the instance's own cgroup (liblxc's ``lxc.payload.NAME``).
        The cgroup up to that component is taken, so that an instance whose init moved into
        a child cgroup (systemd's init.scope) is measured whole; a path without it is left
        out, so a pid recycled by another process is never taken for the instance.
        """
        try:
            text = (self.proc / str(pid) / "cgroup").read_text()
        except OSError:
            return {}
        found: dict[str, Path] = {}
        for line in text.splitlines():
            _, names, path = line.split(":", 2)
            if enclosing is not None:
                parts = path.split("/")
                if enclosing not in parts:
                    continue
                path = "/".join(parts[: parts.index(enclosing) + 1])
            if names == "" and self.v2 is not None:
                found["v2"] = _under(self.v2, path)
            for name in names.split(","):
                if name in self.v1:
                    found[name] = _under(self.v1[name], path)
        return found

    def usage(self, pid: int, enclosing: str | None = None) -> InstanceUsage:
        """CPU, memory and block I/O of the cgroup ``pid`` is in (see :meth:`paths`);
        an empty usage when the pid is gone."""
        paths = self.paths(pid, enclosing)
        fields: dict[str, float | int | None] = {}
        unified = paths.get("v2")
        if "cpuacct" in paths:
            usage = _read_int(paths["cpuacct"] / "cpuacct.usage")
            fields["cpu_seconds"] = None if usage is None else usage / 1e9
        elif unified is not None:
            usec = _read_keyed(unified / "cpu.stat").get("usage_usec")
            fields["cpu_seconds"] = None if usec is None else usec / 1e6
        if "memory" in paths:
            stat = _read_keyed(paths["memory"] / "memory.stat")
            fields["memory_bytes"] = _working_set(_read_int(paths["memory"] / "memory.usage_in_bytes"),
                                                  stat.get("total_inactive_file"))
            limit = stat.get("hierarchical_memory_limit")
            fields["memory_limit_bytes"] = limit if limit is not None and limit < _NO_LIMIT_V1 else None
        elif unified is not None and "memory" in self.v2_controllers:
            fields["memory_bytes"] = _working_set(_read_int(unified / "memory.current"),
                                                  _read_keyed(unified / "memory.stat").get("inactive_file"))
            fields["memory_limit_bytes"] = _read_int(unified / "memory.max")  # "max": None
        if "blkio" in paths:
            fields.update(_blkio(paths["blkio"]))
        elif unified is not None and "io" in self.v2_controllers:
            fields.update(_io_stat(unified / "io.stat"))
        return InstanceUsage(**fields)  # type: ignore[arg-type]


def _under(mount: tuple[Path, str], path: str) -> Path:
    """The directory of cgroup ``path`` (as /proc/PID/cgroup writes it) on a mount."""
    mountpoint, root = mount
    if root != "/" and (path == root or path.startswith(root + "/")):
        path = path[len(root):]
    return mountpoint / path.lstrip("/")


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _read_keyed(path: Path) -> dict[str, int]:
    """A flat-keyed cgroup file (``key value`` lines)."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        key, _, value = line.partition(" ")
        if value.strip().isdigit():
            found[key] = int(value)
    return found


def _working_set(usage: int | None, inactive_file: int | None) -> int | None:
    # Inactive page cache is reclaimed before anything else: what remains is what the
    # instance needs (the figure kubelet and cAdvisor call the working set).
    if usage is None:
        return None
    return max(0, usage - (inactive_file or 0))


def _blkio(directory: Path) -> dict[str, int | None]:
    """cgroup v1 blkio: bytes and operations that reached the block layer, all devices summed."""
    found: dict[str, int | None] = {}
    for filename, unit in (("blkio.throttle.io_service_bytes_recursive", "bytes"),
                           ("blkio.throttle.io_serviced_recursive", "operations")):
        try:
            lines = (directory / filename).read_text().splitlines()
        except OSError:
            continue
        totals = {"Read": 0, "Write": 0}
        for line in lines:
            fields = line.split()
            # "MAJ:MIN Read 4096"; the "Total N" line sums what the device lines already give.
            if len(fields) == 3 and fields[1] in totals:
                totals[fields[1]] += int(fields[2])
        found[f"block_read_{unit}"] = totals["Read"]
        found[f"block_write_{unit}"] = totals["Write"]
    return found


def _io_stat(path: Path) -> dict[str, int | None]:
    """cgroup v2 io.stat (``MAJ:MIN rbytes=N wbytes=N rios=N wios=N ...``), all devices summed."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    totals = dict.fromkeys(("rbytes", "wbytes", "rios", "wios"), 0)
    for line in lines:
        for pair in line.split()[1:]:
            key, _, value = pair.partition("=")
            if key in totals and value.isdigit():
                totals[key] += int(value)
    return {"block_read_bytes": totals["rbytes"], "block_write_bytes": totals["wbytes"],
            "block_read_operations": totals["rios"], "block_write_operations": totals["wios"]}


def netns_usage(pid: int, proc: Path = Path("/proc")) -> InstanceUsage:
    """The network traffic of ``pid``'s network namespace, every interface but loopback, as the
    namespace's interfaces count it (``receive`` is what they received). An empty usage when
    the pid shares the reader's namespace (its traffic is not the instance's alone) or is gone.
    """
    try:
        if os.stat(proc / str(pid) / "ns/net").st_ino == os.stat(proc / "self/ns/net").st_ino:
            return InstanceUsage()
        lines = (proc / str(pid) / "net/dev").read_text().splitlines()
    except OSError:
        return InstanceUsage()
    rx_bytes = rx_packets = tx_bytes = tx_packets = 0
    for line in lines[2:]:  # two header lines
        name, _, counters = line.partition(":")
        values = counters.split()
        if name.strip() == "lo" or len(values) < 10:
            continue
        rx_bytes += int(values[0])
        rx_packets += int(values[1])
        tx_bytes += int(values[8])
        tx_packets += int(values[9])
    return InstanceUsage(network_receive_bytes=rx_bytes, network_transmit_bytes=tx_bytes,
                         network_receive_packets=rx_packets, network_transmit_packets=tx_packets)


def process_tree_usage(roots: Iterable[int], proc: Path = Path("/proc")) -> dict[int, InstanceUsage]:
    """CPU, memory and block I/O of each root pid's tree, from one pass over /proc.

    A root's tree is its descendants and the members of the session it leads (an orphan
    reparented to a subreaper stays counted). CPU is the members' own time plus that of the
    children they reaped; memory the members' summed resident sets (shared pages counted in
    each); block I/O /proc/PID/io's ``read_bytes`` and ``write_bytes`` (operations are not
    counted there). A root that is gone has no entry.
    """
    wanted = set(roots)
    if not wanted:
        return {}
    parents: dict[int, int] = {}
    sessions: dict[int, int] = {}
    stats: dict[int, list[str]] = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(os.path.join(entry.path, "stat"), "rb") as f:
                data = f.read()
            # comm may hold spaces and parentheses: the fields start after its last ')'.
            fields = data[data.rindex(b")") + 2:].decode().split()
        except (OSError, ValueError):
            continue  # exited while we looked
        pid = int(entry.name)
        parents[pid], sessions[pid], stats[pid] = int(fields[1]), int(fields[3]), fields
    children: dict[int, list[int]] = {}
    led: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
        led.setdefault(sessions[pid], []).append(pid)
    found = {}
    for root in wanted & stats.keys():
        members = {root}
        stack = [root]
        while stack:
            for child in children.get(stack.pop(), ()):
                if child not in members:
                    members.add(child)
                    stack.append(child)
        members.update(led.get(root, ()))
        found[root] = _tree(members, stats, proc)
    return found


def _tree(members: set[int], stats: Mapping[int, list[str]], proc: Path) -> InstanceUsage:
    ticks = rss = 0
    read = write = 0
    io_known = False
    for pid in members:
        fields = stats[pid]
        # utime, stime, cutime, cstime (stat fields 14-17) and rss in pages (24).
        ticks += sum(int(v) for v in fields[11:15])
        rss += int(fields[21])
        try:
            io = _read_keyed_colon(proc / str(pid) / "io")
        except OSError:
            continue
        io_known = True
        read += io.get("read_bytes", 0)
        write += io.get("write_bytes", 0)
    return InstanceUsage(cpu_seconds=ticks / _CLOCK_TICKS, memory_bytes=rss * _PAGE_SIZE,
                         block_read_bytes=read if io_known else None,
                         block_write_bytes=write if io_known else None)


def _read_keyed_colon(path: Path) -> dict[str, int]:
    found = {}
    for line in path.read_text().splitlines():
        key, _, value = line.partition(":")
        value = value.strip()
        if value.isdigit():
            found[key] = int(value)
    return found
