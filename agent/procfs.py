"""Reading /proc for plugins that watch processes (process, checkpoint, rsyslog)."""

from __future__ import annotations


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
