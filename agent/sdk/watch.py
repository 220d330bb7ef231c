"""Learning the moment a process exits, without polling: a pidfd per process, read by the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from agent.sdk.procfs import start_time


class ExitWatcher:
    """Calls ``on_exit(pid, code)`` on the event loop when a watched process exits.

    ``code`` is the exit status (negative: the signal that killed it) when the agent could
    collect it, which it can for its own children and for orphans it inherited as the
    node's child subreaper; otherwise None (another parent reaps it). Use one watcher per
    plugin; :meth:`close` at shutdown stops every watch without touching the processes.
    """

    def __init__(self) -> None:
        self._fds: dict[int, int] = {}

    def watch(self, pid: int, on_exit: Callable[[int, int | None], None], started: int | None = None) -> bool:
        """Start watching ``pid``; False when it is already gone.

        With ``started`` (the start time from :func:`agent.sdk.start_time` recorded when
        the process was first seen) a recycled pid counts as gone: the check is made with
        the pidfd held, so from then on the watch names this very process.
        """
        self.unwatch(pid)
        try:
            fd = os.pidfd_open(pid)
        except (ProcessLookupError, OSError):
            return False
        if started is not None and start_time(pid) != started:
            os.close(fd)
            return False
        self._fds[pid] = fd
        asyncio.get_running_loop().add_reader(fd, self._exited, pid, on_exit)
        return True

    def watching(self, pid: int) -> bool:
        return pid in self._fds

    def unwatch(self, pid: int) -> None:
        fd = self._fds.pop(pid, None)
        if fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(fd)
            os.close(fd)

    def close(self) -> None:
        for pid in list(self._fds):
            self.unwatch(pid)

    def _exited(self, pid: int, on_exit: Callable[[int, int | None], None]) -> None:
        code: int | None = None
        fd = self._fds.get(pid)
        if fd is not None:
            with contextlib.suppress(ChildProcessError, OSError):
                info = os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG)
                if info is not None:
                    code = info.si_status if info.si_code == os.CLD_EXITED else -info.si_status
        self.unwatch(pid)
        on_exit(pid, code)
