"""``plugins.monitoring`` settings: probes and rules, parsed and checked before anything runs.

Each probe type takes only its own options, so a misplaced one is an error rather than
silently ignored. Configured probe names may not contain a dot: dotted names belong to the
probes other plugins contribute (``<plugin>.<probe>``), which rules may name before those
plugins have started. Rules come from the agent config and from the controller (task
``monitoring.rules``); both are read by :func:`parse_rules`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from agent.sdk import ConfigError, parse_section

ProbeType = Literal["cpu", "memory", "swap", "disk", "load", "network", "process", "tcp", "http", "command"]


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

COMMON_OPTIONS = {"name", "type", "interval", "timeout"}
THRESHOLDS = {"warning", "critical"}
# Which options each type reads; command and process decide their status themselves.
TYPE_OPTIONS: dict[str, set[str]] = {
    "cpu": THRESHOLDS, "memory": THRESHOLDS, "swap": THRESHOLDS, "load": THRESHOLDS, "network": THRESHOLDS,
    "disk": THRESHOLDS | {"mount"}, "tcp": THRESHOLDS | {"host", "port"},
    "http": THRESHOLDS | {"url", "ca_file", "expect_status"}, "process": {"process"}, "command": {"command"},
}
REQUIRED_OPTIONS = {"tcp": ("host", "port"), "http": ("url",), "process": ("process",), "command": ("command",)}


def parse_config(section: Mapping[str, Any], source: str) -> tuple[MonitoringConfig, dict[str, ProbeConfig], list[RuleConfig]]:
    """The settings, the probes to run by name (defaults included) and the configured rules."""
    config = parse_section(MonitoringConfig, section, source)
    # A configured probe may take a default's name to change its thresholds or interval.
    probes = {p.name: p for p in DEFAULT_PROBES} if config.default_probes else {}
    configured: set[str] = set()
    for i, probe in enumerate(config.probes):
        where = f"{source}.probes[{i}]"
        check_probe(probe, section["probes"][i], where)
        if probe.name in configured:
            raise ConfigError(f"{where}.name: probe name {probe.name!r} is used twice")
        configured.add(probe.name)
        probes[probe.name] = probe
    rules = parse_rules(config.rules, f"{source}.rules")
    for i, rule in enumerate(rules):
        if rule.probe not in probes and "." not in rule.probe:
            raise ConfigError(f"{source}.rules[{i}].probe: no probe named {rule.probe!r} (probes: {', '.join(sorted(probes))})")
    return config, probes, rules


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
