"""Running a host tool (lxc-*, qemu-img, rsyslogd -N1): argv lists only, never a shell string."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import subprocess
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class CommandResult:
    """How a command ended: its exit status and its captured output, decoded."""

    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        """What to show a user when it failed: the end of stderr (or stdout), else the status."""
        return (self.stderr.strip() or self.stdout.strip() or f"exit status {self.returncode}")[-500:]


async def run_command(*argv: str, timeout: float | None = None, env: Mapping[str, str] | None = None) -> CommandResult:
    """Run ``argv`` with stdin from /dev/null and its output captured; never raises for a
    non-zero exit (check ``returncode``). Past ``timeout`` seconds it is killed and
    ``TimeoutError`` is raised. A missing program raises ``FileNotFoundError``."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=dict(env) if env is not None else None,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        # A cancelled caller (a probe past its timeout, a shutdown) must not leave it running.
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await asyncio.shield(proc.wait())
        raise
    return CommandResult(tuple(argv), proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


def run_command_sync(*argv: str) -> CommandResult:
    """:func:`run_command` for code already off the event loop (inside ``asyncio.to_thread``)."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")  # noqa: S603
    return CommandResult(tuple(argv), proc.returncode, proc.stdout, proc.stderr)
