"""Whether libvirtd answers, on a node that has not loaded libvirt (no VMs here).

An agent with no VMs does not load libvirt (:mod:`plugins.kvm.host`), yet its fingerprint
must say whether libvirtd answers, with libvirtd's and QEMU's versions, in the same words
the loaded plugin would use. Asking libvirt means a process with libvirt loaded: a fresh
Python (``python -m plugins.kvm URI``, which connects through the same code as the plugin)
costs ~0.1 s of CPU, far too much every 30 s on an idle node. So the two questions are
answered apart:

- *Is it still there?* A look at ``/proc/net/unix`` for a socket listening at libvirtd's
  path, and at that path for the socket file: no new process, well under a millisecond,
  cheap enough for every fingerprint and health probe. Not a connect(): under systemd
  socket activation (Debian's libvirtd exits after 120 s idle) every connect would start
  libvirtd again, while a listening socket already means libvirtd will answer. The
  socket's and the file's inodes tell a restarted libvirtd from the one seen before.
- *What does it say?* The child is asked only when that changes: at start-up, when libvirtd
  goes away, comes back or restarts, and once an hour regardless (an upgrade under socket
  activation keeps the socket). Its answer (versions, or libvirt's own message for why it
  cannot connect) stands until then.

The socket's word is trusted only while it agrees with the child's last answer. Where they
disagree (a socket that listens but refuses this agent, or libvirtd reached through a
socket this module does not watch) or where there is no local socket to watch (remote
URIs, ``qemu:///session`` whose daemon starts on demand), the child is asked at most every
30 s, as every probe was before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import stat
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path

from agent.sdk import run_command
from plugins.kvm.host import NO_BINDING

# The child at most this often when the socket cannot be trusted.
RECHECK_INTERVAL = 30.0
# At most this long between two children even while nothing seems to change.
MAX_AGE = 3600.0
# libvirtd may probe QEMU's capabilities at a first connection, which takes seconds.
CHILD_TIMEOUT = 30.0
SYSTEM_SOCKETS = (Path("/run/libvirt/libvirt-sock"), Path("/run/libvirt/virtqemud-sock"))
_LISTENING = b"00010000"  # __SO_ACCEPTCON in /proc/net/unix's Flags column
_NO_SOCKET = ("no local socket",)


@dataclasses.dataclass(frozen=True)
class Answer:
    """``reason`` is empty while libvirtd answers; else why it cannot be used."""

    reason: str
    versions: Mapping[str, str] = dataclasses.field(default_factory=dict)


class Liveness:
    """What libvirtd at ``uri`` answered, kept current at almost no cost."""

    def __init__(self, uri: str):
        self.uri = uri
        self.answer = Answer("libvirtd has not been probed yet")
        self._sockets = socket_paths(uri)
        self._seen: object = None  # the socket's state when the child last answered
        self._asked_at = -math.inf
        self._task: asyncio.Task[None] | None = None

    async def refresh(self) -> Answer:
        """Bring :attr:`answer` up to date. Callers share one refresh; a caller cancelled
        (a probe's timeout) does not cancel the child it started."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._refresh())
        await asyncio.shield(self._task)
        return self.answer

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh(self) -> None:
        # Looked up, not imported: without the binding no child could answer either.
        if importlib.util.find_spec("libvirt") is None:
            self.answer, self._seen, self._asked_at = Answer(NO_BINDING), None, -math.inf
            return
        seen = await asyncio.to_thread(listening, self._sockets) if self._sockets else _NO_SOCKET
        if self._due(seen):
            answer = await ask_child(self.uri)
            self.answer, self._seen, self._asked_at = answer, seen, time.monotonic()

    def _due(self, seen: object) -> bool:
        age = time.monotonic() - self._asked_at
        if seen != self._seen or age >= MAX_AGE:
            return True
        agrees = seen is not _NO_SOCKET and (seen is not None) == (self.answer.reason == "")
        return not agrees and age >= RECHECK_INTERVAL


def socket_paths(uri: str) -> tuple[Path, ...]:
    """The UNIX sockets a local qemu URI connects to, most likely first; () for the others."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("qemu", "qemu+unix") or parts.netloc:
        return ()
    given = urllib.parse.parse_qs(parts.query).get("socket")
    if given:
        return (Path(given[-1]),)
    # libvirtd's, then the modular daemon's (virtqemud) that replaces it on newer hosts.
    return SYSTEM_SOCKETS if parts.path == "/system" else ()


def listening(paths: tuple[Path, ...]) -> tuple[str, int, int] | None:
    """The first of ``paths`` that is a socket file a process listens on: (path, the socket's
    inode, the file's inode); None if none. Blocking (reads /proc/net/unix)."""
    real = {os.path.realpath(p): str(p) for p in paths}
    names = {p.name.encode() for p in paths}
    found: dict[str, int] = {}
    with open("/proc/net/unix", "rb") as table:
        next(table, None)  # the header
        for line in table:
            # Num RefCount Protocol Flags Type St Inode Path (Path may hold spaces)
            fields = line.rstrip(b"\n").split(None, 7)
            if len(fields) == 8 and fields[3] == _LISTENING and os.path.basename(fields[7]) in names:
                path = os.path.realpath(os.fsdecode(fields[7]))
                if path in real:
                    found[path] = int(fields[6])
    for path, given in real.items():
        if path in found:
            # The table keeps the name a socket was bound to after its file is removed, and
            # then nothing can connect to it any more.
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if stat.S_ISSOCK(st.st_mode):
                    return given, found[path], st.st_ino
    return None


async def ask_child(uri: str) -> Answer:
    """Ask libvirtd through a fresh interpreter (``python -m plugins.kvm URI``), so this
    process never maps libvirt."""
    # The child must import this very package: put its import root first (the Debian
    # wrapper adds it to sys.path by hand), and keep the working directory off sys.path (-P).
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    try:
        result = await run_command(sys.executable, "-P", "-m", "plugins.kvm", uri, timeout=CHILD_TIMEOUT, env=env)
    except TimeoutError:
        return Answer(f"{uri} did not answer within {CHILD_TIMEOUT:g} s")
    try:
        answer = json.loads(result.stdout)
        return Answer(str(answer["reason"]), dict(answer["versions"]))
    except (ValueError, TypeError, KeyError):
        last = result.stderr.strip().splitlines()[-1:] or ["no error output"]
        return Answer(f"the libvirtd probe (python -m plugins.kvm) failed (exit {result.returncode}): {last[0]}")
