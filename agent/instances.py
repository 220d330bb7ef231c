"""The agent's side of the instance-driver contract: what is the same for every kind.

Drivers (:class:`agent.sdk.InstanceDriver`) fill the kind's mechanics; here every kind gets
the same task kinds, payload checks, one-operation-at-a-time per instance, result shapes,
by-state metric, usage series and adoption. See :mod:`agent.sdk.driver` for the contract as a plugin
author reads it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any

from agent.sdk import (
    CONSOLE_BYTES,
    INSTANCE_STATES,
    NAME_RE,
    OPERATIONS,
    InstanceDriver,
    InstanceState,
    InstanceUsage,
    TaskError,
    UsageMeter,
)
from agent.sdk.driver import CONSOLE_BYTES_MAX
from agent.usage import usage_families

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Driver:
    plugin: str
    driver: InstanceDriver


class Drivers:
    """Every instance driver on this node, by kind. ``deleted(kind, name)`` is awaited after
    each successful delete, under the instance's lock (the plugins' ``kumo_instance_deleted``)."""

    def __init__(self, drivers: Mapping[str, Driver], deleted: Callable[[str, str], Awaitable[None]]):
        self.by_kind = dict(drivers)
        self.deleted = deleted
        self._locks: dict[tuple[str, str], tuple[asyncio.Lock, int]] = {}  # with its holders and waiters
        self._holders: dict[tuple[str, str], asyncio.Task[Any] | None] = {}

    def task_kinds(self) -> dict[str, str]:
        """``<kind>.<operation>`` → owning plugin, for every driver."""
        return {f"{kind}.{op}": d.plugin for kind, d in self.by_kind.items() for op in OPERATIONS}

    def owns(self, task_kind: str) -> bool:
        kind, _, op = task_kind.partition(".")
        return kind in self.by_kind and op in OPERATIONS

    async def handle(self, task_kind: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        kind, _, op = task_kind.partition(".")
        driver = self.by_kind[kind].driver
        name = _name(payload, kind)
        allowed = {"name", "kind"} | _OP_FIELDS.get(op, set())
        if op != "create":
            unknown = sorted(set(payload) - allowed)
            if unknown:
                raise TaskError(f"payload.{unknown[0]}: unknown key for {task_kind} (allowed: "
                                f"{', '.join(sorted(allowed))})", code="bad-request")
        async with self.lock(kind, name):
            if op == "create":
                await _maybe_await(driver.create(name, payload))
                return self._shown(driver, name)
            if op == "start":
                await _maybe_await(driver.start(name))
                return self._shown(driver, name)
            if op == "stop":
                forced = await _maybe_await(driver.stop(name, _timeout(payload)))
                return {**self._shown(driver, name), "forced": bool(forced)}
            if op == "delete":
                await _maybe_await(driver.delete(name))
                await self.deleted(kind, name)
                return {"name": name, "kind": kind, "state": "deleted"}
            output = await _maybe_await(driver.console(name, _console_bytes(payload)))
            return {"name": name, "kind": kind, "log": output.text, "logs": dict(output.logs)}

    async def undo_create(self, task_kind: str, payload: Mapping[str, Any]) -> str | None:
        """Remove what a ``<kind>.create`` cut off by an agent crash had made, with the driver's
        own delete under the instance's lock: the controller forgets an instance whose create
        failed, so anything left would be an orphan nobody deletes. None when ``task_kind`` is
        no driver's create; else a sentence for the task's error saying what was done."""
        kind, _, op = task_kind.partition(".")
        if op != "create" or kind not in self.by_kind:
            return None
        try:
            name = _name(payload, kind)
        except TaskError:
            return None  # refused before the driver saw it: nothing was made
        d = self.by_kind[kind]
        async with self.lock(kind, name):
            try:
                await _maybe_await(d.driver.delete(name))
            except TaskError as exc:
                if exc.code == "not-found":
                    return f"it had made nothing of {kind} instance {name!r} on this node"
                return (f"what it had made of {kind} instance {name!r} could not be removed ({exc}): "
                        f"submit a {kind}.delete of {name!r}")
            except Exception as exc:
                log.exception("plugin %s: removing the interrupted create of %s %s failed", d.plugin, kind, name)
                return (f"what it had made of {kind} instance {name!r} could not be removed (plugin {d.plugin} "
                        f"crashed: {type(exc).__name__}: {exc}): submit a {kind}.delete of {name!r}")
        log.info("removed what the interrupted create of %s instance %s had made", kind, name)
        return f"what it had made of {kind} instance {name!r} was removed"

    @contextlib.asynccontextmanager
    async def lock(self, kind: str, name: str) -> AsyncIterator[None]:
        """One operation at a time on instance ``name`` of ``kind``: every ``<kind>.*`` task
        and whatever another plugin does to the instance (``PluginHooks.instance_lock``).

        Re-entrant within one asyncio task, so that the holder may run an instance operation
        itself (the checkpoint plugin deletes a container whose restore failed).
        """
        key = (kind, name)
        if self._holders.get(key) is asyncio.current_task():
            yield
            return
        # A lock lives as long as an operation holds or awaits it, not until a delete: one
        # queued behind a delete must still exclude the operations that arrive after it.
        lock, users = self._locks.get(key, (asyncio.Lock(), 0))
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                self._holders[key] = asyncio.current_task()
                try:
                    yield
                finally:
                    del self._holders[key]
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def _shown(self, driver: InstanceDriver, name: str) -> dict[str, Any]:
        state = next((s for s in driver.list() if s.name == name), None)
        if state is None:
            return {"name": name, "kind": driver.kind, "state": "unknown", "details": {}}
        return state.to_json()

    def instances(self) -> list[InstanceState]:
        states: list[InstanceState] = []
        for kind, d in self.by_kind.items():
            try:
                states.extend(d.driver.list())
            except Exception:
                log.exception("plugin %s: listing %s instances failed", d.plugin, kind)
        return states

    async def adopt(self) -> list[InstanceState]:
        found: list[InstanceState] = []
        for kind, d in self.by_kind.items():
            try:
                found.extend(await _maybe_await(d.driver.adopt()) or ())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("plugin %s: adopting %s instances failed; they are left as they are", d.plugin, kind)
        return found

    def usage(self) -> dict[str, Mapping[str, InstanceUsage]]:
        """``{kind: {name: usage}}`` from every driver that measures its instances
        (:class:`agent.sdk.UsageMeter`); blocking, so from a worker thread. A driver that
        fails is logged and left out: the others are still measured."""
        found: dict[str, Mapping[str, InstanceUsage]] = {}
        for kind, d in self.by_kind.items():
            if not isinstance(d.driver, UsageMeter):
                continue
            try:
                found[kind] = dict(d.driver.usage())
            except Exception:
                log.exception("plugin %s: measuring %s instances failed", d.plugin, kind)
        return found

    def metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        family = GaugeMetricFamily("kumo_instances", "Instances on this node by kind and state",
                                   labels=["kind", "state"])
        counts = {(kind, state): 0 for kind in self.by_kind for state in INSTANCE_STATES}
        for inst in self.instances():
            counts[(inst.kind, inst.state)] = counts.get((inst.kind, inst.state), 0) + 1
        for (kind, state), count in sorted(counts.items()):
            family.add_metric([kind, state], float(count))
        return [family, *usage_families(self.usage())]


_OP_FIELDS = {"stop": {"timeout"}, "console": {"bytes"}}


def _name(payload: Mapping[str, Any], kind: str) -> str:
    name = payload.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TaskError(
            f"payload.name must be 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}",
            code="bad-request",
        )
    if payload.get("kind", kind) != kind:
        raise TaskError(f"payload.kind is {payload.get('kind')!r} in a {kind} task", code="bad-request")
    return name


def _timeout(payload: Mapping[str, Any]) -> float | None:
    timeout = payload.get("timeout")
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
        raise TaskError(f"payload.timeout must be a number of seconds (0 or more), got {timeout!r}", code="bad-request")
    return float(timeout)


def _console_bytes(payload: Mapping[str, Any]) -> int:
    size = payload.get("bytes", CONSOLE_BYTES)
    if not isinstance(size, int) or isinstance(size, bool) or not 0 < size <= CONSOLE_BYTES_MAX:
        raise TaskError(f"payload.bytes must be an integer from 1 to {CONSOLE_BYTES_MAX}, got {size!r}",
                        code="bad-request")
    return size


async def _maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value
