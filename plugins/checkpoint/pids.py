"""A dumped tree's pids: reaped right after the dump, free again before a restore.

CRIU restores a tree that shared the agent's pid namespace under its old pids, so they must
be free: a killed process that stays a zombie keeps its pid ("Process with requested pid
already exists"). The agent is the node's child subreaper, so the tree's orphans are its
children, which it reaps here at once rather than at the core's next periodic scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from agent.sdk import TaskError, stat_fields
from plugins.checkpoint.preflight import comm

SETTLE_TIMEOUT = 5.0  # seconds a killed process may take to exit, or its parent to reap it


async def reap(pids: list[int]) -> None:
    """Reap ``pids``, which the dump killed, where they are the agent's to reap. The tree's
    root is its driver's (it watches and reaps it)."""
    me = os.getpid()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    for pid in pids:
        while (fields := stat_fields(pid)) is not None and time.monotonic() < deadline:
            if fields[0] != "Z":
                await asyncio.sleep(0.01)  # SIGKILLed, not yet exited
                continue
            if int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)
            break


async def wait_free(pid: int) -> None:
    """Return once ``pid`` is free; ``pid-in-use`` when a live process holds it, or a zombie
    its parent does not reap in time."""
    me = os.getpid()
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        fields = stat_fields(pid)
        if fields is None:
            return
        if fields[0] != "Z":
            raise TaskError(f"pid {pid}, which the checkpoint must be restored under, belongs to another running "
                            f"process ({comm(pid)}): restore on a node where it is free", code="pid-in-use")
        if int(fields[1]) == me:
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    continue
        if time.monotonic() > deadline:
            raise TaskError(f"pid {pid} is a zombie its parent does not reap: restore needs it free", code="pid-in-use")
        await asyncio.sleep(0.02)
