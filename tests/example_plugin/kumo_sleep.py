"""kumo-sleep: instances of the kind ``sleep``, each one a ``sleep`` process on the node.

A complete third-party instance plugin; like every plugin it imports nothing of Kumo but
``agent.sdk``. The agent routes ``sleep.create|start|stop|delete|console`` to the driver
below, checks the payloads, runs one operation at a time per instance, shapes the results
and counts the instances in ``kumo_instances{kind="sleep"}``. The driver only runs processes:

- an instance is ``sleep SECONDS`` in its own session, its output appended to
  ``<state_dir>/<name>.log``, which is its console;
- an ExitWatcher learns the moment it exits, and the agent is told at once;
- a record per instance (``<name>.json``, written whole with atomic_write) keeps what a
  restarted agent needs to adopt the process: its pid, the pid's start time and the boot
  id, which together name this very process and never a recycled pid.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import (
    ConsoleOutput,
    ExitWatcher,
    Fingerprint,
    InstanceState,
    PluginContext,
    TaskError,
    atomic_write,
    boot_id,
    hookimpl,
    parse_payload,
    parse_section,
    start_time,
    tail,
)

KIND = "sleep"
SLEEP = shutil.which("sleep")


@dataclasses.dataclass
class Settings:
    """``plugins.sleep`` in agent.yaml."""

    stop_timeout: float = 10.0  # seconds from SIGTERM to SIGKILL when a stop gives none


@dataclasses.dataclass
class Options:
    seconds: int = 86400


@dataclasses.dataclass
class Spec:
    """The create payload, as ``kumoctl instances create NAME --kind sleep`` sends it."""

    name: str
    kind: str
    vcpus: int = 1
    memory_mib: int = 16
    options: Options = dataclasses.field(default_factory=Options)


@dataclasses.dataclass
class Instance:
    """One instance's record: what survives an agent restart."""

    seconds: int
    pid: int | None = None
    started: int | None = None  # the pid's start time, from /proc
    boot: str | None = None


class SleepDriver:
    """The instance-driver contract (``agent.sdk.InstanceDriver``) for sleep processes."""

    kind = KIND

    def __init__(self, directory: Path, settings: Settings, changed: Callable[[], None]):
        self.dir, self.settings, self.changed = directory, settings, changed
        self.instances: dict[str, Instance] = {}
        self.exited: dict[str, asyncio.Event] = {}
        self.watcher = ExitWatcher()

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        spec = parse_payload(Spec, payload)
        if spec.options.seconds < 1:
            raise TaskError("options.seconds must be 1 or more", code="bad-request")
        if name in self.instances:
            raise TaskError(f"a sleep instance named {name!r} already exists", code="exists")
        self.instances[name] = Instance(spec.options.seconds)
        try:
            await self.start(name)
        except BaseException:
            del self.instances[name]
            await asyncio.to_thread(self._remove, name)
            raise

    async def start(self, name: str) -> None:
        inst = self._get(name)
        if inst.pid is not None:
            return
        if SLEEP is None:
            raise TaskError("no sleep program on PATH (install coreutils)", code="unavailable")
        inst.pid, inst.started, inst.boot = await asyncio.to_thread(self._spawn, name, inst.seconds)
        if not self._watch(name, inst):
            inst.pid = None  # it exited at once
        await asyncio.to_thread(atomic_write, self.dir / f"{name}.json", json.dumps(dataclasses.asdict(inst)))
        self.changed()

    async def stop(self, name: str, timeout: float | None) -> bool:
        inst = self._get(name)
        if inst.pid is None:
            return False
        self._signal(inst, signal.SIGTERM)
        try:
            await asyncio.wait_for(self.exited[name].wait(), self.settings.stop_timeout if timeout is None else timeout)
            return False
        except TimeoutError:
            self._signal(inst, signal.SIGKILL)
            await self.exited[name].wait()
            return True

    async def delete(self, name: str) -> None:
        await self.stop(name, None)
        del self.instances[name]
        self.exited.pop(name, None)
        await asyncio.to_thread(self._remove, name)
        self.changed()

    async def console(self, name: str, size: int) -> ConsoleOutput:
        self._get(name)
        return ConsoleOutput(await asyncio.to_thread(tail, self.dir / f"{name}.log", size))

    async def adopt(self) -> list[InstanceState]:
        records, boot = await asyncio.to_thread(self._records), await asyncio.to_thread(boot_id)
        for name, inst in records.items():
            self.instances[name] = inst
            if inst.pid is not None and (inst.boot != boot or not self._watch(name, inst)):
                inst.pid = None  # it ended while no agent watched
        return self.list()

    def list(self) -> list[InstanceState]:
        return [
            InstanceState(name, KIND, "running" if inst.pid else "stopped" if inst.started else "creating",
                          {"seconds": inst.seconds, **({"pid": inst.pid} if inst.pid else {})})
            for name, inst in sorted(self.instances.items())
        ]

    def _get(self, name: str) -> Instance:
        inst = self.instances.get(name)
        if inst is None:
            raise TaskError(f"no sleep instance {name!r} on this node", code="not-found")
        return inst

    def _spawn(self, name: str, seconds: int) -> tuple[int, int | None, str]:
        """Start ``sleep`` in a session of its own, its output appended to the console log."""
        fd = os.open(self.dir / f"{name}.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, f"sleeping {seconds} s\n".encode())
            pid = os.posix_spawn(SLEEP, [SLEEP, str(seconds)], {}, setsid=True, file_actions=[
                (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                (os.POSIX_SPAWN_DUP2, fd, 1),
                (os.POSIX_SPAWN_DUP2, fd, 2),
            ])
        finally:
            os.close(fd)
        return pid, start_time(pid), boot_id()

    def _watch(self, name: str, inst: Instance) -> bool:
        exited = self.exited[name] = asyncio.Event()

        def on_exit(pid: int, code: int | None) -> None:
            inst.pid = None
            exited.set()
            self.changed()

        return self.watcher.watch(inst.pid, on_exit, started=inst.started)

    def _signal(self, inst: Instance, sig: signal.Signals) -> None:
        # While the watcher has not seen it exit, the pid is still this process (or its zombie).
        if inst.pid is not None and self.watcher.watching(inst.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.pid, sig)  # its own session: whatever it started goes too

    def _records(self) -> dict[str, Instance]:
        return {path.stem: Instance(**json.loads(path.read_text())) for path in self.dir.glob("*.json")}

    def _remove(self, name: str) -> None:
        for suffix in (".json", ".log"):
            (self.dir / f"{name}{suffix}").unlink(missing_ok=True)


class SleepPlugin:
    """What the ``kumo.plugins`` entry point names: settings, fingerprint and the driver."""

    def __init__(self) -> None:
        self.settings = Settings()
        self.driver: SleepDriver | None = None

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.settings = parse_section(Settings, section, source)

    @hookimpl
    def kumo_startup(self, context: PluginContext) -> None:
        self.driver = SleepDriver(context.state_dir, self.settings, context.report_changed)

    @hookimpl
    def kumo_shutdown(self) -> None:
        if self.driver is not None:
            self.driver.watcher.close()  # the processes keep running, to be adopted

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        if SLEEP is None:
            return Fingerprint(False, "no sleep program on PATH (install coreutils)", kinds=(KIND,))
        return Fingerprint(True, kinds=(KIND,))

    @hookimpl
    def kumo_instance_driver(self) -> SleepDriver | None:
        return self.driver
