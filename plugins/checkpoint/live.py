"""Live migration tasks: the source's facts, the destination's end (``checkpoint.live_receive``)
and the source's (``checkpoint.live_send``), each with a directory of the migration's sockets.

The kind moves the instance (its :class:`agent.sdk.LiveMigrator`); the bytes go through
the tunnels of :mod:`.tunnels`. A migration's sockets are in
``<live_sockets>/<migration id>``, a path shared by every agent of the host, so each
agent records the directories it made (``<plugin state>/live-sockets/<migration id>``)
and removes them when its task ends, or, when it was killed first, at its next start
(:func:`discard_sockets`): no live task outlives its agent, and another agent's
migrations on the same host are left alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import LiveMigrator, LiveOptions, TaskError
from plugins.checkpoint.workspace import AnyCheckpointer, Target, Workspace

# tunnels (with aiohttp, and tarfile through transfer) is imported by the tasks that use it:
# an idle agent, which never migrates, does not hold it.

log = logging.getLogger(__name__)

RECORDS = "live-sockets"  # under the plugin's state directory


@dataclasses.dataclass
class LiveReceive(Target):
    migration: str
    controller: str  # the URL of the controller driving the migration
    instance: dict[str, Any]  # the controller's create payload of it
    facts: dict[str, Any]  # the source's checkpoint.live_facts


@dataclasses.dataclass
class LiveSend(Target):
    migration: str
    controller: str
    definition: str  # the destination's (checkpoint.live_receive's ready message)
    channels: list[str]
    max_downtime_ms: int = 300
    converge_timeout: float = 120.0
    on_no_converge: str = "abort"


def discard_sockets(root: Path, records: Path) -> None:
    """Remove the socket directories of the migrations recorded in ``records``: at start-up,
    those of live tasks a killed agent ran. Blocking."""
    for record in records.glob("*"):
        log.warning("checkpoint: removing %s, left by a live migration that did not end", root / record.name)
        shutil.rmtree(root / record.name, ignore_errors=True)
        record.unlink()


class LiveMigrations:
    """The live tasks on an instance; each is called under the instance's lock."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws

    async def facts(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        return {"facts": dict(await _migrator(cp).live_facts(args.name))}

    async def receive(self, cp: AnyCheckpointer, args: LiveReceive, task_id: str) -> Mapping[str, Any]:
        """The destination's end: prepare, serve the tunnels until the controller says how
        the move ended, and keep the instance (it came here) or remove what was prepared.
        ``held`` in the result: it came here, but the move was not known to have finished on
        the source, so it is paused here until the controller decides where it goes on."""
        from plugins.checkpoint import tunnels

        migrator = _migrator(cp)
        async with (tunnels.Session(self.ws.require_context(), args.controller, args.migration) as session,
                    self._sockets(args.migration) as sockets):
            prepared = await migrator.live_prepare(args.name, args.instance, args.facts, sockets)
            try:
                ready = {"definition": prepared.definition, "channels": sorted(prepared.targets)}
                ended = await tunnels.destination_tunnels(session, ready, prepared)
                # Asked whatever the controller said: the hypervisors may have finished the move
                # while it went away or as the source's end failed. Only a move the source
                # finished is known to have left no copy there: otherwise this one is held.
                held = ended != "finished"
                if await migrator.live_arrived(args.name, held):
                    return {"arrived": True, "held": held}
            finally:
                await migrator.live_abandon(args.name)
        raise TaskError(f"{cp.kind} instance {args.name!r} did not arrive: the migration failed on the source or "
                        "was cut off; nothing of it is left here", code="migration-failed")

    async def send(self, cp: AnyCheckpointer, args: LiveSend, task_id: str) -> Mapping[str, Any]:
        """The source's end: the tunnels' sockets, and the kind's move through them."""
        import json

        from plugins.checkpoint import tunnels

        migrator = _migrator(cp)
        if args.on_no_converge not in ("stop-and-copy", "abort"):
            raise TaskError(f"payload.on_no_converge must be stop-and-copy or abort, got {args.on_no_converge!r:.40}",
                            code="bad-request")
        wrong = [c for c in args.channels if not isinstance(c, str) or not tunnels.CHANNEL_RE.match(c)]
        if wrong or not args.channels:
            # They name sockets here, and come from the destination.
            raise TaskError(f"payload.channels must be short lowercase names, got {args.channels!r:.80}",
                            code="bad-request")
        options = LiveOptions(args.max_downtime_ms, args.converge_timeout, args.on_no_converge)
        async with (tunnels.Session(self.ws.require_context(), args.controller, args.migration) as session,
                    self._sockets(args.migration) as sockets,
                    tunnels.source_tunnels(session, sockets, args.channels) as control):
            sending: set[asyncio.Task[None]] = set()

            def progress(figures: Mapping[str, Any]) -> None:
                task = asyncio.ensure_future(control.send_str(json.dumps({"progress": dict(figures)})))
                sending.add(task)
                task.add_done_callback(sending.discard)

            result = await migrator.live_migrate(args.name, args.definition, sockets, options, progress)
        return dict(result)

    def records(self) -> Path:
        """Where the socket directories this agent made are recorded."""
        return self.ws.require_context().state_dir / RECORDS

    @contextlib.asynccontextmanager
    async def _sockets(self, migration: str) -> AsyncIterator[Path]:
        """A new directory for one migration's sockets, root's alone until the kind shares
        it, recorded (see the module docstring) until it is removed as the task ends.
        ``migration`` is a checked id (:class:`.tunnels.Session` refuses others)."""
        root = self.ws.config.live_sockets
        record = self.records() / migration
        await asyncio.to_thread(record.parent.mkdir, 0o700, False, True)
        await asyncio.to_thread(record.touch)
        sockets = root / migration
        try:
            await asyncio.to_thread(root.mkdir, 0o755, True, True)
            await asyncio.to_thread(shutil.rmtree, sockets, True)
            await asyncio.to_thread(sockets.mkdir, 0o700)
            yield sockets
        finally:
            await asyncio.to_thread(shutil.rmtree, sockets, True)
            await asyncio.to_thread(record.unlink, missing_ok=True)


def _migrator(cp: AnyCheckpointer) -> LiveMigrator:
    if not isinstance(cp, LiveMigrator):
        raise TaskError(f"{cp.kind} instances cannot move live on this node", code="unsupported-kind")
    return cp
