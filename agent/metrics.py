"""The agent's ``/metrics``: plugin metric families plus the agent's own health.

Served by aiohttp inside the agent's event loop rather than prometheus_client's
``start_http_server``: Debian 12's prometheus-client 0.16 has no TLS options there (they
came in 0.17), so it could not do the mTLS mode; it also runs a thread per request. aiohttp
is already loaded for the controller session, so serving here costs no extra threads,
shares the loop's shutdown, and lets the server certificate be reloaded after a renewal. Rendering (which calls every plugin's ``kumo_metrics``) happens
in a worker thread, as the hook contract promises plugins.

With ``metrics.client_ca`` set, the listener speaks TLS with the node's own certificate and
requires a client certificate signed by that CA (Prometheus' ``tls_config.cert_file``).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# The web_* modules rather than aiohttp.web, which also loads the websocket server the
# agent never uses (~0.2 MB resident).
from aiohttp.web_app import Application
from aiohttp.web_request import Request
from aiohttp.web_response import Response
from aiohttp.web_runner import AppRunner, TCPSite
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from agent.sdk import Identity

log = logging.getLogger(__name__)


class _PluginCollector:
    """Yields every plugin's families at scrape time (``Hooks.metrics``)."""

    def __init__(self, families: Callable[[], Iterable[Any]]):
        self._families = families

    def collect(self) -> Iterable[Any]:
        yield from self._families()

    def describe(self) -> list[Any]:
        # Empty: the registry must not call plugins at registration time to learn names.
        return []


class AgentMetrics:
    """The agent's health metrics, in a registry of their own (never the process-global one)."""

    def __init__(self, plugin_families: Callable[[], Iterable[Any]] | None = None):
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        self.heartbeat_seconds = Histogram(
            "kumo_agent_heartbeat_duration_seconds",
            "Round-trip time of heartbeats to the controller, in seconds.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=self.registry,
        )
        self.connected = Gauge(
            "kumo_agent_controller_connected",
            "1 while the agent is registered with the controller and its requests succeed, else 0.",
            registry=self.registry,
        )
        self.tasks = Counter(
            "kumo_agent_tasks",
            "Tasks finished by this agent, by task kind and outcome (succeeded, failed, replayed).",
            ["kind", "outcome"],
            registry=self.registry,
        )
        self.plugin_available = Gauge(
            "kumo_agent_plugin_available",
            "1 when the plugin reports itself available on this node, 0 when it does not.",
            ["plugin"],
            registry=self.registry,
        )
        self.cert_expiry = Gauge(
            "kumo_agent_certificate_expiry_timestamp_seconds",
            "When the node certificate expires, as a Unix timestamp in seconds.",
            registry=self.registry,
        )
        if plugin_families is not None:
            self.registry.register(_PluginCollector(plugin_families))

    def render(self) -> bytes:
        return generate_latest(self.registry)


def server_tls_context(identity: Identity, client_ca: Path) -> ssl.SSLContext:
    """Serve with the node's certificate; require a client certificate signed by ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(identity.certificate), str(identity.key))
    ctx.load_verify_locations(cafile=str(client_ca))
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


class MetricsServer:
    """``GET /metrics`` on ``host:port``; plain HTTP, or mTLS when ``tls`` is given."""

    def __init__(self, metrics: AgentMetrics, host: str, port: int, tls: ssl.SSLContext | None = None):
        self.metrics = metrics
        self.host = host
        self.port = port
        self.tls = tls
        self._runner: AppRunner | None = None

    async def start(self) -> None:
        app = Application()
        app.router.add_get("/metrics", self._handle)
        self._runner = AppRunner(app, access_log=None)
        await self._runner.setup()
        site = TCPSite(self._runner, self.host, self.port, ssl_context=self.tls)
        await site.start()
        log.info("metrics: serving %s://%s:%d/metrics", "https" if self.tls else "http", self.host, self.port)

    def reload_certificate(self, identity: Identity) -> None:
        """Serve the renewed node certificate to new connections."""
        if self.tls is not None:
            self.tls.load_cert_chain(str(identity.certificate), str(identity.key))

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _handle(self, request: Request) -> Response:
        body = await asyncio.to_thread(self.metrics.render)
        response = Response(body=body)
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response
