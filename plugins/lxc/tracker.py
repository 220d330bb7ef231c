"""What the plugin knows about each container, kept fresh from liblxc.

- Every container under the plugin's ``lxcpath`` is a Kumo instance whose name is the
  container name. Nothing else is recorded, so an agent restart adopts what liblxc shows
  (running containers keep running) and the checkpoint plugin finds a container through
  ``details.lxcpath``.
- State comes from liblxc: all containers (``lxc-ls``) at start-up and every
  ``poll_interval`` seconds, for containers started or stopped by other tools (a CRIU
  restore); one container (``lxc-info``) right after an operation on it; and a pidfd on
  each running container's init, so a container whose init dies (kill -9) is seen at once.
  liblxc's monitor process cleans up the cgroups and the veth when init exits; the plugin
  reports the container stopped when liblxc does, that is after that cleanup.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.sdk import ExitWatcher, InstanceState, InstanceStateName

from .liblxc import STATES, Liblxc, Seen
from .record import SHOWN, read_record

log = logging.getLogger(__name__)

KIND = "lxc"
SETTLE_STEP = 0.05  # how often liblxc is asked whether a container whose init died has stopped
SETTLE_STEPS = 200


@dataclasses.dataclass
class Container:
    """One container as the plugin last saw it."""

    name: str
    state: InstanceStateName = "unknown"
    pid: int | None = None
    record: dict[str, Any] = dataclasses.field(default_factory=dict)
    watched: int | None = None  # the init pid whose exit is watched
    # The init pid whose exit was seen: never watched again while liblxc still shows it.
    dead: int | None = None


class Containers:
    """The containers under one lxcpath, by name."""

    def __init__(self, lxc: Liblxc, report_changed: Callable[[], None]):
        self.lxc = lxc
        self.by_name: dict[str, Container] = {}
        # Names being created or deleted here: liblxc's view of them is not the truth until that ends.
        self.busy: set[str] = set()
        self._report_changed = report_changed
        self._exits = ExitWatcher()
        self._lock = asyncio.Lock()
        self._refreshed = 0.0  # loop time of the last lxc-ls
        self._poller: asyncio.Task[None] | None = None
        self._settlers: dict[str, asyncio.Task[None]] = {}

    def states(self) -> list[InstanceState]:
        states = []
        for inst in sorted(self.by_name.values(), key=lambda i: i.name):
            details: dict[str, Any] = {"lxcpath": str(self.lxc.lxcpath)}
            if inst.pid is not None and inst.state == "running":
                details["pid"] = inst.pid
            details.update({key: inst.record[key] for key in SHOWN if key in inst.record})
            states.append(InstanceState(inst.name, KIND, inst.state, details))
        return states

    # ---- creating and deleting -----------------------------------------------------------

    def creating(self, name: str) -> None:
        self.busy.add(name)
        self.by_name[name] = Container(name, "creating")

    def deleting(self, name: str) -> None:
        self.busy.add(name)

    async def release(self, name: str, record: dict[str, Any] | None = None) -> None:
        """The create or delete of ``name`` ended, well or not: from now on liblxc's state of
        it is the truth (``record`` is a new container's)."""
        async with self._lock:
            self.busy.discard(name)
            if record is not None and name in self.by_name:
                self.by_name[name].record = record
            changed = await self._read_one(name)
        if changed:
            self._report_changed()

    # ---- reading liblxc ---------------------------------------------------------------

    async def refresh(self) -> None:
        """Re-read every container's state from liblxc; report what changed."""
        changed = False
        async with self._lock:
            self._refreshed = asyncio.get_running_loop().time()
            seen = await self.lxc.states()
            for name in [n for n in self.by_name if n not in seen and n not in self.busy]:
                self._unwatch(self.by_name.pop(name))
                changed = True
            for name, found in seen.items():
                if name not in self.busy:
                    changed = await self._apply(name, found) or changed
        if changed:
            self._report_changed()

    async def refresh_one(self, name: str) -> Container | None:
        """Re-read one container's state from liblxc; what the plugin now knows of it."""
        async with self._lock:
            changed = name not in self.busy and await self._read_one(name)
        if changed:
            self._report_changed()
        return self.by_name.get(name)

    async def _read_one(self, name: str) -> bool:
        found = await self.lxc.state(name)
        if found is not None:
            return await self._apply(name, found)
        inst = self.by_name.pop(name, None)
        if inst is not None:
            self._unwatch(inst)
        return inst is not None

    async def _apply(self, name: str, found: Seen) -> bool:
        lxc_state, pid = found
        inst = self.by_name.get(name)
        changed = inst is None
        if inst is None:
            record = await asyncio.to_thread(read_record, self.lxc.lxcpath / name)
            inst = self.by_name[name] = Container(name, record=record)
        state = STATES.get(lxc_state, "unknown")
        if (state, pid) != (inst.state, inst.pid):
            inst.state, inst.pid = state, pid
            changed = True
        if state == "running" and pid is not None:
            self._watch(inst, pid)
        else:
            self._unwatch(inst)
        return changed

    # ---- polling and init exits -----------------------------------------------------------

    def start_polling(self, interval: float) -> None:
        """Poll every ``interval`` seconds from now; adoption reads liblxc first."""
        self._refreshed = asyncio.get_running_loop().time()
        self._poller = asyncio.create_task(self._poll(interval))

    async def _poll(self, interval: float) -> None:
        loop = asyncio.get_running_loop()
        listed = None
        while True:
            # Counted from the last lxc-ls, whoever ran it: adoption's is as fresh as a poll's.
            wait = self._refreshed + interval - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            # A node with no container forks no lxc-ls until something appears in lxcpath:
            # its directory's modification time moves when a container directory is added.
            if not self.by_name:
                changed = await asyncio.to_thread(_changed_at, self.lxc.lxcpath)
                if changed == listed:
                    self._refreshed = loop.time()
                    continue
                listed = changed
            try:
                await self.refresh()
            except Exception:
                log.exception("lxc: reading container states failed")

    def _watch(self, inst: Container, pid: int) -> None:
        """Learn the moment a container's init exits."""
        if pid in (inst.watched, inst.dead):
            return
        self._unwatch(inst)
        inst.watched = pid
        if not self._exits.watch(pid, lambda exited, _code: self._init_exited(inst.name, exited)):
            self._init_exited(inst.name, pid)

    def _unwatch(self, inst: Container) -> None:
        if inst.watched is not None:
            self._exits.unwatch(inst.watched)
            inst.watched = None

    def _init_exited(self, name: str, pid: int) -> None:
        inst = self.by_name.get(name)
        if inst is None or inst.watched != pid:
            return
        inst.watched, inst.dead = None, pid
        if name not in self._settlers:
            task = asyncio.create_task(self._follow_exit(name))
            self._settlers[name] = task
            task.add_done_callback(lambda _t: self._settlers.pop(name, None))

    async def _follow_exit(self, name: str) -> None:
        """After init exits liblxc's monitor cleans up, then says STOPPED: follow it closely."""
        for _ in range(SETTLE_STEPS):
            inst = await self.refresh_one(name)
            if inst is None or inst.state != "running" or inst.pid != inst.dead:
                return
            await asyncio.sleep(SETTLE_STEP)

    async def close(self) -> None:
        """Stop polling and watching; the containers keep running."""
        tasks = [t for t in (self._poller, *self._settlers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._poller = None
        self._exits.close()
        for inst in self.by_name.values():
            inst.watched = None


def _changed_at(directory: Path) -> int | None:
    try:
        return os.stat(directory).st_mtime_ns
    except OSError:
        return None
