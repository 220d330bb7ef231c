"""The ``process`` plugin: plain host processes as Kumo instances.

A process instance is an argv list run in its own session, with stdin from /dev/null and
stdout/stderr appended to ``<state_dir>/instances/<name>/console.log``. Each instance has a
JSON record beside its log (argv, cwd, env, pid, the pid's start time from /proc and the
boot id), so an agent that restarts adopts the processes still running instead of
restarting them: a pid counts as ours only while its start time and the boot id match the
record, so a recycled pid is never mistaken for the instance.

State comes from the pid itself: a pidfd per running instance is watched by the event loop
(no polling); when it becomes readable the process has exited, the instance turns
``stopped`` and the runtime is told at once (``report_changed``).

Other plugins (checkpoint) learn an instance's pid from ``InstanceState.details["pid"]``
(through ``context.hooks.instances()``), never by importing this module. After something
else has put a process back (a CRIU restore, later a migration), it hands the pid over with
the ``process.adopt`` task: ``{"name", "pid", "options"?}``; ``options`` (the create
options) make a record for an instance this node has never seen.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import (
    Fingerprint,
    InstanceState,
    PluginContext,
    TaskError,
    hookimpl,
    parse_section,
    start_time,
    stat_fields,
)

log = logging.getLogger(__name__)

KIND = "process"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
PR_SET_CHILD_SUBREAPER = 36
# A process does not inherit the agent's environment (which may hold the agent's own
# settings): it gets this plus its own ``env``, the same on every node it may move to.
BASE_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/",
    "LANG": "C.UTF-8",
}


@dataclasses.dataclass
class ProcessConfig:
    """``plugins.process`` settings."""

    stop_timeout: float = 10.0  # seconds between SIGTERM and SIGKILL in process.stop
    console_bytes: int = 65536  # how much of the log's end process.console returns
    reap_interval: float = 1.0  # seconds between scans for orphaned zombie children


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
    # In memory only: the Popen of a process this agent started (it reaps it), the pidfd
    # the loop watches, the record write started by an exit, and the event set on exit.
    popen: subprocess.Popen | None = None
    pidfd: int | None = None
    saving: asyncio.Task | None = None
    exited: asyncio.Event = dataclasses.field(default_factory=asyncio.Event)

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


class ProcessPlugin:
    """Runs argv lists as instances of kind ``process``; see the module docstring."""

    def __init__(self) -> None:
        self.config = ProcessConfig()
        self.context: PluginContext | None = None
        self.instances: dict[str, _Instance] = {}
        self.locks: dict[str, asyncio.Lock] = {}
        self.subreaper = False
        self.reaper: asyncio.Task | None = None

    # -- lifecycle -----------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config = parse_section(ProcessConfig, section, source)

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        await asyncio.to_thread((context.state_dir / "instances").mkdir, parents=True, exist_ok=True)
        # Processes we start (and criu restores, and lxc monitors) outlive the tools that
        # fork them; their orphans must come back to the agent, not to PID 1. PID 1 on
        # these machines reaps lazily, and a dumped task left as a zombie keeps its pid
        # taken, so a CRIU restore of that pid fails ("Process with requested pid already
        # exists"). As a child subreaper the agent gets those orphans and reaps them itself.
        self.subreaper = _set_child_subreaper(True)
        self.reaper = asyncio.create_task(self._reap_orphans(), name="process-reaper")

    @hookimpl
    async def kumo_shutdown(self) -> None:
        if self.reaper is not None:
            self.reaper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.reaper
        loop = asyncio.get_running_loop()
        for inst in self.instances.values():
            self._unwatch(inst, loop)
        # An exit seen just before the shutdown is still written to its record.
        saves = [inst.saving for inst in self.instances.values() if inst.saving is not None and not inst.saving.done()]
        if saves:
            await asyncio.wait(saves)
        # Nobody reaps for us any more: orphans must go back to PID 1 (this matters when
        # the plugin stops inside a longer-lived process, as in tests).
        if self.subreaper:
            self.subreaper = not _set_child_subreaper(False)

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        return Fingerprint(
            available=True,
            kinds=(KIND,),
            attributes={"subreaper": self.subreaper, "instances": len(self.instances)},
        )

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return [f"{KIND}.{op}" for op in ("create", "start", "stop", "delete", "console", "adopt")]

    @hookimpl
    async def kumo_adopt(self) -> Iterable[InstanceState]:
        records = await asyncio.to_thread(self._read_records)
        boot_id = await asyncio.to_thread(_boot_id)
        for record in records:
            inst = _Instance(
                name=record["name"],
                argv=list(record["argv"]),
                cwd=record.get("cwd"),
                env=dict(record.get("env") or {}),
                exit_code=record.get("exit_code"),
            )
            self.instances[inst.name] = inst
            pid, start = record.get("pid"), record.get("start_time")
            if pid and start is not None and record.get("boot_id") == boot_id and start_time(pid) == start:
                inst.pid, inst.start_time, inst.boot_id = pid, start, boot_id
                if self._watch(inst):
                    log.info("process %s: adopted running pid %d", inst.name, pid)
                    continue
            if inst.pid or pid:
                log.info("process %s: pid %s from the record is gone; instance is stopped", inst.name, pid)
            inst.pid = inst.start_time = None
            inst.exited.set()
            await self._save(inst)
        return self._states()

    @hookimpl
    def kumo_instances(self) -> Iterable[InstanceState]:
        return self._states()

    # -- tasks ---------------------------------------------------------------------

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        op = kind.removeprefix(f"{KIND}.")
        name = _instance_name(payload)
        async with self.locks.setdefault(name, asyncio.Lock()):
            if op == "create":
                return await self._create(name, payload)
            if op == "adopt":
                return await self._adopt_pid(name, payload)
            inst = self.instances.get(name)
            if inst is None:
                raise TaskError(f"no process instance named {name!r} on this node", code="not-found")
            if op == "start":
                if not self._running(inst):
                    await self._spawn(inst)
                return self._state(inst).to_json()
            if op == "stop":
                timeout = payload.get("timeout", self.config.stop_timeout)
                if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
                    raise TaskError("payload.timeout must be a number of seconds >= 0", code="bad-request")
                await self._stop(inst, float(timeout))
                return self._state(inst).to_json()
            if op == "delete":
                await self._stop(inst, self.config.stop_timeout)
                del self.instances[name]
                if inst.saving is not None:
                    await asyncio.wait([inst.saving])
                await asyncio.to_thread(shutil.rmtree, self._dir(name))
                self._changed()
                return {"name": name, "deleted": True}
            if op == "console":
                return {"log": await asyncio.to_thread(_tail, self._log(name), self.config.console_bytes)}
        raise TaskError(f"the process plugin has no operation {op!r}", code="bad-request")

    async def _create(self, name: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        if payload.get("kind", KIND) != KIND:
            raise TaskError(f"payload.kind must be {KIND!r}, got {payload.get('kind')!r}", code="bad-request")
        if name in self.instances:
            raise TaskError(f"a process instance named {name!r} already exists: delete it first", code="exists")
        inst = _instance_from_options(name, payload.get("options"))
        await asyncio.to_thread(self._dir(name).mkdir, mode=0o700)
        self.instances[name] = inst
        try:
            await self._spawn(inst)
        except BaseException:
            del self.instances[name]
            await asyncio.to_thread(shutil.rmtree, self._dir(name), True)
            raise
        return self._state(inst).to_json()

    async def _adopt_pid(self, name: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        pid = payload.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise TaskError("payload.pid must be a positive integer", code="bad-request")
        inst = self.instances.get(name)
        if inst is None:
            if payload.get("options") is None:
                raise TaskError(
                    f"no process instance named {name!r} on this node: pass its create options to adopt it",
                    code="not-found",
                )
            inst = _instance_from_options(name, payload.get("options"))
        elif self._running(inst):
            if inst.pid == pid:
                return self._state(inst).to_json()
            raise TaskError(f"process instance {name!r} already runs as pid {inst.pid}", code="conflict")
        start = start_time(pid)
        if start is None:
            raise TaskError(f"pid {pid} is not a running process: nothing to adopt", code="not-running")
        inst.pid, inst.start_time, inst.boot_id = pid, start, await asyncio.to_thread(_boot_id)
        inst.popen, inst.exit_code = None, None
        if not self._watch(inst):
            raise TaskError(f"pid {pid} exited while being adopted", code="not-running")
        await asyncio.to_thread(self._dir(name).mkdir, mode=0o700, exist_ok=True)
        self.instances[name] = inst
        await self._save(inst)
        self._changed()
        return self._state(inst).to_json()

    # -- processes -----------------------------------------------------------------

    async def _spawn(self, inst: _Instance) -> None:
        def spawn() -> subprocess.Popen:
            fd = os.open(self._log(inst.name), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                return subprocess.Popen(  # noqa: S603 - an argv list, never a shell
                    inst.argv,
                    cwd=inst.cwd or "/",
                    env={**BASE_ENV, **inst.env},
                    stdin=subprocess.DEVNULL,
                    stdout=fd,
                    stderr=fd,
                    start_new_session=True,
                    close_fds=True,
                )
            finally:
                os.close(fd)

        try:
            popen = await asyncio.to_thread(spawn)
        except FileNotFoundError as exc:
            missing = exc.filename or inst.argv[0]
            what = f"working directory {inst.cwd!r}" if missing == inst.cwd else f"command {inst.argv[0]!r}"
            raise TaskError(f"{what} not found: give an existing path (PATH is {BASE_ENV['PATH']})",
                            code="bad-command") from exc
        except (PermissionError, NotADirectoryError) as exc:
            raise TaskError(f"cannot run {inst.argv[0]!r}: {exc.strerror}", code="bad-command") from exc
        inst.popen, inst.pid, inst.exit_code = popen, popen.pid, None
        inst.start_time, inst.boot_id = start_time(popen.pid), await asyncio.to_thread(_boot_id)
        inst.exited = asyncio.Event()
        if not self._watch(inst):
            inst.exited.set()
        await self._save(inst)
        self._changed()

    async def _stop(self, inst: _Instance, timeout: float) -> None:
        if not self._running(inst):
            return
        self._signal_group(inst, signal.SIGTERM)
        try:
            await asyncio.wait_for(inst.exited.wait(), timeout)
            return
        except TimeoutError:
            log.warning("process %s: still running %.0f s after SIGTERM; sending SIGKILL", inst.name, timeout)
        self._signal_group(inst, signal.SIGKILL)
        try:
            await asyncio.wait_for(inst.exited.wait(), 10)
        except TimeoutError:
            raise TaskError(
                f"process {inst.name!r} (pid {inst.pid}) survived SIGKILL for 10 s (stuck in the kernel?)",
                code="stop-failed",
            ) from None

    def _signal_group(self, inst: _Instance, sig: signal.Signals) -> None:
        # The instance is its own session and process group (pgid == pid), so children it
        # started are stopped with it. While our pidfd has not reported the exit, the pid
        # is still the instance's (even a zombie keeps it), so the group id cannot be reused.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(inst.pid, sig)

    def _watch(self, inst: _Instance) -> bool:
        """Start watching ``inst.pid``; False when it is gone (or is no longer ours)."""
        try:
            pidfd = os.pidfd_open(inst.pid)
        except ProcessLookupError:
            return False
        # Checked again with the pidfd held: from here the fd names this very process.
        if start_time(inst.pid) != inst.start_time:
            os.close(pidfd)
            return False
        inst.pidfd = pidfd
        inst.exited = asyncio.Event()
        asyncio.get_running_loop().add_reader(pidfd, self._on_exit, inst)
        return True

    def _unwatch(self, inst: _Instance, loop: asyncio.AbstractEventLoop) -> None:
        if inst.pidfd is not None:
            loop.remove_reader(inst.pidfd)
            os.close(inst.pidfd)
            inst.pidfd = None

    def _on_exit(self, inst: _Instance) -> None:
        code: int | None = None
        if inst.popen is not None:
            code = inst.popen.poll()
        else:
            # A restored or adopted process may have been re-parented to us (subreaper):
            # then we can collect its status; if not, its parent does and the code is unknown.
            with contextlib.suppress(ChildProcessError, OSError):
                info = os.waitid(os.P_PIDFD, inst.pidfd, os.WEXITED | os.WNOHANG)
                if info is not None:
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        self._unwatch(inst, asyncio.get_running_loop())
        log.info("process %s: pid %s exited (code %s)", inst.name, inst.pid, code)
        inst.pid = inst.start_time = None
        inst.popen = None
        inst.exit_code = code
        inst.exited.set()
        if self.instances.get(inst.name) is inst:
            inst.saving = asyncio.get_running_loop().create_task(self._save(inst))
            inst.saving.add_done_callback(_log_failure)
            self._changed()

    async def _reap_orphans(self) -> None:
        """Reap zombie children nobody else waits for.

        Children other code started (asyncio subprocesses, subprocess.run) are reaped by
        their owner the moment they exit; only a zombie still there one scan later is an
        orphan handed to us as subreaper (criu-restored trees, lxc monitors).
        """
        seen: set[int] = set()
        me = os.getpid()
        while True:
            await asyncio.sleep(self.config.reap_interval)
            ours = {inst.pid for inst in self.instances.values() if inst.popen is not None}
            zombies = await asyncio.to_thread(_zombie_children, me) - ours
            for pid in zombies & seen:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            seen = zombies - seen

    # -- state ---------------------------------------------------------------------

    def _running(self, inst: _Instance) -> bool:
        return inst.pid is not None and not inst.exited.is_set()

    def _state(self, inst: _Instance) -> InstanceState:
        running = self._running(inst)
        details: dict[str, Any] = {
            "pid": inst.pid if running else None,
            "start_time": inst.start_time if running else None,
            "options": inst.options(),
            "log": str(self._log(inst.name)),
        }
        if not running:
            details["exit_code"] = inst.exit_code
        return InstanceState(inst.name, KIND, "running" if running else "stopped", details)

    def _states(self) -> list[InstanceState]:
        return [self._state(inst) for inst in self.instances.values()]

    def _changed(self) -> None:
        if self.context is not None:
            self.context.report_changed()

    def _dir(self, name: str) -> Path:
        assert self.context is not None, "kumo_startup was not called"
        return self.context.state_dir / "instances" / name

    def _log(self, name: str) -> Path:
        return self._dir(name) / "console.log"

    async def _save(self, inst: _Instance) -> None:
        path = self._dir(inst.name) / "record.json"
        data = json.dumps(inst.record(), indent=1)

        def write() -> None:
            if not path.parent.is_dir():
                return  # deleted meanwhile
            tmp = path.with_suffix(".tmp")
            tmp.write_text(data)
            os.replace(tmp, path)

        await asyncio.to_thread(write)

    def _read_records(self) -> list[dict[str, Any]]:
        records = []
        assert self.context is not None, "kumo_startup was not called"
        for path in sorted((self.context.state_dir / "instances").glob("*/record.json")):
            try:
                record = json.loads(path.read_text())
                if record.get("name") == path.parent.name and isinstance(record.get("argv"), list):
                    records.append(record)
                    continue
            except (OSError, ValueError) as exc:
                log.error("process: cannot read %s: %s; leaving it alone", path, exc)
                continue
            log.error("process: %s is not a process record; leaving it alone", path)
        return records


def _instance_name(payload: Mapping[str, Any]) -> str:
    name = payload.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TaskError(
            f"payload.name must be 1-63 letters, digits, '.', '_' or '-' starting with a letter or digit, got {name!r}",
            code="bad-request",
        )
    return name


def _instance_from_options(name: str, options: Any) -> _Instance:
    if not isinstance(options, Mapping):
        raise TaskError("payload.options must be a mapping with at least 'command'", code="bad-request")
    unknown = sorted(set(options) - {"command", "cwd", "env"})
    if unknown:
        raise TaskError(f"payload.options.{unknown[0]}: unknown key (allowed: command, cwd, env)", code="bad-request")
    argv = options.get("command")
    if not isinstance(argv, list) or not argv or not all(isinstance(a, str) and "\0" not in a for a in argv):
        raise TaskError(
            "payload.options.command must be a non-empty argv list of strings (never a shell string)",
            code="bad-request",
        )
    cwd = options.get("cwd")  # default "/": never wherever the agent happened to start
    if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
        raise TaskError("payload.options.cwd must be an absolute path", code="bad-request")
    env = options.get("env") or {}
    if not isinstance(env, Mapping) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in env.items()
    ):
        raise TaskError("payload.options.env must map variable names to strings", code="bad-request")
    return _Instance(name=name, argv=list(argv), cwd=cwd, env=dict(env))


def _set_child_subreaper(on: bool) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        log.error("process: prctl(PR_SET_CHILD_SUBREAPER, %d) failed: %s", on, os.strerror(err))
        return False
    return True


def _zombie_children(parent: int) -> set[int]:
    # /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which these kernels lack.
    zombies = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields and fields[0] == "Z" and int(fields[1]) == parent:
                zombies.add(int(entry.name))
    return zombies


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text().strip()


def _tail(path: Path, limit: int) -> str:
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - limit))
            return f.read(limit).decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def _log_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("process: saving a record failed: %s", task.exception())
