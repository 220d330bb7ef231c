"""Reading /proc without forking: for plugins that watch processes."""

from __future__ import annotations

import os


def stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from the state on (field 3), or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    return data[data.rindex(b")") + 2 :].decode().split()


def start_time(pid: int) -> int | None:
    """The pid's start time (clock ticks after boot), None when gone or a zombie."""
    fields = stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def boot_id() -> str:
    """This boot's id: a pid and start time recorded under another boot name nothing now."""
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def zombie_children(parent: int) -> set[int]:
    """Pids of ``parent``'s children that have exited and wait to be reaped."""
    # /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, which some kernels lack.
    zombies = set()
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields and fields[0] == "Z" and int(fields[1]) == parent:
                zombies.add(int(entry.name))
    return zombies
