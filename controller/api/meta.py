"""About the controller itself: its OpenAPI document, its metrics, Prometheus discovery of the
agents, and certificates for things that are not nodes (Prometheus, more admins)."""

from __future__ import annotations

import datetime
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller import pki
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
from controller.services import iso

ISSUABLE_ROLES = ("scraper", "admin")
CLIENT_CERT_LIFETIME = datetime.timedelta(days=365)


def openapi(routes: list[Route]) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": f"{route.method.lower()}_{route.handler.__name__}",
            "x-kumo-role": route.role,
            "security": [] if route.role == "enroll" else [{"mutualTLS": []}],
            "responses": {"default": {"description": "JSON; errors are {\"error\": sentence}"}},
        }
        parameters = [
            {"name": part[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for part in route.path.split("/") if part.startswith("{")
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.body is not None:
            operation["requestBody"] = {
                "content": {"application/json": {"schema": {
                    "type": "object",
                    "properties": {name: {"description": text} for name, text in route.body.items()},
                }}}
            }
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {"title": "Kumo controller", "version": "1"},
        "components": {"securitySchemes": {"mutualTLS": {"type": "mutualTLS"}}},
        "paths": paths,
    }


async def openapi_document(request: web.Request) -> web.Response:
    return reply(openapi(state(request).routes))


async def metrics(request: web.Request) -> web.Response:
    ctl = state(request)
    counts = await ctl.store.counts()
    for task_state in ("pending", "delivered", "succeeded", "failed"):
        ctl.metrics.tasks.labels(task_state).set(counts["tasks"].get(task_state, 0))
    by_state = {"ready": 0, "unreachable": 0}
    for row in await ctl.store.list_nodes():
        by_state[ctl.node_view(row)["state"]] += 1
    for node_state, number in by_state.items():
        ctl.metrics.nodes.labels(node_state).set(number)
    response = web.Response(body=generate_latest(ctl.metrics.registry))
    response.content_type = CONTENT_TYPE_LATEST.split(";")[0]
    return response


async def prometheus_targets(request: web.Request) -> web.Response:
    """Prometheus ``http_sd_configs``: one target group per agent that publishes metrics."""
    ctl = state(request)
    groups = []
    for row in await ctl.store.list_nodes():
        node = ctl.node_view(row)
        if not node["metrics_url"]:
            continue
        url = urlsplit(node["metrics_url"])
        plugins = node["plugins"]
        kinds = sorted({k for fp in plugins.values() if fp.get("available") for k in fp.get("kinds") or ()})
        acceleration = ((plugins.get("kvm") or {}).get("attributes") or {}).get("acceleration", "")
        groups.append({
            "targets": [url.netloc],
            "labels": {
                "__scheme__": url.scheme,
                "__metrics_path__": url.path or "/metrics",
                "node_id": node["id"],
                "hostname": node["hostname"],
                "kumo_state": node["state"],
                "kumo_kinds": ",".join(kinds),
                "kumo_acceleration": acceleration,
            },
        })
    return web.json_response(groups)


async def issue_certificate(request: web.Request) -> web.Response:
    """Sign a CSR for a scraper (Prometheus) or another admin; the key never leaves its owner."""
    ctl = state(request)
    data = await json_body(request)
    reject_unknown(data, {"role", "name", "csr"})
    role = field(data, "role", str)
    name = field(data, "name", str)
    if role not in ISSUABLE_ROLES:
        raise ApiError(400, f"role must be one of {', '.join(ISSUABLE_ROLES)} (nodes get theirs by joining), got {role!r}")
    if not 0 < len(name) <= 64:
        raise ApiError(400, "name must be 1 to 64 characters")
    try:
        public_key = pki.public_key_from_csr(field(data, "csr", str))
    except pki.CSRError as exc:
        raise ApiError(400, str(exc)) from None
    cert = ctl.ca.issue(public_key, role, name, CLIENT_CERT_LIFETIME)
    serial = format(cert.serial_number, "x")
    await ctl.store.add_client_certificate(serial, role, name, pki.expires_at(cert))
    return reply({"certificate": pki.pem(cert), "ca": pki.pem(ctl.ca.cert), "serial": serial}, 201)


async def list_certificates(request: web.Request) -> web.Response:
    """Every admin and scraper certificate issued, oldest first (node certificates go with their node)."""
    limit, after = page_query(request)
    rows, following = paged(await state(request).store.list_client_certificates(limit + 1, time_cursor(after)), limit,
                            lambda r: f"{r['created_at']!r}/{r['serial']}")
    return reply({"certificates": [
        {"serial": r["serial"], "role": r["role"], "name": r["name"], "expires_at": iso(r["expires_at"]),
         "created_at": iso(r["created_at"]), "revoked_at": iso(r["revoked_at"])} for r in rows], "next": following})


async def revoke_certificate(request: web.Request) -> web.Response:
    ctl = state(request)
    serial = request.match_info["serial"].lower()
    if serial == ctl.peer(request)[2]:
        raise ApiError(409, "this is the certificate making the request: revoke it with another admin certificate")
    if not await ctl.store.revoke_client_certificate(serial):
        raise ApiError(404, f"no admin or scraper certificate with serial {serial} was issued here "
                            "(see kumoctl certificate list; a node's certificates go with kumoctl nodes remove)")
    return reply({"serial": serial, "revoked": True})


async def audit_log(request: web.Request) -> web.Response:
    """Every admin action, newest first: who (role, name, certificate serial), what, how it ended."""
    limit, after = page_query(request)
    if after is not None and not (after.isdigit() and len(after) <= 18):  # an id: within a 64-bit integer
        raise ApiError(400, "after must be the next cursor of the previous page")
    rows, following = paged(await state(request).store.list_audit(limit + 1, int(after) if after else None), limit,
                            lambda r: str(r["id"]))
    return reply({"entries": [{**{k: r[k] for k in ("id", "role", "name", "serial", "method", "path", "status", "error")},
                               "at": iso(r["at"])} for r in rows], "next": following})


ROUTES = [
    Route("GET", "/v1/openapi.json", openapi_document, "any", "This document."),
    Route("GET", "/metrics", metrics, "scraper", "The controller's own metrics (Prometheus text format)."),
    Route("GET", "/v1/prometheus/targets", prometheus_targets, "scraper",
          "Prometheus http_sd_configs: every agent's metrics endpoint, labelled with its node id and kinds."),
    Route("POST", "/v1/certificates", issue_certificate, "admin", "Issue a client certificate for a scraper or an admin.",
          {"role": "scraper or admin", "name": "certificate name", "csr": "PEM CSR, ECDSA P-256"}),
    Route("GET", "/v1/certificates", list_certificates, "admin",
          "Every admin and scraper certificate issued, oldest first, with its serial and whether it is revoked, "
          "a page at a time (?limit=&after=NEXT)."),
    Route("DELETE", "/v1/certificates/{serial}", revoke_certificate, "admin",
          "Revoke an admin or scraper certificate at once (not the one making the request)."),
    Route("GET", "/v1/audit", audit_log, "admin",
          "The audit log, newest first: every admin action that changes something, who made it and its outcome, a page at a time (?limit=&after=NEXT)."),
]
