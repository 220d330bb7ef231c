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
   idempotency journal, so a task redelivered after a crash is answered, not run again;
5. the certificate is renewed at two thirds of its lifetime;
6. SIGTERM stops the loops, gives running tasks a grace period, calls ``kumo_shutdown``
   and exits 0. Workloads are never touched.
"""

from __future__ import annotations

import asyncio
import datetime
import importlib
import json
import logging
import random
import signal
import socket
import time
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from agent.certinfo import certificate_validity
from agent.client import ControllerClient, ControllerRejected
from agent.facts import node_facts
from agent.journal import Outcome, TaskJournal
from agent.metrics import AgentMetrics, MetricsServer, server_tls_context
from agent.pluginmanager import Hooks, PluginLoadError
from agent.reaper import Reaper
from agent.sdk import (
    Backoff,
    ConfigError,
    ControllerUnavailable,
    DiskFull,
    Fingerprint,
    Identity,
    ImageCache,
    PluginContext,
    TaskError,
)
from agent.settings import (
    NODE_CERT_NEXT,
    REJOIN_ADVICE,
    AgentSettings,
    JoinError,
    NotJoined,
    check_plugin_sections,
    load_identity,
    read_join_record,
    split_listen,
)
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


class NodeRejected(Exception):
    """The controller no longer accepts this node (removed, revoked, unknown): stop the agent."""


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
        self.journal = TaskJournal(self.state_dir / JOURNAL_FILE)
        self.identity: Identity | None = None
        self.client: ControllerClient | None = None
        self._contexts: list[PluginContext] = []
        self.metrics_server: MetricsServer | None = None
        self.owners: dict[str, str] = {}
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
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(settings.tasks.concurrency)
        self._expired_logged = False
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
        background = [
            asyncio.create_task(self._session_loop(), name="session"),
            asyncio.create_task(self._renew_loop(), name="renew"),
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
        await self._finish_tasks()
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
        await asyncio.to_thread(_recover_renewal, self.state_dir)
        self.identity = load_identity(self.state_dir)
        controllers = self.settings.controller or read_join_record(self.state_dir).controllers
        self.client = ControllerClient(controllers, self.identity, self._on_connection_change,
                                       self.settings.controller_timeout)
        client = self.client
        self.images.pull_from(lambda: (client.base_url, client.node_path, client.tls))
        self._on_connection_change(False)
        await asyncio.to_thread(self.journal.load)
        await self._start_plugins()
        self.hooks.load_drivers()
        self.owners = self.hooks.task_owners()
        adopted = await self.hooks.adopt()
        if adopted:
            log.info("adopted %d instance(s): %s", len(adopted), ", ".join(f"{i.kind}/{i.name}" for i in adopted))
        await self._start_metrics()
        log.info(
            "node %s: plugins %s; task kinds %s",
            self.identity.node_id,
            ", ".join(self.hooks.plugin_names()),
            ", ".join(sorted(self.owners)) or "none",
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
        self.metrics_server = MetricsServer(self.metrics, host, port, tls)
        try:
            await self.metrics_server.start()
        except OSError as exc:
            raise ConfigError(f"{self.settings.source}: metrics.listen: cannot listen on {listen}: {exc.strerror}") from None

    async def _finish_tasks(self) -> None:
        if not self._running:
            return
        grace = self.settings.tasks.shutdown_grace
        log.info("waiting up to %.0f s for %d running task(s)", grace, len(self._running))
        _, pending = await asyncio.wait(set(self._running), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

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
        assert self.client is not None
        while True:
            wait = int(self.poll_timeout)
            slack = min(POLL_SLACK, self.client.timeout)
            answer = await self.client.node_call("GET", f"tasks?wait={wait}", timeout=wait + slack)
            for task in answer.get("tasks") or ():
                self._dispatch(task)

    # -- tasks --------------------------------------------------------------------------

    def _dispatch(self, task: Mapping[str, Any]) -> None:
        runner = asyncio.create_task(self._handle_delivery(dict(task)), name=f"task {task.get('id')}")
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)

    async def _handle_delivery(self, task: dict[str, Any]) -> None:
        task_id = str(task.get("id"))
        kind = str(task.get("kind"))
        key = str(task.get("idempotency_key") or f"task:{task_id}")
        try:
            outcome = await self._outcome_for(key, task_id, kind, task.get("payload") or {})
            await self._report(task_id, outcome)
        except asyncio.CancelledError:
            raise
        except NodeRejected as exc:
            log.error("%s", exc)
        except Exception:
            log.exception("task %s (%s): could not be handled", task_id, kind)

    async def _outcome_for(self, key: str, task_id: str, kind: str, payload: Mapping[str, Any]) -> Outcome:
        done = self.journal.done.get(key)
        if done is not None:
            log.info("task %s (%s): key %s already ran; reporting the journalled result", task_id, kind, key)
            self.metrics.tasks.labels(kind=kind, outcome="replayed").inc()
            return done
        running = self._inflight.get(key)
        if running is not None:
            log.info("task %s (%s): key %s is running; reporting its result when done", task_id, kind, key)
            return await asyncio.shield(running)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            if key in self.journal.started:
                undone = await self.hooks.drivers.undo_create(kind, payload)
                error = (f"the agent stopped while task {task_id} ({kind}) was running, so its outcome is "
                         "unknown; check the instance's state and submit a new task if needed")
                if undone is not None:
                    error = f"the agent stopped while task {task_id} ({kind}) was running; {undone}"
                outcome = Outcome("failed", error=error, code="interrupted")
            else:
                async with self._slots:
                    try:
                        await asyncio.to_thread(self.journal.record_started, key, task_id, kind)
                    except DiskFull as exc:
                        # Unjournalled, a task could run twice after a crash: it does not run.
                        log.warning("task %s (%s) not run: %s", task_id, kind, exc)
                        outcome = Outcome("failed", error=f"the task did not run: {exc}", code="no-space")
                    else:
                        outcome = await self._run_task(task_id, kind, payload)
                self.metrics.tasks.labels(kind=kind, outcome=outcome.state).inc()
            try:
                await asyncio.to_thread(self.journal.record_done, key, task_id, outcome)
            except DiskFull as exc:
                # It ran: say so. Redelivered after a crash, it is answered "interrupted", never rerun.
                log.warning("task %s (%s): its outcome is reported but not journalled: %s", task_id, kind, exc)
            future.set_result(outcome)
            return outcome
        except asyncio.CancelledError:
            future.cancel()
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved here so an unawaited future does not warn
            raise
        finally:
            del self._inflight[key]

    async def _run_task(self, task_id: str, kind: str, payload: Mapping[str, Any]) -> Outcome:
        owner = self.owners.get(kind)
        if owner is None:
            installed = ", ".join(self.hooks.plugin_names()) or "none"
            log.warning("task %s: no plugin handles task kind %s", task_id, kind)
            return Outcome(
                "failed",
                error=f"no plugin on this node handles task kind {kind}; installed plugins: {installed}",
                code="unknown-kind",
            )
        log.info("task %s (%s): running on plugin %s", task_id, kind, owner)
        try:
            result = await self.hooks.handle_task(kind, payload, task_id)
            result = json.loads(json.dumps(dict(result or {})))
        except TaskError as exc:
            log.warning("task %s (%s) failed: %s [%s]", task_id, kind, exc, exc.code)
            return Outcome("failed", result=exc.details, error=str(exc), code=exc.code)
        except DiskFull as exc:
            log.warning("task %s (%s) failed: %s", task_id, kind, exc)
            return Outcome("failed", error=str(exc), code="no-space")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("task %s (%s): plugin %s raised", task_id, kind, owner)
            return Outcome(
                "failed",
                error=f"plugin {owner} crashed running {kind}: {type(exc).__name__}: {exc} (see the agent log)",
                code="plugin-error",
            )
        log.info("task %s (%s) succeeded", task_id, kind)
        return Outcome("succeeded", result=result)

    async def _report(self, task_id: str, outcome: Outcome) -> None:
        """Report until the controller has it; during an outage wait for the session to come back."""
        assert self.client is not None
        backoff = Backoff(base=1.0)
        while True:
            await self._connected.wait()
            try:
                await self.client.node_call("POST", f"tasks/{task_id}/result", outcome.to_json())
                return
            except ControllerUnavailable as exc:
                delay = backoff.next()
                log.debug("task %s: result not reported (%s); retrying in %.1f s", task_id, exc, delay)
                await asyncio.sleep(delay)
            except ControllerRejected as exc:
                if exc.status in (401, 403):
                    raise NodeRejected(str(exc)) from None
                if exc.status == 413 and outcome.code != "result-too-large":
                    # Dropping it would leave the task "delivered" for ever: report why instead.
                    log.warning("task %s: its result is too large for the controller: %s", task_id, exc.error)
                    outcome = Outcome("failed", error=f"the task ran, but its result is too large to report: "
                                                      f"{exc.error}", code="result-too-large")
                    continue
                # 404/409: the task is gone or already has its result (a redelivery we answered twice).
                log.info("task %s: result not accepted: %s", task_id, exc.error)
                return

    # -- certificate renewal -------------------------------------------------------------

    async def _renew_loop(self) -> None:
        assert self.identity is not None
        backoff = Backoff(base=2.0, cap=60.0)
        while True:
            not_before, not_after = await asyncio.to_thread(certificate_validity, self.identity.certificate)
            self.metrics.cert_expiry.set(not_after.timestamp())
            now = datetime.datetime.now(datetime.UTC)
            renew_at = not_before + (not_after - not_before) * 2 / 3
            if now < renew_at:
                await asyncio.sleep((renew_at - now).total_seconds())
                continue
            if now >= not_after and not self._expired_logged:
                self._expired_logged = True
                log.error(
                    "the node certificate expired at %s (no renewal reached the controller in time): the "
                    "controller refuses this node until it joins again. Instances keep running. %s",
                    not_after.isoformat(), REJOIN_ADVICE,
                )
            wait = backoff.next()
            if now < not_after:  # say so the moment it expires, not at the next backoff step
                wait = min(wait, (not_after - now).total_seconds())
            try:
                async with asyncio.timeout(wait):  # not wait_for: see _heartbeat_loop
                    await self._connected.wait()
                await self._renew()
                backoff.reset()
            except TimeoutError:
                continue
            except ControllerUnavailable as exc:
                log.warning("certificate renewal: controller unavailable (%s); will retry", exc)
                await asyncio.sleep(backoff.next())
            except ControllerRejected as exc:
                if exc.status in (401, 403, 404):
                    raise NodeRejected(f"certificate renewal refused: {exc.error}") from None
                log.error("certificate renewal refused: %s; will retry", exc)
                await asyncio.sleep(backoff.next())
            except (JoinError, DiskFull) as exc:
                log.error("certificate renewal: %s; will retry", exc)
                await asyncio.sleep(backoff.next())

    async def _renew(self) -> None:
        # cryptography is imported at the first renewal, not at start: the idle agent needs
        # only the certificate's dates (agent.certinfo), and it costs ~9 MB resident. The
        # import runs off the event loop, which it would otherwise stall.
        await asyncio.to_thread(importlib.import_module, "agent.enroll")
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        from agent.enroll import (
            cert_validity,
            check_issued,
            install_renewed,
            make_csr,
            new_node_key,
        )

        assert self.client is not None and self.identity is not None
        key = await asyncio.to_thread(new_node_key)
        csr = make_csr(key, self.identity.node_id)
        answer = await self.client.node_call("POST", "renew", {"csr": csr})
        try:
            cert = x509.load_pem_x509_certificate(str(answer["certificate"]).encode())
        except (KeyError, ValueError) as exc:
            raise JoinError(f"the controller's renewal answer has no usable certificate ({exc})") from None
        check_issued(cert, key, self.identity.node_id)
        await asyncio.to_thread(
            install_renewed, self.state_dir, key, cert.public_bytes(serialization.Encoding.PEM)
        )
        self.client.reload_identity()
        if self.metrics_server is not None:
            self.metrics_server.reload_certificate(self.identity)
        _, not_after = cert_validity(cert)
        self.metrics.cert_expiry.set(not_after.timestamp())
        self._expired_logged = False
        log.info("renewed the node certificate (serial %x), valid until %s", cert.serial_number, not_after.isoformat())


def _positive(value: Any, default: float) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    return default


def _recover_renewal(state_dir: Path) -> None:
    """Finish or discard a renewal a crash interrupted; cryptography is imported only then."""
    if (state_dir / NODE_CERT_NEXT).exists():
        from agent.enroll import recover_renewal

        recover_renewal(state_dir)


def _source_address(remote_host: str) -> str:
    """The local address this host uses to reach ``remote_host`` (what the controller can scrape)."""
    try:
        family, _, _, _, addr = socket.getaddrinfo(remote_host, 9, type=socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect(addr)  # UDP: no packet is sent, the kernel only picks the route
            return s.getsockname()[0]
    except OSError:
        return socket.getfqdn()
