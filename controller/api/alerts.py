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
from controller.api import (
    ApiError,
    Route,
    field,
    json_body,
    page_query,
    paged,
    reject_unknown,
    reply,
    state,
    time_cursor,
)

log = logging.getLogger("kumo.controller.alerts")

ALERT_FIELDS = {"id", "rule", "state", "severity", "labels", "annotations", "value", "starts_at", "ends_at"}
STATES = ("firing", "resolved")
LISTED = ("node", "rule", "state", "severity", "labels", "annotations", "value", "starts_at", "ends_at")
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


async def list_alerts(request: web.Request) -> web.Response:
    ctl = state(request)
    wanted = request.query.get("state")
    if wanted is not None and wanted not in STATES:
        raise ApiError(400, f"state must be firing or resolved, got {wanted!r}")
    limit, after = page_query(request)
    before = None
    if after is not None:
        received_at, rest = time_cursor(after)
        node, _, alert_id = rest.partition("/")  # node ids hold no "/"; an alert's id may
        before = (received_at, node, alert_id)
    rows, following = paged(await ctl.store.current_alerts(wanted, request.query.get("node"), limit + 1, before),
                            limit, lambda row: f"{row['received_at']!r}/{row['node']}/{row['id']}")
    return reply({"alerts": [{k: row[k] for k in LISTED} for row in rows], "next": following})


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
    Route("GET", "/v1/alerts", list_alerts, "admin",
          "Each alert's latest state, the most recently changed first, a page at a time "
          "(?state=firing|resolved&node=&limit=&after=NEXT)."),
]
