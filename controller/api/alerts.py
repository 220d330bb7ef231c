"""Alerts: rules are evaluated on the nodes; the controller stores what they report and
forwards it to an Alertmanager-compatible webhook (``alertmanager_url`` in controller.yaml).

A node sends each firing or resolved transition with an id of its own and re-sends until it
hears "ok", so the store keeps (node, id) once. Forwarding follows the Alertmanager v2 API
(``POST /api/v2/alerts``): a resolved alert is the same labels with ``endsAt`` set.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from agent.sdk import Backoff
from controller.api import ApiError, Route, field, json_body, reject_unknown, reply, state

log = logging.getLogger("kumo.controller.alerts")

ALERT_FIELDS = {"id", "rule", "state", "severity", "labels", "annotations", "value", "starts_at", "ends_at"}
STATES = ("firing", "resolved")
FORWARD_BATCH = 200
RETRY_FIRST = 1.0
RETRY_MAX = 60.0


def _alert(item: Any) -> dict[str, Any]:
    if not isinstance(item, dict):
        raise ApiError(400, "alerts: each item must be an object")
    reject_unknown(item, ALERT_FIELDS)
    alert = {
        "id": field(item, "id", str),
        "rule": field(item, "rule", str),
        "state": field(item, "state", str),
        "severity": field(item, "severity", str, required=False, default="warning"),
        "labels": field(item, "labels", dict, required=False, default={}),
        "annotations": field(item, "annotations", dict, required=False, default={}),
        "value": field(item, "value", (int, float), required=False),
        "starts_at": field(item, "starts_at", str),
        "ends_at": field(item, "ends_at", str, required=False),
    }
    if alert["state"] not in STATES:
        raise ApiError(400, f"alerts: state must be firing or resolved, got {alert['state']!r}")
    if not all(isinstance(v, str) for v in (*alert["labels"].values(), *alert["annotations"].values())):
        raise ApiError(400, "alerts: label and annotation values must be strings")
    return alert


async def report(request: web.Request) -> web.Response:
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"alerts"})
    alerts = [_alert(item) for item in field(data, "alerts", list)]
    added = await ctl.store.add_alerts(request.match_info["id"], alerts)
    return reply({"ok": True, "accepted": added})


def current(transitions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The latest state of each alert, keyed by node, rule and labels."""
    latest: dict[tuple[str, str, tuple[tuple[str, str], ...]], dict[str, Any]] = {}
    for row in transitions:
        latest[(row["node"], row["rule"], tuple(sorted(row["labels"].items())))] = row
    return [
        {k: row[k] for k in ("node", "rule", "state", "severity", "labels", "annotations", "value", "starts_at", "ends_at")}
        for row in latest.values()
    ]


async def list_alerts(request: web.Request) -> web.Response:
    ctl = state(request)
    wanted = request.query.get("state")
    if wanted is not None and wanted not in STATES:
        raise ApiError(400, f"state must be firing or resolved, got {wanted!r}")
    node = request.query.get("node")
    alerts = [
        a for a in current(await ctl.store.list_alerts())
        if (wanted is None or a["state"] == wanted) and (node is None or a["node"] == node)
    ]
    return reply({"alerts": sorted(alerts, key=lambda a: a["starts_at"], reverse=True)})


def alertmanager_body(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        item: dict[str, Any] = {
            "labels": {**row["labels"], "alertname": row["rule"], "node": row["node"], "severity": row["severity"]},
            "annotations": row["annotations"],
            "startsAt": row["starts_at"],
        }
        if row["state"] == "resolved":
            item["endsAt"] = row["ends_at"] or row["starts_at"]
        out.append(item)
    return out


async def forward_loop(ctl: Any) -> None:
    """Deliver stored transitions to the webhook in order, retrying with backoff until it takes them."""
    url = ctl.settings.alertmanager_url
    endpoint = url.rstrip("/") + "/api/v2/alerts"
    backoff = Backoff(RETRY_FIRST, RETRY_MAX)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        while True:
            ctl.alerts_waiting.clear()  # before looking: an alert stored while the store answers wakes the next wait
            rows = await ctl.store.unforwarded_alerts(FORWARD_BATCH)
            if not rows:
                await ctl.alerts_waiting.wait()
                continue
            try:
                async with session.post(endpoint, json=alertmanager_body(rows)) as response:
                    if response.status >= 300:
                        raise RuntimeError(f"{endpoint} answered {response.status}")
            except (TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
                delay = backoff.next()
                log.warning("forwarding %d alert(s) failed (%s); retrying in %.0f s", len(rows), exc or type(exc).__name__, delay)
                await asyncio.sleep(delay)
                continue
            backoff.reset()
            await ctl.store.mark_forwarded([(row["node"], row["id"]) for row in rows])


ROUTES = [
    Route("POST", "/v1/nodes/{id}/alerts", report, "node", "A node reports alert transitions (deduplicated by id).",
          {"alerts": "list of {id, rule, state, severity, labels, annotations, value, starts_at, ends_at}"}),
    Route("GET", "/v1/alerts", list_alerts, "admin", "Each alert's latest state (?state=firing|resolved&node=)."),
]
