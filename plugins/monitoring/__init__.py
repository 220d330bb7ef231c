"""The ``monitoring`` plugin: probes on their own schedules, alert rules evaluated on the node.

Probes. Built-in types: ``cpu``, ``memory``, ``swap``, ``disk`` (every mount, or one), ``load``,
``network`` (bytes/s per interface), ``process`` (how many match a name), ``tcp`` (connect
time), ``http`` (GET, response time) and ``command`` (any Nagios plugin: exit 0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN, the first perfdata value as the number). Other plugins
add probes through ``kumo_probes``; they are named ``<plugin>.<probe>``. Every probe runs
in its own asyncio task with its own interval and timeout, so a slow or hung probe never
delays another; a command that times out is killed with its whole process group and reads
UNKNOWN.

Alerts. Rules come from the agent config and from the controller (task
``monitoring.rules``, kept in the plugin's state dir); each firing or resolved transition
goes through an fsync'd outbox to the controller, so an outage or a restart loses none.

The package, by concern: ``settings`` (config, probe and rule validation), ``probes`` (the
built-in probe types), ``schedule`` (running them), ``alerts`` (rules, transitions, the
outbox and its delivery), ``metrics`` (the metric families and textfiles); this module is
the plugin's hooks and their wiring.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from agent.sdk import (
    ConfigError,
    Fingerprint,
    PluginContext,
    TaskError,
    hookimpl,
    parse_payload,
)

from .alerts import Alerts
from .metrics import alert_families, network_families, probe_families, textfile_families
from .probes import ProbeTools, builtin, contributed, contributed_name
from .schedule import ProbeScheduler, cancel_all
from .settings import (
    DEFAULT_PROBES,
    MonitoringConfig,
    ProbeConfig,
    RuleConfig,
    parse_config,
    parse_rules,
)

log = logging.getLogger(__name__)

COLLECT_PROBES_EVERY = 60.0


@dataclasses.dataclass
class RulesPayload:
    """``monitoring.rules``: the controller's whole rule set for this node."""

    rules: list[dict[str, Any]]


class MonitoringPlugin:
    """The ``monitoring`` entry point: probes, rules, the alert outbox and their metrics."""

    def __init__(self) -> None:
        self.config = MonitoringConfig()
        self.probes: dict[str, ProbeConfig] = {p.name: p for p in DEFAULT_PROBES}
        self.context: PluginContext | None = None
        self.alerts = Alerts()
        self.scheduler = ProbeScheduler(self.alerts.evaluate, self.alerts.forget)
        self.tools = ProbeTools(self.scheduler.in_thread)
        self._background: list[asyncio.Task[None]] = []

    @property
    def rules(self) -> list[RuleConfig]:
        return self.alerts.rules

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config, self.probes, self.alerts.config_rules = parse_config(section, source)

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        await self.alerts.open(context.state_dir)
        for probe in self.probes.values():
            self.scheduler.schedule(probe.name, builtin(probe, self.tools), probe.interval, probe.timeout)
        self._background = [
            asyncio.create_task(self.alerts.deliver(self._send), name="monitoring-outbox"),
            asyncio.create_task(self._collect_loop(), name="monitoring-contributed-probes"),
        ]

    @hookimpl
    async def kumo_shutdown(self) -> None:
        await cancel_all([*self.scheduler.tasks.values(), *self._background])
        await self.alerts.flush()

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        probes = {p for p, _ in self.scheduler.samples} | set(self.probes)
        return Fingerprint(available=True, attributes={"probes": sorted(probes), "rules": len(self.rules)})

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return ("monitoring.rules",)

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        if kind != "monitoring.rules":
            raise TaskError(f"the monitoring plugin does not handle {kind!r}", code="unknown-kind")
        items = parse_payload(RulesPayload, payload).rules
        try:
            rules = parse_rules(items, "payload.rules")
        except ConfigError as exc:
            raise TaskError(str(exc), code="bad-request") from None
        clash = {r.name for r in rules} & {r.name for r in self.alerts.config_rules}
        if clash:
            raise TaskError(
                f"rule {sorted(clash)[0]!r} is already defined in this node's agent config: rename it in the pushed set",
                code="conflict",
            )
        await self.alerts.push_rules(rules, items)
        return {"rules": len(rules)}

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        return [
            *probe_families(self.scheduler), *network_families(self.tools.network_counters),
            *alert_families(self.alerts), *textfile_families(self.config.textfile_dir),
        ]

    async def _send(self, batch: list[dict[str, Any]]) -> None:
        assert self.context is not None
        await self.context.call_controller("POST", "alerts", {"alerts": batch})

    async def _collect_loop(self) -> None:
        """Pick up probes other plugins contribute (they may start after this plugin)."""
        assert self.context is not None
        await asyncio.sleep(1.0)
        told: set[str] = set()
        while True:
            for plugin, probe in await self.context.hooks.probes():
                name = contributed_name(plugin, probe.name)
                if name not in self.scheduler.tasks:
                    self.scheduler.schedule(name, contributed(probe), probe.interval, probe.timeout)
            for rule in self.rules:
                if rule.probe not in self.scheduler.tasks and rule.name not in told:
                    told.add(rule.name)
                    log.warning("monitoring: rule %s watches probe %r, which this node does not have (probes: %s)",
                                rule.name, rule.probe, ", ".join(sorted(self.scheduler.tasks)))
            await asyncio.sleep(COLLECT_PROBES_EVERY)
