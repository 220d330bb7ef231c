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
  operation, so a failed migration leaves no copy behind.

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
  holds) and ``checkpoint.receive`` (``migration``, ``image_name``): the two ends of a
  migration's transfer, ``{"bytes", "sha256", ...}``; the images the destination lacks
  travel with the checkpoint and land in its image cache;
- ``checkpoint.discard``: removes every checkpoint of an instance that moved away.

An instance's checkpoints and logs go with it when its kind deletes it
(``kumo_instance_deleted``).

CRIU's logs of the last dump and restore of each instance go to
``<state_dir>/logs/<kind>/<name>/{dump,restore}.{log,out}``, outside the image, so a full
image disk cannot swallow the reason a dump failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import (
    CHECKPOINT_ID_RE,
    NAME_RE,
    Checkpointer,
    CheckpointSubject,
    ConfigError,
    CriuCommand,
    DirectoryCheckpointer,
    Fingerprint,
    LiveMigrator,
    LiveOptions,
    NativeCheckpointer,
    PluginContext,
    TaskError,
    hookimpl,
    parse_payload,
    parse_section,
    start_time,
    valid_sha256,
)
from plugins.checkpoint import criu, image

# pids, preflight, stream (with tarfile) and transfer are imported by the tasks that use
# them: an idle agent, which never checkpoints, does not hold them (~0.4 MB resident).
if TYPE_CHECKING:
    from plugins.checkpoint import stream
    from plugins.checkpoint.preflight import Blocker, Scan

log = logging.getLogger(__name__)

PROBE_TTL = 300.0  # seconds a probe of criu is trusted by the fingerprint
STOP_WAIT = 5.0  # seconds a dumped instance's kind may take to see it stopped


@dataclasses.dataclass
class CheckpointConfig:
    """``plugins.checkpoint`` settings."""

    criu: str = "criu"  # a path, or a name looked up in PATH
    images_dir: Path | None = None  # default: <state_dir>/images
    keep: int = 2  # complete checkpoints kept per instance; older ones are removed
    timeout: float = 600.0  # seconds one criu dump or restore may take
    # Where a live migration's sockets are (one directory per migration): the same path on
    # every node, since a hypervisor may give both ends one path.
    live_sockets: Path = Path("/run/kumo/migrations")


@dataclasses.dataclass
class Target:
    """Every task's payload: the instance."""

    name: str
    kind: str


@dataclasses.dataclass
class Dump(Target):
    leave_running: bool = False
    keep: int | None = None  # the instance's retention; default: the plugin's


@dataclasses.dataclass
class Restore(Target):
    checkpoint: str | None = None  # an id; default: the latest
    # The instance's create payload as the controller keeps it, for a native kind's restore.
    instance: dict[str, Any] | None = None


@dataclasses.dataclass
class Remove(Target):
    checkpoint: str


@dataclasses.dataclass
class Prune(Target):
    keep: int


@dataclasses.dataclass
class Holds(Target):
    images: list[str]


@dataclasses.dataclass
class Send(Target):
    migration: str
    image: str
    skip_images: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class Receive(Target):
    migration: str
    image_name: str


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


# What a kind supplies: for CRIU, or its own save and restore.
AnyCheckpointer = Checkpointer | NativeCheckpointer
# A task: (the instance's checkpointer, the parsed payload, the task id) -> its result.
Handler = Callable[[AnyCheckpointer, Any, str], Awaitable[Mapping[str, Any]]]


class CheckpointPlugin:
    """CRIU checkpoint/restore for other plugins' instances; see the module docstring."""

    def __init__(self) -> None:
        self.config = CheckpointConfig()
        self.context: PluginContext | None = None
        self.status = criu.CriuStatus(False, "not started")
        self.probed_at = 0.0
        self.pruning: set[asyncio.Task] = set()
        self.tasks: dict[str, tuple[type[Target], Handler]] = {
            "checkpoint.preflight": (Target, self._preflight),
            "checkpoint.dump": (Dump, self._dump),
            "checkpoint.restore": (Restore, self._restore),
            "checkpoint.holds": (Holds, self._holds),
            "checkpoint.send": (Send, self._send),
            "checkpoint.receive": (Receive, self._receive),
            "checkpoint.discard": (Target, self._discard),
            "checkpoint.live_facts": (Target, self._live_facts),
            "checkpoint.live_receive": (LiveReceive, self._live_receive),
            "checkpoint.live_send": (LiveSend, self._live_send),
            "checkpoint.list": (Target, self._list),
            "checkpoint.remove": (Remove, self._remove),
            "checkpoint.prune": (Prune, self._prune_to),
        }

    # -- hooks ------------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        config = parse_section(CheckpointConfig, section, source)
        if config.keep < 1:
            raise ConfigError(f"{source}.keep: expected an integer >= 1, got {config.keep}")
        self.config = config

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        await asyncio.to_thread(self._images_root().mkdir, parents=True, exist_ok=True)
        await asyncio.to_thread(image.discard_incoming, self._images_root())
        await self._probe()

    @hookimpl
    async def kumo_shutdown(self) -> None:
        if self.pruning:
            await asyncio.wait(self.pruning)

    @hookimpl
    async def kumo_fingerprint(self) -> Fingerprint:
        if time.monotonic() - self.probed_at > PROBE_TTL:
            await self._probe()
        st = self.status
        checkpointers = self.context.hooks.checkpointers() if self.context is not None else {}
        native = sorted(kind for kind, cp in checkpointers.items() if isinstance(cp, NativeCheckpointer))
        # A kind that saves itself needs no criu: only CRIU's kinds wait for a working one.
        kinds = sorted(checkpointers) if st.usable else native
        # native_kinds: their restore takes the controller's payload of the instance.
        # live_kinds: they also move while they run (checkpoint.live_*).
        live = sorted(kind for kind, cp in checkpointers.items() if isinstance(cp, LiveMigrator))
        attributes: dict[str, Any] = {"criu": st.path, "criu_version": st.version, "instance_kinds": kinds,
                                      "native_kinds": native, "live_kinds": live}
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
        await self._remove_all(kind, name)
        await asyncio.to_thread(shutil.rmtree, self._require_context().state_dir / "logs" / kind / name, True)

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
        async with self._require_context().hooks.instance_lock(args.kind, args.name):
            return await handler(checkpointer, args, task_id)

    # -- pre-flight and dump ----------------------------------------------------------

    async def _preflight(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        blockers, _, _ = await self._check(cp, args.name)
        return {"ok": not blockers, "blockers": blockers}

    async def _check(self, cp: AnyCheckpointer, name: str) -> tuple[list[Blocker], CheckpointSubject | None,
                                                                    Scan | None]:
        """What blocks a dump of ``name`` now; the instance, and its tree when it runs."""
        from plugins.checkpoint import preflight

        if isinstance(cp, NativeCheckpointer):
            native = await cp.subject(name)
            if native is None:
                return [{"code": "not-found", "message": "no such instance on this node"}], None, None
            return [{"code": b.code, "message": b.message} for b in await cp.blockers(name)], native, None
        blockers: list[Blocker] = []
        if not self.status.usable:
            blockers.append({"code": "criu-unavailable", "message": self.status.reason})
        subject = await cp.subject(name)
        if subject is None:
            blockers.append({"code": "not-found", "message": "no such instance on this node"})
            return blockers, None, None
        if subject.pid is None:
            blockers.append({"code": "not-running", "message": f"{cp.kind} instance {name!r} is {subject.state}: "
                             "only a running instance can be checkpointed"})
            return blockers, subject, None
        found = await asyncio.to_thread(preflight.scan, subject.pid)
        return blockers + found.blockers, subject, found

    async def _dump(self, cp: AnyCheckpointer, args: Dump, task_id: str) -> Mapping[str, Any]:
        from plugins.checkpoint import pids

        blockers, subject, found = await self._check(cp, args.name)
        if subject is None:
            raise TaskError(f"no {cp.kind} instance named {args.name!r} on this node", code="not-found")
        if blockers:
            raise TaskError(f"{cp.kind} instance {args.name!r} cannot be checkpointed: "
                            + "; ".join(b["message"] for b in blockers),
                            code=blockers[0]["code"], details={"blockers": blockers})
        if isinstance(cp, NativeCheckpointer):
            return await self._save(cp, subject, args.leave_running, args.keep)
        assert found is not None and subject.pid is not None and self.status.path is not None
        base = self._images_root() / cp.kind / args.name
        logs = await self._logs(cp.kind, args.name)
        made = await asyncio.to_thread(image.new_image, base)
        command = await cp.dump_command(subject, self.status.path, made, logs, args.leave_running)
        hasher = image.TailHasher(made)
        hasher.start()
        try:
            rc = await criu.run(command, logs / "dump.out", self.config.timeout)
        except BaseException:
            await asyncio.to_thread(hasher.stop)
            await asyncio.to_thread(shutil.rmtree, made, True)
            raise
        if rc != 0:
            await asyncio.to_thread(hasher.stop)
            raise await self._dump_failed(cp.kind, subject.name, subject.pid, command, made, logs)
        manifest = self._manifest(cp.kind, subject, found, args.leave_running)
        files, size = await asyncio.to_thread(image.finish_manifest, made, hasher, manifest)
        if not args.leave_running:
            await self._until_stopped(cp, args.name)
            await pids.reap(found.pids[1:])
        self._publish(cp.kind, args.name, base, made, args.keep)
        log.info("checkpoint: %s %s dumped to %s (%d bytes)", cp.kind, args.name, made, size)
        return {"checkpoint": made.name, "image": str(made), "manifest": files, "size_bytes": size}

    async def _save(self, cp: NativeCheckpointer, subject: CheckpointSubject, leave_running: bool,
                    keep: int | None) -> Mapping[str, Any]:
        """A dump by the kind's own mechanism: it writes the image's files, this plugin the rest."""
        base = self._images_root() / cp.kind / subject.name
        made = await asyncio.to_thread(image.new_image, base)
        try:
            saved = await cp.save(subject.name, made, leave_running)
            images = sorted({valid_sha256(digest) for digest in saved.images})
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, made, True)
            raise
        manifest = self._manifest(cp.kind, dataclasses.replace(subject, record=saved.record), None, leave_running)
        manifest["images"] = images
        files, size = await asyncio.to_thread(image.finish_manifest, made, None, manifest)
        self._publish(cp.kind, subject.name, base, made, keep)
        log.info("checkpoint: %s %s saved to %s (%d bytes)", cp.kind, subject.name, made, size)
        return {"checkpoint": made.name, "image": str(made), "manifest": files, "size_bytes": size, "images": images}

    def _publish(self, kind: str, name: str, base: Path, made: Path, keep: int | None) -> None:
        image.publish(base, made)  # one symlink and a rename: not worth a thread
        # Old checkpoints go in the background (deleting gigabytes is no part of this dump),
        # under the instance's lock so that no restore reads a checkpoint being deleted.
        prune = asyncio.create_task(self._prune(kind, name, base, keep or self.config.keep))
        self.pruning.add(prune)
        prune.add_done_callback(self.pruning.discard)

    def _manifest(self, kind: str, subject: CheckpointSubject, found: Scan | None,
                  leave_running: bool) -> dict[str, Any]:
        """The manifest of a dump; ``found`` None for a native save (no tree, no criu)."""
        assert self.context is not None
        return {
            "format": image.MANIFEST_FORMAT,
            "name": subject.name,
            "kind": kind,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": platform.release(),
            "criu_version": self.status.version if found is not None else None,
            "leave_running": leave_running,
            "pid": subject.pid,
            "pids": found.pids if found is not None else [],
            "shared_namespaces": sorted(found.shared) if found is not None else [],
            "instance": dict(subject.record),
            "definition": subject.definition,
            "state_dir": str(self.context.agent_state_dir),
            "open_files": found.open_files if found is not None else [],
        }

    async def _dump_failed(self, kind: str, name: str, pid: int, command: CriuCommand, made: Path,
                           logs: Path) -> TaskError:
        """The error of a failed dump, whose image is removed (its log kept among ``logs``)."""
        alive = start_time(pid) is not None
        criu_log = command.log
        if criu_log.is_relative_to(made):  # the tool logs into the image: keep it
            criu_log = logs / "dump.log"
            await asyncio.to_thread(_copy_if_there, command.log, criu_log)
        reason = await asyncio.to_thread(criu.criu_error, criu_log, logs / "dump.out")
        await asyncio.to_thread(shutil.rmtree, made, True)
        tool = Path(command.argv[0]).name
        return TaskError(f"{tool} dump of {kind} instance {name!r} failed: {reason}; "
                         + ("the instance is still running" if alive else "the instance is no longer running")
                         + f" (logs: {logs}/dump.*)", code="dump-failed")

    async def _until_stopped(self, cp: Checkpointer, name: str) -> None:
        # criu has ended the instance; wait until its kind has seen that too, so a restore
        # sent right after this dump does not find it "running".
        deadline = time.monotonic() + STOP_WAIT
        while time.monotonic() < deadline:
            current = await cp.subject(name)
            if current is None or current.state != "running":
                return
            await asyncio.sleep(0.01)
        log.warning("checkpoint: %s %s still reported running %.0f s after its dump", cp.kind, name, STOP_WAIT)

    async def _prune(self, kind: str, name: str, base: Path, keep: int) -> None:
        async with self._require_context().hooks.instance_lock(kind, name):
            await asyncio.to_thread(image.prune, base, keep)

    # -- restore ----------------------------------------------------------------------

    async def _restore(self, cp: AnyCheckpointer, args: Restore, task_id: str) -> Mapping[str, Any]:
        if not isinstance(cp, NativeCheckpointer):
            self._require_criu()
        chosen = await self._image_to_restore(cp.kind, args)
        manifest = await asyncio.to_thread(image.verify_image, chosen, args.name, cp.kind)
        current = await cp.subject(args.name)
        if current is not None and current.state == "running":
            raise TaskError(f"{cp.kind} instance {args.name!r} is running: stop it before restoring a checkpoint",
                            code="already-running")
        if isinstance(cp, NativeCheckpointer):
            await cp.restore(args.name, manifest["instance"], chosen, args.instance)
            log.info("checkpoint: %s %s restored from %s", cp.kind, args.name, chosen)
            return {"pid": None, "checkpoint": chosen.name, "image": str(chosen)}
        staged = await asyncio.to_thread(image.staged_directory, chosen) if current is None else None
        if staged is None:
            pid = await self._restore_image(cp, chosen, manifest)
        else:
            pid = await self._restore_staged(cp, chosen, manifest, staged, task_id)
        log.info("checkpoint: %s %s restored from %s as pid %d", cp.kind, args.name, chosen, pid)
        return {"pid": pid, "checkpoint": chosen.name, "image": str(chosen)}

    async def _image_to_restore(self, kind: str, args: Restore) -> Path:
        base = self._images_root() / kind / args.name
        if args.checkpoint is None:
            latest = base / "latest"
            if not await asyncio.to_thread(latest.is_symlink):
                raise TaskError(f"no checkpoint of {kind} instance {args.name!r} on this node: dump one first",
                                code="no-image")
            return await asyncio.to_thread(latest.resolve)
        chosen = image.checkpoint_path(base, args.checkpoint)
        if not await asyncio.to_thread(chosen.is_dir):
            raise TaskError(f"no checkpoint {args.checkpoint} of {kind} instance {args.name!r} on this node "
                            "(see checkpoint.list)", code="no-image")
        return chosen

    async def _restore_staged(self, cp: Checkpointer, chosen: Path, manifest: Mapping[str, Any], staged: Path,
                              task_id: str) -> int:
        """Restore an instance that migrated here with its directory: the kind takes the
        directory over first, and deletes the instance again if CRIU fails."""
        assert self.context is not None
        name = manifest["name"]
        if not isinstance(cp, DirectoryCheckpointer):
            raise TaskError(f"{cp.kind} instances take no directory along on this node", code="unsupported-kind")
        try:
            await cp.take_over(name, manifest["instance"], staged)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, staged, True)
            raise
        finally:
            await asyncio.to_thread((chosen / image.STAGED).unlink, missing_ok=True)
        try:
            return await self._restore_image(cp, chosen, manifest)
        except BaseException:
            try:
                await self.context.hooks.handle_task(f"{cp.kind}.delete", {"name": name}, f"{task_id}:undo-take-over")
            except Exception:
                log.exception("checkpoint: could not delete %s %s after its failed restore", cp.kind, name)
            raise

    async def _restore_image(self, cp: Checkpointer, chosen: Path, manifest: Mapping[str, Any]) -> int:
        from plugins.checkpoint import pids, stream

        assert self.context is not None and self.status.path is not None
        name, shared = manifest["name"], set(manifest["shared_namespaces"])
        files = {path: stream.local_path(path, manifest, self.context.agent_state_dir)
                 for path in manifest["open_files"]}
        missing = [str(local) for local in files.values() if not await asyncio.to_thread(local.exists)]
        if missing:
            raise TaskError(f"{cp.kind} instance {name!r} had files open that are missing on this node: "
                            f"{', '.join(missing)}; put them back at the same paths (a migration must carry them) "
                            "and retry", code="missing-files")
        if "pid" in shared:
            for pid in manifest["pids"]:
                await pids.wait_free(pid)
        logs = await self._logs(cp.kind, name)
        # A file of the source agent's state (the console log its kind opened for appending)
        # is this agent's copy now: CRIU hands the tree our descriptor for it.
        moved = {path: local for path, local in files.items() if local != Path(path)}
        inherited = await asyncio.to_thread(_open_for_append, moved)
        try:
            command = await cp.restore_command(name, manifest["instance"], self.status.path, chosen, logs, inherited)
            await asyncio.to_thread(command.log.unlink, missing_ok=True)  # no stale reason from an older run
            rc = await criu.run(command, logs / "restore.out", self.config.timeout, tuple(inherited))
        finally:
            for fd in inherited:
                os.close(fd)
        if rc != 0:
            reason = await asyncio.to_thread(criu.criu_error, command.log, logs / "restore.out")
            raise TaskError(f"{Path(command.argv[0]).name} restore of {cp.kind} instance {name!r} failed: {reason}; "
                            f"the instance is left stopped (logs: {command.log}, {logs / 'restore.out'})",
                            code="restore-failed")
        return await cp.restored(name, manifest["instance"], chosen)

    # -- migration --------------------------------------------------------------------

    async def _send(self, cp: AnyCheckpointer, args: Send, task_id: str) -> Mapping[str, Any]:
        from plugins.checkpoint import stream, transfer

        assert self.context is not None
        base = self._images_root() / cp.kind / args.name
        chosen = Path(args.image)
        if chosen.parent != base:
            raise TaskError(f"payload.image must be a checkpoint directory under {base}, got {args.image!r}",
                            code="bad-request")
        manifest = await asyncio.to_thread(image.verify_image, chosen, args.name, cp.kind)
        members = await asyncio.to_thread(stream.image_members, chosen, manifest)
        if manifest["definition"]:
            directory = await self._travelling_directory(cp, args.name)
            carried = await asyncio.to_thread(stream.directory_members, directory, manifest["definition"])
            # The definition right after the manifest: a destination that cannot run the
            # instance refuses before a single memory page is sent.
            members = members[:1] + carried[:1] + members[1:] + carried[1:]
        travelling = [digest for digest in manifest.get("images") or () if digest not in args.skip_images]
        members += await asyncio.to_thread(stream.cache_members, self.context.images.directory, travelling)
        result = await transfer.send(self.context, args.migration, members)
        log.info("checkpoint: sent %s %s (%d bytes) for migration %s", cp.kind, args.name, result["bytes"],
                 args.migration)
        return result

    async def _travelling_directory(self, cp: AnyCheckpointer, name: str) -> Path:
        subject = await cp.subject(name)
        if subject is None or subject.directory is None:
            raise TaskError(f"{cp.kind} instance {name!r} is no longer on this node: its directory cannot travel",
                            code="not-found")
        if subject.state == "running":
            raise TaskError(f"{cp.kind} instance {name!r} is running: its directory would change while it is sent; "
                            "migrate it (the dump stops it) rather than send a checkpoint of it running",
                            code="already-running")
        return subject.directory

    async def _receive(self, cp: AnyCheckpointer, args: Receive, task_id: str) -> Mapping[str, Any]:
        from plugins.checkpoint import stream, transfer

        assert self.context is not None
        if not CHECKPOINT_ID_RE.match(args.image_name):
            raise TaskError(f"payload.image_name must be a checkpoint id, got {args.image_name!r:.80}",
                            code="bad-request")
        base = self._images_root() / cp.kind / args.name
        final = base / args.image_name
        if await asyncio.to_thread(final.exists):
            raise TaskError(f"checkpoint {final} already exists on this node", code="exists")
        incoming = base / f".incoming-{args.image_name}"
        await asyncio.to_thread(shutil.rmtree, incoming, True)
        await asyncio.to_thread(incoming.mkdir, parents=True)
        staged: list[Path] = []
        placed: list[Path] = []  # the instance's open files written into the agent's state
        stage, own = self._stager(cp, args.name, incoming, staged), self.context.agent_state_dir
        try:
            got = await transfer.receive(self.context, args.migration,
                                         lambda body: stream.unpack(body, incoming, own, stage, args.name, placed),
                                         incoming)
            manifest = await asyncio.to_thread(image.check_received, incoming, args.name, cp.kind, got["checksums"])
            if manifest["definition"] and not staged:
                raise TaskError(f"the image stream carried no instance/{manifest['definition']}: the source sent "
                                "no directory", code="image-corrupt")
            if staged:
                await asyncio.to_thread(image.write_json, incoming / image.STAGED, {"directory": str(staged[0])})
            for digest in got["images"]:  # checked as they arrived: now the cache's
                arrived = incoming / f"{stream.CACHED}{digest}"
                await self.context.images.get(str(arrived), digest)
                await asyncio.to_thread(arrived.unlink)
            await asyncio.to_thread(os.rename, incoming, final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            for directory in staged:
                await asyncio.to_thread(shutil.rmtree, directory, True)
            for path in placed:
                await asyncio.to_thread(path.unlink, True)
            raise
        await asyncio.to_thread(image.publish, base, final)
        log.info("checkpoint: received %s %s (%d bytes) into %s", cp.kind, args.name, got["bytes"], final)
        return {"image": str(final), "bytes": got["bytes"], "sha256": got["sha256"], "files": got["files"],
                "images": got["images"]}

    def _stager(self, cp: AnyCheckpointer, name: str, incoming: Path, staged: list[Path]) -> stream.Stage:
        """What the unpacking thread calls when a travelling directory's definition arrives:
        the kind checks it (on the event loop) and gives the directory to unpack into."""
        loop = asyncio.get_running_loop()

        def stage(definition: str, data: bytes) -> Path:
            manifest = image.read_manifest(incoming)  # the stream's first member
            if manifest.get("definition") != definition:
                raise TaskError(f"the image stream carries instance/{definition}, which its manifest does not name",
                                code="image-corrupt")
            if not isinstance(cp, DirectoryCheckpointer):
                raise TaskError(f"{cp.kind} instances take no directory along on this node", code="unsupported-kind")
            given = asyncio.run_coroutine_threadsafe(cp.stage(name, manifest["instance"], data), loop).result()
            staged.append(given.path)
            return given

        return stage

    async def _holds(self, cp: AnyCheckpointer, args: Holds, task_id: str) -> Mapping[str, Any]:
        """Which of ``args.images`` this node's image cache holds: a migration sends only the others."""
        wanted = {valid_sha256(digest) for digest in args.images}
        held = await asyncio.to_thread(self._require_context().images.held)
        return {"held": sorted(wanted & {entry["sha256"] for entry in held})}

    async def _discard(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        """Remove every checkpoint of an instance that has moved away (its images would go
        stale), or that arrived here for a migration rolled back, with the directories that
        arrived with them and were never taken over."""
        base, staged = await self._remove_all(cp.kind, args.name)
        return {"removed": str(base), "staged": [str(d) for d in staged]}

    async def _remove_all(self, kind: str, name: str) -> tuple[Path, list[Path]]:
        """Remove every checkpoint of an instance and the directories staged with them."""
        base = self._images_root() / kind / name
        staged = await asyncio.to_thread(image.staged_directories, base)
        for directory in staged:
            await asyncio.to_thread(shutil.rmtree, directory, True)
        await asyncio.to_thread(shutil.rmtree, base, True)
        return base, staged

    # -- live migration (plugins/checkpoint/live.py) --------------------------------------

    async def _live_facts(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        return {"facts": dict(await self._live(cp).live_facts(args.name))}

    async def _live_receive(self, cp: AnyCheckpointer, args: LiveReceive, task_id: str) -> Mapping[str, Any]:
        """The destination's end: prepare, serve the tunnels until the controller says how
        the move ended, and keep the instance (it runs here) or remove what was prepared."""
        from plugins.checkpoint import live

        migrator = self._live(cp)
        async with live.Session(self._require_context(), args.controller, args.migration) as session:
            sockets = await self._live_sockets(args.migration)
            try:
                prepared = await migrator.live_prepare(args.name, args.instance, args.facts, sockets)
                try:
                    ready = {"definition": prepared.definition, "channels": sorted(prepared.targets)}
                    await live.destination_tunnels(session, ready, prepared)
                    # Asked whatever the controller said: one that died after libvirt finished the
                    # move never says "finished", and the VM runs here all the same.
                    if await migrator.live_arrived(args.name):
                        return {"arrived": True}
                finally:
                    await migrator.live_abandon(args.name)
            finally:
                await asyncio.to_thread(shutil.rmtree, sockets, True)
        raise TaskError(f"{cp.kind} instance {args.name!r} did not arrive: the migration failed on the source or "
                        "was cut off; nothing of it is left here", code="migration-failed")

    async def _live_send(self, cp: AnyCheckpointer, args: LiveSend, task_id: str) -> Mapping[str, Any]:
        """The source's end: the tunnels' sockets, and the kind's move through them."""
        import json

        from plugins.checkpoint import live

        migrator = self._live(cp)
        if args.on_no_converge not in ("stop-and-copy", "abort"):
            raise TaskError(f"payload.on_no_converge must be stop-and-copy or abort, got {args.on_no_converge!r:.40}",
                            code="bad-request")
        wrong = [c for c in args.channels if not isinstance(c, str) or not live.CHANNEL_RE.match(c)]
        if wrong or not args.channels:
            # They name sockets here, and come from the destination.
            raise TaskError(f"payload.channels must be short lowercase names, got {args.channels!r:.80}",
                            code="bad-request")
        options = LiveOptions(args.max_downtime_ms, args.converge_timeout, args.on_no_converge)
        async with live.Session(self._require_context(), args.controller, args.migration) as session:
            sockets = await self._live_sockets(args.migration)
            try:
                async with live.source_tunnels(session, sockets, args.channels) as control:
                    sending: set[asyncio.Task[None]] = set()

                    def progress(figures: Mapping[str, Any]) -> None:
                        task = asyncio.ensure_future(control.send_str(json.dumps({"progress": dict(figures)})))
                        sending.add(task)
                        task.add_done_callback(sending.discard)

                    result = await migrator.live_migrate(args.name, args.definition, sockets, options, progress)
            finally:
                await asyncio.to_thread(shutil.rmtree, sockets, True)
        return dict(result)

    def _live(self, cp: AnyCheckpointer) -> LiveMigrator:
        if not isinstance(cp, LiveMigrator):
            raise TaskError(f"{cp.kind} instances cannot move live on this node", code="unsupported-kind")
        return cp

    async def _live_sockets(self, migration: str) -> Path:
        """A new directory for one migration's sockets, root's alone until the kind shares it."""
        root = self.config.live_sockets
        await asyncio.to_thread(root.mkdir, 0o755, True, True)
        sockets = root / migration
        await asyncio.to_thread(shutil.rmtree, sockets, True)
        await asyncio.to_thread(sockets.mkdir, 0o700)
        return sockets

    # -- listing, removing, pruning ------------------------------------------------------

    async def _list(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        return {"checkpoints": await asyncio.to_thread(image.listing, self._images_root() / cp.kind / args.name)}

    async def _remove(self, cp: AnyCheckpointer, args: Remove, task_id: str) -> Mapping[str, Any]:
        latest = await asyncio.to_thread(image.remove, self._images_root() / cp.kind / args.name, args.checkpoint)
        log.info("checkpoint: removed %s of %s %s", args.checkpoint, cp.kind, args.name)
        return {"removed": args.checkpoint, "latest": latest}

    async def _prune_to(self, cp: AnyCheckpointer, args: Prune, task_id: str) -> Mapping[str, Any]:
        base = self._images_root() / cp.kind / args.name
        removed = await asyncio.to_thread(image.prune, base, args.keep)
        return {"removed": removed, "checkpoints": await asyncio.to_thread(image.listing, base)}

    # -- helpers ----------------------------------------------------------------------

    def _checkpointer(self, kind: str) -> AnyCheckpointer:
        assert self.context is not None, "kumo_startup was not called"
        checkpointers = self.context.hooks.checkpointers()
        if kind not in checkpointers:
            able = ", ".join(sorted(checkpointers)) or "none"
            raise TaskError(f"{kind!r} instances cannot be checkpointed on this node (it checkpoints: {able})",
                            code="unsupported-kind")
        return checkpointers[kind]

    async def _probe(self) -> None:
        self.status = await criu.probe_criu(self.config.criu)
        self.probed_at = time.monotonic()
        if not self.status.usable:
            log.warning("checkpoint: %s", self.status.reason)

    def _require_criu(self) -> None:
        if not self.status.usable:
            raise TaskError(self.status.reason, code="criu-unavailable")

    def _require_context(self) -> PluginContext:
        assert self.context is not None, "kumo_startup was not called"
        return self.context

    def _images_root(self) -> Path:
        assert self.context is not None, "kumo_startup was not called"
        return self.config.images_dir or self.context.state_dir / "images"

    async def _logs(self, kind: str, name: str) -> Path:
        """The directory for the logs of one instance's last dump and restore (created)."""
        assert self.context is not None
        path = self.context.state_dir / "logs" / kind / name
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return path


def _open_for_append(files: Mapping[str, Path]) -> dict[int, str]:
    """Open each local file for appending: descriptor -> the original path as CRIU names it."""
    fds: dict[int, str] = {}
    try:
        for path, local in files.items():
            fds[os.open(local, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)] = path.lstrip("/")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return fds


def _copy_if_there(source: Path, target: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(source, target)
