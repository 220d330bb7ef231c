"""CRIU itself: finding it and checking that it works here, running it, and the error text of its logs.

We drive the ``criu`` command line through asyncio subprocesses rather than pycriu's RPC
(``criu swrk``): pycriu is not on PyPI (Debian ships it only for /usr/bin/python3, and a
venv would need it built from the criu tree plus protobuf), the command line costs the same
per operation, its logs are the files operators already know, and tools that wrap CRIU
(``lxc-checkpoint``) run criu by name anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import platform
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

from agent.sdk import CriuCommand, TaskError, run_command

INSTALL_HINT = "install criu >= 4.1: see scripts/deps/30-criu.sh"
# `criu check --feature` names worth scheduling by: soft-dirty tracking makes pre-dump and
# iterative (low-downtime) migration possible, userfaultfd makes lazy (post-copy) restore possible.
FEATURES = ("mem_dirty_track", "uffd", "uffd-noncoop", "pidfd_store", "network_lock_nftables", "timens")
PROBE_TIMEOUT = 30.0
# Logged on every run where root lacks CAP_SYS_RESOURCE: never the reason anything failed.
HARMLESS = ("RLIMIT_NOFILE",)
# Consequences criu logs after the root cause, which comes first.
GENERIC = ("Could not initialize kernel features detection", "Dumping FAILED", "Restoring FAILED", "exited, status=")


@dataclasses.dataclass(frozen=True)
class CriuStatus:
    """What probing criu found; ``reason`` says what is wrong when it is not usable."""

    usable: bool
    reason: str = ""
    path: str | None = None
    version: str | None = None
    features: Mapping[str, bool] = dataclasses.field(default_factory=dict)


async def probe_criu(criu: str) -> CriuStatus:
    """Find criu, its version, whether ``criu check`` passes here, and its optional features."""
    path = criu if "/" in criu else shutil.which(criu, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if not path or not os.access(path, os.X_OK):
        return CriuStatus(False, f"criu not found at {criu!r} (plugins.checkpoint.criu); {INSTALL_HINT}")
    rc, out = await _capture(path, "--version")
    match = re.search(r"Version:\s*(\S+)", out)
    if rc != 0 or not match:
        return CriuStatus(False, f"{path} is not a working criu (--version: {first_line(out)}); {INSTALL_HINT}", path)
    version = match.group(1)
    rc, out = await _capture(path, "check")
    if rc != 0:
        # A failing `criu check` often says only "Could not initialize kernel features
        # detection"; `--all` names the cause (on kernels >= 6.13, criu < 4.1: the vDSO).
        _, more = await _capture(path, "check", "--all")
        reason = criu_error_text(out + "\n" + more)
        return CriuStatus(False, f"criu {version} ({path}) fails on kernel {platform.release()}: {reason}; {INSTALL_HINT}",
                          path, version)
    results = await asyncio.gather(*(_capture(path, "check", "--feature", f) for f in FEATURES))
    return CriuStatus(True, "", path, version, {f: r[0] == 0 for f, r in zip(FEATURES, results, strict=True)})


async def _capture(*argv: str) -> tuple[int, str]:
    """(exit status, stdout and stderr) of a probe; never raises."""
    try:
        result = await run_command(*argv, timeout=PROBE_TIMEOUT)
    except OSError as exc:
        return 127, exc.strerror or str(exc)
    except TimeoutError:
        return 124, f"timed out after {PROBE_TIMEOUT:.0f} s"
    return result.returncode, result.stdout + result.stderr


async def run(command: CriuCommand, output: Path, timeout: float, pass_fds: tuple[int, ...] = ()) -> int:
    """Run ``command`` with its output in the file ``output``; its exit status. Past
    ``timeout`` seconds it is killed and the task fails with ``timeout``."""
    tool = Path(command.argv[0]).name
    out = await asyncio.to_thread(open, output, "wb")
    try:
        proc = await asyncio.create_subprocess_exec(
            *command.argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
            env=dict(command.env) if command.env is not None else None, pass_fds=pass_fds,
        )
    except OSError as exc:
        raise TaskError(f"cannot run {command.argv[0]}: {exc.strerror}", code="unavailable") from exc
    finally:
        out.close()
    try:
        return await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise TaskError(f"{tool} took longer than {timeout:.0f} s and was killed (plugins.checkpoint.timeout); "
                        f"see {output}", code="timeout") from None


def criu_error_text(text: str) -> str:
    """The first error line that names a cause: criu logs the root cause first, then the
    consequences ("Can't open cwd", "Restoring FAILED")."""
    errors = [
        re.sub(r"^.*?Error \([^)]*\):\s*", "", line).strip()
        for line in text.splitlines()
        if re.search(r"Error \(", line) and not any(h in line for h in HARMLESS)
    ]
    specific = [e for e in errors if e and not any(g in e for g in GENERIC)]
    if specific:
        return specific[0]
    if errors:
        return errors[0]
    return first_line(text) or "no error message"


def criu_error(*logfiles: Path) -> str:
    """The most telling error in the first of ``logfiles`` that has any text (criu's log,
    then the tool's own output). Blocking: call it off the event loop."""
    for logfile in logfiles:
        try:
            text = logfile.read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            return criu_error_text(text)
    return "no error message in " + ", ".join(map(str, logfiles))


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")
