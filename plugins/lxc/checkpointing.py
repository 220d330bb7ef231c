"""How liblxc containers are checkpointed: the lxc kind's :class:`agent.sdk.Checkpointer`.

``lxc-checkpoint`` runs criu with a container's options (its namespaces, cgroups, mounts,
``--tcp-established``, ``--file-locks``), so the checkpoint plugin drives it rather than
criu itself. It runs ``criu`` from PATH: the configured criu's directory goes first.
CRIU's ``mntns-compat-mode`` is needed to restore a container here and is refused on dump,
so lxc-checkpoint gets it through ``CRIU_CONFIG_FILE`` for restores only. criu's own logs
of it (``dump.log``, ``restore.log``) are in the image directory.

A container migrates whole: its directory under lxcpath (config, rootfs, Kumo's record)
travels with the image, its ``config`` first, which the destination checks before any
memory page is sent (its bridge, the host paths it binds, what it includes).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from agent.sdk import (
    CheckpointSubject,
    CriuCommand,
    StagedDirectory,
    TaskError,
    atomic_write,
    parse_payload,
)

from .spec import CreatePayload, asks_privileged

KIND = "lxc"
DEFINITION = "config"  # the file of a container's directory the destination checks first
RESTORE_CONF = "criu-restore.conf"  # in the lxc plugin's state directory
RESTORE_OPTIONS = "mntns-compat-mode\n"


class LxcCheckpointer:
    """Checkpoint, restore and migration of the containers of ``plugin`` (the lxc plugin)."""

    kind = KIND

    def __init__(self, plugin: Any):
        self.plugin = plugin

    async def subject(self, name: str) -> CheckpointSubject | None:
        state = next((s for s in self.plugin.list() if s.name == name), None)
        if state is None:
            return None
        pid = state.details.get("pid") if state.state == "running" else None
        if state.state == "running" and not isinstance(pid, int):
            pid = await self.plugin.init_pid(name)
        lxcpath: Path = self.plugin.config.lxcpath
        return CheckpointSubject(name, state.state, pid, {"lxcpath": str(lxcpath)},
                                 directory=lxcpath / name, definition=DEFINITION)

    async def dump_command(self, subject: CheckpointSubject, criu: str, image: Path, logs: Path,
                           leave_running: bool) -> CriuCommand:
        argv = self._argv(subject.name, image)
        if not leave_running:
            argv.append("-s")
        return CriuCommand(argv, image / "dump.log", self._env(criu, None))

    async def restore_command(self, name: str, record: Mapping[str, Any], criu: str, image: Path,
                              logs: Path, inherit_fds: Mapping[int, str]) -> CriuCommand:
        # A container's files are in its own directory: inherit_fds is always empty here.
        if not any(s.name == name for s in self.plugin.list()):
            # Never the lxcpath of the record: on a node that shares the source's disk that
            # would restore the source's own copy.
            raise TaskError(f"no container {name!r} on this node to restore into: restore it where it was "
                            "checkpointed, or migrate it here", code="not-found")
        conf = self.plugin.context.state_dir / RESTORE_CONF
        await asyncio.to_thread(_write_if_changed, conf, RESTORE_OPTIONS)
        return CriuCommand([*self._argv(name, image), "-r"], image / "restore.log", self._env(criu, conf))

    async def restored(self, name: str, record: Mapping[str, Any], image: Path) -> int:
        pid = await self.plugin.init_pid(name)
        if pid is None:
            raise TaskError(f"container {name!r} was restored but liblxc shows no init pid", code="restore-failed")
        return pid

    async def stage(self, name: str, record: Mapping[str, Any], definition: bytes,
                    instance: Mapping[str, Any] | None) -> StagedDirectory:
        recorded = None if instance is None else asks_privileged(parse_payload(CreatePayload, instance,
                                                                                "payload.instance"))
        path, privileged = await self.plugin.stage_migration(name, definition.decode("utf-8", "replace"),
                                                             _source(record), recorded)
        # The config was just checked to use this node's own user namespace, or none where
        # this node allows privileged containers and the controller records it privileged.
        config = self.plugin.config
        ids = None if privileged else range(config.idmap_start, config.idmap_start + config.idmap_size)
        return StagedDirectory(path, ids)

    async def take_over(self, name: str, record: Mapping[str, Any], directory: Path) -> None:
        await self.plugin.import_migrated(name, directory, _source(record))

    def _argv(self, name: str, image: Path) -> list[str]:
        return [self.plugin.config.lxc_checkpoint, "-n", name, "-P", str(self.plugin.config.lxcpath), "-D", str(image)]

    def _env(self, criu: str, restore_conf: Path | None) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(criu) + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if restore_conf is None:
            env.pop("CRIU_CONFIG_FILE", None)
        else:
            env["CRIU_CONFIG_FILE"] = str(restore_conf)
        return env


def _source(record: Mapping[str, Any]) -> str:
    """The source node's lxcpath, which the container's config names."""
    lxcpath = record.get("lxcpath")
    if not isinstance(lxcpath, str) or not lxcpath.startswith("/"):
        raise TaskError(f"the checkpoint's record names no lxcpath the container came from (got {lxcpath!r})",
                        code="image-corrupt")
    return lxcpath


def _write_if_changed(path: Path, text: str) -> None:
    try:
        if path.read_text() == text:
            return
    except OSError:
        pass
    atomic_write(path, text, 0o644)
