"""The built-in probe types, one small factory per type, and the wrapper for contributed probes.

A factory takes a probe's settings and returns ``run``, the coroutine function the scheduler
calls on every interval; ``run`` returns ``[(target, ProbeResult)]``, one entry per thing it
measured (a disk mount, an interface; ``""`` for a probe with one). Values are in base
units: ratios 0..1, seconds, bytes. Blocking reads (psutil, statfs, /proc) go through
``tools.in_thread`` so that a probe stuck in the kernel holds only its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any

import psutil

from agent.sdk import Probe, ProbeResult

from .settings import ProbeConfig

Results = list[tuple[str, ProbeResult]]
Run = Callable[[], Awaitable[Results]]

NAGIOS = {0: "ok", 1: "warning", 2: "critical", 3: "unknown"}
PERFDATA_VALUE = re.compile(r"^\s*'?[^=']+'?=(-?[\d.]+)")
OUTPUT_LIMIT = 4096  # bytes of a check's output kept: its first line is all that is shown
COMM_LENGTH = 15  # the kernel keeps this much of a process name in /proc/PID/comm


@dataclasses.dataclass
class ProbeTools:
    """What the built-in probes share with the plugin.

    ``in_thread(probe, function, *args)`` runs a blocking step in the probe's own thread;
    ``network_counters`` is the latest byte count per interface, for the plugin's metrics.
    """

    in_thread: Callable[..., Awaitable[Any]]
    network_counters: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


def builtin(p: ProbeConfig, tools: ProbeTools) -> Run:
    """The ``run`` of a configured probe, from its type's factory."""
    return FACTORIES[p.type](p, tools)


def graded(p: ProbeConfig, value: float) -> str:
    """The status of ``value`` against the probe's thresholds (at or above each one)."""
    if p.critical is not None and value >= p.critical:
        return "critical"
    if p.warning is not None and value >= p.warning:
        return "warning"
    return "ok"


def one(p: ProbeConfig, value: float, message: str) -> Results:
    return [("", ProbeResult(graded(p, value), value, message))]  # type: ignore[arg-type]


def cpu(p: ProbeConfig, tools: ProbeTools) -> Run:
    # From this probe's own previous reading, not psutil.cpu_percent()'s process-wide one,
    # which any other caller in the agent would reset.
    last: Any = None

    async def run() -> Results:
        nonlocal last
        times = await tools.in_thread(p.name, psutil.cpu_times)
        previous, last = last, times
        if previous is None:
            return []
        total = sum(times) - sum(previous)
        idle = (times.idle + getattr(times, "iowait", 0.0)) - (previous.idle + getattr(previous, "iowait", 0.0))
        busy = min(1.0, max(0.0, 1 - idle / total)) if total > 0 else 0.0
        return one(p, busy, f"{busy * 100:.0f}% busy")

    return run


def memory(p: ProbeConfig, tools: ProbeTools) -> Run:
    async def run() -> Results:
        vm = await tools.in_thread(p.name, psutil.virtual_memory)
        return one(p, (vm.total - vm.available) / vm.total, f"{vm.available // 2**20} MiB available")

    return run


def swap(p: ProbeConfig, tools: ProbeTools) -> Run:
    async def run() -> Results:
        sw = await tools.in_thread(p.name, psutil.swap_memory)
        return one(p, sw.used / sw.total if sw.total else 0.0, f"{sw.used // 2**20} of {sw.total // 2**20} MiB used")

    return run


def disk(p: ProbeConfig, tools: ProbeTools) -> Run:
    def usage() -> Results:
        mounts = [p.mount] if p.mount else sorted({d.mountpoint for d in psutil.disk_partitions(all=False)})
        out = []
        for mount in mounts:
            try:
                du = psutil.disk_usage(mount)
            except OSError as exc:
                out.append((mount, ProbeResult("unknown", None, f"{mount}: {exc.strerror}")))
                continue
            ratio = du.used / du.total if du.total else 0.0
            out.append((mount, ProbeResult(graded(p, ratio), ratio, f"{mount}: {du.free // 2**20} MiB free")))  # type: ignore[arg-type]
        return out

    async def run() -> Results:
        return await tools.in_thread(p.name, usage)

    return run


def load(p: ProbeConfig, tools: ProbeTools) -> Run:
    async def run() -> Results:
        load1, _, _ = os.getloadavg()
        return one(p, load1, f"load {load1:.2f} on {os.cpu_count()} CPUs")

    return run


def network(p: ProbeConfig, tools: ProbeTools) -> Run:
    last: dict[str, tuple[float, int]] = {}  # nic -> (when, bytes both ways)

    async def run() -> Results:
        counters = await tools.in_thread(p.name, psutil.net_io_counters, True)
        # Replaced whole, never changed in place: scrapes read it from another thread.
        tools.network_counters = {nic: (c.bytes_recv, c.bytes_sent) for nic, c in counters.items()}
        now, out = time.monotonic(), []
        for nic, c in sorted(counters.items()):
            total = c.bytes_recv + c.bytes_sent
            before = last.get(nic)
            last[nic] = (now, total)
            if before is not None and now > before[0]:
                rate = max(0, total - before[1]) / (now - before[0])
                out.append((nic, ProbeResult(graded(p, rate), rate, f"{nic}: {rate:.0f} B/s")))  # type: ignore[arg-type]
        return out

    return run


def process(p: ProbeConfig, tools: ProbeTools) -> Run:
    name = p.process
    assert name is not None

    async def run() -> Results:
        n = await tools.in_thread(p.name, count_processes, name)
        return [("", ProbeResult("ok" if n else "critical", float(n), f"{n} {name} process(es)"))]

    return run


def tcp(p: ProbeConfig, tools: ProbeTools) -> Run:
    target = f"{p.host}:{p.port}"

    async def run() -> Results:
        started = time.monotonic()
        try:
            _, writer = await asyncio.open_connection(p.host, p.port)
        except OSError as exc:
            return [(target, ProbeResult("critical", None, f"{target}: {exc.strerror or exc}"))]
        elapsed = time.monotonic() - started
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return [(target, ProbeResult(graded(p, elapsed), elapsed, f"{target}: connected in {elapsed * 1000:.1f} ms"))]  # type: ignore[arg-type]

    return run


def http(p: ProbeConfig, tools: ProbeTools) -> Run:
    url = p.url or ""
    tls: list[ssl.SSLContext] = []

    async def run() -> Results:
        import aiohttp  # only agents with an http probe pay for the client

        if url.startswith("https://") and not tls:
            # Once, and off the loop: loading a CA bundle reads and parses files.
            cafile = str(p.ca_file) if p.ca_file else None
            tls.append(await tools.in_thread(p.name, lambda: ssl.create_default_context(cafile=cafile)))
        started = time.monotonic()
        try:
            async with aiohttp.ClientSession() as session, session.get(url, **({"ssl": tls[0]} if tls else {})) as response:
                await response.read()
                status = response.status
        except (aiohttp.ClientError, OSError) as exc:
            return [(url, ProbeResult("critical", None, f"{url}: {exc or type(exc).__name__}"))]
        elapsed = time.monotonic() - started
        if status != p.expect_status:
            return [(url, ProbeResult("critical", elapsed, f"{url}: HTTP {status}, expected {p.expect_status}"))]
        return [(url, ProbeResult(graded(p, elapsed), elapsed, f"{url}: HTTP {status} in {elapsed * 1000:.0f} ms"))]  # type: ignore[arg-type]

    return run


def command(p: ProbeConfig, tools: ProbeTools) -> Run:
    argv = p.command
    assert argv is not None

    async def run() -> Results:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, start_new_session=True,
            )
        except OSError as exc:
            return [("", ProbeResult("unknown", None, f"cannot run {argv[0]}: {exc.strerror}"))]
        try:
            output, _ = await proc.communicate()
        except asyncio.CancelledError:
            # A timeout cancels us: the check and anything it started go, not just the shell.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        return [("", nagios_result(proc.returncode, output[:OUTPUT_LIMIT].decode(errors="replace")))]

    return run


FACTORIES: dict[str, Callable[[ProbeConfig, ProbeTools], Run]] = {
    "cpu": cpu, "memory": memory, "swap": swap, "disk": disk, "load": load, "network": network,
    "process": process, "tcp": tcp, "http": http, "command": command,
}


def nagios_result(code: int | None, output: str) -> ProbeResult:
    """A Nagios plugin's exit code and output: ``TEXT | label=value;warn;crit ...``."""
    status = NAGIOS.get(code if code is not None else 3, "unknown")
    first = output.strip().splitlines()[0] if output.strip() else f"exit {code}"
    text, _, perfdata = first.partition("|")
    match = PERFDATA_VALUE.match(perfdata)
    value = float(match.group(1)) if match else None
    if code not in NAGIOS:
        text = f"exit {code} is not a Nagios status: {text.strip()}"
    return ProbeResult(status, value, text.strip())  # type: ignore[arg-type]


def count_processes(name: str) -> int:
    """How many processes are called ``name``, as ``pgrep -x`` counts them.

    /proc/PID/comm alone, a fifth of psutil.process_iter's cost on a busy host; a name
    longer than the kernel keeps is checked in full against the command line (argv[0], or
    argv[1] for a script run by its interpreter).
    """
    count = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/comm", "rb") as f:
                if f.read().rstrip(b"\n").decode(errors="replace") != name[:COMM_LENGTH]:
                    continue
            if len(name) > COMM_LENGTH:
                with open(f"/proc/{entry.name}/cmdline", "rb") as f:
                    argv = f.read().decode(errors="replace").split("\0")[:2]
                if name not in (os.path.basename(arg) for arg in argv):
                    continue
        except OSError:  # gone meanwhile, or not ours to read
            continue
        count += 1
    return count


def contributed_name(plugin: str, name: str) -> str:
    """``<plugin>.<probe>``; a probe name already starting with the plugin's name keeps it once."""
    for prefix in (f"{plugin}.", f"{plugin}-"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    return f"{plugin}.{name}"


def contributed(probe: Probe) -> Run:
    """The ``run`` of another plugin's probe: its labels, sorted, are the target."""

    async def run() -> Results:
        result = probe.run()
        if asyncio.iscoroutine(result):
            result = await result
        target = ",".join(f"{k}={v}" for k, v in sorted(result.labels.items()))
        return [(target, result)]

    return run
