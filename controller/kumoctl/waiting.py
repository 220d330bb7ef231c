"""Waiting for what the controller runs in the background: a node's task, a migration.

Progress goes to stderr, and only when it is a terminal, so scripts read clean output.
Ctrl-C stops the waiting, never the work: the message says how to follow it.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from .client import Client
from .errors import CommandError
from .output import mib

_SPINNER = "|/-\\"
FINAL_STATES = ("succeeded", "failed")


def wait_for_task(
    client: Client, task: Mapping[str, Any], doing: str, timeout: float,
    detail: Callable[[], str] | None = None,
) -> Mapping[str, Any]:
    """Poll a task until it ends; a spinner on stderr when it is a terminal, with what
    ``detail()`` says about it (an image pull's progress). Failure raises."""
    show = sys.stderr.isatty()
    started = time.monotonic()
    delay = 0.2
    tick = 0
    try:
        while task["state"] not in FINAL_STATES:
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise CommandError(
                    f"{doing}: task {task['id']} is still {task['state']} after {timeout:g} s; "
                    f"follow it with: kumoctl tasks show {task['id']}"
                )
            if show:
                extra = detail() if detail is not None else ""
                sys.stderr.write(
                    f"\r{_SPINNER[tick % 4]} {doing}: task {task['state']}{extra} ({elapsed:.0f}s) \033[K"
                )
                sys.stderr.flush()
            tick += 1
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            task = client.call("GET", f"/v1/tasks/{quote(task['id'], safe='')}")
    except KeyboardInterrupt:
        if show:
            sys.stderr.write("\n")
        print(
            f"stopped waiting; task {task['id']} goes on: kumoctl tasks show {task['id']}",
            file=sys.stderr,
        )
        raise
    finally:
        if show:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
    if task["state"] == "failed":
        code = f" [{task['code']}]" if task.get("code") else ""
        raise CommandError(
            f"{doing} failed on node {task.get('node')}: {task.get('error') or 'no error given'}{code}"
        )
    return task


def _migration_line(migration: Mapping[str, Any], elapsed: float) -> str:
    progress = migration.get("progress") or {}
    phase = migration.get("phase") or "?"
    line = f"migrating {migration['instance']} {migration['source']} -> {migration['destination']}: {phase}"
    total = progress.get("bytes_total")
    if "memory_remaining" in progress:  # a live migration: the hypervisor's figures
        line += (f" memory {mib(progress['memory_remaining'])}/{mib(progress.get('memory_total'))} MiB to copy,"
                 f" dirtied at {mib(progress.get('memory_dirty_rate'))} MiB/s,"
                 f" disk {mib(progress.get('disk_remaining'))} MiB to copy")
        if progress.get("not_converging"):
            line += f"; not converging: {progress['not_converging']}"
    elif phase != "checkpoint" and total:
        done = progress.get("bytes_received") or 0
        line += f" {mib(done)}/{mib(total)} MiB ({min(100, 100 * done // total)}%)"
    return f"{line} {elapsed:.0f}s"


def wait_for_migration(
    client: Client, migration: Mapping[str, Any], timeout: float
) -> Mapping[str, Any]:
    """Poll a migration until it ends, its phase and bytes moved on stderr when it is a terminal."""
    show = sys.stderr.isatty()
    started = time.monotonic()
    path = f"/v1/migrations/{quote(migration['id'], safe='')}"
    try:
        while migration["state"] == "running":
            elapsed = time.monotonic() - started
            if elapsed > timeout:
                raise CommandError(
                    f"migration {migration['id']} of {migration['instance']} is still in its "
                    f"{migration.get('phase')} phase after {timeout:g} s; follow it with GET {path}"
                )
            if show:
                sys.stderr.write(f"\r\033[K{_migration_line(migration, elapsed)}")
                sys.stderr.flush()
            time.sleep(0.2)
            migration = client.call("GET", path)
    except KeyboardInterrupt:
        if show:
            sys.stderr.write("\n")
        print(f"stopped waiting; migration {migration['id']} goes on: GET {path}", file=sys.stderr)
        raise
    if show:
        # The last line stays: how much moved and how long it took.
        final = {**migration, "phase": f"{migration['state']} (last phase: {migration.get('phase')})"}
        sys.stderr.write(f"\r\033[K{_migration_line(final, time.monotonic() - started)}\n")
        sys.stderr.flush()
    return migration


def migration_failure(migration: Mapping[str, Any]) -> str:
    """Why a migration failed, with its code and what became of the instance."""
    code = f" [{migration['code']}]" if migration.get("code") else ""
    outcome = f"; {migration['outcome']}" if migration.get("outcome") else ""
    return f"{migration.get('error') or 'no error given'}{code}{outcome}"


def migration_mode(migration: Mapping[str, Any]) -> str:
    """How a migration moved its instance: ``stop-and-copy``, ``live``, or live finished by a pause."""
    if migration.get("mode") != "live":
        return "stop-and-copy"
    # An abort that came as the copy converged did nothing: only a pause finishes one.
    if (migration.get("progress") or {}).get("not_converging") == "stop-and-copy":
        return "live, finished by stop-and-copy as it did not converge"
    return "live"
