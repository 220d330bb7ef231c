"""The two ends of a stop-and-copy migration: sending a checkpoint (with the directory an
instance takes along and the cached images the destination lacks) and receiving it, which
images the destination already holds, and discarding what an instance left behind.

The stream's format is :mod:`.stream`'s, its way through the controller :mod:`.transfer`'s;
this module decides what goes into the stream and where what arrives is put.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import CHECKPOINT_ID_RE, DirectoryCheckpointer, TaskError, valid_sha256
from plugins.checkpoint import image
from plugins.checkpoint.local import LocalCheckpoints
from plugins.checkpoint.workspace import AnyCheckpointer, Target, Workspace

# stream (with tarfile) and transfer are imported by the tasks that use them: an idle
# agent, which never migrates, does not hold them.
if TYPE_CHECKING:
    from plugins.checkpoint import stream

log = logging.getLogger(__name__)


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
    # The instance's create payload as the controller keeps it, for a kind whose instances
    # take a directory along: how the instance is confined here comes from it, not the source.
    instance: dict[str, Any] | None = None


class MigrationTransfer:
    """The migration tasks on an instance's checkpoints; each is called under the instance's lock."""

    def __init__(self, ws: Workspace, local: LocalCheckpoints) -> None:
        self.ws = ws
        self.local = local

    async def send(self, cp: AnyCheckpointer, args: Send, task_id: str) -> Mapping[str, Any]:
        from plugins.checkpoint import stream, transfer

        assert self.ws.context is not None
        base = self.ws.images(cp.kind, args.name)
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
        members += await asyncio.to_thread(stream.cache_members, self.ws.context.images.directory, travelling)
        result = await transfer.send(self.ws.context, args.migration, members)
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

    async def receive(self, cp: AnyCheckpointer, args: Receive, task_id: str) -> Mapping[str, Any]:
        from plugins.checkpoint import stream, transfer

        assert self.ws.context is not None
        if not CHECKPOINT_ID_RE.match(args.image_name):
            raise TaskError(f"payload.image_name must be a checkpoint id, got {args.image_name!r:.80}",
                            code="bad-request")
        base = self.ws.images(cp.kind, args.name)
        final = base / args.image_name
        if await asyncio.to_thread(final.exists):
            raise TaskError(f"checkpoint {final} already exists on this node", code="exists")
        incoming = base / f".incoming-{args.image_name}"
        await asyncio.to_thread(shutil.rmtree, incoming, True)
        await asyncio.to_thread(incoming.mkdir, parents=True)
        staged: list[Path] = []
        placed: list[Path] = []  # the instance's open files written into the agent's state
        stage, own = self._stager(cp, args, incoming, staged), self.ws.context.agent_state_dir
        try:
            got = await transfer.receive(self.ws.context, args.migration,
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
                await self.ws.context.images.get(str(arrived), digest)
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

    def _stager(self, cp: AnyCheckpointer, args: Receive, incoming: Path, staged: list[Path]) -> stream.Stage:
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
            given = asyncio.run_coroutine_threadsafe(cp.stage(args.name, manifest["instance"], data, args.instance),
                                                     loop).result()
            staged.append(given.path)
            return given

        return stage

    async def holds(self, cp: AnyCheckpointer, args: Holds, task_id: str) -> Mapping[str, Any]:
        """Which of ``args.images`` this node's image cache holds: a migration sends only the others."""
        wanted = {valid_sha256(digest) for digest in args.images}
        held = await asyncio.to_thread(self.ws.require_context().images.held)
        return {"held": sorted(wanted & {entry["sha256"] for entry in held})}

    async def discard(self, cp: AnyCheckpointer, args: Target, task_id: str) -> Mapping[str, Any]:
        """Remove every checkpoint of an instance that has moved away (its images would go
        stale), or that arrived here for a migration rolled back, with the directories that
        arrived with them and were never taken over."""
        base, staged = await self.local.remove_all(cp.kind, args.name)
        return {"removed": str(base), "staged": [str(d) for d in staged]}
