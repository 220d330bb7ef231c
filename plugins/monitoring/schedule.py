"""Running probes: each in its own asyncio task, on its own interval, cut off by its timeout.

A slow or hung probe therefore never delays another. A run that fails, times out or cannot
start leaves every target the probe had ``unknown`` rather than stale. A blocking step runs
in a thread of the probe's own (:meth:`ProbeScheduler.in_thread`), and while that thread is
still blocked the probe is not started again, so a dead NFS mount costs one thread, not one
per interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from agent.sdk import ProbeResult

from .probes import Results, Run

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Sample:
    """The last result of a probe for one target (a mount, an interface...)."""

    status: str
    value: float | None
    message: str
    at: float


# Told of every new sample, and of each target a probe no longer reports.
OnSample = Callable[[str, str, Sample], Awaitable[None]]
OnGone = Callable[[str, str], Awaitable[None]]


class ProbeScheduler:
    """The probes' tasks and what they last measured, by (probe, target)."""

    def __init__(self, on_sample: OnSample, on_gone: OnGone):
        self.on_sample = on_sample
        self.on_gone = on_gone
        self.samples: dict[tuple[str, str], Sample] = {}
        self.durations: dict[str, float] = {}
        self.timeouts: dict[str, int] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._threads: dict[str, threading.Thread] = {}

    def schedule(self, name: str, run: Run, interval: float, timeout: float) -> None:
        self.tasks[name] = asyncio.create_task(self._loop(name, run, interval, timeout), name=f"probe {name}")

    async def _loop(self, name: str, run: Run, interval: float, timeout: float) -> None:
        while True:
            started = time.monotonic()
            results = await self._run_once(name, run, timeout)
            for target, result in results:
                sample = Sample(result.status, result.value, result.message, time.time())
                self.samples[(name, target)] = sample
                await self.on_sample(name, target, sample)
            await self._forget(name, {t for t, _ in results})
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def _run_once(self, name: str, run: Run, timeout: float) -> Results:
        targets = sorted(t for p, t in self.samples if p == name) or [""]
        blocked = self._threads.get(name)
        if blocked is not None and blocked.is_alive():
            # A thread cannot be cancelled: starting another run would pile them up.
            self.timeouts[name] = self.timeouts.get(name, 0) + 1
            return unknown(targets, "its previous run is still blocked in a system call: not started again")
        started = time.monotonic()
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow the shutdown's
            # cancellation when the probe finishes at that moment.
            async with asyncio.timeout(timeout):
                results = await run()
        except TimeoutError:
            self.timeouts[name] = self.timeouts.get(name, 0) + 1
            results = unknown(targets, f"timed out after {timeout:g} s")
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.debug("probe %s failed", name, exc_info=True)
            results = unknown(targets, f"{type(exc).__name__}: {exc}")
        self.durations[name] = time.monotonic() - started
        return results

    async def _forget(self, probe: str, current: set[str]) -> None:
        """Drop targets a probe no longer reports (an unmounted disk, the placeholder a
        failed run used): their alerts must resolve, and nothing else would resolve them."""
        for _, target in [key for key in self.samples if key[0] == probe and key[1] not in current]:
            del self.samples[(probe, target)]
            await self.on_gone(probe, target)

    async def in_thread(self, probe: str, function: Callable[..., Any], *args: Any) -> Any:
        """Run a blocking probe step in a thread of its own.

        Not the loop's default executor: a probe stuck in the kernel (statfs on a dead NFS
        server) would hold one of its few workers, which the agent's metrics and other
        plugins share, and its exit would wait for it. A daemon thread holds nothing, and
        the probe loop does not start another run while it is alive.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()

        def settle(result: Any, error: BaseException | None) -> None:
            if future.done():
                return
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)

        def work() -> None:
            try:
                result, error = function(*args), None
            except BaseException as exc:  # handed to the awaiting coroutine
                result, error = None, exc
            with contextlib.suppress(RuntimeError):  # the loop closed while we were blocked
                loop.call_soon_threadsafe(settle, result, error)

        thread = threading.Thread(target=work, name=f"kumo-probe {probe}", daemon=True)
        self._threads[probe] = thread
        thread.start()
        return await future


def unknown(targets: Iterable[str], message: str) -> Results:
    return [(t, ProbeResult("unknown", None, message)) for t in targets]


async def cancel_all(tasks: Iterable[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait for them to end, again and again: a contributed probe may
    swallow one cancellation."""
    pending = set(tasks)
    while pending:
        for task in pending:
            task.cancel()
        done, pending = await asyncio.wait(pending, timeout=1.0)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                log.error("monitoring: %s ended with %r", task.get_name(), task.exception())
