"""The ``monitoring`` plugin: probes on their own schedules, alert rules evaluated on the node.

Probes. Built-in types: ``cpu``, ``memory``, ``swap``, ``disk`` (every mount, or one), ``load``,
``network`` (bytes/s per interface), ``process`` (how many match a name), ``tcp`` (connect
time), ``http`` (GET, response time) and ``command`` (any Nagios plugin: exit 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN, the first perfdata value as the number). Each type takes
only its own options, so a misplaced one is an error rather than silently ignored. Other
plugins add probes through ``kumo_probes``; they are named ``<plugin>.<probe>`` (a dot,
which configured probe names may not contain). Every probe runs in its own asyncio task
with its own interval and timeout, so a slow or hung probe never delays another; a command
that times out is killed with its whole process group and reads UNKNOWN. Values are in base
units: ratios 0..1, seconds, bytes.

Textfiles. ``*.prom`` files in ``textfile_dir`` are read at every scrape the way
node_exporter's textfile collector reads them (the same metric in several files is one
family); a file that does not parse is skipped whole and ``kumo_textfile_scrape_error``
says so.

Alerts. A rule watches one probe: a condition on its value (``op``, ``value``) or on its
status, held for ``for`` seconds. Statuses rank ok < warning < critical < unknown and a
status rule fires at its rank or above (``status: critical`` fires on critical and on a
check that could not tell, as Nagios notifies on both). A probe with several targets (disk
mounts, interfaces) gives one alert per target. Rules come from the agent config and from
the controller (task ``monitoring.rules``, kept in the plugin's state dir). Each firing or resolved transition is appended to an on-disk outbox
(fsync'd) and sent to the controller until it says "ok", with the same id every time, so a
controller outage or an agent restart loses none and the controller stores each once.
Firing alerts are remembered on disk too, so a restarted agent does not fire them again,
and an alert whose rule is removed (config or controller) is resolved rather than left
firing for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import json
import logging
import os
import random
import re
import signal
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import psutil

from agent.sdk import (
    ConfigError,
    ControllerUnavailable,
    Fingerprint,
    PluginContext,
    Probe,
    ProbeResult,
    TaskError,
    hookimpl,
    parse_section,
)

log = logging.getLogger(__name__)

ProbeType = Literal["cpu", "memory", "swap", "disk", "load", "network", "process", "tcp", "http", "command"]
STATUSES = ("ok", "warning", "critical", "unknown")
NAGIOS = {0: "ok", 1: "warning", 2: "critical", 3: "unknown"}
SEVERITY = {"ok": 0, "warning": 1, "critical": 2, "unknown": 3}
OPERATORS = {
    ">": lambda a, b: a > b, ">=": lambda a, b: a >= b, "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}
PERFDATA_VALUE = re.compile(r"^\s*'?[^=']+'?=(-?[\d.]+)")
SEND_BATCH = 100
RETRY_MAX = 60.0
COLLECT_PROBES_EVERY = 60.0
OUTPUT_LIMIT = 4096


@dataclasses.dataclass
class ProbeConfig:
    """One probe in ``plugins.monitoring.probes``; which options apply depends on ``type``."""

    name: str
    type: ProbeType
    interval: float = 15.0
    timeout: float = 10.0
    warning: float | None = None  # the value at or above which the status is warning
    critical: float | None = None
    mount: str | None = None  # disk: one mount (default: every real one)
    process: str | None = None  # process: its name, as `pgrep -x NAME` matches it
    host: str | None = None  # tcp
    port: int | None = None  # tcp
    url: str | None = None  # http(s)
    ca_file: Path | None = None  # http: CA bundle for a private https endpoint
    expect_status: int = 200  # http
    command: list[str] | None = None  # command: argv, never a shell string


@dataclasses.dataclass
class Condition:
    """``value <op> threshold``: true fires the rule (after ``for``)."""

    op: Literal[">", ">=", "<", "<=", "==", "!="]
    value: float


@dataclasses.dataclass
class RuleConfig:
    """One alert rule; ``for`` in YAML is ``for_`` here (``for`` is a Python keyword)."""

    name: str
    probe: str
    condition: Condition | None = None
    status: Literal["warning", "critical", "unknown"] | None = None
    for_: float = 0.0
    severity: str = "warning"
    labels: dict[str, str] = dataclasses.field(default_factory=dict)
    summary: str = ""


@dataclasses.dataclass
class MonitoringConfig:
    """``plugins.monitoring`` settings. ``default_probes`` adds cpu, memory, swap, disk, load and network."""

    default_probes: bool = True
    probes: list[ProbeConfig] = dataclasses.field(default_factory=list)
    rules: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    textfile_dir: Path | None = None


DEFAULT_PROBES = [
    ProbeConfig(name=name, type=name) for name in ("cpu", "memory", "swap", "disk", "load", "network")  # type: ignore[arg-type]
]


def parse_rules(items: list[Any], where: str) -> list[RuleConfig]:
    """Rules from YAML or the controller; ConfigError naming the rule and key."""
    rules = []
    for i, item in enumerate(items):
        key = f"{where}[{i}]"
        if isinstance(item, Mapping) and "for_" in item:
            raise ConfigError(f"{key}.for_: unknown key (the hold time is spelt for)")
        if isinstance(item, Mapping) and "for" in item:
            item = {**{k: v for k, v in item.items() if k != "for"}, "for_": item["for"]}
        try:
            rule = parse_section(RuleConfig, item, key)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("for_", "for")) from None  # name the key as the user wrote it
        if (rule.condition is None) == (rule.status is None):
            raise ConfigError(f"{key}: give either condition: {{op, value}} or status: warning|critical|unknown")
        if rule.for_ < 0:
            raise ConfigError(f"{key}.for: expected seconds >= 0")
        rules.append(rule)
    names = [r.name for r in rules]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{where}: rule name {duplicate!r} is used twice")
    return rules


COMMON_OPTIONS = {"name", "type", "interval", "timeout"}
THRESHOLDS = {"warning", "critical"}
# Which options each type reads; command and process decide their status themselves.
TYPE_OPTIONS: dict[str, set[str]] = {
    "cpu": THRESHOLDS, "memory": THRESHOLDS, "swap": THRESHOLDS, "load": THRESHOLDS, "network": THRESHOLDS,
    "disk": THRESHOLDS | {"mount"}, "tcp": THRESHOLDS | {"host", "port"},
    "http": THRESHOLDS | {"url", "ca_file", "expect_status"}, "process": {"process"}, "command": {"command"},
}
REQUIRED_OPTIONS = {"tcp": ("host", "port"), "http": ("url",), "process": ("process",), "command": ("command",)}


def check_probe(probe: ProbeConfig, given: Mapping[str, Any], where: str) -> None:
    """What parse_section cannot see: options that belong to another type, ranges, names."""
    allowed = COMMON_OPTIONS | TYPE_OPTIONS[probe.type]
    stray = sorted(set(map(str, given)) - allowed)
    if stray:
        raise ConfigError(f"{where}.{stray[0]}: not an option of a {probe.type} probe (options: {', '.join(sorted(allowed))})")
    for option in REQUIRED_OPTIONS.get(probe.type, ()):
        if getattr(probe, option) in (None, []):
            raise ConfigError(f"{where}.{option}: required for a {probe.type} probe")
    if not probe.name or "." in probe.name:
        raise ConfigError(f"{where}.name: expected a name without dots (dotted names are other plugins' probes), got {probe.name!r}")
    for option in ("interval", "timeout"):
        if getattr(probe, option) <= 0:
            raise ConfigError(f"{where}.{option}: expected seconds > 0, got {getattr(probe, option)}")
    if probe.port is not None and not 0 < probe.port < 65536:
        raise ConfigError(f"{where}.port: expected 1 to 65535, got {probe.port}")
    if probe.url is not None and not probe.url.startswith(("http://", "https://")):
        raise ConfigError(f"{where}.url: expected an http:// or https:// URL, got {probe.url!r}")
    if probe.ca_file is not None and not probe.ca_file.is_file():
        raise ConfigError(f"{where}.ca_file: {probe.ca_file} is not a file (a PEM CA bundle for the https URL)")


def now_iso() -> str:
    """Now in UTC, ISO 8601 with a ``Z``, as the alerts contract writes times."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclasses.dataclass
class Sample:
    """The last result of a probe for one target (a mount, an interface...)."""

    status: str
    value: float | None
    message: str
    at: float


class MonitoringPlugin:
    """The ``monitoring`` entry point: probes, rules, the alert outbox and their metrics."""

    def __init__(self) -> None:
        self.config = MonitoringConfig()
        self.probes: dict[str, ProbeConfig] = {p.name: p for p in DEFAULT_PROBES}
        self.config_rules: list[RuleConfig] = []
        self.pushed_rules: list[RuleConfig] = []
        self.context: PluginContext | None = None
        self.samples: dict[tuple[str, str], Sample] = {}
        self.durations: dict[str, float] = {}
        self.timeouts: dict[str, int] = {}
        self.pending: dict[tuple[str, str], float] = {}  # (rule, target) -> condition true since
        self.firing: dict[str, dict[str, Any]] = {}  # "rule\0target" -> the firing transition
        self.outbox: list[dict[str, Any]] = []
        self.sent_total = 0
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._background: list[asyncio.Task[None]] = []
        self._outbox_ready = asyncio.Event()
        self._net_last: dict[str, tuple[float, int]] = {}
        self._cpu_last: Any = None
        self.network_counters: dict[str, tuple[int, int]] = {}  # nic -> (received, sent) bytes
        self._file_lock = asyncio.Lock()
        self._writes: set[asyncio.Future[None]] = set()
        self._threads: dict[str, threading.Thread] = {}

    # -- configuration and lifecycle ------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config = parse_section(MonitoringConfig, section, source)
        # A configured probe may take a default's name to change its thresholds or interval.
        probes = {p.name: p for p in DEFAULT_PROBES} if self.config.default_probes else {}
        configured: set[str] = set()
        for i, probe in enumerate(self.config.probes):
            where = f"{source}.probes[{i}]"
            check_probe(probe, section["probes"][i], where)
            if probe.name in configured:
                raise ConfigError(f"{where}.name: probe name {probe.name!r} is used twice")
            configured.add(probe.name)
            probes[probe.name] = probe
        self.probes = probes
        self.config_rules = parse_rules(self.config.rules, f"{source}.rules")
        for i, rule in enumerate(self.config_rules):
            # Probes other plugins contribute are named <plugin>.<probe>; they are known later.
            if rule.probe not in probes and "." not in rule.probe:
                raise ConfigError(f"{source}.rules[{i}].probe: no probe named {rule.probe!r} (probes: {', '.join(sorted(probes))})")

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        self.pushed_rules, self.firing, self.outbox = await asyncio.to_thread(self._load_state)
        await self._resolve_removed_rules()
        self._outbox_ready.set()
        for probe in self.probes.values():
            self._schedule(probe.name, self._builtin(probe), probe.interval, probe.timeout)
        self._background = [
            asyncio.create_task(self._deliver_loop(), name="monitoring-outbox"),
            asyncio.create_task(self._collect_loop(), name="monitoring-contributed-probes"),
        ]

    @hookimpl
    async def kumo_shutdown(self) -> None:
        pending = {*self._tasks.values(), *self._background}
        while pending:
            # Again until they end: a contributed probe may swallow one cancellation.
            for task in pending:
                task.cancel()
            done, pending = await asyncio.wait(pending, timeout=1.0)
            for task in done:
                if not task.cancelled() and task.exception() is not None:
                    log.error("monitoring: %s ended with %r", task.get_name(), task.exception())
        await asyncio.gather(*self._writes, return_exceptions=True)

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        return Fingerprint(
            available=True,
            attributes={"probes": sorted({p for p, _ in self.samples} | set(self.probes)), "rules": len(self.rules)},
        )

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return ("monitoring.rules",)

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        if kind != "monitoring.rules":
            raise TaskError(f"the monitoring plugin does not handle {kind!r}", code="unknown-kind")
        items = payload.get("rules")
        if not isinstance(items, list):
            raise TaskError("payload.rules must be a list of rules", code="invalid")
        try:
            rules = parse_rules(items, "payload.rules")
        except ConfigError as exc:
            raise TaskError(str(exc), code="invalid") from None
        clash = {r.name for r in rules} & {r.name for r in self.config_rules}
        if clash:
            raise TaskError(
                f"rule {sorted(clash)[0]!r} is already defined in this node's agent config: rename it in the pushed set",
                code="conflict",
            )
        self.pushed_rules = rules
        await self._save_json("rules.json", items)
        await self._resolve_removed_rules()
        return {"rules": len(rules)}

    @property
    def rules(self) -> list[RuleConfig]:
        return self.config_rules + self.pushed_rules

    # -- scheduling ---------------------------------------------------------------------

    def _schedule(self, name: str, run: Any, interval: float, timeout: float) -> None:
        self._tasks[name] = asyncio.create_task(self._probe_loop(name, run, interval, timeout), name=f"probe {name}")

    async def _probe_loop(self, name: str, run: Any, interval: float, timeout: float) -> None:
        while True:
            started = time.monotonic()
            # A failed run leaves every target the probe had unknown, not stale.
            targets = sorted(t for p, t in self.samples if p == name) or [""]
            blocked = self._threads.get(name)
            if blocked is not None and blocked.is_alive():
                # A thread cannot be cancelled: starting another run would pile them up.
                self.timeouts[name] = self.timeouts.get(name, 0) + 1
                message = "its previous run is still blocked in a system call: not started again"
                results = [(t, ProbeResult("unknown", None, message)) for t in targets]
            else:
                try:
                    # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the
                    # shutdown's cancellation when the probe finishes at that moment.
                    async with asyncio.timeout(timeout):
                        results = await run()
                except TimeoutError:
                    self.timeouts[name] = self.timeouts.get(name, 0) + 1
                    results = [(t, ProbeResult("unknown", None, f"timed out after {timeout:g} s")) for t in targets]
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.debug("probe %s failed", name, exc_info=True)
                    results = [(t, ProbeResult("unknown", None, f"{type(exc).__name__}: {exc}")) for t in targets]
                self.durations[name] = time.monotonic() - started
            for target, result in results:
                self.samples[(name, target)] = Sample(result.status, result.value, result.message, time.time())
                await self._evaluate(name, target)
            await self._forget_targets(name, {t for t, _ in results})
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _in_thread(self, probe: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking probe step in a thread of its own.

        Not the loop's default executor: a probe stuck in the kernel (statfs on a dead NFS
        server) would hold one of its few workers, which the agent's metrics and other
        plugins share, and its exit would wait for it. A daemon thread holds nothing, and
        the probe loop does not start another run while it is alive.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed while we were blocked
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=work, name=f"kumo-probe {probe}", daemon=True)
        self._threads[probe] = thread
        thread.start()
        return await future

    async def _collect_loop(self) -> None:
        """Pick up probes other plugins contribute (they may start after this plugin)."""
        assert self.context is not None
        await asyncio.sleep(1.0)
        told: set[str] = set()
        while True:
            # By plugin, so each contributed probe is named after the plugin that owns it.
            results, _ = await self.context.hooks.call_each("kumo_probes")
            for plugin, probes in sorted(results.items()):
                for probe in probes or ():
                    name = contributed_name(plugin, probe.name)
                    if name not in self._tasks:
                        self._schedule(name, _contributed(probe), probe.interval, probe.timeout)
            for rule in self.rules:
                if rule.probe not in self._tasks and rule.name not in told:
                    told.add(rule.name)
                    log.warning("monitoring: rule %s watches probe %r, which this node does not have (probes: %s)",
                                rule.name, rule.probe, ", ".join(sorted(self._tasks)))
            await asyncio.sleep(COLLECT_PROBES_EVERY)

    # -- built-in probes ----------------------------------------------------------------

    def _builtin(self, p: ProbeConfig) -> Any:
        def graded(value: float) -> str:
            if p.critical is not None and value >= p.critical:
                return "critical"
            if p.warning is not None and value >= p.warning:
                return "warning"
            return "ok"

        def one(value: float, message: str = "", target: str = "") -> list[tuple[str, ProbeResult]]:
            return [(target, ProbeResult(graded(value), value, message))]

        async def cpu() -> list[tuple[str, ProbeResult]]:
            # From our own previous reading, not psutil.cpu_percent()'s process-wide one,
            # which any other caller in the agent would reset.
            times = await self._in_thread(p.name, psutil.cpu_times)
            last, self._cpu_last = self._cpu_last, times
            if last is None:
                return []
            total = sum(times) - sum(last)
            idle = (times.idle + getattr(times, "iowait", 0.0)) - (last.idle + getattr(last, "iowait", 0.0))
            busy = min(1.0, max(0.0, 1 - idle / total)) if total > 0 else 0.0
            return one(busy, f"{busy * 100:.0f}% busy")

        async def memory() -> list[tuple[str, ProbeResult]]:
            vm = await self._in_thread(p.name, psutil.virtual_memory)
            return one((vm.total - vm.available) / vm.total, f"{vm.available // 2**20} MiB available")

        async def swap() -> list[tuple[str, ProbeResult]]:
            sw = await self._in_thread(p.name, psutil.swap_memory)
            return one(sw.used / sw.total if sw.total else 0.0, f"{sw.used // 2**20} of {sw.total // 2**20} MiB used")

        async def disk() -> list[tuple[str, ProbeResult]]:
            def usage() -> list[tuple[str, ProbeResult]]:
                mounts = [p.mount] if p.mount else sorted({d.mountpoint for d in psutil.disk_partitions(all=False)})
                out = []
                for mount in mounts:
                    try:
                        du = psutil.disk_usage(mount)
                    except OSError as exc:
                        out.append((mount, ProbeResult("unknown", None, f"{mount}: {exc.strerror}")))
                        continue
                    ratio = du.used / du.total if du.total else 0.0
                    out.append((mount, ProbeResult(graded(ratio), ratio, f"{mount}: {du.free // 2**20} MiB free")))
                return out

            return await self._in_thread(p.name, usage)

        async def load() -> list[tuple[str, ProbeResult]]:
            load1, _, _ = os.getloadavg()
            return one(load1, f"load {load1:.2f} on {os.cpu_count()} CPUs")

        async def network() -> list[tuple[str, ProbeResult]]:
            counters = await self._in_thread(p.name, psutil.net_io_counters, True)
            self.network_counters = {nic: (c.bytes_recv, c.bytes_sent) for nic, c in counters.items()}
            now, out = time.monotonic(), []
            for nic, c in sorted(counters.items()):
                total = c.bytes_recv + c.bytes_sent
                last = self._net_last.get(nic)
                self._net_last[nic] = (now, total)
                if last is not None and now > last[0]:
                    rate = max(0, total - last[1]) / (now - last[0])
                    out.append((nic, ProbeResult(graded(rate), rate, f"{nic}: {rate:.0f} B/s")))
            return out

        async def process() -> list[tuple[str, ProbeResult]]:
            assert p.process is not None
            n = await self._in_thread(p.name, count_processes, p.process)
            return [("", ProbeResult("ok" if n else "critical", float(n), f"{n} {p.process} process(es)"))]

        async def tcp() -> list[tuple[str, ProbeResult]]:
            started = time.monotonic()
            target = f"{p.host}:{p.port}"
            try:
                _, writer = await asyncio.open_connection(p.host, p.port)
            except OSError as exc:
                return [(target, ProbeResult("critical", None, f"{target}: {exc.strerror or exc}"))]
            elapsed = time.monotonic() - started
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return [(target, ProbeResult(graded(elapsed), elapsed, f"{target}: connected in {elapsed * 1000:.1f} ms"))]

        tls: list[ssl.SSLContext] = []

        async def http() -> list[tuple[str, ProbeResult]]:
            import aiohttp

            if p.url and p.url.startswith("https://") and not tls:
                # Once, and off the loop: loading a CA bundle reads and parses files.
                cafile = str(p.ca_file) if p.ca_file else None
                tls.append(await self._in_thread(p.name, lambda: ssl.create_default_context(cafile=cafile)))
            started = time.monotonic()
            try:
                async with aiohttp.ClientSession() as session, session.get(p.url, **({"ssl": tls[0]} if tls else {})) as response:
                    await response.read()
                    status = response.status
            except (aiohttp.ClientError, OSError) as exc:
                return [(p.url or "", ProbeResult("critical", None, f"{p.url}: {exc or type(exc).__name__}"))]
            elapsed = time.monotonic() - started
            if status != p.expect_status:
                return [(p.url or "", ProbeResult("critical", elapsed, f"{p.url}: HTTP {status}, expected {p.expect_status}"))]
            return [(p.url or "", ProbeResult(graded(elapsed), elapsed, f"{p.url}: HTTP {status} in {elapsed * 1000:.0f} ms"))]

        async def command() -> list[tuple[str, ProbeResult]]:
            assert p.command is not None
            try:
                proc = await asyncio.create_subprocess_exec(
                    *p.command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT, start_new_session=True,
                )
            except OSError as exc:
                return [("", ProbeResult("unknown", None, f"cannot run {p.command[0]}: {exc.strerror}"))]
            try:
                output, _ = await proc.communicate()
            except asyncio.CancelledError:
                # A timeout cancels us: the check and anything it started go, not just the shell.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
                raise
            return [("", nagios_result(proc.returncode, output[:OUTPUT_LIMIT].decode(errors="replace")))]

        return {
            "cpu": cpu, "memory": memory, "swap": swap, "disk": disk, "load": load, "network": network,
            "process": process, "tcp": tcp, "http": http, "command": command,
        }[p.type]

    # -- rules and the outbox -----------------------------------------------------------

    async def _evaluate(self, probe: str, target: str) -> None:
        sample = self.samples[(probe, target)]
        for rule in self.rules:
            if rule.probe != probe:
                continue
            if rule.condition is not None:
                if sample.value is None:
                    continue  # no number this time: neither fire nor resolve on a failed reading
                active = OPERATORS[rule.condition.op](sample.value, rule.condition.value)
            else:
                assert rule.status is not None
                active = SEVERITY[sample.status] >= SEVERITY[rule.status]
            key = f"{rule.name}\0{target}"
            if active:
                since = self.pending.setdefault((rule.name, target), time.monotonic())
                if key not in self.firing and time.monotonic() - since >= rule.for_:
                    await self._transition(rule, probe, target, sample, "firing")
            else:
                self.pending.pop((rule.name, target), None)
                if key in self.firing:
                    await self._transition(rule, probe, target, sample, "resolved")

    async def _forget_targets(self, probe: str, current: set[str]) -> None:
        """Drop targets a probe no longer reports (an unmounted disk, the placeholder a failed
        run used), resolving their alerts: nothing would resolve them otherwise."""
        for _, target in [key for key in self.samples if key[0] == probe and key[1] not in current]:
            del self.samples[(probe, target)]
            gone = Sample("unknown", None, f"{target or probe} is no longer reported", time.time())
            for rule in self.rules:
                if rule.probe != probe:
                    continue
                self.pending.pop((rule.name, target), None)
                if f"{rule.name}\0{target}" in self.firing:
                    await self._transition(rule, probe, target, gone, "resolved")

    async def _transition(self, rule: RuleConfig, probe: str, target: str, sample: Sample, state: str) -> None:
        key = f"{rule.name}\0{target}"
        labels = {**rule.labels, "probe": probe, **({"target": target} if target else {})}
        now = now_iso()
        alert = {
            "id": uuid.uuid4().hex, "rule": rule.name, "state": state, "severity": rule.severity,
            "labels": labels, "annotations": {"summary": rule.summary or f"{rule.name}: {sample.message}"},
            "value": sample.value, "starts_at": self.firing[key]["starts_at"] if state == "resolved" else now,
            "ends_at": now if state == "resolved" else None,
        }
        await self._commit(key, alert)

    async def _resolve_removed_rules(self) -> None:
        """Resolve firing alerts whose rule is gone: nothing would ever resolve them otherwise."""
        names = {rule.name for rule in self.rules}
        for key, alert in list(self.firing.items()):
            if alert["rule"] not in names:
                resolved = {**alert, "id": uuid.uuid4().hex, "state": "resolved", "ends_at": now_iso(),
                            "annotations": {"summary": f"{alert['rule']}: the rule was removed"}}
                await self._commit(key, resolved)

    async def _commit(self, key: str, alert: dict[str, Any]) -> None:
        """Record a transition: the firing set, the disk and the outbox, or none of them."""
        if alert["state"] == "firing":
            self.firing[key] = alert
        else:
            del self.firing[key]
        log.warning("alert %s %s: %s", alert["rule"], alert["state"], alert["annotations"]["summary"])

        async def record() -> None:
            await asyncio.to_thread(self._record, alert, dict(self.firing))
            self.outbox.append(alert)

        await self._shielded(record)
        self._outbox_ready.set()

    async def _shielded(self, step: Callable[[], Awaitable[None]]) -> None:
        """Run ``step`` (a state write and the in-memory change it stands for) under the file
        lock, to its end even when the caller is cancelled.

        A shutdown cancels probes and the sender mid-write; the step still finishes (and
        kumo_shutdown waits for it). Memory and disk change together under the lock, so the
        sender's rewrite of the outbox never drops a transition appended meanwhile.
        """
        async def locked() -> None:
            async with self._file_lock:
                await step()

        task = asyncio.ensure_future(locked())
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

    async def _deliver_loop(self) -> None:
        assert self.context is not None
        delay = 1.0
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self.outbox:
                batch = self.outbox[:SEND_BATCH]
                try:
                    await self.context.call_controller("POST", "alerts", {"alerts": batch})
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    level = logging.DEBUG if isinstance(exc, ControllerUnavailable) else logging.ERROR
                    log.log(level, "monitoring: %d alert(s) kept for the controller: %s", len(self.outbox), exc)
                    await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                    delay = min(delay * 2, RETRY_MAX)
                    continue
                delay = 1.0
                sent = {a["id"] for a in batch}
                self.sent_total += len(batch)

                async def remove(sent: set[str] = sent) -> None:
                    self.outbox = [a for a in self.outbox if a["id"] not in sent]
                    await asyncio.to_thread(self._rewrite_outbox, list(self.outbox))

                await self._shielded(remove)

    # -- state on disk ------------------------------------------------------------------

    def _path(self, name: str) -> Path:
        assert self.context is not None
        return self.context.state_dir / name

    def _load_state(self) -> tuple[list[RuleConfig], dict[str, dict[str, Any]], list[dict[str, Any]]]:
        pushed: list[RuleConfig] = []
        try:
            pushed = parse_rules(json.loads(self._path("rules.json").read_text()), "controller rules")
        except FileNotFoundError:
            pass
        except (ValueError, ConfigError) as exc:
            log.error("monitoring: ignoring the saved controller rules: %s", exc)
        try:
            firing = json.loads(self._path("firing.json").read_text())
        except FileNotFoundError:
            firing = {}
        outbox = []
        with contextlib.suppress(FileNotFoundError), self._path("outbox.jsonl").open() as f:
            for line in f:
                try:
                    outbox.append(json.loads(line))
                except ValueError:
                    log.error("monitoring: skipping a torn line at the end of the alert outbox")
        return pushed, firing, outbox

    def _record(self, alert: dict[str, Any], firing: dict[str, dict[str, Any]]) -> None:
        with self._path("outbox.jsonl").open("a") as f:
            f.write(json.dumps(alert) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._write_json("firing.json", firing)

    def _rewrite_outbox(self, alerts: list[dict[str, Any]]) -> None:
        self._write_text("outbox.jsonl", "".join(json.dumps(a) + "\n" for a in alerts))

    def _write_json(self, name: str, data: Any) -> None:
        self._write_text(name, json.dumps(data))

    async def _save_json(self, name: str, data: Any) -> None:
        async def save() -> None:
            await asyncio.to_thread(self._write_json, name, data)

        await self._shielded(save)

    def _write_text(self, name: str, text: str) -> None:
        path = self._path(name)
        tmp = path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    # -- metrics --------------------------------------------------------------------------

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        value = GaugeMetricFamily("kumo_probe_value", "The last number a probe measured, in base units.", labels=["probe", "target"])
        status = GaugeMetricFamily(
            "kumo_probe_status", "1 for the status the probe's last run gave (ok, warning, critical, unknown), else 0.",
            labels=["probe", "target", "status"],
        )
        last_run = GaugeMetricFamily(
            "kumo_probe_last_run_timestamp_seconds", "When a probe last ran, as a Unix timestamp.", labels=["probe", "target"]
        )
        for (probe, target), sample in sorted(self.samples.items()):
            if sample.value is not None:
                value.add_metric([probe, target], sample.value)
            for name in STATUSES:
                status.add_metric([probe, target, name], 1.0 if sample.status == name else 0.0)
            last_run.add_metric([probe, target], sample.at)
        duration = GaugeMetricFamily("kumo_probe_duration_seconds", "How long a probe's last run took.", labels=["probe"])
        for probe, seconds in sorted(self.durations.items()):
            duration.add_metric([probe], seconds)
        timeouts = CounterMetricFamily("kumo_probe_timeouts", "Probe runs cut off by their timeout.", labels=["probe"])
        for probe, count in sorted(self.timeouts.items()):
            timeouts.add_metric([probe], count)
        received = CounterMetricFamily("kumo_network_receive_bytes", "Bytes received, by interface.", labels=["device"])
        sent_bytes = CounterMetricFamily("kumo_network_transmit_bytes", "Bytes sent, by interface.", labels=["device"])
        for nic, (rx, tx) in sorted(self.network_counters.items()):
            received.add_metric([nic], rx)
            sent_bytes.add_metric([nic], tx)
        firing = GaugeMetricFamily("kumo_alerts_firing", "Alerts firing on this node, by rule.", labels=["rule"])
        by_rule: dict[str, int] = {}
        for alert in self.firing.values():
            by_rule[alert["rule"]] = by_rule.get(alert["rule"], 0) + 1
        for rule, count in sorted(by_rule.items()):
            firing.add_metric([rule], count)
        queued = GaugeMetricFamily("kumo_alert_outbox_transitions", "Alert transitions waiting for the controller's answer.")
        queued.add_metric([], len(self.outbox))
        sent = CounterMetricFamily("kumo_alert_transitions_sent", "Alert transitions the controller accepted.")
        sent.add_metric([], self.sent_total)
        return [value, status, last_run, duration, timeouts, received, sent_bytes, firing, queued, sent, *self._textfiles()]

    def _textfiles(self) -> list[Any]:
        """``*.prom`` files as node_exporter's textfile collector reads them.

        A file that cannot be read or parsed, or that gives a metric another file typed
        differently, is skipped whole and ``kumo_textfile_scrape_error`` is 1; the same
        metric in several files is merged into one family, as Prometheus requires.
        """
        from prometheus_client.core import GaugeMetricFamily
        from prometheus_client.parser import text_string_to_metric_families

        if self.config.textfile_dir is None:
            return []
        error = GaugeMetricFamily("kumo_textfile_scrape_error", "1 if a textfile could not be read or parsed, else 0.")
        mtime = GaugeMetricFamily("kumo_textfile_mtime_seconds", "When each textfile read was last changed.", labels=["file"])
        families: dict[str, Any] = {}
        failed = 0
        for path in sorted(self.config.textfile_dir.glob("*.prom")):
            try:
                parsed = list(text_string_to_metric_families(path.read_text()))
                changed = path.stat().st_mtime
                for family in parsed:
                    known = families.get(family.name)
                    if known is not None and known.type != family.type:
                        raise ValueError(f"{family.name} is a {family.type} here but a {known.type} in an earlier file")
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                failed = 1
                log.warning("monitoring: textfile %s skipped: %s", path, exc)
                continue
            for family in parsed:
                if family.name in families:
                    families[family.name].samples.extend(family.samples)
                else:
                    families[family.name] = family
            mtime.add_metric([str(path)], changed)
        error.add_metric([], failed)
        return [*families.values(), mtime, error]


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


COMM_LENGTH = 15  # the kernel keeps this much of a process name in /proc/PID/comm


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


def _contributed(probe: Probe) -> Any:
    async def run() -> list[tuple[str, ProbeResult]]:
        result = probe.run()
        if asyncio.iscoroutine(result):
            result = await result
        target = ",".join(f"{k}={v}" for k, v in sorted(result.labels.items()))
        return [(target, result)]

    return run
