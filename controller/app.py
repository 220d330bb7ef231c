"""The controller process: its state, the two HTTPS listeners and the request guard.

Two listeners share one :class:`Controller`. The API listener requires a client certificate
from the Kumo CA at the TLS handshake; the enrollment listener asks for none and serves only
``POST /v1/enroll``. Every route declares who may call it (:class:`controller.api.Route`),
and :func:`guard` checks that against the peer certificate before the handler runs, so no
handler can forget to.

Heartbeats are frequent and mostly say "nothing changed": they update an in-memory table
that is written to the store every :data:`FLUSH_INTERVAL` seconds, not once per request.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import ssl
import time
from collections import OrderedDict
from typing import Any

from aiohttp import web
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from controller import pki
from controller.api import (
    ApiError,
    Route,
    alerts,
    enroll,
    instances,
    logging_settings,
    meta,
    migration,
    nodes,
    reply,
    tasks,
)
from controller.settings import ControllerSettings, split_address
from controller.store import SQLiteStore, Store

log = logging.getLogger("kumo.controller")

FLUSH_INTERVAL = 2.0
API_MODULES = (enroll, nodes, tasks, instances, migration, logging_settings, alerts, meta)


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
        self.metrics = Metrics()
        self.routes: list[Route] = [route for module in API_MODULES for route in module.ROUTES]
        # node id -> serials of its certificates still accepted (removal empties it at once)
        self.serials: dict[str, set[str]] = {}
        self.revoked: set[str] = set()  # serials of revoked admin and scraper certificates
        # node id -> {"last_seen", "instances", "plugins"} newer than the store's copy
        self.live: dict[str, dict[str, Any]] = {}
        self.polls: collections.Counter[str] = collections.Counter()  # long polls open, by node
        self._dirty: set[str] = set()
        self._wakeups: dict[str, set[asyncio.Event]] = {}
        self._task_waiters: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self._peers: OrderedDict[bytes, tuple[str, str, str]] = OrderedDict()
        self._background: list[asyncio.Task[None]] = []
        self.alerts_waiting = asyncio.Event()
        self.stopping = False

    async def start(self) -> None:
        self.serials = await self.store.valid_serials()
        await self._register_init_admin()
        self.revoked = await self.store.revoked_serials()
        self._background.append(asyncio.create_task(self._flush_loop(), name="kumo-flush"))
        self._background.append(asyncio.create_task(alerts.forward_loop(self), name="kumo-alert-forwarder"))

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
        """Every controller's API URL, the one agents use first at the head: what join strings
        carry. One controller knows only itself; a shared store will list them all."""
        return [self.settings.url]

    def release_waiters(self) -> None:
        """Answer every long-poll now, so shutting down does not wait out their timeouts."""
        self.stopping = True
        for waiters in self._wakeups.values():
            for event in waiters:
                event.set()

    async def stop(self) -> None:
        await migration.shutdown(self)
        for task in self._background:
            task.cancel()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()
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
            cached = (*pki.identity_of(cert), format(cert.serial_number, "x"))
            self._peers[der] = cached
            if len(self._peers) > 4096:
                self._peers.popitem(last=False)
        return cached

    # Nodes' live state.

    def touch(self, node_id: str, instances: list[Any] | None = None, plugins: dict[str, Any] | None = None) -> None:
        live = self.live.setdefault(node_id, {"instances": [], "plugins": None})
        live["last_seen"] = time.time()
        if instances is not None:
            live["instances"] = instances
        if plugins is not None:
            live["plugins"] = plugins
        self._dirty.add(node_id)

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
        return {
            "id": row["id"],
            "hostname": row["hostname"],
            "state": state,
            "drained": bool(row.get("drained")),
            "last_seen": last_seen,
            "agent_version": row.get("agent_version"),
            "metrics_url": row.get("metrics_url"),
            "plugins": plugins,
            "facts": row.get("facts") or {},
            "instances": live.get("instances", row.get("instances") or []),
        }

    async def flush(self) -> None:
        if not self._dirty:
            return
        rows = {node_id: self.live[node_id] for node_id in self._dirty if node_id in self.live}
        self._dirty.clear()
        await self.store.save_live(rows)

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
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(event.wait(), timeout)
        finally:
            waiters.discard(event)
            if not waiters:
                self._wakeups.pop(node_id, None)

    # Orchestrations (migration) wait for the tasks they hand out.

    def task_finished(self, task: dict[str, Any]) -> None:
        for waiter in self._task_waiters.pop(task["id"], ()):
            if not waiter.done():
                waiter.set_result(task)

    async def wait_task(self, task_id: str, timeout: float) -> dict[str, Any]:
        """The task once it has ended; TimeoutError if it has not within ``timeout``."""
        waiter = asyncio.get_running_loop().create_future()
        self._task_waiters.setdefault(task_id, []).append(waiter)
        try:
            task = await self.store.get_task(task_id)
            if task is not None and task["state"] in ("succeeded", "failed"):
                return task
            return await asyncio.wait_for(waiter, timeout)
        finally:
            waiters = self._task_waiters.get(task_id, [])
            if waiter in waiters:
                waiters.remove(waiter)
                if not waiters:
                    del self._task_waiters[task_id]


def guard(route: Route, handler: Any) -> Any:
    """Wrap ``handler`` with the identity check ``route.role`` asks for."""

    @functools.wraps(handler)
    async def checked(request: web.Request) -> web.StreamResponse:
        ctl: Controller = request.app["kumo"]
        if route.role != "enroll":
            role, name, serial = ctl.peer(request)
            if route.role == "node":
                node_id = request.match_info["id"]
                if role != "node" or name != node_id:
                    raise ApiError(403, f"this certificate ({role or 'no role'} {name!r}) cannot act as node {node_id}")
                if serial not in ctl.serials.get(node_id, ()):
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
    except ApiError as exc:
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
        response = await handler(request)
    except ApiError as exc:
        response = reply({"error": exc.message, **exc.extra}, exc.status)
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


def make_app(ctl: Controller, enrollment: bool) -> web.Application:
    """The API app, or (``enrollment``) the app that serves only enrollment."""
    app = web.Application(middlewares=[errors], client_max_size=ctl.settings.max_body_bytes)
    app["kumo"] = ctl
    for route in ctl.routes:
        if (route.role == "enroll") == enrollment:
            app.router.add_route(route.method, route.path, guard(route, route.handler))
    return app


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
    store = await SQLiteStore(settings.database).open()
    ctl = Controller(settings, store, ca)
    await ctl.start()
    runners: list[web.AppRunner] = []
    try:
        for enrollment, listen in ((False, settings.listen), (True, settings.enroll_listen)):
            runner = web.AppRunner(make_app(ctl, enrollment), access_log=None)
            await runner.setup()
            runners.append(runner)
            host, port = split_address(listen, "listen")
            try:
                await web.TCPSite(runner, host, port, ssl_context=tls_context(settings, not enrollment)).start()
            except OSError as exc:
                raise OSError(f"cannot listen on {listen}: {exc.strerror}") from None
            log.info("%s listening on https://%s", "enrollment" if enrollment else "API", listen)
        await stop.wait()
    finally:
        ctl.release_waiters()
        for runner in runners:
            await runner.cleanup()
        await ctl.stop()

