"""The ``process`` plugin: plain host processes as Kumo instances.

A process instance is an argv list run in its own session, with stdin from /dev/null and
stdout/stderr appended to ``<state_dir>/instances/<name>/console.log``, its console. Each
instance has a JSON record beside its log (argv, cwd, env, pid, the pid's start time from
/proc and the boot id), so an agent that restarts adopts the processes still running
instead of restarting them: a pid counts as ours only while its start time and the boot id
match the record, so a recycled pid is never mistaken for the instance.

State comes from the pid itself: an :class:`agent.sdk.ExitWatcher` learns the moment a
process exits (no polling); the instance turns ``stopped`` and the agent is told at once.

Usage (:meth:`ProcessDriver.usage`) is the process tree's, read from /proc in one pass for
all instances: CPU time, resident memory and block I/O. A process has no limit and shares
the host's network, so those stay unmeasured.

The agent core routes ``process.create|start|stop|delete|console`` to
:class:`ProcessDriver`. The checkpoint plugin checkpoints, restores and migrates process
instances through :class:`ProcessCheckpointer`: a plain ``criu dump`` of the instance's
tree and ``criu restore`` of it under the same pid, after which the driver takes the
restored pid over (creating the instance from the create options the image carries when
this node has never seen it, as on a migration's destination).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import (
    CheckpointSubject,
    ConsoleOutput,
    CriuCommand,
    ExitWatcher,
    Fingerprint,
    InstanceState,
    InstanceUsage,
    PluginContext,
    TaskError,
    atomic_write,
    boot_id,
    hookimpl,
    parse_payload,
    parse_section,
    process_tree_usage,
    start_time,
    tail,
)

log = logging.getLogger(__name__)

KIND = "process"
# A process does not inherit the agent's environment (which may hold the agent's own
# settings): it gets this plus its own ``env``, the same on every node it may move to.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
    "LANG": "C.UTF-8",
}
KILL_WAIT = 10.0  # seconds a process may take to go after SIGKILL before the stop fails
RESTORE_PIDFILE = "kumo-restore.pid"  # in the image directory: where criu restore writes the root's pid


@dataclasses.dataclass
class ProcessConfig:
    """``plugins.process`` settings."""

    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL when a stop gives none


@dataclasses.dataclass
class Options:
    """What runs: the ``options`` of a create payload (and of an image's record)."""

    command: list[str]
    cwd: str | None = None  # default "/": never wherever the agent happened to start
    env: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class CreateSpec:
    """The create payload. ``vcpus`` and ``memory_mib`` are for placement: a process is not limited."""

    name: str
    options: Options
    kind: str = KIND
    vcpus: int | None = None
    memory_mib: int | None = None


@dataclasses.dataclass
class _Instance:
    name: str
    argv: list[str]
    cwd: str | None = None
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    pid: int | None = None
    start_time: int | None = None
    boot_id: str | None = None
    exit_code: int | None = None
    # In memory only: the Popen of a process this agent started, the record write started
    # by an exit, one record write at a time, and the event set on exit.
    popen: subprocess.Popen | None = None
    saving: asyncio.Task | None = None
    writing: asyncio.Lock = dataclasses.field(default_factory=asyncio.Lock)
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

    @property
    def running(self) -> bool:
        return self.pid is not None and not self.exited.is_set()

    def record(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "argv": self.argv,
            "cwd": self.cwd,
            "env": self.env,
            "pid": self.pid,
            "start_time": self.start_time,
            "boot_id": self.boot_id,
            "exit_code": self.exit_code,
        }

    def options(self) -> dict[str, Any]:
        return {"command": list(self.argv), "cwd": self.cwd, "env": dict(self.env)}


def _instance(name: str, options: Options) -> _Instance:
    """A new instance from checked options; TaskError ``bad-request`` naming what is wrong."""
    if not options.command or any("\0" in arg for arg in options.command):
        raise TaskError("payload.options.command must be a non-empty argv list of strings (never a shell string)",
                        code="bad-request")
    if options.cwd is not None and not options.cwd.startswith("/"):
        raise TaskError("payload.options.cwd must be an absolute path", code="bad-request")
    if not all(key and "=" not in key for key in options.env):
        raise TaskError("payload.options.env must map variable names to strings", code="bad-request")
    return _Instance(name=name, argv=list(options.command), cwd=options.cwd, env=dict(options.env))


class ProcessDriver:
    """The ``process`` kind's :class:`agent.sdk.InstanceDriver`; see the module docstring."""

    kind = KIND

    def __init__(self, directory: Path, config: ProcessConfig, boot: str, changed: Callable[[], None]):
        self.dir = directory  # <state_dir>/instances
        self.config = config
        self.boot = boot
        self.changed = changed
        self.instances: dict[str, _Instance] = {}
        self.watcher = ExitWatcher()
        # The counters last reported, by name, with the pid they were of (see usage), and
        # the lock that keeps a scrape and a heartbeat measuring at once from undoing that.
        self._counted: dict[str, tuple[int, InstanceUsage]] = {}
        self._counting = threading.Lock()

    # -- the driver contract ------------------------------------------------------------

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        spec = parse_payload(CreateSpec, payload)
        inst = _instance(name, spec.options)
        if name in self.instances:
            raise TaskError(f"a process instance named {name!r} already exists: delete it first", code="exists")
        self.instances[name] = inst
        try:
            # A directory left without a record is no instance's (adopt found none in it).
            await asyncio.to_thread(self._dir(name).mkdir, mode=0o700, exist_ok=True)
            await self._spawn(inst)
        except BaseException:
            del self.instances[name]
            await asyncio.to_thread(shutil.rmtree, self._dir(name), True)
            raise

    async def start(self, name: str) -> None:
        inst = self._get(name)
        if not inst.running:
            await self._spawn(inst)

    async def stop(self, name: str, timeout: float | None) -> bool:
        return await self._stop(self._get(name), self.config.stop_timeout if timeout is None else timeout)

    async def delete(self, name: str) -> None:
        if name not in self.instances and await asyncio.to_thread(self._dir(name).is_dir):
            # No record, so no process: what a create cut off by a crash left before its spawn.
            await asyncio.to_thread(shutil.rmtree, self._dir(name), True)
            return
        inst = self._get(name)
        await self._stop(inst, self.config.stop_timeout)
        del self.instances[name]
        if inst.saving is not None:
            await asyncio.wait([inst.saving])
        await asyncio.to_thread(shutil.rmtree, self._dir(name))
        self.changed()

    async def console(self, name: str, size: int) -> ConsoleOutput:
        self._get(name)
        return ConsoleOutput(await asyncio.to_thread(tail, self._log(name), size))

    async def adopt(self) -> list[InstanceState]:
        for record in await asyncio.to_thread(self._read_records):
            inst = _Instance(name=record["name"], argv=list(record["argv"]), cwd=record.get("cwd"),
                             env=dict(record.get("env") or {}), exit_code=record.get("exit_code"))
            self.instances[inst.name] = inst
            pid, started = record.get("pid"), record.get("start_time")
            if pid and started is not None and record.get("boot_id") == self.boot:
                inst.pid, inst.start_time, inst.boot_id = pid, started, self.boot
                if self._watch(inst):
                    log.info("process %s: adopted running pid %d", inst.name, pid)
                    continue
            if pid:
                log.info("process %s: pid %s from the record is gone; instance is stopped", inst.name, pid)
            inst.pid = inst.start_time = None
            inst.exited.set()
            await self._save(inst)
        return self.list()

    def list(self) -> list[InstanceState]:
        # A copy first: a scrape lists from a worker thread while the loop may add or remove.
        return [self._state(inst) for inst in list(self.instances.values())]

    def usage(self) -> dict[str, InstanceUsage]:
        running = {inst.name: inst.pid for inst in list(self.instances.values()) if inst.running}
        with self._counting:
            trees = process_tree_usage(pid for pid in running.values() if pid is not None)
            found = {}
            counted = {}
            for name, pid in running.items():
                if pid not in trees:
                    continue
                usage = trees[pid]
                last = self._counted.get(name)
                if last is not None and last[0] == pid:
                    usage = _never_less(usage, last[1])
                found[name] = usage
                counted[name] = (pid, usage)
            self._counted = counted
        return found

    # -- a restored process -------------------------------------------------------------

    async def take_over(self, name: str, pid: int, options: Any) -> None:
        """Make the running ``pid`` (a CRIU restore) instance ``name``; ``options`` (the create
        options an image carries) make the instance when this node has never seen it."""
        inst = self.instances.get(name)
        if inst is None:
            if not isinstance(options, Mapping):
                raise TaskError(f"no process instance named {name!r} on this node and no create options to "
                                "make one", code="not-found")
            inst = _instance(name, parse_payload(Options, options, "options"))
        elif inst.running:
            if inst.pid == pid:
                return
            raise TaskError(f"process instance {name!r} already runs as pid {inst.pid}", code="conflict")
        started = start_time(pid)
        if started is None:
            raise TaskError(f"pid {pid} is not a running process: nothing to take over", code="not-running")
        inst.pid, inst.start_time, inst.boot_id = pid, started, self.boot
        inst.popen, inst.exit_code = None, None
        if not self._watch(inst):
            inst.pid = inst.start_time = None
            inst.exited.set()
            raise TaskError(f"pid {pid} exited while it was taken over", code="not-running")
        try:
            await asyncio.to_thread(self._dir(name).mkdir, mode=0o700, exist_ok=True)
            await self._save(inst)
        except BaseException:
            # Known only once its record is written: the caller kills what it restored.
            self.watcher.unwatch(pid)
            inst.pid = inst.start_time = None
            raise
        self.instances[name] = inst
        self.changed()

    # -- processes ----------------------------------------------------------------------

    async def _spawn(self, inst: _Instance) -> None:
        try:
            popen = await asyncio.to_thread(self._popen, inst)
        except FileNotFoundError as exc:
            missing = exc.filename or inst.argv[0]
            what = f"working directory {inst.cwd!r}" if missing == inst.cwd else f"command {inst.argv[0]!r}"
            raise TaskError(f"{what} not found: give an existing path (PATH is {BASE_ENV['PATH']})",
                            code="bad-command") from exc
        except (PermissionError, NotADirectoryError) as exc:
            raise TaskError(f"cannot run {inst.argv[0]!r}: {exc.strerror}", code="bad-command") from exc
        inst.popen, inst.pid, inst.exit_code = popen, popen.pid, None
        inst.start_time, inst.boot_id = start_time(popen.pid), self.boot
        if not self._watch(inst):  # gone already, and reaped by someone else
            self._exited(inst, popen.pid, None)
        try:
            await self._save(inst)
        except BaseException:
            # Unrecorded, the process would be nobody's after an agent restart (a full state
            # directory does this): it does not run rather than run unseen.
            self._signal(inst, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(inst.exited.wait(), KILL_WAIT)
            raise
        self.changed()

    def _popen(self, inst: _Instance) -> subprocess.Popen:
        fd = os.open(self._log(inst.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            return subprocess.Popen(  # noqa: S603 - an argv list, never a shell
                inst.argv, cwd=inst.cwd or "/", env={**BASE_ENV, **inst.env}, stdin=subprocess.DEVNULL,
                stdout=fd, stderr=fd, start_new_session=True, close_fds=True,
            )
        finally:
            os.close(fd)

    async def _stop(self, inst: _Instance, timeout: float) -> bool:
        """SIGTERM, then SIGKILL after ``timeout``; whether it had to kill."""
        if not inst.running:
            return False
        self._signal(inst, signal.SIGTERM)
        try:
            await asyncio.wait_for(inst.exited.wait(), timeout)
            return False
        except TimeoutError:
            log.warning("process %s: still running %.0f s after SIGTERM; sending SIGKILL", inst.name, timeout)
        self._signal(inst, signal.SIGKILL)
        try:
            await asyncio.wait_for(inst.exited.wait(), KILL_WAIT)
        except TimeoutError:
            raise TaskError(f"process {inst.name!r} (pid {inst.pid}) survived SIGKILL for {KILL_WAIT:.0f} s "
                            "(stuck in the kernel?)", code="failed") from None
        return True

    def _signal(self, inst: _Instance, sig: signal.Signals) -> None:
        # The instance is its own session and process group (pgid == pid), so children it
        # started are stopped with it. While the watcher has not reported the exit, the pid
        # is still the instance's (even a zombie keeps it), so the group cannot be another's.
        if inst.pid is not None and self.watcher.watching(inst.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(inst.pid, sig)

    def _watch(self, inst: _Instance) -> bool:
        """Watch ``inst.pid``; False when it is gone (or is no longer the process recorded)."""
        assert inst.pid is not None
        inst.exited = asyncio.Event()
        return self.watcher.watch(inst.pid, functools.partial(self._exited, inst), started=inst.start_time)

    def _exited(self, inst: _Instance, pid: int, code: int | None) -> None:
        if inst.popen is not None:
            # The watcher collected it: the Popen must never wait for that pid, which is free now.
            inst.popen.returncode = -1 if code is None else code
        log.info("process %s: pid %s exited (code %s)", inst.name, pid, code)
        inst.pid = inst.start_time = None
        inst.popen = None
        inst.exit_code = code
        inst.exited.set()
        if self.instances.get(inst.name) is inst:
            inst.saving = asyncio.get_running_loop().create_task(self._save(inst))
            inst.saving.add_done_callback(_log_failure)
            self.changed()

    # -- state and records --------------------------------------------------------------

    def _get(self, name: str) -> _Instance:
        inst = self.instances.get(name)
        if inst is None:
            raise TaskError(f"no process instance named {name!r} on this node", code="not-found")
        return inst

    def _state(self, inst: _Instance) -> InstanceState:
        running = inst.running
        details: dict[str, Any] = {
            "pid": inst.pid if running else None,
            "start_time": inst.start_time if running else None,
            "options": inst.options(),
            "log": str(self._log(inst.name)),
        }
        if not running:
            details["exit_code"] = inst.exit_code
        return InstanceState(inst.name, KIND, "running" if running else "stopped", details)

    def _dir(self, name: str) -> Path:
        return self.dir / name

    def _log(self, name: str) -> Path:
        return self._dir(name) / "console.log"

    async def _save(self, inst: _Instance) -> None:
        """Write the instance's record as it is when its turn comes (an exit's write may still
        be running when a start writes the next)."""
        path = self._dir(inst.name) / "record.json"

        def write(data: str) -> None:
            if path.parent.is_dir():  # else deleted meanwhile
                atomic_write(path, data)

        async with inst.writing:
            await asyncio.to_thread(write, json.dumps(inst.record(), indent=1))

    async def saves_done(self) -> None:
        """Wait for the record writes that exits started (an exit seen just before a shutdown
        is still recorded)."""
        saves = [inst.saving for inst in self.instances.values() if inst.saving is not None and not inst.saving.done()]
        if saves:
            await asyncio.wait(saves)

    def _read_records(self) -> list[dict[str, Any]]:
        records = []
        for path in sorted(self.dir.glob("*/record.json")):
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError) as exc:
                log.error("process: cannot read %s: %s; leaving it alone", path, exc)
                continue
            if isinstance(record, dict) and record.get("name") == path.parent.name and isinstance(record.get("argv"), list):
                records.append(record)
            else:
                log.error("process: %s is not a process record; leaving it alone", path)
        return records


class ProcessCheckpointer:
    """The ``process`` kind's :class:`agent.sdk.Checkpointer`: plain criu on the instance's tree."""

    kind = KIND

    def __init__(self, driver: ProcessDriver):
        self.driver = driver

    async def subject(self, name: str) -> CheckpointSubject | None:
        inst = self.driver.instances.get(name)
        if inst is None:
            return None
        running = inst.running
        return CheckpointSubject(name, "running" if running else "stopped", inst.pid if running else None,
                                 {"options": inst.options()})

    async def dump_command(self, subject: CheckpointSubject, criu: str, image: Path, logs: Path,
                           leave_running: bool) -> CriuCommand:
        argv = [criu, "dump", "-t", str(subject.pid), "-D", str(image), "-o", str(logs / "dump.log")]
        if leave_running:
            argv.append("--leave-running")
        return CriuCommand(argv, logs / "dump.log")

    async def restore_command(self, name: str, record: Mapping[str, Any], criu: str, image: Path,
                              logs: Path, inherit_fds: Mapping[int, str]) -> CriuCommand:
        pidfile = image / RESTORE_PIDFILE
        await asyncio.to_thread(pidfile.unlink, missing_ok=True)  # criu refuses to overwrite one
        argv = [criu, "restore", "-D", str(image), "-d", "-o", str(logs / "restore.log"), "--pidfile", str(pidfile)]
        for fd, path in inherit_fds.items():
            argv += ["--inherit-fd", f"fd[{fd}]:{path}"]
        return CriuCommand(argv, logs / "restore.log")

    async def restored(self, name: str, record: Mapping[str, Any], image: Path) -> int:
        pidfile = image / RESTORE_PIDFILE
        pid = int((await asyncio.to_thread(pidfile.read_text)).strip())
        try:
            await asyncio.to_thread(pidfile.unlink)
            await self.driver.take_over(name, pid, record.get("options"))
        except Exception as exc:
            # All or nothing: a process the driver does not know would run unmanaged.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            raise TaskError(f"process instance {name!r} was restored as pid {pid} but could not be taken over "
                            f"({exc}); the restored process was killed and the checkpoint is unchanged",
                            code="adopt-failed") from exc
        return pid


class ProcessPlugin:
    """What the ``kumo.plugins`` entry point names: settings, fingerprint, driver and checkpointer."""

    def __init__(self) -> None:
        self.config = ProcessConfig()
        self.driver: ProcessDriver | None = None
        self.checkpointer: ProcessCheckpointer | None = None

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config = parse_section(ProcessConfig, section, source)

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        directory = context.state_dir / "instances"
        await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
        boot = await asyncio.to_thread(boot_id)
        self.driver = ProcessDriver(directory, self.config, boot, context.report_changed)
        self.checkpointer = ProcessCheckpointer(self.driver)

    @hookimpl
    async def kumo_shutdown(self) -> None:
        if self.driver is not None:
            self.driver.watcher.close()  # the processes keep running, to be adopted
            await self.driver.saves_done()

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        count = len(self.driver.instances) if self.driver is not None else 0
        return Fingerprint(available=True, kinds=(KIND,), attributes={"instances": count})

    @hookimpl
    def kumo_instance_driver(self) -> ProcessDriver | None:
        return self.driver

    @hookimpl
    def kumo_checkpointer(self) -> ProcessCheckpointer | None:
        return self.checkpointer


def _never_less(usage: InstanceUsage, last: InstanceUsage) -> InstanceUsage:
    """``usage`` with its counters no lower than ``last``'s. A tree member that exits and is
    reaped outside the tree (an orphan, by the agent as subreaper) takes its CPU time and I/O
    with it; a counter that went down would read as a restart and count everything again."""
    def kept(now: float | int | None, before: float | int | None) -> float | int | None:
        return now if now is None or before is None else max(now, before)

    return dataclasses.replace(
        usage,
        cpu_seconds=kept(usage.cpu_seconds, last.cpu_seconds),
        block_read_bytes=kept(usage.block_read_bytes, last.block_read_bytes),
        block_write_bytes=kept(usage.block_write_bytes, last.block_write_bytes),
    )


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("process: saving a record failed: %s", task.exception())
