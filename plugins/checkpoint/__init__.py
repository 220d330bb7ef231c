"""The ``checkpoint`` plugin: checkpoint, restore and migration of other plugins' instances.

It runs no instances of its own and knows no kind: a kind whose instances are process
trees CRIU can dump supplies an :class:`agent.sdk.Checkpointer` (``kumo_checkpointer``),
found here through ``context.hooks.checkpointers()``; a kind that saves its instances
itself (a VM) supplies an :class:`agent.sdk.NativeCheckpointer` instead. The fingerprint
lists the kinds it can checkpoint now (``attributes.instance_kinds``: CRIU's kinds only
while criu works), and the controller checkpoints and migrates only them. A CRIU kind's
checkpointer says which tree to dump and with what command, and takes the instance over
after a restore; a native one saves into, and restores from, the image directory it is
given. This plugin keeps the rest, the same for every kind:

- the pre-flight scan of the tree (:mod:`.preflight`), which refuses with the reason
  before anything changes;
- CRIU itself (:mod:`.criu`): probing it, running it, naming the error in its log;
- the image (:mod:`.image`): its directory, manifest and CRC-32 checksums (computed while
  criu writes, or after a native save), checked again before every restore, and pruning;
- the migration stream (:mod:`.stream` for its format, :mod:`.transfer` for the way
  through the controller), with the directory a kind's instances take along;
- the rollback of a restore into a directory that travelled: the kind's ``delete``
  operation, so a failed migration leaves no copy behind;
- the tunnels a live migration's hypervisors talk through (:mod:`.tunnels`).

This module is the plugin itself: its hooks, and which task runs where. The tasks are in
:mod:`.local` (checkpoints on this node), :mod:`.migration` (the two ends of a
stop-and-copy migration) and :mod:`.live` (live migration), around what they all share
(:mod:`.workspace`: the settings, criu's state, where images and logs are).

Tasks (each ``{"name", "kind", ...}``), one at a time per instance:

- ``checkpoint.preflight``: ``{"ok", "blockers": [{"code", "message"}]}``;
- ``checkpoint.dump`` (``leave_running``, default false; ``keep``, the instance's own
  retention, default ``plugins.checkpoint.keep``): ``{"checkpoint", "image", "manifest",
  "size_bytes", "images"}`` (``checkpoint``: its id; ``images``: the digests of cached
  images a native kind's restore needs); the checkpoints beyond ``keep`` go afterwards;
- ``checkpoint.restore`` (``checkpoint``, an id, default the latest; ``instance``, the
  controller's create payload of it, for a native kind): ``{"pid", "checkpoint", "image"}`` (``pid``
  None for a native kind: there is no process tree);
- ``checkpoint.list``: ``{"checkpoints": [{"id", "created_at", "size_bytes", "kind",
  "leave_running", "latest"}]}``, newest first; ``checkpoint.remove`` (``checkpoint``):
  ``{"removed", "latest"}``; ``checkpoint.prune`` (``keep``): keeps the latest and the newest
  others, ``keep`` in all, ``{"removed": [id], "checkpoints": [...]}``;
- ``checkpoint.holds`` (``images``): which of those images this node's cache holds, ``{"held"}``;
- ``checkpoint.send`` (``migration``, ``image``, ``skip_images``: the images the destination
  holds) and ``checkpoint.receive`` (``migration``, ``image_name``; ``instance``, the
  controller's create payload of it, for a kind whose instances take a directory along):
  the two ends of a migration's transfer, ``{"bytes", "sha256", ...}``; the images the
  destination lacks travel with the checkpoint and land in its image cache;
- ``checkpoint.discard``: removes every checkpoint of an instance that moved away;
- ``checkpoint.live_facts``, ``checkpoint.live_receive`` and ``checkpoint.live_send``: what
  the source tells the destination, and the two ends of a live migration (:mod:`.live`).

An instance's checkpoints and logs go with it when its kind deletes it
(``kumo_instance_deleted``). At start-up the plugin removes what its tasks left when the
agent was killed in their middle: half-received images and live migrations' sockets.

CRIU's logs of the last dump and restore of each instance go to
``<state_dir>/logs/<kind>/<name>/{dump,restore}.{log,out}``, outside the image, so a full
image disk cannot swallow the reason a dump failed.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from agent.sdk import (
    NAME_RE,
    ConfigError,
    DirectoryCheckpointer,
    Fingerprint,
    LiveMigrator,
    NativeCheckpointer,
    PluginContext,
    TaskError,
    hookimpl,
    parse_payload,
    parse_section,
)
from plugins.checkpoint import criu, image
from plugins.checkpoint.live import LiveMigrations, LiveReceive, LiveSend, discard_sockets
from plugins.checkpoint.local import Dump, LocalCheckpoints, Prune, Remove, Restore
from plugins.checkpoint.migration import Holds, MigrationTransfer, Receive, Send
from plugins.checkpoint.workspace import AnyCheckpointer, CheckpointConfig, Target, Workspace

log = logging.getLogger(__name__)

PROBE_TTL = 300.0  # seconds a probe of criu is trusted by the fingerprint

# A task: (the instance's checkpointer, the parsed payload, the task id) -> its result.
Handler = Callable[[AnyCheckpointer, Any, str], Awaitable[Mapping[str, Any]]]


class CheckpointPlugin:
    """Checkpoint, restore and migration for other plugins' instances; see the module docstring."""

    def __init__(self) -> None:
        self.workspace = Workspace()
        self.probed_at = 0.0
        self.local = LocalCheckpoints(self.workspace)
        self.migration = MigrationTransfer(self.workspace, self.local)
        self.live = LiveMigrations(self.workspace)
        self.tasks: dict[str, tuple[type[Target], Handler]] = {
            "checkpoint.preflight": (Target, self.local.preflight),
            "checkpoint.dump": (Dump, self.local.dump),
            "checkpoint.restore": (Restore, self.local.restore),
            "checkpoint.holds": (Holds, self.migration.holds),
            "checkpoint.send": (Send, self.migration.send),
            "checkpoint.receive": (Receive, self.migration.receive),
            "checkpoint.discard": (Target, self.migration.discard),
            "checkpoint.live_facts": (Target, self.live.facts),
            "checkpoint.live_receive": (LiveReceive, self.live.receive),
            "checkpoint.live_send": (LiveSend, self.live.send),
            "checkpoint.list": (Target, self.local.listing),
            "checkpoint.remove": (Remove, self.local.remove),
            "checkpoint.prune": (Prune, self.local.prune),
        }

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        config = parse_section(CheckpointConfig, section, source)
        if config.keep < 1:
            raise ConfigError(f"{source}.keep: expected an integer >= 1, got {config.keep}")
        self.workspace.config = config

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.workspace.context = context
        images = self.workspace.images_root()
        await asyncio.to_thread(images.mkdir, parents=True, exist_ok=True)
        # No task of the agent before this one can still be running: what they left goes.
        await asyncio.to_thread(image.discard_incoming, images)
        await asyncio.to_thread(discard_sockets, self.workspace.config.live_sockets, self.live.records())
        await self._probe()

    @hookimpl
    async def kumo_shutdown(self) -> None:
        await self.local.drain()

    @hookimpl
    async def kumo_fingerprint(self) -> Fingerprint:
        if time.monotonic() - self.probed_at > PROBE_TTL:
            await self._probe()
        st = self.workspace.status
        context = self.workspace.context
        checkpointers = context.hooks.checkpointers() if context is not None else {}
        native = sorted(kind for kind, cp in checkpointers.items() if isinstance(cp, NativeCheckpointer))
        # A kind that saves itself needs no criu: only CRIU's kinds wait for a working one.
        kinds = sorted(checkpointers) if st.usable else native
        # native_kinds: their restore takes the controller's payload of the instance;
        # directory_kinds: their checkpoint.receive does.
        # live_kinds: they also move while they run (checkpoint.live_*).
        directory = sorted(kind for kind, cp in checkpointers.items() if isinstance(cp, DirectoryCheckpointer))
        live_kinds = sorted(kind for kind, cp in checkpointers.items() if isinstance(cp, LiveMigrator))
        attributes: dict[str, Any] = {"criu": st.path, "criu_version": st.version, "instance_kinds": kinds,
                                      "native_kinds": native, "directory_kinds": directory, "live_kinds": live_kinds}
        if st.usable:
            attributes.update(
                check="ok",
                features=dict(st.features),
                pre_dump=st.features.get("mem_dirty_track", False),
                lazy_pages=st.features.get("uffd-noncoop", False),
            )
        elif native:
            attributes["criu_reason"] = st.reason
        available = st.usable or bool(native)
        return Fingerprint(available=available, reason="" if available else st.reason, attributes=attributes)

    @hookimpl
    async def kumo_instance_deleted(self, kind: str, name: str) -> None:
        # Called under the instance's lock, by the delete: nothing of it is left on this node.
        await self.local.remove_all(kind, name)
        await asyncio.to_thread(shutil.rmtree, self.workspace.logs_dir(kind, name), True)

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return list(self.tasks)

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        if kind not in self.tasks:
            raise TaskError(f"the checkpoint plugin has no task kind {kind!r}", code="bad-request")
        payload_type, handler = self.tasks[kind]
        args = parse_payload(payload_type, payload)
        if not NAME_RE.match(args.name):
            raise TaskError(f"payload.name must be an instance name, got {args.name!r}", code="bad-request")
        if isinstance(args, Dump | Prune) and args.keep is not None and args.keep < 1:
            raise TaskError(f"payload.keep must be an integer >= 1 (the checkpoints kept), got {args.keep}",
                            code="bad-request")
        checkpointer = self._checkpointer(args.kind)
        # The instance's own lock, which its <kind>.* tasks take too: no start or delete
        # runs while its checkpoint is dumped or restored.
        async with self.workspace.require_context().hooks.instance_lock(args.kind, args.name):
            return await handler(checkpointer, args, task_id)

    def _checkpointer(self, kind: str) -> AnyCheckpointer:
        checkpointers = self.workspace.require_context().hooks.checkpointers()
        if kind not in checkpointers:
            able = ", ".join(sorted(checkpointers)) or "none"
            raise TaskError(f"{kind!r} instances cannot be checkpointed on this node (it checkpoints: {able})",
                            code="unsupported-kind")
        return checkpointers[kind]

    async def _probe(self) -> None:
        self.workspace.status = await criu.probe_criu(self.workspace.config.criu)
        self.probed_at = time.monotonic()
        if not self.workspace.status.usable:
            log.warning("checkpoint: %s", self.workspace.status.reason)
