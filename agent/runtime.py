"""The agent's run loop: start plugins, register, heartbeat, run tasks, renew, stop cleanly.

Shape of a run (``kumo-agent run``):

1. every plugin is configured from its ``plugins.<name>`` table (:func:`configure_plugins`);
2. the agent becomes the child subreaper (agent/reaper.py); each plugin gets a
   :class:`~agent.sdk.PluginContext` and ``kumo_startup``; then every instance driver
   (``kumo_instance_driver``) adopts the instances that outlived the previous agent;
3. the session loop registers with the controller and then runs the heartbeat and the task
   long-poll side by side; when the controller goes away both stop, the state change is
   logged once and registration is retried with jittered exponential backoff, on the next
   controller when the agent knows several (agent/client.py). Plugins and their workloads
   keep running the whole time, and results of tasks go to whichever controller answers;
4. every delivered task runs on its owning plugin (a bounded number at once) through the
   idempotency journal, so a task redelivered after a crash is answered, not run again
   (agent/tasks.py);
5. the certificate is renewed at two thirds of its lifetime (agent/renewal.py);
6. SIGTERM stops the loops, gives running tasks a grace period, calls ``kumo_shutdown``
   and exits 0. Workloads are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.client import ControllerClient, ControllerRejected, NodeRejected
from agent.facts import node_facts
from agent.journal import TaskJournal
from agent.metrics import AgentMetrics, MetricsServer, server_tls_context
from agent.pluginmanager import Hooks, PluginLoadError
from agent.reaper import Reaper
from agent.renewal import CertificateRenewal, recover_interrupted
from agent.sdk import (
    Backoff,
    ConfigError,
    ControllerUnavailable,
    Fingerprint,
    Identity,
    ImageCache,
    PluginContext,
)
from agent.settings import (
    AgentSettings,
    JoinError,
    NotJoined,
    check_plugin_sections,
    load_identity,
    read_join_record,
    split_listen,
)
from agent.tasks import TaskRunner
from agent.usage import NodeUsage

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_CONFIG = 2
EXIT_REJECTED = 3
JOURNAL_FILE = "tasks.journal"
HEARTBEAT_JITTER = 0.2
PULL_REPORT_INTERVAL = 1.0  # seconds between heartbeats while an image is being pulled
POLL_SLACK = 15.0


def agent_version() -> str:
    try:
        return version("kumo")
    except PackageNotFoundError:
        return "unknown"


def configure_plugins(hooks: Hooks, settings: AgentSettings) -> None:
    """Hand every plugin its ``plugins.<name>`` table; ConfigError stops the agent.

    Called directly rather than through ``Hooks.call_each``: a configuration error is not a
    plugin failure to isolate and log with a traceback, it is a message for the operator.
    """
    check_plugin_sections(settings, hooks.plugin_names())
    configurable = set()
    for impl in hooks.pm.hook.kumo_configure.get_hookimpls():
        name = impl.plugin_name
        configurable.add(name)
        source = settings.plugin_source(name)
        args = {"section": dict(settings.plugins.get(name) or {}), "source": source}
        try:
            impl.function(**{arg: args[arg] for arg in impl.argnames})
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"{source}: plugin {name!r} failed to configure: {type(exc).__name__}: {exc}") from exc
    for name, section in settings.plugins.items():
        if section and name not in configurable:
            raise ConfigError(f"{settings.plugin_source(name)}: the {name!r} plugin takes no settings")


async def probe_plugins(hooks: Hooks, settings: AgentSettings) -> tuple[dict[str, Fingerprint], dict[str, str]]:
    """Start every plugin away from the running agent's state, fingerprint it, shut it down;
    the fingerprints and the owner of every task kind (instance drivers' included).

    For ``kumo-agent plugins``: most plugins only know what they can do once started
    (libvirt connected, binaries checked). Their state directories are throwaway ones, so a
    listing never touches what a running agent keeps, and nothing talks to the controller.
    """
    import tempfile

    try:
        identity: Identity | None = load_identity(settings.state_dir)
    except (NotJoined, OSError):
        identity = None

    async def offline(*_args: Any, **_kwargs: Any) -> Any:
        raise ControllerUnavailable("`kumo-agent plugins` does not talk to the controller")

    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="kumo-plugins-") as tmp:
        images = ImageCache(Path(tmp) / "images")
        for name in hooks.plugin_names():
            plugin_dir = Path(tmp) / name
            plugin_dir.mkdir(mode=0o700)
            context = PluginContext(name, plugin_dir, Path(tmp), identity, hooks, lambda: None, offline, images)
            _, startup = await hooks.call_each("kumo_startup", only=name, context=context)
            if startup:
                failures[name] = f"startup failed: {startup[0].message}"
        try:
            fingerprints = await hooks.fingerprints()
            hooks.load_drivers()
            owners = hooks.task_owners()
        finally:
            await hooks.call_each("kumo_shutdown")
    for name, reason in failures.items():
        fingerprints[name] = Fingerprint(False, reason)
    return fingerprints, owners


class Runtime:
    """One agent process: build it with configured plugins, then ``await run()`` for the exit code."""

    def __init__(self, settings: AgentSettings, hooks: Hooks):
        self.settings = settings
        self.hooks = hooks
        self.state_dir = settings.state_dir
        self.metrics = AgentMetrics(hooks.metrics)
        self.reaper = Reaper()
        cache = settings.image_cache
        self.images = ImageCache(cache.path, cache.max_mib << 20 if cache.max_mib else None, cache.ca_file)
        self.identity: Identity | None = None
        self.client: ControllerClient | None = None
        self._contexts: list[PluginContext] = []
        self.metrics_server: MetricsServer | None = None
        self.tasks: TaskRunner | None = None  # once the plugins have started
        self.fingerprints: dict[str, Fingerprint] = {}
        self.startup_failures: dict[str, str] = {}
        self.heartbeat_interval = 10.0
        self.poll_timeout = 30.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop = asyncio.Event()
        self._connected = asyncio.Event()
        self._wake = asyncio.Event()
        self.usage = NodeUsage()  # kept: each heartbeat's CPU busy figure is since the previous one
        self._fingerprints_due = True
        self._fingerprints_sent: tuple[float, Any] = (0.0, None)
        self._fingerprints_at = 0.0
        self._plugins_started = False
        self._signal_name = "SIGTERM"

    # -- lifecycle ---------------------------------------------------------------------

    async def run(self) -> int:
        self._loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._loop.add_signal_handler(sig, self._signalled, sig)
        try:
            await self._prepare()
        except (NotJoined, JoinError, ConfigError, PluginLoadError, OSError, ValueError) as exc:
            log.error("%s", exc)
            if self._plugins_started:
                await self._shutdown_plugins()
            if self.client is not None:
                await self.client.close()
            return EXIT_CONFIG
        assert self.identity is not None and self.client is not None and self.tasks is not None
        renewal = CertificateRenewal(self.state_dir, self.identity, self.client, self.metrics,
                                     self.metrics_server, self._connected)
        background = [
            asyncio.create_task(self._session_loop(), name="session"),
            asyncio.create_task(renewal.run(), name="renew"),
        ]
        stopper = asyncio.create_task(self._stop.wait(), name="stop")
        done, _ = await asyncio.wait([stopper, *background], return_when=asyncio.FIRST_COMPLETED)
        code = EXIT_OK
        for task in done:
            if task is stopper:
                log.info("stopping: %s received", self._signal_name)
                continue
            exc = task.exception()
            if isinstance(exc, NodeRejected):
                log.error("%s", exc)
                code = EXIT_REJECTED
            elif exc is not None:
                log.error("agent loop %s crashed", task.get_name(), exc_info=exc)
                code = EXIT_FAILURE
        for task in [stopper, *background]:
            task.cancel()
        await asyncio.gather(stopper, *background, return_exceptions=True)
        await self.tasks.finish(self.settings.tasks.shutdown_grace)
        await self._shutdown_plugins()
        if self.client is not None:
            await self.client.close()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        log.info("stopped (exit %d); workloads were left running", code)
        return code

    def _signalled(self, sig: signal.Signals) -> None:
        self._signal_name = sig.name
        self._stop.set()

    async def _prepare(self) -> None:
        await asyncio.to_thread(recover_interrupted, self.state_dir)
        self.identity = load_identity(self.state_dir)
        controllers = self.settings.controller or read_join_record(self.state_dir).controllers
        self.client = ControllerClient(controllers, self.identity, self._on_connection_change,
                                       self.settings.controller_timeout)
        client = self.client
        self.images.pull_from(lambda: (client.base_url, client.node_path, client.tls))
        self._on_connection_change(False)
        journal = TaskJournal(self.state_dir / JOURNAL_FILE)
        await asyncio.to_thread(journal.load)
        await self._start_plugins()
        self.hooks.load_drivers()
        self.tasks = TaskRunner(journal, self.hooks, self.hooks.task_owners(), self.metrics, self.client,
                                self._connected, self.settings.tasks.concurrency)
        adopted = await self.hooks.adopt()
        if adopted:
            log.info("adopted %d instance(s): %s", len(adopted), ", ".join(f"{i.kind}/{i.name}" for i in adopted))
        await self._start_metrics()
        log.info(
            "node %s: plugins %s; task kinds %s",
            self.identity.node_id,
            ", ".join(self.hooks.plugin_names()),
            ", ".join(sorted(self.tasks.owners)) or "none",
        )

    async def _start_plugins(self) -> None:
        assert self.identity is not None and self.client is not None
        self._plugins_started = True
        self.reaper.start()
        for name in self.hooks.plugin_names():
            plugin_dir = self.state_dir / "plugins" / name
            plugin_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            plugin_dir.chmod(0o700)
            context = PluginContext(
                name=name,
                state_dir=plugin_dir,
                agent_state_dir=self.state_dir,
                identity=self.identity,
                hooks=self.hooks,
                report_changed=self.report_changed,
                call_controller=self.client.node_call,
                images=self.images,
                controller_url=self.client.base_url,
            )
            self._contexts.append(context)
            _, failures = await self.hooks.call_each("kumo_startup", only=name, context=context)
            for failure in failures:
                self.startup_failures[name] = f"startup failed: {failure.message}"

    async def _shutdown_plugins(self) -> None:
        await self.hooks.call_each("kumo_shutdown")
        await self.reaper.stop()

    async def _start_metrics(self) -> None:
        listen = self.settings.metrics.listen
        if listen is None:
            return
        host, port = split_listen(listen)
        tls = None
        if self.settings.metrics.client_ca is not None:
            assert self.identity is not None
            tls = server_tls_context(self.identity, self.settings.metrics.client_ca)
        self.metrics_server = MetricsServer(self.metrics, host, port, tls, self.settings.metrics.max_connections)
        try:
            await self.metrics_server.start()
        except OSError as exc:
            raise ConfigError(f"{self.settings.source}: metrics.listen: cannot listen on {listen}: {exc.strerror}") from None

    def report_changed(self) -> None:
        """``PluginContext.report_changed``: heartbeat now. Safe to call from any thread."""
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            self._changed()
        else:
            loop.call_soon_threadsafe(self._changed)

    def _changed(self) -> None:
        self._fingerprints_due = True
        self._wake.set()

    def _on_connection_change(self, connected: bool) -> None:
        assert self.client is not None
        self.metrics.connected.set(1 if connected else 0)
        current = self.client.base_url
        for url in self.client.controllers.urls:
            self.metrics.controller.labels(url=url).set(1 if connected and url == current else 0)
        if connected:
            # Plugins that stream to the controller themselves follow the session.
            for context in self._contexts:
                context.controller_url = current
            self._connected.set()
        else:
            self._connected.clear()

    # -- the controller session ---------------------------------------------------------

    async def _session_loop(self) -> None:
        assert self.client is not None
        backoff = Backoff()
        while True:
            try:
                await self._register()
                self.client.mark_connected()
                backoff.reset()
                await self._connected_loops()
            except ControllerUnavailable as exc:
                self.client.mark_unreachable(str(exc))
            except ControllerRejected as exc:
                if exc.status in (401, 403, 404):
                    raise NodeRejected(
                        f"the controller refused node {self.client.identity.node_id}: {exc.error} "
                        "(removed or revoked?). Re-join with `kumo-agent join --force --token JOIN`."
                    ) from None
                self.client.mark_unreachable(str(exc))
            delay = backoff.next()
            log.debug("controller: next attempt in %.1f s, to %s", delay, self.client.base_url)
            await asyncio.sleep(delay)

    async def _connected_loops(self) -> None:
        """Heartbeat and long-poll together; the first failure stops both and is raised."""
        tasks = [
            asyncio.create_task(self._heartbeat_loop(), name="heartbeat"),
            asyncio.create_task(self._poll_loop(), name="poll"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _register(self) -> None:
        assert self.client is not None
        fingerprints = await self._refresh_fingerprints()
        facts = await asyncio.to_thread(node_facts)
        facts["vcpu_overcommit"] = self.settings.vcpu_overcommit
        plugins = {name: fp.to_json() for name, fp in fingerprints.items()}
        body = {
            "hostname": socket.gethostname(),
            "agent_version": agent_version(),
            "facts": facts,
            "plugins": plugins,
            "metrics_url": await self._metrics_url(),
            "instances": [i.to_json() for i in await self.hooks.instances()],
        }
        answer = await self._send_report("register", body)
        self.heartbeat_interval = _positive(answer.get("heartbeat_interval"), self.heartbeat_interval)
        self.poll_timeout = min(60.0, _positive(answer.get("poll_timeout"), self.poll_timeout))
        self._fingerprints_sent = (time.monotonic(), plugins)

    async def _heartbeat_loop(self) -> None:
        assert self.client is not None
        while True:
            delay = self.heartbeat_interval * random.uniform(1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER)
            if self.images.pulling:  # the admin's create is waiting on it: report progress sooner
                delay = min(delay, PULL_REPORT_INTERVAL)
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow this task's own
            # cancellation when the event is set at that moment, and the loop would run on.
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            body: dict[str, Any] = {"instances": [i.to_json() for i in await self.hooks.instances()],
                                    "usage": await self.usage.summary(self.hooks.drivers),
                                    "images": await self._images_report()}
            plugins = await self._fingerprints_to_send()
            if plugins is not None:
                body["plugins"] = plugins
            started = time.monotonic()
            await self._send_report("heartbeat", body)
            elapsed = time.monotonic() - started
            self.metrics.heartbeat_seconds.observe(elapsed)
            log.debug("heartbeat: %.3f s%s", elapsed, " (with fingerprints)" if plugins is not None else "")
            if plugins is not None:
                self._fingerprints_sent = (time.monotonic(), plugins)

    async def _images_report(self) -> dict[str, Any]:
        """What the image cache holds (the scheduler prefers nodes holding an image) and
        how far its pulls are."""
        held = await asyncio.to_thread(self.images.held)
        return {"held": [image["sha256"] for image in held],
                "pulling": {digest: {"bytes": done, "total": total}
                            for digest, (done, total) in list(self.images.pulling.items())}}

    async def _send_report(self, path: str, body: dict[str, Any]) -> Any:
        """POST a register or heartbeat. One the controller finds too large (a node with very
        many instances) goes again without the instances' details, rather than leave the node
        unreachable for as long as it has them."""
        assert self.client is not None
        try:
            return await self.client.node_call("POST", path, body)
        except ControllerRejected as exc:
            if exc.status != 413:
                raise
            log.warning("%s: too large for the controller (%s); sent without instance details", path, exc.error)
            lean = [{**instance, "details": {}} for instance in body["instances"]]
            return await self.client.node_call("POST", path, {**body, "instances": lean})

    async def _fingerprints_to_send(self) -> dict[str, Any] | None:
        """Fresh fingerprints when they are due and changed, or every fingerprint_interval."""
        interval = self.settings.heartbeat.fingerprint_interval
        now = time.monotonic()
        if not self._fingerprints_due and now - self._fingerprints_at < interval:
            return None
        fingerprints = await self._refresh_fingerprints()
        plugins = {name: fp.to_json() for name, fp in fingerprints.items()}
        sent_at, sent = self._fingerprints_sent
        if plugins != sent or now - sent_at >= interval:
            return plugins
        return None

    async def _refresh_fingerprints(self) -> dict[str, Fingerprint]:
        fingerprints = await self.hooks.fingerprints()
        for name, reason in self.startup_failures.items():
            fingerprints[name] = Fingerprint(False, reason)
        for name, fp in fingerprints.items():
            self.metrics.plugin_available.labels(plugin=name).set(1 if fp.available else 0)
        self.fingerprints = fingerprints
        self._fingerprints_at = time.monotonic()
        self._fingerprints_due = False
        return fingerprints

    async def _metrics_url(self) -> str | None:
        listen = self.settings.metrics.listen
        if listen is None or self.metrics_server is None:
            return None
        assert self.client is not None
        host, port = split_listen(listen)
        if host in ("0.0.0.0", "::", ""):
            controller_host = urlsplit(self.client.base_url).hostname or "localhost"
            host = await asyncio.to_thread(_source_address, controller_host)
        scheme = "https" if self.settings.metrics.client_ca else "http"
        shown = f"[{host}]" if ":" in host else host
        return f"{scheme}://{shown}:{port}/metrics"

    async def _poll_loop(self) -> None:
        assert self.client is not None and self.tasks is not None
        while True:
            wait = int(self.poll_timeout)
            slack = min(POLL_SLACK, self.client.timeout)
            answer = await self.client.node_call("GET", f"tasks?wait={wait}", timeout=wait + slack)
            for task in answer.get("tasks") or ():
                self.tasks.dispatch(task)


def _positive(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def _source_address(remote_host: str) -> str:
    """The local address this host uses to reach ``remote_host`` (what the controller can scrape)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(remote_host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.getfqdn()
