"""The agent as the node's child subreaper: orphans of what it starts come back to it.

Processes the agent starts (instances, CRIU restores, liblxc monitors) outlive the tools
that fork them. Their orphans must come back to the agent, not to PID 1: PID 1 on many
machines (containers, minimal VMs) reaps lazily, and a dumped task left as a zombie keeps
its pid taken, so a CRIU restore of that pid fails ("Process with requested pid already
exists"). As a child subreaper the agent inherits those orphans and reaps them here.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os

from agent.sdk import zombie_children

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
REAP_INTERVAL = 1.0


def set_child_subreaper(on: bool) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, int(on), 0, 0, 0) != 0:
        log.error("prctl(PR_SET_CHILD_SUBREAPER, %d) failed: %s", on, os.strerror(ctypes.get_errno()))
        return False
    return True


class Reaper:
    """Makes this process the subreaper while started, and reaps zombie orphans.

    Children other code started (asyncio subprocesses, Popen objects a plugin waits for)
    are reaped by their owner the moment they exit; only a zombie still there one scan
    later is an orphan nobody else waits for.
    """

    def __init__(self, interval: float = REAP_INTERVAL):
        self.interval = interval
        self.active = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.active = set_child_subreaper(True)
        if self.active:
            self._task = asyncio.create_task(self._loop(), name="reaper")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # Nobody reaps for us any more: orphans go back to PID 1 (this matters when the
        # agent runs inside a longer-lived process, as in tests).
        if self.active:
            self.active = not set_child_subreaper(False)

    async def _loop(self) -> None:
        seen: set[int] = set()
        me = os.getpid()
        while True:
            await asyncio.sleep(self.interval)
            if not _a_child_exited():
                seen = set()
                continue
            zombies = await asyncio.to_thread(zombie_children, me)
            for pid in zombies & seen:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            seen = zombies - seen


def _a_child_exited() -> bool:
    """Whether some child of this process waits to be reaped: one system call, nothing reaped
    (WNOWAIT), so that an idle agent does not read every /proc/PID/stat each second."""
    try:
        return os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # no children at all
        return False
