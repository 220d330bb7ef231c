"""The controller process: its state, the two HTTPS listeners and the request guard.

Two listeners share one :class:`Controller`. The API listener requires a client certificate
from the Kumo CA at the TLS handshake; the enrollment listener asks for none and serves only
``POST /v1/enroll``. Every route declares who may call it (:class:`controller.api.Route`),
and :func:`guard` checks that against the caller's identity before the handler runs, so no
handler can forget to. A third listener, when ``ui_listen`` is set, serves the web interface
(:mod:`controller.ui`): the same admin routes behind the same guard, the identity coming
from a browser session instead of a certificate. Each listener caps the connections it holds,
in all and per client (:mod:`controller.connections`), and closes kept-alive connections
idle for ``keepalive_timeout``.

Heartbeats are frequent and mostly say "nothing changed": they update an in-memory table
that is written to the store every :data:`FLUSH_INTERVAL` seconds, not once per request.

Several controllers may serve one fleet on one PostgreSQL database. What a controller keeps
in memory is a cache of the store or about its own connections (the long-polls it holds,
the heartbeats it has not yet written); the store's events (:mod:`controller.store.database`) keep
the caches current and wake this controller's long-polls and waiters, whichever
controller made the change.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import io
import logging
import ssl
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from agent.sdk import require_peer_role
from controller import pki, tls
from controller.api import (
    ApiError,
    Route,
    alerts,
    enroll,
    images,
    instances,
    logging_settings,
    meta,
    migration,
    nodes,
    rebalancing,
    reply,
    tasks,
    ui,
)
from controller.connections import ConnectionLimits
from controller.services import Refused, inflight, migrations, rebalance
from controller.services import images as image_service
from controller.settings import ControllerSettings, split_address
from controller.store import Store, open_store
from controller.store.database import Event, StoreUnavailable, cancel_and_wait
from controller.ui import IDENTIFY
from controller.ui import make_app as make_ui_app

log = logging.getLogger("kumo.controller")

FLUSH_INTERVAL = 2.0
# Every controller says it is alive this often; one not heard of for three times as long is gone.
REGISTRY_INTERVAL = 5.0
PRUNE_INTERVAL = 3600.0
STOP_REPORT_AFTER = 10.0
LIMITS = "kumo.connections"  # app key: the listener's ConnectionLimits
# Seconds a closing connection waits for the client's TLS close before it is dropped (asyncio's
# default, 30, would hold every idle connection closed at keepalive_timeout that much longer).
TLS_SHUTDOWN_TIMEOUT = 5.0
API_MODULES = (enroll, nodes, tasks, instances, images, migration, rebalancing, logging_settings, alerts, meta, ui)


class Metrics:
    """The controller's own ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "kumo_controller_requests", "API requests answered, by route and status.",
            ["method", "route", "status"], registry=self.registry,
        )
        self.latency = Histogram(
            "kumo_controller_request_duration_seconds", "Time to answer an API request.",
            ["route"], registry=self.registry,
        )
        self.nodes = Gauge("kumo_controller_nodes", "Enrolled nodes by state.", ["state"], registry=self.registry)
        self.tasks = Gauge("kumo_controller_tasks", "Tasks by state.", ["state"], registry=self.registry)
        self.enrollments = Counter(
            "kumo_controller_enrollments", "Enrollment attempts by outcome.", ["outcome"], registry=self.registry
        )


class Controller:
    """Everything the handlers share: settings, store, CA, and the live view of the nodes."""

    def __init__(self, settings: ControllerSettings, store: Store, ca: pki.CertificateAuthority):
        self.settings = settings
        self.store = store
        self.ca = ca
        self.id = "c-" + uuid.uuid4().hex[:12]  # this process; a restart is another controller
        self.started_at = time.time()
        self.blobs = image_service.Blobs(settings.images_dir)
        self._peers_session: aiohttp.ClientSession | None = None
        self.metrics = Metrics()
        self.routes: list[Route] = [route for module in API_MODULES for route in module.ROUTES]
        # node id -> serials of its certificates still accepted (removal empties it at once)
        self.serials: dict[str, set[str]] = {}
        self.revoked: set[str] = set()  # serials of revoked admin and scraper certificates
        # node id -> {"last_seen", "instances", "plugins"} newer than the store's copy
        self.live: dict[str, dict[str, Any]] = {}
        self.polls: collections.Counter[str] = collections.Counter()  # long polls open, by node
        self._dirty: set[str] = set()
        self._changed: set[str] = set()  # nodes whose instances or plugins changed since the last flush
        # Called with {"event": "live", "node": id} when a heartbeat changes what a node runs
        # (the web interface's live pages listen); the store's events cover everything else.
        self.watchers: list[Callable[[Event], None]] = []
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._task_waiters: dict[str, set[asyncio.Event]] = {}
        self._peers: OrderedDict[bytes, tuple[str, str, str, float]] = OrderedDict()
        self._background: list[asyncio.Task[None]] = []
        self.alerts_waiting = asyncio.Event()
        self.stopping = False
        # None once the store is open; until then why the API answers 503.
        self.unavailable: str | None = "the controller is starting"
        store.subscribe(self._on_event)

    async def start(self) -> None:
        """Open the store, retrying while the database cannot be reached (the API answers 503
        meanwhile); a database that never will be usable (wrong password) raises StoreError."""
        delay = 0.5
        while True:
            try:
                await self.store.open()
                break
            except StoreUnavailable as exc:
                self.unavailable = f"the controller cannot reach its database yet ({exc}); retry shortly"
                log.warning("%s; retrying in %.0f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 15.0)
        await asyncio.to_thread(self.blobs.prepare)
        await self._reload()
        await self._register_init_admin()
        await self.store.controller_seen(self.id, self.settings.url, self.started_at)
        await migrations.end_orphans(self)
        self.unavailable = None
        self._background.append(asyncio.create_task(self._flush_loop(), name="kumo-flush"))
        self._background.append(asyncio.create_task(self._registry_loop(), name="kumo-registry"))
        self._background.append(asyncio.create_task(self._image_files_loop(), name="kumo-image-files"))
        self._background.append(asyncio.create_task(
            self.store.singleton("ending orphaned migrations", self._orphans_loop), name="kumo-orphans"))
        self._background.append(asyncio.create_task(
            self.store.singleton("pruning old records", self._prune_loop), name="kumo-prune"))
        self._background.append(asyncio.create_task(
            self.store.singleton(rebalance.SINGLETON, lambda: rebalance.loop(self)), name="kumo-rebalance"))
        if self.settings.alertmanager_url:
            self._background.append(asyncio.create_task(
                self.store.singleton("alert forwarding", lambda: alerts.forward_loop(self)), name="kumo-alert-forwarder"))

    # The other controllers.

    async def _registry_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_INTERVAL)
            try:
                await self.store.controller_seen(self.id, self.settings.url, self.started_at)
            except StoreUnavailable as exc:
                log.warning("could not tell the other controllers this one is alive: %s", exc)

    async def _orphans_loop(self) -> None:
        while True:
            await asyncio.sleep(REGISTRY_INTERVAL)
            try:
                await migrations.end_orphans(self)
            except StoreUnavailable as exc:
                log.warning("could not look for migrations a dead controller left: %s", exc)

    async def _prune_loop(self) -> None:
        while True:
            try:
                pruned = await self.store.prune(time.time() - self.settings.retention_days * 86400,
                                                forwarding=bool(self.settings.alertmanager_url))
                if any(pruned.values()):
                    log.info("pruned what ended over %g days ago: %s", self.settings.retention_days,
                             ", ".join(f"{n} {what}" for what, n in pruned.items() if n))
            except StoreUnavailable as exc:
                log.warning("could not prune old records: %s", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _image_files_loop(self) -> None:
        """This controller's image files that the catalogue no longer lists, and uploads
        abandoned a day ago. Not a singleton: every controller has its own files."""
        while True:
            try:
                known = {row["sha256"] for row in await self.store.find_images()}
                removed = await asyncio.to_thread(image_service.prune_blobs, self.blobs, known, time.time() - 86400)
                if removed:
                    log.info("removed image files no longer in the catalogue or abandoned: %s", ", ".join(removed))
            except (StoreUnavailable, OSError) as exc:
                log.warning("could not prune image files: %s", exc)
            await asyncio.sleep(PRUNE_INTERVAL)

    async def _controllers(self) -> list[dict[str, Any]]:
        """The controllers alive now. One at this controller's URL but not this process is
        this controller's previous run: it is gone, whenever it was last heard of."""
        rows = await self.store.list_controllers(time.time() - 3 * REGISTRY_INTERVAL)
        return [row for row in rows if row["id"] == self.id or row["url"] != self.settings.url]

    async def live_controllers(self) -> list[str]:
        return [self.id, *(row["id"] for row in await self._controllers() if row["id"] != self.id)]

    async def controller_url(self, controller_id: str) -> str | None:
        """The URL of a live controller, None when it is not running."""
        return next((row["url"] for row in await self._controllers() if row["id"] == controller_id), None)

    def peers(self) -> aiohttp.ClientSession:
        """HTTPS to the other controllers, as this controller (its certificate, role ``controller``)."""
        if self._peers_session is None:
            pki_dir = self.settings.pki_dir
            context = ssl.create_default_context(cafile=str(pki_dir / "ca.crt"))
            context.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
            require_peer_role(context, "controller")
            self._peers_session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=context),
                timeout=aiohttp.ClientTimeout(total=None, connect=30, sock_read=inflight.STALL_TIMEOUT + 30),
            )
        return self._peers_session

    async def _reload(self) -> None:
        self.serials = await self.store.valid_serials()
        self.revoked = await self.store.revoked_serials()

    def _on_event(self, event: Event | None) -> None:
        """A change any controller made (see controller.store.database); None: events may have been missed."""
        if event is None:
            self._background.append(asyncio.create_task(self._catch_up(), name="kumo-catch-up"))
            return
        what = event.get("event")
        if what == "tasks":
            self.wake(event["node"])
        elif what == "task":
            for waiter in self._task_waiters.get(event["id"], ()):
                waiter.set()
        elif what == "certificate":
            self.serials.setdefault(event["node"], set()).add(event["serial"])
        elif what == "removed":
            self.forget(event["node"])
        elif what == "revoked":
            self.revoked.add(event["serial"])
        elif what == "alerts":
            self.alerts_waiting.set()

    async def _catch_up(self) -> None:
        """After missing events: reload the caches and let every waiter look at the store again."""
        try:
            await self._reload()
        except StoreUnavailable as exc:
            log.warning("could not reload certificates after reconnecting to the database: %s", exc)
        for waiters in (*self._wakeups.values(), *self._task_waiters.values()):
            for waiter in waiters:
                waiter.set()
        self.alerts_waiting.set()

    async def node_may_connect(self, node_id: str, serial: str) -> bool:
        """Whether this certificate still speaks for the node. The cache answers; a miss asks
        the store, since another controller may have enrolled or renewed it a moment ago."""
        if serial in self.serials.get(node_id, ()):
            return True
        known = (await self.store.valid_serials(node_id)).get(node_id, set())
        if known:
            self.serials[node_id] = known
        return serial in known

    async def _register_init_admin(self) -> None:
        """List the admin certificate ``kumo-controller init`` made, so it can be revoked like
        the ones issued through the API (init writes files; the store opens only here)."""
        path = self.settings.pki_dir / "admin.crt"
        try:
            cert = x509.load_pem_x509_certificate(await asyncio.to_thread(path.read_bytes))
        except (OSError, ValueError):
            return
        role, name = pki.identity_of(cert)
        await self.store.add_client_certificate(format(cert.serial_number, "x"), role, name, pki.expires_at(cert))

    async def controller_urls(self) -> list[str]:
        """Every live controller's API URL, this one first: what join strings carry, in the
        order a joining agent tries them."""
        others = [row["url"] for row in await self._controllers() if row["id"] != self.id]
        return list(dict.fromkeys([self.settings.url, *others]))

    def release_waiters(self) -> None:
        """Answer every long-poll now, so shutting down does not wait out their timeouts."""
        self.stopping = True
        for waiters in self._wakeups.values():
            for event in waiters:
                event.set()

    async def stop(self) -> None:
        await migrations.shutdown(self)
        await cancel_and_wait(self._background)
        if self._peers_session is not None:
            await self._peers_session.close()
        try:
            await self.flush()
            if self.unavailable is None:
                await self.store.controller_gone(self.id)
        except StoreUnavailable as exc:
            log.warning("could not save the last heartbeats: %s", exc)
        await self.store.close()

    # Peers.

    def peer(self, request: web.Request) -> tuple[str, str, str]:
        """(role, name, serial hex) of the client certificate on this connection."""
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der:
            raise ApiError(403, "no client certificate: use a certificate issued by this controller's CA")
        cached = self._peers.get(der)
        if cached is None:
            cert = x509.load_der_x509_certificate(der)
            cached = (*pki.identity_of(cert), format(cert.serial_number, "x"), pki.expires_at(cert))
            self._peers[der] = cached
            if len(self._peers) > 4096:
                self._peers.popitem(last=False)
        role, name, serial, expires = cached
        # TLS checks the dates at the handshake only: a connection kept alive from before
        # the certificate expired (a partition that heals) must not outlive it.
        if time.time() > expires:
            raise ApiError(403, f"the client certificate of {role} {name!r} expired at "
                                f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(expires))}: a node renews "
                                "its own before that, else joins again (kumo-agent join --force)")
        return role, name, serial

    # Nodes' live state.

    def touch(self, node_id: str, instances: list[Any], plugins: dict[str, Any] | None = None,
              usage: dict[str, Any] | None = None, images: dict[str, Any] | None = None) -> None:
        """Record a node's report (register or heartbeat). ``last_seen`` is when the node last
        said what it runs, never only that it polled: a decision made from ``instances`` (the
        recovery of a migration) needs to know how old they are."""
        live = self.live.setdefault(node_id, {"plugins": None, "usage": None})
        now = time.time()
        if usage is not None:
            # Rates over half a heartbeat interval at least: a heartbeat sent early (an instance
            # changed state) may follow the one before by milliseconds, over which a CPU counter
            # in clock ticks says nothing (a burning instance would show 0 or several cores).
            base = live.get("rate_base")
            if base is None or now - base[0] >= self.settings.heartbeat_interval / 2:
                _add_cpu_rates(usage, base, now)
                live["rate_base"] = (now, {name: figures.get("cpu_seconds")
                                           for name, figures in usage["instances"].items()})
            else:
                _keep_cpu_rates(usage, live["usage"])
            live["usage"] = usage
        changed = instances != live.get("instances") or (plugins is not None and plugins != live["plugins"])
        live["last_seen"] = now
        live["instances"] = instances
        if plugins is not None:
            live["plugins"] = plugins
        if images is not None:
            live["images"] = images
        self._dirty.add(node_id)
        if changed:
            self._changed.add(node_id)
            for watcher in self.watchers:
                watcher({"event": "live", "node": node_id})

    def node_view(self, row: dict[str, Any]) -> dict[str, Any]:
        """A stored node merged with its live state, with its readiness worked out."""
        live = self.live.get(row["id"], {})
        last_seen = live.get("last_seen", row.get("last_seen"))
        if row.get("removed"):
            state = "removed"
        elif last_seen is not None and time.time() - last_seen <= 3 * self.settings.heartbeat_interval:
            state = "ready"
        else:
            state = "unreachable"
        plugins = live.get("plugins") or row.get("plugins") or {}
        facts, claim = _capped(row.get("facts") or {}, row.get("capacity") or {})
        return {
            "id": row["id"],
            "hostname": row["hostname"],
            "state": state,
            "drained": bool(row.get("drained")),
            "last_seen": last_seen,
            "agent_version": row.get("agent_version"),
            "metrics_url": row.get("metrics_url"),
            "plugins": plugins,
            "facts": facts,
            "capacity": {**(row.get("capacity") or {}), "claimed": claim},
            "instances": live.get("instances", row.get("instances") or []),
            "usage": live.get("usage") or row.get("usage") or None,
            "images": live.get("images") or row.get("images") or {"held": [], "pulling": {}},
        }

    async def flush(self) -> None:
        if not self._dirty:
            return
        rows = {node_id: self.live[node_id] for node_id in self._dirty if node_id in self.live}
        changed = sorted(self._changed & rows.keys())
        self._dirty.clear()
        self._changed.clear()
        await self.store.save_live(rows, changed)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except Exception:
                log.exception("saving heartbeats to the store failed; retrying")

    def forget(self, node_id: str) -> None:
        self.serials.pop(node_id, None)
        self.live.pop(node_id, None)
        self._dirty.discard(node_id)
        self.wake(node_id)

    # Long-poll.

    def wake(self, node_id: str) -> None:
        for event in self._wakeups.get(node_id, ()):
            event.set()

    async def wait_for_tasks(self, node_id: str, timeout: float) -> None:
        """Return when tasks were queued for the node, or after ``timeout``."""
        event = asyncio.Event()
        waiters = self._wakeups.setdefault(node_id, set())
        waiters.add(event)
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for wraps the wait in a task of
            # its own, and every agent holds one of these for most of its life.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await event.wait()
        finally:
            waiters.discard(event)
            if not waiters:
                self._wakeups.pop(node_id, None)

    # Orchestrations (migration) wait for the tasks they hand out.

    async def wait_task(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The task once it has ended (on whichever controller its node reported it);
        TimeoutError if it has not within ``timeout``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ended = asyncio.Event()
        waiters = self._task_waiters.setdefault(task_id, set())
        waiters.add(ended)
        try:
            while True:
                ended.clear()  # before looking: an event arriving while the store answers is kept
                task = await self.store.get_task(task_id)
                if task is not None and task["state"] in ("succeeded", "failed"):
                    return task
                await asyncio.wait_for(ended.wait(), max(0.0, deadline - loop.time()))
        finally:
            waiters.discard(ended)
            if not waiters:
                self._task_waiters.pop(task_id, None)


def _capped(facts: dict[str, Any], capacity: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A node's facts held to the capacity the controller recorded for it, and what it claims
    beyond that (None when nothing): a node cannot talk its way into more placements."""
    over = {key: facts[key] for key in ("cpus", "memory_bytes") if key in facts and key in capacity
            and facts[key] > capacity[key]}
    if not over:
        return facts, None
    capped = {**facts, **{key: capacity[key] for key in over}}
    if "memory_available_bytes" in capped:
        capped["memory_available_bytes"] = min(capped["memory_available_bytes"], capped.get("memory_bytes", 0))
    return capped, over


def _add_cpu_rates(usage: dict[str, Any], base: tuple[float, dict[str, Any]] | None, now: float) -> None:
    """Each instance's ``cpu_cores``: CPU seconds per second since ``base`` (when, and each
    instance's CPU counter then); a counter that went back (the instance restarted) gives none."""
    if base is None:
        return
    at, counters = base
    for name, figures in usage["instances"].items():
        earlier, current = counters.get(name), figures.get("cpu_seconds")
        if now > at and earlier is not None and current is not None and current >= earlier:
            figures["cpu_cores"] = round((current - earlier) / (now - at), 4)


def _keep_cpu_rates(usage: dict[str, Any], before: dict[str, Any]) -> None:
    """An early report shows the rates of the report before it (see Controller.touch)."""
    for name, figures in usage["instances"].items():
        cores = (before["instances"].get(name) or {}).get("cpu_cores")
        if cores is not None:
            figures["cpu_cores"] = cores


def guard(route: Route, handler: Any) -> Any:
    """Wrap ``handler`` with the identity check ``route.role`` asks for."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        ctl: Controller = request.app["kumo"]
        if ctl.unavailable:
            raise ApiError(503, ctl.unavailable)
        if route.role != "enroll":
            role, name, serial = await request.app[IDENTIFY](request)
            if route.role == "node":
                node_id = request.match_info["id"]
                if role != "node" or name != node_id:
                    raise ApiError(403, f"this certificate ({role or 'no role'} {name!r}) cannot act as node {node_id}")
                if not await ctl.node_may_connect(node_id, serial):
                    raise ApiError(
                        403,
                        f"node {node_id} is removed or this certificate was revoked; re-join it with a new token "
                        "(kumo-agent join --force)",
                    )
            elif serial in ctl.revoked:
                raise ApiError(403, f"this {role} certificate ({name!r}, serial {serial}) was revoked")
            elif route.role == "admin" and role != "admin":
                raise ApiError(403, f"this endpoint needs an admin certificate; this one is for {role or 'no role'} {name!r}")
            elif route.role == "scraper" and role not in ("admin", "scraper"):
                raise ApiError(403, f"this endpoint needs a scraper or admin certificate, not {role or 'no role'} {name!r}")
            elif route.role == "controller" and role != "controller":
                raise ApiError(403, f"only another controller may call this endpoint, not {role or 'no role'} {name!r}")
            if route.role == "admin" and request.method != "GET":
                return await audited(ctl, request, handler, (role, name, serial))
        return await handler(request)

    return checked


async def audited(ctl: Controller, request: web.Request, handler: Any, who: tuple[str, str, str]) -> web.StreamResponse:
    """Run an admin action and record who did what and how it ended (never the request body:
    user-data and keys have no place in a log)."""
    status, error = 500, "internal error"
    try:
        response = await handler(request)
        status, error = response.status, None
        return response
    except Refused as exc:
        status, error = exc.status, exc.message
        raise
    finally:
        role, name, serial = who
        entry = {"at": time.time(), "role": role, "name": name, "serial": serial, "method": request.method,
                 "path": request.path, "status": status, "error": error}
        try:
            await asyncio.shield(ctl.store.add_audit(entry))
        except Exception:
            log.exception("could not record %s %s by %s %s in the audit log", request.method, request.path, role, name)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure becomes JSON ``{"error": sentence}``; unexpected ones are logged, not leaked."""
    ctl: Controller = request.app["kumo"]
    started = time.perf_counter()
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    try:
        refused = request.app[LIMITS].refused.get(request.transport)
        response = await handler(request) if refused is None else _over_cap(refused)
    except Refused as exc:
        response = reply({"error": exc.message, **exc.extra}, exc.status)
    except StoreUnavailable as exc:
        response = reply({"error": f"{exc}; the request is safe to retry"}, 503)
    except web.HTTPRequestEntityTooLarge:
        limit = ctl.settings.max_body_bytes
        response = reply({"error": f"request body is larger than the {limit}-byte limit; send less"}, 413)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        message = {
            404: f"no such endpoint: {request.method} {request.path} (see /v1/openapi.json)",
            405: f"{request.method} is not allowed on {request.path} (see /v1/openapi.json)",
        }.get(exc.status, exc.reason)
        response = reply({"error": message}, exc.status)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = reply({"error": "internal error in the controller; its log has the details"}, 500)
    ctl.metrics.requests.labels(request.method, route, str(response.status)).inc()
    ctl.metrics.latency.labels(route).observe(time.perf_counter() - started)
    return response


def _over_cap(why: str) -> web.Response:
    """The answer on a connection over a listener's cap; the connection closes after it."""
    response = reply({"error": why}, 503)
    response.headers["Retry-After"] = "5"
    response.force_close()
    return response


def make_app(ctl: Controller, enrollment: bool) -> web.Application:
    """The API app, or (``enrollment``) the app that serves only enrollment."""
    app = web.Application(middlewares=[errors], client_max_size=ctl.settings.max_body_bytes)
    app["kumo"] = ctl
    app[IDENTIFY] = _certificate_identity
    for route in ctl.routes:
        if (route.role == "enroll") == enrollment:
            app.router.add_route(route.method, route.path, guard(route, route.handler))
    return app


async def _certificate_identity(request: web.Request) -> tuple[str, str, str]:
    return request.app["kumo"].peer(request)


def tls_context(settings: ControllerSettings, require_client: bool) -> ssl.SSLContext:
    pki_dir = settings.pki_dir
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # server.crt holds the server certificate followed by the CA's: a joining node finds the
    # CA in the chain and checks it against the hash in its join string.
    context.load_cert_chain(pki_dir / "server.crt", pki_dir / "server.key")
    if require_client:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(cafile=str(pki_dir / "ca.crt"))
    return context


async def serve(settings: ControllerSettings, stop: asyncio.Event) -> None:
    """Run the controller until ``stop`` is set."""
    ca = pki.CertificateAuthority.load(settings.pki_dir / "ca.crt", settings.pki_dir / "ca.key")
    ctl = Controller(settings, open_store(settings.database), ca)
    runners: list[web.AppRunner] = []
    servers: list[asyncio.AbstractServer] = []
    try:
        listeners = [("API", settings.listen, make_app(ctl, False), True),
                     ("enrollment", settings.enroll_listen, make_app(ctl, True), False)]
        if settings.ui_listen:
            admin = [(route, guard(route, route.handler)) for route in ctl.routes if route.role == "admin"]
            listeners.append(("web interface", settings.ui_listen, make_ui_app(ctl, admin, errors), False))
        for what, listen, app, require_client in listeners:
            limits = ConnectionLimits(what, settings.max_connections, settings.max_connections_per_client)
            app[LIMITS] = limits
            runner = web.AppRunner(app, access_log=None, keepalive_timeout=settings.keepalive_timeout)
            await runner.setup()
            runners.append(runner)
            host, port = split_address(listen, "listen")
            try:
                servers.append(await tls.serve(limits.factory(runner.server), host, port,
                                               tls_context(settings, require_client), TLS_SHUTDOWN_TIMEOUT))
            except OSError as exc:
                raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
            log.info("%s listening on https://%s", what, listen)
        # Listening first: while the database is out of reach, requests get a 503 saying so.
        starting = asyncio.ensure_future(ctl.start())
        await asyncio.wait({starting, asyncio.ensure_future(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            return
        starting.result()
        await stop.wait()
    finally:
        watchdog = asyncio.ensure_future(_report_stuck(STOP_REPORT_AFTER))
        ctl.release_waiters()
        for server in servers:
            server.close()
        for runner in runners:
            await runner.cleanup()
        await ctl.stop()
        watchdog.cancel()


async def _report_stuck(after: float) -> None:
    """Log what the controller is still waiting for when stopping takes longer than ``after``
    seconds: a stop that hangs is otherwise silent until it is killed."""
    await asyncio.sleep(after)
    me = asyncio.current_task()
    for task in asyncio.all_tasks():
        if task is not me:
            where = io.StringIO()
            task.print_stack(file=where)
            log.warning("still stopping after %.0f s: %s", after, where.getvalue())

