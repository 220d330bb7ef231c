"""liblxc, driven through its own command-line tools as asyncio subprocesses with argument lists.

The python3-lxc binding is a C extension built against one liblxc (Debian ships it only for
/usr/bin/python3, so a venv cannot import it), and its calls block (and fork) inside the
agent process; each tool costs a few milliseconds, never blocks the event loop and keeps
liblxc out of the agent's memory.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

from agent.sdk import InstanceStateName, TaskError, run_command, tail

TOOLS = ("lxc-create", "lxc-start", "lxc-stop", "lxc-ls", "lxc-info", "lxc-destroy")
# liblxc's states as Kumo's instance states.
STATES: dict[str, InstanceStateName] = {
    "RUNNING": "running", "STOPPING": "running", "STARTING": "creating", "STOPPED": "stopped",
    "FROZEN": "paused", "FREEZING": "paused", "THAWED": "running", "ABORTING": "failed",
}
Seen = tuple[str, int | None]  # liblxc's state of a container and its init pid


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


async def version() -> str:
    return (await run_command("lxc-ls", "--version")).stdout.strip()


class Liblxc:
    """The lxc tools, every call on the containers under one lxcpath."""

    def __init__(self, lxcpath: Path):
        self.lxcpath = lxcpath

    def _at(self, name: str) -> tuple[str, ...]:
        return ("-P", str(self.lxcpath), "-n", name)

    async def create(self, name: str, template: str, config: Path) -> None:
        """``lxc-create`` from a template, with ``config`` as the config it starts from."""
        result = await run_command("lxc-create", *self._at(name), "-t", template, "-f", str(config))
        if result.returncode != 0:
            raise TaskError(f"lxc-create -t {template} failed for {name!r}: {result.error}")

    async def start(self, name: str) -> None:
        """Start the container; returns once liblxc reports it running."""
        result = await run_command("lxc-start", *self._at(name))
        if result.returncode != 0:
            from .lxcconf import LXC_LOG  # create-time code, not held by an idle agent

            why = await asyncio.to_thread(_last_errors, self.lxcpath / name / LXC_LOG)
            raise TaskError(f"lxc-start failed for {name!r}: {why or result.error}")

    async def stop(self, name: str, timeout: float) -> bool:
        """Ask init to halt (lxc.signal.halt), then kill if it has not stopped within
        ``timeout`` seconds; whether it had to kill."""
        graceful = await run_command("lxc-stop", *self._at(name), "--nokill", "-t", str(max(1, round(timeout))))
        if graceful.returncode == 0:
            return False
        killed = await run_command("lxc-stop", *self._at(name), "-k")
        if killed.returncode != 0 and (await self.state(name) or ("",))[0] != "STOPPED":
            raise TaskError(f"lxc-stop could not kill container {name!r}: {killed.error}")
        return True

    async def destroy(self, name: str) -> None:
        """Kill and destroy a container (``lxc-destroy -f``), then drop any directory left."""
        result = await run_command("lxc-destroy", *self._at(name), "-f")
        if result.returncode != 0 and (await self.state(name) or ("",))[0] == "RUNNING":
            raise TaskError(f"lxc-destroy could not remove container {name!r}: {result.error}")
        await asyncio.to_thread(shutil.rmtree, self.lxcpath / name, True)

    async def state(self, name: str) -> Seen | None:
        """One container's state and init pid (``lxc-info``); None when liblxc has no such container."""
        result = await run_command("lxc-info", *self._at(name), "-s", "-p")
        if result.returncode != 0:
            return None
        return parse_lxc_info(result.stdout)

    async def states(self) -> dict[str, Seen]:
        """Every container under lxcpath (``lxc-ls``)."""
        result = await run_command("lxc-ls", "-P", str(self.lxcpath), "-f", "-F", "name,state,pid")
        return parse_lxc_ls(result.stdout)


def parse_lxc_ls(out: str) -> dict[str, Seen]:
    """``lxc-ls -f -F name,state,pid`` → {name: (STATE, pid or None)}."""
    found: dict[str, Seen] = {}
    for text in out.splitlines()[1:]:
        fields = text.split()
        if len(fields) >= 3:
            found[fields[0]] = (fields[1], int(fields[2]) if fields[2].isdigit() else None)
    return found


def parse_lxc_info(out: str) -> Seen | None:
    """``lxc-info -s -p`` (``State: RUNNING`` and, when running, ``PID: 4242``) → (STATE, pid or None)."""
    fields = {}
    for text in out.splitlines():
        key, sep, value = text.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    if "State" not in fields:
        return None
    pid = fields.get("PID", "")
    return fields["State"], int(pid) if pid.isdigit() else None


def _last_errors(log_file: Path) -> str:
    """The ERROR lines of liblxc's container log from its last start, shortened."""
    errors = [text.split(" - ", 2)[-1] for text in tail(log_file, 16384).splitlines()
              if text.startswith("lxc-start ") and " ERROR " in text]
    return "; ".join(errors[-3:])
