"""Running the tasks the controller delivers, and reporting how each ended.

- Every delivered task runs on the plugin that owns its kind, at most ``tasks.concurrency``
  at once, through the idempotency journal (agent/journal.py): a task redelivered after it
  ran is answered from the journal, never run again; one that was running when the agent
  stopped is answered ``interrupted``, after its instance driver undid a half-made create.
- A redelivery of a task that is still running waits for the same outcome.
- A plugin's failure is the task's failure, with the plugin's error text and code; a crash
  of the plugin is ``plugin-error``, never a crash of the agent.
- The outcome is reported until the controller has it; during an outage, once the session
  is back (the session itself is the runtime's, agent/runtime.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

from agent.client import ControllerClient, ControllerRejected, NodeRejected
from agent.journal import Outcome, TaskJournal
from agent.metrics import AgentMetrics
from agent.pluginmanager import Hooks
from agent.sdk import Backoff, ControllerUnavailable, DiskFull, TaskError

log = logging.getLogger(__name__)


class TaskRunner:
    """Runs delivered tasks on their ``owners`` (task kind -> plugin name) through ``journal``
    (loaded), and reports their outcomes through ``client`` while ``connected`` is set."""

    def __init__(self, journal: TaskJournal, hooks: Hooks, owners: dict[str, str], metrics: AgentMetrics,
                 client: ControllerClient, connected: asyncio.Event, concurrency: int):
        self.owners = owners
        self._journal = journal
        self._hooks = hooks
        self._metrics = metrics
        self._client = client
        self._connected = connected
        self._inflight: dict[str, asyncio.Future[Outcome]] = {}
        self._running: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(concurrency)

    def dispatch(self, task: Mapping[str, Any]) -> None:
        """Run a task the long poll delivered, in the background."""
        runner = asyncio.create_task(self._handle_delivery(dict(task)), name=f"task {task.get('id')}")
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)

    async def finish(self, grace: float) -> None:
        """At shutdown: give running tasks ``grace`` seconds, then cancel them."""
        if not self._running:
            return
        log.info("waiting up to %.0f s for %d running task(s)", grace, len(self._running))
        _, pending = await asyncio.wait(set(self._running), timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

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
        done = self._journal.done.get(key)
        if done is not None:
            log.info("task %s (%s): key %s already ran; reporting the journalled result", task_id, kind, key)
            self._metrics.tasks.labels(kind=kind, outcome="replayed").inc()
            return done
        running = self._inflight.get(key)
        if running is not None:
            log.info("task %s (%s): key %s is running; reporting its result when done", task_id, kind, key)
            return await asyncio.shield(running)
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            if key in self._journal.started:
                undone = await self._hooks.drivers.undo_create(kind, payload)
                error = (f"the agent stopped while task {task_id} ({kind}) was running, so its outcome is "
                         "unknown; check the instance's state and submit a new task if needed")
                if undone is not None:
                    error = f"the agent stopped while task {task_id} ({kind}) was running; {undone}"
                outcome = Outcome("failed", error=error, code="interrupted")
            else:
                async with self._slots:
                    try:
                        await asyncio.to_thread(self._journal.record_started, key, task_id, kind)
                    except DiskFull as exc:
                        # Unjournalled, a task could run twice after a crash: it does not run.
                        log.warning("task %s (%s) not run: %s", task_id, kind, exc)
                        outcome = Outcome("failed", error=f"the task did not run: {exc}", code="no-space")
                    else:
                        outcome = await self._run_task(task_id, kind, payload)
                self._metrics.tasks.labels(kind=kind, outcome=outcome.state).inc()
            try:
                await asyncio.to_thread(self._journal.record_done, key, task_id, outcome)
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
            installed = ", ".join(self._hooks.plugin_names()) or "none"
            log.warning("task %s: no plugin handles task kind %s", task_id, kind)
            return Outcome(
                "failed",
                error=f"no plugin on this node handles task kind {kind}; installed plugins: {installed}",
                code="unknown-kind",
            )
        log.info("task %s (%s): running on plugin %s", task_id, kind, owner)
        try:
            result = await self._hooks.handle_task(kind, payload, task_id)
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
        backoff = Backoff(base=1.0)
        while True:
            await self._connected.wait()
            try:
                await self._client.node_call("POST", f"tasks/{task_id}/result", outcome.to_json())
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
