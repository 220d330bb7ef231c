"""The plugin's metric families: probe samples, alert counts, and node_exporter-style textfiles.

Built from cached values at every scrape (``kumo_metrics`` runs off the event loop), so a
scrape never waits for a probe.

Textfiles. ``*.prom`` files in ``textfile_dir`` are read at every scrape the way
node_exporter's textfile collector reads them (the same metric in several files is one
family); a file that does not parse is skipped whole and ``kumo_textfile_scrape_error``
says so.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .alerts import Alerts
from .schedule import ProbeScheduler

log = logging.getLogger(__name__)

STATUSES = ("ok", "warning", "critical", "unknown")


def probe_families(scheduler: ProbeScheduler) -> list[Any]:
    value = GaugeMetricFamily("kumo_probe_value", "The last number a probe measured, in base units.", labels=["probe", "target"])
    status = GaugeMetricFamily(
        "kumo_probe_status", "1 for the status the probe's last run gave (ok, warning, critical, unknown), else 0.",
        labels=["probe", "target", "status"],
    )
    last_run = GaugeMetricFamily(
        "kumo_probe_last_run_timestamp_seconds", "When a probe last ran, as a Unix timestamp.", labels=["probe", "target"]
    )
    for (probe, target), sample in sorted(scheduler.samples.items()):
        if sample.value is not None:
            value.add_metric([probe, target], sample.value)
        for name in STATUSES:
            status.add_metric([probe, target, name], 1.0 if sample.status == name else 0.0)
        last_run.add_metric([probe, target], sample.at)
    duration = GaugeMetricFamily("kumo_probe_duration_seconds", "How long a probe's last run took.", labels=["probe"])
    for probe, seconds in sorted(scheduler.durations.items()):
        duration.add_metric([probe], seconds)
    timeouts = CounterMetricFamily("kumo_probe_timeouts", "Probe runs cut off by their timeout.", labels=["probe"])
    for probe, count in sorted(scheduler.timeouts.items()):
        timeouts.add_metric([probe], count)
    return [value, status, last_run, duration, timeouts]


def network_families(counters: Mapping[str, tuple[int, int]]) -> list[Any]:
    received = CounterMetricFamily("kumo_network_receive_bytes", "Bytes received, by interface.", labels=["device"])
    sent = CounterMetricFamily("kumo_network_transmit_bytes", "Bytes sent, by interface.", labels=["device"])
    for nic, (rx, tx) in sorted(counters.items()):
        received.add_metric([nic], rx)
        sent.add_metric([nic], tx)
    return [received, sent]


def alert_families(alerts: Alerts) -> list[Any]:
    firing = GaugeMetricFamily("kumo_alerts_firing", "Alerts firing on this node, by rule.", labels=["rule"])
    by_rule: dict[str, int] = {}
    for alert in alerts.firing.values():
        by_rule[alert["rule"]] = by_rule.get(alert["rule"], 0) + 1
    for rule, count in sorted(by_rule.items()):
        firing.add_metric([rule], count)
    queued = GaugeMetricFamily("kumo_alert_outbox_transitions", "Alert transitions waiting for the controller's answer.")
    queued.add_metric([], len(alerts.outbox))
    sent = CounterMetricFamily("kumo_alert_transitions_sent", "Alert transitions the controller accepted.")
    sent.add_metric([], alerts.sent_total)
    return [firing, queued, sent]


def textfile_families(directory: Path | None) -> list[Any]:
    """``*.prom`` files as node_exporter's textfile collector reads them.

    A file that cannot be read or parsed, or that gives a metric another file typed
    differently, is skipped whole and ``kumo_textfile_scrape_error`` is 1; the same
    metric in several files is merged into one family, as Prometheus requires.
    """
    if directory is None:
        return []
    # Only with textfiles to read: most agents never load the parser.
    from prometheus_client.parser import text_string_to_metric_families

    error = GaugeMetricFamily("kumo_textfile_scrape_error", "1 if a textfile could not be read or parsed, else 0.")
    mtime = GaugeMetricFamily("kumo_textfile_mtime_seconds", "When each textfile read was last changed.", labels=["file"])
    families: dict[str, Any] = {}
    failed = 0
    for path in sorted(directory.glob("*.prom")):
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
