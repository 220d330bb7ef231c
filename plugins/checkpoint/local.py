"""Checkpoints kept on this node: the pre-flight, dump (by CRIU or by the kind itself),
restore, listing, removal and pruning of an instance's checkpoints.

What a migration adds (sending and receiving checkpoints, live moves) is in
:mod:`.migration` and :mod:`.live`; the image's files are :mod:`.image`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import platform
import re
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import (
    Checkpointer,
    CheckpointSubject,
    CriuCommand,
    DirectoryCheckpointer,
    NativeCheckpointer,
    TaskError,
    start_time,
    valid_sha256,
)
from plugins.checkpoint import criu, image
from plugins.checkpoint.workspace import AnyCheckpointer, Target, Workspace

# pids, preflight and stream are imported by the tasks that use them: an idle agent,
# which never checkpoints, does not hold them.
if TYPE_CHECKING:
    from plugins.checkpoint.preflight import Blocker, Scan

log = logging.getLogger(__name__)

STOP_WAIT = 5.0  # seconds a dumped instance's kind may take to see it stopped


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


class LocalCheckpoints:
    """The tasks on an instance's checkpoints here; each is called under the instance's lock."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.pruning: set[asyncio.Task] = set()

    async def drain(self) -> None:
        """Wait for the background pruning of older checkpoints (at shutdown)."""
        if self.pruning:
            await asyncio.wait(self.pruning)

    # -- pre-flight and dump ----------------------------------------------------------

    async def preflight(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
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
        if not self.ws.status.usable:
            blockers.append({"code": "criu-unavailable", "message": self.ws.status.reason})
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

    async def dump(self, cp: AnyCheckpointer, args: Dump, task_id: str) -> Mapping[str, Any]:
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
        assert found is not None and subject.pid is not None and self.ws.status.path is not None
        base = self.ws.images(cp.kind, args.name)
        logs = await self.ws.logs(cp.kind, args.name)
        made = await asyncio.to_thread(image.new_image, base)
        command = await cp.dump_command(subject, self.ws.status.path, made, logs, args.leave_running)
        hasher = image.TailHasher(made)
        hasher.start()
        try:
            rc = await criu.run(command, logs / "dump.out", self.ws.config.timeout)
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
        base = self.ws.images(cp.kind, subject.name)
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
        prune = asyncio.create_task(self._prune(kind, name, base, keep or self.ws.config.keep))
        self.pruning.add(prune)
        prune.add_done_callback(self.pruning.discard)

    def _manifest(self, kind: str, subject: CheckpointSubject, found: Scan | None,
                  leave_running: bool) -> dict[str, Any]:
        """The manifest of a dump; ``found`` None for a native save (no tree, no criu)."""
        assert self.ws.context is not None
        return {
            "format": image.MANIFEST_FORMAT,
            "name": subject.name,
            "kind": kind,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": platform.release(),
            "criu_version": self.ws.status.version if found is not None else None,
            "leave_running": leave_running,
            "pid": subject.pid,
            "pids": found.pids if found is not None else [],
            "shared_namespaces": sorted(found.shared) if found is not None else [],
            "instance": dict(subject.record),
            "definition": subject.definition,
            "state_dir": str(self.ws.context.agent_state_dir),
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
        async with self.ws.require_context().hooks.instance_lock(kind, name):
            await asyncio.to_thread(image.prune, base, keep)

    # -- restore ----------------------------------------------------------------------

    async def restore(self, cp: AnyCheckpointer, args: Restore, task_id: str) -> Mapping[str, Any]:
        if not isinstance(cp, NativeCheckpointer):
            self.ws.require_criu()
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
        base = self.ws.images(kind, args.name)
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
        assert self.ws.context is not None
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
                await self.ws.context.hooks.handle_task(f"{cp.kind}.delete", {"name": name}, f"{task_id}:undo-take-over")
            except Exception:
                log.exception("checkpoint: could not delete %s %s after its failed restore", cp.kind, name)
            raise

    async def _restore_image(self, cp: Checkpointer, chosen: Path, manifest: Mapping[str, Any]) -> int:
        from plugins.checkpoint import pids, stream

        assert self.ws.context is not None and self.ws.status.path is not None
        name, shared = manifest["name"], set(manifest["shared_namespaces"])
        files = {path: stream.local_path(path, manifest, self.ws.context.agent_state_dir)
                 for path in manifest["open_files"]}
        missing = [str(local) for local in files.values() if not await asyncio.to_thread(local.exists)]
        if missing:
            raise TaskError(f"{cp.kind} instance {name!r} had files open that are missing on this node: "
                            f"{', '.join(missing)}; put them back at the same paths (a migration must carry them) "
                            "and retry", code="missing-files")
        if "pid" in shared:
            for pid in manifest["pids"]:
                await pids.wait_free(pid)
        logs = await self.ws.logs(cp.kind, name)
        # A file of the source agent's state (the console log its kind opened for appending)
        # is this agent's copy now: CRIU hands the tree our descriptor for it.
        moved = {path: local for path, local in files.items() if local != Path(path)}
        inherited = await asyncio.to_thread(_open_for_append, moved)
        try:
            command = await cp.restore_command(name, manifest["instance"], self.ws.status.path, chosen, logs, inherited)
            await asyncio.to_thread(command.log.unlink, missing_ok=True)  # no stale reason from an older run
            rc = await criu.run(command, logs / "restore.out", self.ws.config.timeout, tuple(inherited))
        finally:
            for fd in inherited:
                os.close(fd)
        if rc != 0:
            reason = await asyncio.to_thread(criu.criu_error, command.log, logs / "restore.out")
            # A process this node started after the pids were found free took one of them.
            taken = re.search(r"Can't fork for (\d+): File exists", reason)
            raise TaskError(f"{Path(command.argv[0]).name} restore of {cp.kind} instance {name!r} failed: {reason}; "
                            + (f"pid {taken[1]} was taken by another process as the restore began; " if taken else "")
                            + f"the instance is left stopped (logs: {command.log}, {logs / 'restore.out'})",
                            code="pid-in-use" if taken else "restore-failed")
        return await cp.restored(name, manifest["instance"], chosen)

    # -- listing, removing, pruning ------------------------------------------------------

    async def remove_all(self, kind: str, name: str) -> tuple[Path, list[Path]]:
        """Remove every checkpoint of an instance and the directories staged with them."""
        base = self.ws.images(kind, name)
        staged = await asyncio.to_thread(image.staged_directories, base)
        for directory in staged:
            await asyncio.to_thread(shutil.rmtree, directory, True)
        await asyncio.to_thread(shutil.rmtree, base, True)
        return base, staged

    async def listing(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        return {"checkpoints": await asyncio.to_thread(image.listing, self.ws.images(cp.kind, args.name))}

    async def remove(self, cp: AnyCheckpointer, args: Remove, task_id: str) -> Mapping[str, Any]:
        latest = await asyncio.to_thread(image.remove, self.ws.images(cp.kind, args.name), args.checkpoint)
        log.info("checkpoint: removed %s of %s %s", args.checkpoint, cp.kind, args.name)
        return {"removed": args.checkpoint, "latest": latest}

    async def prune(self, cp: AnyCheckpointer, args: Prune, task_id: str) -> Mapping[str, Any]:
        base = self.ws.images(cp.kind, args.name)
        removed = await asyncio.to_thread(image.prune, base, args.keep)
        return {"removed": removed, "checkpoints": await asyncio.to_thread(image.listing, base)}


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
