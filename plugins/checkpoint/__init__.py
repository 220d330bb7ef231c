"""The ``checkpoint`` plugin: CRIU checkpoint and restore of ``process`` and ``lxc`` instances.

It runs no instances of its own: it finds the instance through the other plugins' states
(``context.hooks.instances()``) and uses only what their details publish — a process's
``pid`` and create ``options``, a container's ``lxcpath`` (its name is the instance name).
After a restore it hands the new pid back to the owning plugin through that plugin's
``<kind>.adopt`` task, when it declares one (``{"name", "pid", **manifest["instance"]}``).

We drive the ``criu`` command line through asyncio subprocesses rather than pycriu's RPC
(``criu swrk``): pycriu is not on PyPI (Debian ships it only for /usr/bin/python3, and a
venv would need it built from the criu tree plus protobuf), the command line costs the same
per operation, its logs are the files operators already know, and ``lxc-checkpoint`` runs
criu by name anyway.

Image layout (designed for migration, where the directory is copied to another node and
restored there)::

    <images_dir>/<kind>/<name>/<UTC time>-<random>/   one checkpoint
        *.img                   CRIU's images
        stats-*, kumo-*.pid     CRIU's statistics and our pidfile (not checksummed)
        kumo-manifest.json      written last: {"format", "name", "kind", "created_at", "kernel",
                                "criu_version", "pid", "pids", "instance", "state_dir", "open_files",
                                "files": {file: CRC-32}}
        kumo-verified.json      this node only: the stat of each file when it was hashed here
    <images_dir>/<kind>/<name>/latest -> the newest complete checkpoint

A directory without a manifest is a dump that never finished. CRIU's logs of the last dump
and restore of each instance go to ``<state_dir>/logs/<kind>-<name>-{dump,restore}.{log,out}``,
outside the image, so a full image disk cannot swallow the reason a dump failed
(lxc-checkpoint keeps its own criu logs, dump.log and restore.log, in the image directory). Before a restore every file
listed is checked against its checksum — by reading it again, unless ``kumo-verified.json``
shows the file untouched (same inode, size, mtime and ctime) since this node hashed it, as
after a local dump; a copied image (a migration) has no valid stamp and is always hashed.

Migration moves a checkpoint between nodes through the controller, which relays one stream
(it never stores the image): ``checkpoint.send`` on the source PUTs a tar of the checkpoint to
``/v1/nodes/<source>/migrations/<id>/image`` while ``checkpoint.receive`` on the destination
GETs ``/v1/nodes/<destination>/migrations/<id>/image``, both over mutual TLS with the node's
own certificate. The tar holds ``image/<file>`` for the manifest and every file it covers,
and, for a process, each regular file it had open. Those under the source agent's state
directory (its console log) are the instance's own: they travel as ``state/<path in the
state directory>``, land in the destination's state directory, and CRIU restores the
process with them in place of the originals (``--inherit-fd``), so two agents with
different state directories (two on one machine) never write into each other's. Any other
open file travels as ``files/<path>`` and must be at the same path and identical on the
destination, or missing there and inside its state directory. The receiver hashes every
image file as it arrives, checks it against the manifest and stamps it, so the restore that
follows does not hash it again.
Both ends return the stream's sha256 and length, which the controller compares.

A container travels with its definition, stopped since the dump: ``container/config``, then
after the image everything else under ``<lxcpath>/<name>`` (its rootfs, Kumo's record). The
tar is written here member by member rather than by ``tar``: every header is built before the
first byte is sent, so the size is known for the progress display and the stream never
sits whole in memory or on disk; ownership is numeric (an unprivileged container's shifted
ids), hardlinks, symlinks, device nodes and FIFOs are kept, and extended attributes travel
as PAX ``SCHILY.xattr.*`` records (file capabilities included). Paths the config binds
from the host (the busybox template's /lib, /usr/lib) are not in the directory and are
not carried. The receiver unpacks it itself, never following a symlink or writing outside
the directory the lxc plugin gave it: the config's arrival is the moment the destination's
lxc plugin checks that this node has what the container needs (``lxc.stage``), so the config
comes right after the manifest, before CRIU's images and the rootfs. The stream's sha256 covers these bytes as it covers the image; the restore
then asks the lxc plugin to take the container over (``lxc.import``) and deletes it again
(``lxc.delete``) if CRIU fails, so a failed migration leaves no copy behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import logging
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import ssl
import stat
import struct
import tarfile
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from agent.sdk import (
    ConfigError,
    Fingerprint,
    InstanceState,
    PluginContext,
    TaskError,
    hookimpl,
    parse_section,
    start_time,
    stat_fields,
)

log = logging.getLogger(__name__)

MANIFEST = "kumo-manifest.json"
STAMP = "kumo-verified.json"
CARRIED = "kumo-container.json"  # a received image: where its container was unpacked
# 2: the files' checksums are CRC-32 (format 1 had sha256).
MANIFEST_FORMAT = 2
KINDS = ("process", "lxc")
INSTALL_HINT = "install criu >= 4.1: see scripts/deps/30-criu.sh"
# `criu check --feature` names worth scheduling by: soft-dirty tracking makes pre-dump and
# iterative (low-downtime) migration possible, userfaultfd makes lazy (post-copy) restore possible.
FEATURES = ("mem_dirty_track", "uffd", "uffd-noncoop", "pidfd_store", "network_lock_nftables", "timens")
PROBE_TTL = 300.0
# Character devices CRIU restores by path on any Linux host: null, zero, full, random, urandom.
SAFE_CHAR_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}
TTY_MAJORS = {4, 5, 136}
UNSUPPORTED_ANON = ("[io_uring]", "[userfaultfd]", "[perf_event]", "bpf-map", "bpf-prog")
UNSUPPORTED_FS = {"fuse", "fuseblk", "nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "virtiofs"}
TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}
HASH_CHUNK = 1 << 20
STALL_TIMEOUT = 60.0  # seconds a transfer may go without a byte moving
IMAGE_NAME_RE = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,100}$")
TAR_BLOCK = 512
MAX_CONFIG_BYTES = 1 << 20
XATTR = "SCHILY.xattr."


@dataclasses.dataclass
class CheckpointConfig:
    """``plugins.checkpoint`` settings."""

    criu: str = "criu"  # a path, or a name looked up in PATH
    lxc_checkpoint: str = "lxc-checkpoint"
    images_dir: Path | None = None  # default: <state_dir>/images
    keep: int = 2  # complete checkpoints kept per instance; older ones are removed
    timeout: float = 600.0  # seconds one criu dump or restore may take


@dataclasses.dataclass(frozen=True)
class CriuStatus:
    """What probing criu found; ``reason`` says what is wrong when it is not usable."""

    usable: bool
    reason: str = ""
    path: str | None = None
    version: str | None = None
    features: Mapping[str, bool] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class _Target:
    name: str
    kind: str
    state: InstanceState
    pid: int | None
    lxcpath: str | None = None


class CheckpointPlugin:
    """CRIU checkpoint/restore for other plugins' instances; see the module docstring."""

    def __init__(self) -> None:
        self.config = CheckpointConfig()
        self.context: PluginContext | None = None
        self.status = CriuStatus(False, "not started")
        self.probed_at = 0.0
        self.locks: dict[tuple[str, str], asyncio.Lock] = {}
        self.pruning: set[asyncio.Task] = set()

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
        await asyncio.to_thread(_discard_incoming, self._images_root())
        # CRIU's mntns-compat-mode is needed to restore an lxc container here, and is
        # refused on dump: lxc-checkpoint reads it from this file for restores only.
        await asyncio.to_thread(self._lxc_restore_conf().write_text, "mntns-compat-mode\n")
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
        attributes: dict[str, Any] = {"criu": st.path, "criu_version": st.version, "instance_kinds": list(KINDS)}
        if st.usable:
            attributes.update(
                check="ok",
                features=dict(st.features),
                pre_dump=st.features.get("mem_dirty_track", False),
                lazy_pages=st.features.get("uffd-noncoop", False),
            )
        return Fingerprint(available=st.usable, reason=st.reason, attributes=attributes)

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return ["checkpoint.preflight", "checkpoint.dump", "checkpoint.restore", "checkpoint.send", "checkpoint.receive",
                "checkpoint.discard"]

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        name, ikind = payload.get("name"), payload.get("kind")
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise TaskError(f"payload.name must be an instance name, got {name!r}", code="bad-request")
        if ikind not in KINDS:
            raise TaskError(f"payload.kind must be one of {', '.join(KINDS)}, got {ikind!r}", code="unsupported-kind")
        async with self.locks.setdefault((ikind, name), asyncio.Lock()):
            if kind == "checkpoint.preflight":
                blockers = await self._preflight(await self._target(name, ikind, must_exist=False))
                return {"ok": not blockers, "blockers": blockers}
            if kind == "checkpoint.dump":
                leave_running = payload.get("leave_running", False)
                if not isinstance(leave_running, bool):
                    raise TaskError("payload.leave_running must be true or false", code="bad-request")
                return await self._dump(await self._target(name, ikind), leave_running)
            if kind == "checkpoint.restore":
                return await self._restore(name, ikind, payload.get("image"), task_id)
            if kind == "checkpoint.send":
                return await self._send(name, ikind, payload)
            if kind == "checkpoint.receive":
                return await self._receive(name, ikind, payload, task_id)
            if kind == "checkpoint.discard":
                return await self._discard(name, ikind)
        raise TaskError(f"the checkpoint plugin has no task kind {kind!r}", code="bad-request")

    # -- criu ----------------------------------------------------------------------

    async def _probe(self) -> None:
        self.status = await probe_criu(self.config.criu)
        self.probed_at = time.monotonic()
        if not self.status.usable:
            log.warning("checkpoint: %s", self.status.reason)

    def _require_criu(self) -> str:
        if not self.status.usable:
            raise TaskError(self.status.reason, code="criu-unavailable")
        assert self.status.path is not None
        return self.status.path

    # -- finding the instance ------------------------------------------------------

    async def _target(self, name: str, kind: str, must_exist: bool = True) -> _Target | None:
        assert self.context is not None, "kumo_startup was not called"
        states = await self.context.hooks.instances()
        state = next((s for s in states if s.name == name and s.kind == kind), None)
        if state is None:
            if must_exist:
                raise TaskError(f"no {kind} instance named {name!r} on this node", code="not-found")
            return None
        pid = state.details.get("pid") if state.state == "running" else None
        lxcpath = None
        if kind == "lxc":
            lxcpath = state.details.get("lxcpath")
            if not isinstance(lxcpath, str) or not lxcpath:
                raise TaskError(
                    f"the lxc plugin's state of {name!r} carries no details.lxcpath: cannot find the container",
                    code="lxc-details",
                )
        return _Target(name, kind, state, pid if isinstance(pid, int) else None, lxcpath)

    async def _preflight(self, target: _Target | None) -> list[dict[str, str]]:
        blockers: list[dict[str, str]] = []
        if not self.status.usable:
            blockers.append({"code": "criu-unavailable", "message": self.status.reason})
        if target is None:
            blockers.append({"code": "not-found", "message": "no such instance on this node"})
            return blockers
        if target.pid is None and target.kind == "lxc" and target.state.state == "running":
            target.pid = await self._lxc_init_pid(target)
        if target.pid is None:
            blockers.append({
                "code": "not-running",
                "message": f"{target.kind} instance {target.name!r} is {target.state.state}: only a running instance can be checkpointed",
            })
            return blockers
        blockers += await asyncio.to_thread(scan_blockers, target.pid, target.kind)
        return blockers

    # -- dump ----------------------------------------------------------------------

    async def _dump(self, target: _Target, leave_running: bool) -> Mapping[str, Any]:
        blockers = await self._preflight(target)
        if blockers:
            raise TaskError(
                f"{target.kind} instance {target.name!r} cannot be checkpointed: "
                + "; ".join(b["message"] for b in blockers),
                code=blockers[0]["code"],
                details={"blockers": blockers},
            )
        criu = self._require_criu()
        assert target.pid is not None
        base = self._images_root() / target.kind / target.name
        logs = self._logs(target.kind, target.name)
        # Names sort by creation time (to the microsecond), which is how _prune picks the oldest.
        now = datetime.datetime.now(datetime.UTC)
        image = base / (now.strftime("%Y%m%dT%H%M%S.%fZ") + "-" + secrets.token_hex(3))
        await asyncio.to_thread(image.mkdir, parents=True)
        tree = await asyncio.to_thread(_tree, target.pid)
        open_files = await asyncio.to_thread(_open_files, tree)
        if target.kind == "process":
            argv = [criu, "dump", "-t", str(target.pid), "-D", str(image), "-o", str(logs / "dump.log")]
            if leave_running:
                argv.append("--leave-running")
            env = None
        else:
            argv = [self.config.lxc_checkpoint, "-n", target.name, "-P", target.lxcpath or "", "-D", str(image)]
            if not leave_running:
                argv.append("-s")
            env = self._lxc_env(criu, restore=False)
        hasher = _TailHasher(image)
        hasher.start()
        try:
            rc = await self._run(argv, logs / "dump.out", env)
        except BaseException:
            await asyncio.to_thread(hasher.stop)
            await asyncio.to_thread(shutil.rmtree, image, True)
            raise
        if rc != 0:
            await asyncio.to_thread(hasher.stop)
            alive = start_time(target.pid) is not None
            if target.kind == "lxc":
                await asyncio.to_thread(_keep_lxc_log, image / "dump.log", logs / "dump.log")
            reason = await asyncio.to_thread(_criu_error, logs / "dump.log", logs / "dump.out")
            await asyncio.to_thread(shutil.rmtree, image, True)
            raise TaskError(
                f"criu dump of {target.kind} instance {target.name!r} failed: {reason}; "
                + ("the instance is still running" if alive else "the instance is no longer running")
                + f" (logs: {logs}/dump.*)",
                code="dump-failed",
            )
        instance: dict[str, Any] = {}
        if target.kind == "process":
            instance["options"] = dict(target.state.details.get("options") or {})
        else:
            instance["lxcpath"] = target.lxcpath
        manifest = {
            "format": MANIFEST_FORMAT,
            "name": target.name,
            "kind": target.kind,
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "kernel": platform.release(),
            "criu_version": self.status.version,
            "leave_running": leave_running,
            "pid": target.pid,
            "pids": tree,
            "instance": instance,
            "state_dir": str(self._agent_state()),
            "open_files": open_files,
        }
        files, size = await asyncio.to_thread(_finish_manifest, image, hasher, manifest)
        if not leave_running:
            await self._until_stopped(target)
            await self._reap(tree[1:])
        await asyncio.to_thread(_publish, base, image)
        # Old checkpoints go in the background (deleting gigabytes is no part of this dump),
        # under the instance's lock so that no restore reads a checkpoint being deleted.
        prune = asyncio.create_task(self._prune(target, base))
        self.pruning.add(prune)
        prune.add_done_callback(self.pruning.discard)
        log.info("checkpoint: %s %s dumped to %s (%d bytes)", target.kind, target.name, image, size)
        return {"image": str(image), "manifest": files, "size_bytes": size}

    async def _prune(self, target: _Target, base: Path) -> None:
        async with self.locks.setdefault((target.kind, target.name), asyncio.Lock()):
            await asyncio.to_thread(_prune, base, self.config.keep)

    async def _reap(self, pids: list[int]) -> None:
        """Reap the tree's other processes, which criu killed and the agent (a subreaper)
        inherited: a restore, here or on a node sharing this pid namespace, needs their pids
        free, and the periodic reaper could be seconds late. The root is its plugin's to reap."""
        me = os.getpid()
        deadline = time.monotonic() + 5
        for pid in pids:
            while (fields := stat_fields(pid)) is not None and time.monotonic() < deadline:
                if fields[0] != "Z":
                    await asyncio.sleep(0.01)  # SIGKILLed, not yet exited
                    continue
                if int(fields[1]) == me:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)
                break

    async def _until_stopped(self, target: _Target) -> None:
        # criu has killed the instance; wait until its plugin has seen that too, so a
        # restore sent right after this dump does not find it "running".
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            current = await self._target(target.name, target.kind, must_exist=False)
            if current is None or current.state.state != "running":
                return
            await asyncio.sleep(0.01)
        log.warning("checkpoint: %s %s still reported running 5 s after its dump", target.kind, target.name)

    # -- restore -------------------------------------------------------------------

    async def _restore(self, name: str, kind: str, image_arg: Any, task_id: str) -> Mapping[str, Any]:
        assert self.context is not None
        criu = self._require_criu()
        if image_arg is None:
            latest = self._images_root() / kind / name / "latest"
            if not latest.is_symlink():
                raise TaskError(f"no checkpoint of {kind} instance {name!r} on this node: dump one first",
                                code="no-image")
            image = latest.resolve()
        elif isinstance(image_arg, str) and image_arg.startswith("/"):
            image = Path(image_arg)
        else:
            raise TaskError("payload.image must be an absolute path to a checkpoint directory", code="bad-request")
        manifest = await asyncio.to_thread(verify_image, image, name, kind)
        current = await self._target(name, kind, must_exist=False)
        if current is not None and current.state.state == "running":
            raise TaskError(f"{kind} instance {name!r} is running: stop it before restoring a checkpoint",
                            code="already-running")
        if kind == "process":
            pid = await self._restore_process(criu, image, manifest)
        elif current is None and await asyncio.to_thread((image / CARRIED).is_file):
            pid = await self._restore_carried(criu, image, manifest, name, task_id)
        else:
            pid = await self._restore_lxc(criu, image, manifest, name)
        await self._hand_over(kind, name, pid, manifest, task_id)
        log.info("checkpoint: %s %s restored from %s as pid %d", kind, name, image, pid)
        return {"pid": pid, "image": str(image)}

    async def _restore_process(self, criu: str, image: Path, manifest: Mapping[str, Any]) -> int:
        pid = manifest["pid"]
        files = {Path(f): _local_path(f, manifest, self._agent_state()) for f in manifest.get("open_files") or []}
        missing = [str(local) for local in files.values() if not await asyncio.to_thread(os.path.exists, local)]
        if missing:
            raise TaskError(
                f"process instance {manifest['name']!r} had files open that are missing on this node: "
                f"{', '.join(missing)}; put them back at the same paths (a migration must carry them) and retry",
                code="missing-files",
            )
        for tree_pid in manifest.get("pids") or [pid]:
            await self._wait_pid_free(tree_pid)
        pidfile = image / "kumo-restore.pid"
        with contextlib.suppress(FileNotFoundError):
            pidfile.unlink()
        logs = self._logs("process", manifest["name"])
        argv = [criu, "restore", "-D", str(image), "-d", "-o", str(logs / "restore.log"), "--pidfile", str(pidfile)]
        # A file of the source agent's state (the console log the process plugin opened for
        # appending) is this agent's copy now: CRIU hands the process our descriptor for it.
        inherited: list[int] = []
        try:
            for path, local in files.items():
                if local != path:
                    inherited.append(os.open(local, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
                    argv += ["--inherit-fd", f"fd[{inherited[-1]}]:{str(path).lstrip('/')}"]
            rc = await self._run(argv, logs / "restore.out", pass_fds=tuple(inherited))
        finally:
            for fd in inherited:
                os.close(fd)
        if rc != 0:
            reason = await asyncio.to_thread(_criu_error, logs / "restore.log", logs / "restore.out")
            raise TaskError(
                f"criu restore of process instance {manifest['name']!r} failed: {reason}; "
                f"the instance is left stopped (logs: {logs}/restore.*)",
                code="restore-failed",
            )
        return int(pidfile.read_text().strip())

    async def _restore_lxc(self, criu: str, image: Path, manifest: Mapping[str, Any], name: str) -> int:
        current = await self._target(name, "lxc", must_exist=False)
        if current is None:
            # Never fall back to the lxcpath in the manifest: on a node that shares the
            # source's disk that would restore the source's own copy.
            raise TaskError(f"no container {name!r} on this node to restore into: restore it where it was "
                            "checkpointed, or migrate it here", code="not-found")
        lxcpath = current.lxcpath
        argv = [self.config.lxc_checkpoint, "-n", name, "-P", lxcpath, "-D", str(image), "-r"]
        # Output to a file, never a pipe: the restored container's monitor inherits it
        # and would hold a pipe open for the container's whole life.
        logs = self._logs("lxc", name)
        rc = await self._run(argv, logs / "restore.out", self._lxc_env(criu, restore=True))
        if rc != 0:
            reason = await asyncio.to_thread(_criu_error, image / "restore.log", logs / "restore.out")
            raise TaskError(
                f"lxc-checkpoint restore of container {name!r} failed: {reason}; "
                f"the container is left stopped (logs: {image / 'restore.log'}, {logs / 'restore.out'})",
                code="restore-failed",
            )
        target = _Target(name, "lxc", InstanceState(name, "lxc", "running"), None, lxcpath)
        pid = await self._lxc_init_pid(target)
        if pid is None:
            raise TaskError(f"container {name!r} was restored but lxc-info shows no init pid", code="restore-failed")
        return pid

    async def _restore_carried(self, criu: str, image: Path, manifest: Mapping[str, Any], name: str,
                               task_id: str) -> int:
        """Restore a container that migrated here: the lxc plugin takes over the directory it
        was unpacked into, and deletes it again if CRIU fails, so no stopped copy is left."""
        assert self.context is not None
        carried = json.loads(await asyncio.to_thread((image / CARRIED).read_text))
        payload = {"name": name, "directory": carried["directory"], "lxcpath": manifest["instance"].get("lxcpath")}
        await self._lxc_task("lxc.import", payload, f"{task_id}:import")
        await asyncio.to_thread((image / CARRIED).unlink)
        try:
            return await self._restore_lxc(criu, image, manifest, name)
        except BaseException:
            try:
                await self._lxc_task("lxc.delete", {"name": name}, f"{task_id}:undo-import")
            except Exception:
                log.exception("checkpoint: could not delete container %s after its failed restore", name)
            raise

    async def _lxc_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        assert self.context is not None
        owner = self.context.hooks.task_owners().get(kind)
        if owner is None:
            raise TaskError(f"a container migrating here needs the lxc plugin's {kind} task, and no plugin on "
                            "this node has it: enable the lxc plugin", code="lxc-unavailable")
        return await self.context.hooks.handle_task(owner, kind, payload, task_id)

    async def _hand_over(self, kind: str, name: str, pid: int, manifest: Mapping[str, Any], task_id: str) -> None:
        """Tell the instance's own plugin about the restored pid, through its ``<kind>.adopt`` task.

        A restored process keeps its pid but not its start time, so the owning plugin must
        re-learn it. Plugins without an ``adopt`` task (lxc reads liblxc's state) are skipped.
        """
        assert self.context is not None
        owner = self.context.hooks.task_owners().get(f"{kind}.adopt")
        if owner is None:
            return
        payload = {"name": name, "pid": pid, **manifest.get("instance", {})}
        try:
            await self.context.hooks.handle_task(owner, f"{kind}.adopt", payload, f"{task_id}:adopt")
        except Exception as exc:
            # All or nothing: an instance its plugin does not know would run unmanaged.
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise TaskError(
                f"{kind} instance {name!r} was restored as pid {pid} but the {owner} plugin refused it ({exc}); "
                "the restored process was killed and the checkpoint is unchanged",
                code="adopt-failed",
            ) from exc

    async def _wait_pid_free(self, pid: int) -> None:
        # CRIU restores a plain process under its old pid. After a dump that pid may still
        # be a zombie for a moment: reap it if it is our child, else give its parent time.
        me = os.getpid()
        deadline = time.monotonic() + 5
        while True:
            fields = stat_fields(pid)
            if fields is None:
                return
            if fields[0] != "Z":
                raise TaskError(
                    f"pid {pid}, which the checkpoint must be restored under, belongs to another running process "
                    f"({_comm(pid)}): restore on a node where it is free",
                    code="pid-in-use",
                )
            if int(fields[1]) == me:
                with contextlib.suppress(ChildProcessError):
                    if os.waitpid(pid, os.WNOHANG)[0] == pid:
                        continue
            if time.monotonic() > deadline:
                raise TaskError(f"pid {pid} is a zombie its parent does not reap: restore needs it free",
                                code="pid-in-use")
            await asyncio.sleep(0.02)

    # -- migration transfer --------------------------------------------------------

    async def _send(self, name: str, kind: str, payload: Mapping[str, Any]) -> Mapping[str, Any]:
        image_arg = payload.get("image")
        base = self._images_root() / kind / name
        if not isinstance(image_arg, str) or Path(image_arg).parent != base:
            raise TaskError(f"payload.image must be a checkpoint directory under {base}, got {image_arg!r}",
                            code="bad-request")
        image = Path(image_arg)
        manifest = await asyncio.to_thread(verify_image, image, name, kind)
        members = await asyncio.to_thread(_transfer_members, image, manifest)
        if kind == "lxc":
            current = await self._target(name, kind, must_exist=False)
            if current is not None and current.state.state == "running":
                raise TaskError(f"container {name!r} is running: its rootfs would change while it is sent; "
                                "migrate it (the dump stops it) rather than send a checkpoint of it running",
                                code="already-running")
            directory = Path(manifest["instance"]["lxcpath"]) / name
            container = await asyncio.to_thread(_container_members, directory)
            # The config right after the manifest: a destination that cannot run the
            # container refuses before a single memory page is sent.
            members = members[:1] + container[:1] + members[1:] + container[1:]
        # Known before the first byte, so the controller can show progress against it.
        total = sum(len(header) + _padded(size) for header, _, size in members) + 2 * TAR_BLOCK
        digest, sent = hashlib.sha256(), 0

        async def tar_stream() -> Any:
            nonlocal sent
            async for chunk in _tar_chunks(members):
                digest.update(chunk)
                sent += len(chunk)
                yield chunk

        answer = await self._transfer("PUT", payload, tar_stream(), {"Content-Type": "application/x-tar", "X-Kumo-Size": str(total)})
        log.info("checkpoint: sent %s %s (%d bytes) for migration %s", kind, name, sent, payload.get("migration"))
        return {"bytes": sent, "sha256": digest.hexdigest(), "relayed": answer.get("bytes")}

    async def _receive(self, name: str, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        assert self.context is not None
        image_name = payload.get("image_name")
        if not isinstance(image_name, str) or not IMAGE_NAME_RE.match(image_name):
            raise TaskError(f"payload.image_name must be a checkpoint directory name, got {image_name!r}", code="bad-request")
        base = self._images_root() / kind / name
        final = base / image_name
        if final.exists():
            raise TaskError(f"checkpoint {final} already exists on this node", code="exists")
        incoming = base / f".incoming-{image_name}"
        await asyncio.to_thread(shutil.rmtree, incoming, True)
        await asyncio.to_thread(incoming.mkdir, parents=True)
        # Files a process had open may be created only inside this agent's own state.
        own_root = self._agent_state()
        loop = asyncio.get_running_loop()
        staged: list[Path] = []

        def stage(config: str) -> Path:
            """Called from the unpacking thread when the container's config arrives."""
            manifest = json.loads((incoming / MANIFEST).read_text())
            payload = {"name": name, "config": config, "lxcpath": manifest.get("instance", {}).get("lxcpath")}
            future = asyncio.run_coroutine_threadsafe(self._lxc_task("lxc.stage", payload, f"{task_id}:stage"), loop)
            staged.append(Path(future.result()["directory"]))
            return staged[0]

        try:
            stats = await self._transfer("GET", payload, None, {},
                                         receive=lambda body: _unpack(body, incoming, own_root, stage if kind == "lxc" else None))
            await asyncio.to_thread(_check_received, incoming, name, kind, stats["hashes"])
            if kind == "lxc":
                if not staged:
                    raise TaskError("the image stream of a container carried no container/config: the source "
                                    "sent no container definition", code="image-corrupt")
                await asyncio.to_thread(_write_json, incoming / CARRIED, {"directory": str(staged[0])})
            await asyncio.to_thread(os.rename, incoming, final)
        except BaseException:
            await asyncio.to_thread(shutil.rmtree, incoming, True)
            for directory in staged:
                await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        await asyncio.to_thread(_publish, base, final)
        log.info("checkpoint: received %s %s (%d bytes) into %s", kind, name, stats["bytes"], final)
        return {"image": str(final), "bytes": stats["bytes"], "sha256": stats["sha256"], "files": stats["files"]}

    async def _discard(self, name: str, kind: str) -> Mapping[str, Any]:
        """Remove every checkpoint of an instance that has moved away (its images would go stale)."""
        base = self._images_root() / kind / name
        await asyncio.to_thread(shutil.rmtree, base, True)
        return {"removed": str(base)}

    async def _transfer(self, method: str, payload: Mapping[str, Any], body: Any, headers: Mapping[str, str],
                        receive: Any = None) -> dict[str, Any]:
        """One request to this node's migration endpoint on the controller; the decoded answer
        (PUT) or what ``receive`` made of the streamed body in a worker thread (GET)."""
        import aiohttp

        assert self.context is not None
        migration = payload.get("migration")
        if not isinstance(migration, str) or not re.fullmatch(r"m-[0-9a-f]{1,32}", migration):
            raise TaskError(f"payload.migration must be a migration id, got {migration!r}", code="bad-request")
        identity, base_url = self.context.identity, self.context.controller_url
        if identity is None or not base_url:
            raise TaskError("this agent has no controller session to transfer an image through", code="no-controller")
        url = f"{base_url.rstrip('/')}/v1/nodes/{identity.node_id}/migrations/{migration}/image"
        tls = await asyncio.to_thread(_tls_context, identity)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=STALL_TIMEOUT)
        what = "sending the image to" if method == "PUT" else "receiving the image from"
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.request(
                method, url, data=body, headers=dict(headers), ssl=tls
            ) as response:
                if response.status >= 400:
                    text = await response.text(errors="replace")
                    with contextlib.suppress(ValueError):
                        text = json.loads(text).get("error", text)
                    raise TaskError(f"{what} the controller failed ({response.status}): {text}", code="transfer-failed")
                if receive is None:
                    return await response.json(content_type=None) or {}
                loop = asyncio.get_running_loop()
                return await asyncio.to_thread(receive, _BodyReader(response.content, loop))
        except (aiohttp.ClientError, OSError, TimeoutError, tarfile.TarError, EOFError) as exc:
            raise TaskError(f"{what} the controller broke off: {exc or type(exc).__name__}; nothing was restored",
                            code="transfer-failed") from exc

    # -- helpers -------------------------------------------------------------------

    async def _run(self, argv: list[str], output: Path, env: Mapping[str, str] | None = None,
                   pass_fds: tuple[int, ...] = ()) -> int:
        with open(output, "wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out, env=env, pass_fds=pass_fds
            )
        try:
            return await asyncio.wait_for(proc.wait(), self.config.timeout)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise TaskError(f"{Path(argv[0]).name} took longer than {self.config.timeout:.0f} s and was killed "
                            f"(plugins.checkpoint.timeout); see {output}", code="timeout") from None

    def _lxc_env(self, criu: str, restore: bool) -> dict[str, str]:
        # lxc-checkpoint runs "criu" from PATH: put the configured one first.
        env = dict(os.environ)
        env["PATH"] = os.path.dirname(criu) + os.pathsep + env.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        if restore:
            env["CRIU_CONFIG_FILE"] = str(self._lxc_restore_conf())
        else:
            env.pop("CRIU_CONFIG_FILE", None)
        return env

    async def _lxc_init_pid(self, target: _Target) -> int | None:
        proc = await asyncio.create_subprocess_exec(
            "lxc-info", "-n", target.name, "-P", target.lxcpath or "", "-pH",
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await proc.communicate()
        text = out.decode().strip()
        return int(text) if proc.returncode == 0 and text.isdigit() else None

    def _images_root(self) -> Path:
        assert self.context is not None, "kumo_startup was not called"
        return self.config.images_dir or self.context.state_dir / "images"

    def _agent_state(self) -> Path:
        """The agent's state directory (this plugin's is ``<it>/plugins/checkpoint``)."""
        assert self.context is not None, "kumo_startup was not called"
        return self.context.state_dir.parent.parent

    def _logs(self, kind: str, name: str) -> Path:
        """The directory for the logs of one instance's last dump and restore (created)."""
        assert self.context is not None
        path = self.context.state_dir / "logs" / kind / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _lxc_restore_conf(self) -> Path:
        assert self.context is not None
        return self.context.state_dir / "criu-lxc-restore.conf"


# -- probing criu --------------------------------------------------------------------


async def probe_criu(criu: str) -> CriuStatus:
    """Find criu, its version, whether ``criu check`` passes here, and its optional features."""
    path = criu if "/" in criu else shutil.which(criu, path=os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin")
    if not path or not os.access(path, os.X_OK):
        return CriuStatus(False, f"criu not found at {criu!r} (plugins.checkpoint.criu); {INSTALL_HINT}")
    rc, out = await _capture([path, "--version"])
    match = re.search(r"Version:\s*(\S+)", out)
    if rc != 0 or not match:
        return CriuStatus(False, f"{path} is not a working criu (--version: {_first_line(out)}); {INSTALL_HINT}", path)
    version = match.group(1)
    rc, out = await _capture([path, "check"])
    if rc != 0:
        # A failing `criu check` often says only "Could not initialize kernel features
        # detection"; `--all` names the cause (on kernels >= 6.13, criu < 4.1: the vDSO).
        _, more = await _capture([path, "check", "--all"])
        reason = _criu_error_text(out + "\n" + more)
        return CriuStatus(
            False,
            f"criu {version} ({path}) fails on kernel {platform.release()}: {reason}; {INSTALL_HINT}",
            path,
            version,
        )
    results = await asyncio.gather(*(_capture([path, "check", "--feature", f]) for f in FEATURES))
    return CriuStatus(True, "", path, version, {f: r[0] == 0 for f, r in zip(FEATURES, results, strict=True)})


async def _capture(argv: list[str]) -> tuple[int, str]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
    except OSError as exc:
        return 127, exc.strerror or str(exc)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return 124, "timed out after 30 s"
    return proc.returncode or 0, out.decode("utf-8", "replace")


def _criu_error_text(text: str) -> str:
    """The first error line that names a cause: criu logs the root cause first, then the
    consequences ("Can't open cwd", "Restoring FAILED")."""
    harmless = ("RLIMIT_NOFILE",)  # logged on every run where root lacks CAP_SYS_RESOURCE
    generic = ("Could not initialize kernel features detection", "Dumping FAILED", "Restoring FAILED",
               "exited, status=")
    errors = [
        re.sub(r"^.*?Error \([^)]*\):\s*", "", line).strip()
        for line in text.splitlines()
        if re.search(r"Error \(", line) and not any(h in line for h in harmless)
    ]
    specific = [e for e in errors if e and not any(g in e for g in generic)]
    if specific:
        return specific[0]
    if errors:
        return errors[0]
    return _first_line(text) or "no error message"


def _criu_error(*logfiles: Path) -> str:
    """The most telling error in a criu log (or, failing that, the tool's own output)."""
    for logfile in logfiles:
        try:
            text = logfile.read_text(errors="replace")
        except OSError:
            continue
        if text.strip():
            return _criu_error_text(text)
    return "no error message in " + ", ".join(map(str, logfiles))


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


# -- pre-flight scanning -------------------------------------------------------------


def scan_blockers(root: int, kind: str) -> list[dict[str, str]]:
    """What in the process tree under ``root`` would make a CRIU dump fail, from /proc.

    Each blocker is ``{"code", "message"}``: ``traced``, ``tty``, ``char-device``,
    ``unsupported-fd``, ``file-lock``, ``tcp-established``, ``tcp-connection``,
    ``unix-external``, ``unsupported-mount``.
    """
    blockers: list[dict[str, str]] = []
    pids = _tree(root)
    sockets: dict[int, int] = {}  # socket inode -> pid holding it
    for pid in pids:
        tracer = _status_field(pid, "TracerPid")
        if tracer and tracer != "0":
            blockers.append({
                "code": "traced",
                "message": f"pid {pid} ({_comm(pid)}) is traced by pid {tracer} ({_comm(int(tracer))}); "
                "CRIU must be its only tracer: detach the debugger or strace first",
            })
        for fd, target in _fds(pid):
            if target.startswith("socket:["):
                sockets[int(target[8:-1])] = pid
            elif target.startswith("anon_inode:"):
                if any(a in target for a in UNSUPPORTED_ANON):
                    blockers.append({"code": "unsupported-fd", "message": f"pid {pid} has fd {fd} {target} open, which CRIU cannot checkpoint"})
            elif target.startswith("/"):
                try:
                    st = os.stat(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if stat.S_ISCHR(st.st_mode):
                    dev = (os.major(st.st_rdev), os.minor(st.st_rdev))
                    if dev in SAFE_CHAR_DEVICES:
                        continue
                    if dev[0] in TTY_MAJORS:
                        blockers.append({"code": "tty", "message": f"pid {pid} ({_comm(pid)}) has the terminal {target} open as fd {fd}: "
                                         "run it without a terminal (stdin from /dev/null, output to a file)"})
                    else:
                        blockers.append({"code": "char-device", "message": f"pid {pid} ({_comm(pid)}) has the device {target} "
                                         f"({dev[0]}:{dev[1]}) open as fd {fd}; CRIU cannot restore device state: close it first"})
    if kind == "process":
        blockers += _lock_blockers(pids)
        # lxc-checkpoint passes --tcp-established: a container keeps its connections (and
        # its address); a plain process shares the host's network and cannot.
        blockers += _tcp_blockers(root, sockets)
        if _same_netns(root):
            blockers += _unix_blockers(sockets)
    elif not _same_mntns(root):
        blockers += _mount_blockers(root)
    return blockers


def _lock_blockers(pids: list[int]) -> list[dict[str, str]]:
    # CRIU takes file locks along only with --file-locks, which is meant for containers: on
    # a shared host, the locked file's other users would see the lock vanish and come back.
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return []
    holders = sorted({int(cols[4]) for cols in map(str.split, lines) if len(cols) > 5 and cols[4].isdigit()} & set(pids))
    return [{"code": "file-lock", "message": f"pid {pid} ({_comm(pid)}) holds a file lock (see /proc/locks); "
             "CRIU takes locks along only for containers: release it first"} for pid in holders]


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _fds(pid: int) -> list[tuple[int, str]]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(OSError):
            out.append((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
    return sorted(out)


def _open_files(pids: list[int]) -> list[str]:
    """Regular files the tree holds open: a restore elsewhere needs them at the same paths and sizes."""
    files = set()
    for pid in pids:
        for fd, target in _fds(pid):
            if target.startswith("/") and not target.endswith(" (deleted)"):
                with contextlib.suppress(OSError):
                    if stat.S_ISREG(os.stat(f"/proc/{pid}/fd/{fd}").st_mode):
                        files.add(target)
    return sorted(files)


def _tcp_blockers(root: int, sockets: Mapping[int, int]) -> list[dict[str, str]]:
    blockers = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{root}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or int(cols[9]) not in sockets or cols[3] == "0A":
                continue
            pid, state = sockets[int(cols[9])], TCP_STATES.get(cols[3], cols[3])
            where = f"{_addr(cols[1])} -> {_addr(cols[2])}"
            if state == "ESTABLISHED":
                blockers.append({"code": "tcp-established", "message": f"pid {pid} ({_comm(pid)}) has an established TCP connection "
                                 f"{where}; a plain process cannot take it along: close it (or run the workload in an lxc container)"})
            else:
                blockers.append({"code": "tcp-connection", "message": f"pid {pid} ({_comm(pid)}) has a TCP socket in state {state} "
                                 f"{where}, which CRIU cannot checkpoint: retry when it has settled"})
    return blockers


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    if len(host) == 8:
        return f"{socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])}:{int(port, 16)}"
    raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, 32, 8))
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def _unix_blockers(sockets: Mapping[int, int]) -> list[dict[str, str]]:
    try:
        table = _unix_sockets()
    except OSError as exc:
        log.warning("checkpoint: unix socket diagnostics unavailable: %s", exc)
        return []
    blockers = []
    for inode, pid in sockets.items():
        peer = table.get(inode, (0, ""))[0]
        if peer and peer not in sockets:
            name = table.get(peer, (0, ""))[1] or table.get(inode, (0, ""))[1] or "an unnamed socket"
            blockers.append({"code": "unix-external", "message": f"pid {pid} ({_comm(pid)}) has a unix socket connected to "
                             f"{name} outside the instance; CRIU cannot restore the other end: close it first"})
    return blockers


def _unix_sockets() -> dict[int, tuple[int, str]]:
    """inode -> (peer inode or 0, bound name) for the unix sockets of our network namespace.

    /proc/net/unix does not show peers; NETLINK_SOCK_DIAG does (as ``ss -x`` uses it).
    """
    netlink_sock_diag, sock_diag_by_family, nlmsg_done, nlmsg_error = 4, 20, 3, 2
    udiag_show_name, udiag_show_peer, unix_diag_name, unix_diag_peer = 0x1, 0x4, 0, 2
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, udiag_show_name | udiag_show_peer,
                      0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack("=IHHII", 16 + len(req), sock_diag_by_family, 0x1 | 0x300, 1, 0)
    out: dict[int, tuple[int, str]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, netlink_sock_diag) as nl:
        nl.sendto(header + req, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if mtype == nlmsg_done:
                    return out
                if mtype == nlmsg_error:
                    raise OSError("sock_diag answered with an error")
                _, _, _, _, inode, _, _ = struct.unpack_from("=BBBBIII", data, offset + 16)
                peer, name = 0, ""
                pos = offset + 32
                while pos + 4 <= offset + length:
                    alen, atype = struct.unpack_from("=HH", data, pos)
                    if alen < 4:
                        break
                    value = data[pos + 4 : pos + alen]
                    if atype == unix_diag_peer:
                        peer = struct.unpack("=I", value[:4])[0]
                    elif atype == unix_diag_name:
                        name = value.replace(b"\0", b"@", 1).decode(errors="replace") if value[:1] == b"\0" else value.decode(errors="replace")
                    pos += (alen + 3) & ~3
                out[inode] = (peer, name)
                offset += (length + 3) & ~3


def _mount_blockers(root: int) -> list[dict[str, str]]:
    blockers = []
    try:
        lines = Path(f"/proc/{root}/mountinfo").read_text().splitlines()
    except OSError:
        return blockers
    for line in lines:
        post = line.split(" - ", 1)
        if len(post) != 2:
            continue
        fstype, mountpoint = post[1].split()[0], line.split()[4]
        if fstype in UNSUPPORTED_FS or fstype.startswith("fuse."):
            blockers.append({"code": "unsupported-mount", "message": f"{mountpoint} is a {fstype} mount, which CRIU cannot "
                             "checkpoint inside a container: unmount it or make it an lxc.mount.entry bind from the host"})
    return blockers


def _same_netns(pid: int) -> bool:
    return _ns(pid, "net") == _ns(os.getpid(), "net")


def _same_mntns(pid: int) -> bool:
    return _ns(pid, "mnt") == _ns(os.getpid(), "mnt")


def _ns(pid: int, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None


def _status_field(pid: int, key: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


# -- images --------------------------------------------------------------------------


def _checksummed(name: str) -> bool:
    """Which files of a checkpoint directory the manifest covers: not logs or our own files."""
    return not (name.startswith("kumo-") or name.endswith(".log") or name.startswith("stats-"))


class _TailHasher:
    """Hashes CRIU's page images while criu is still writing them, on another core.

    criu writes ``pages-*.img`` front to back in one pass (pagemap entries point at
    increasing offsets), so the bytes read so far are final. Memory pages are nearly the
    whole image, so this hides most of the hashing behind the dump itself.
    """

    def __init__(self, image: Path):
        self.image = image
        self.hashes: dict[str, tuple[_Checksum, int, int]] = {}  # name -> (checksum, bytes read, inode)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="checkpoint-hasher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Criu has exited: hash the rest and return (blocks; call it off the event loop)."""
        self.stopping.set()
        self.thread.join()

    def _run(self) -> None:
        while True:
            progressed = False
            for path in self.image.glob("pages-*.img"):
                progressed |= self._advance(path)
            if not progressed and self.stopping.wait(0.05):
                return

    def _advance(self, path: Path) -> bool:
        try:
            with open(path, "rb") as f:
                ino = os.fstat(f.fileno()).st_ino
                digest, done, known = self.hashes.get(path.name, (_Checksum(), 0, ino))
                if known != ino:
                    digest, done = _Checksum(), 0
                f.seek(done)
                start = done
                # 1 MiB reads stay in the CPU cache between read and hash.
                while done - start < HASH_CHUNK * 64 and (chunk := f.read(HASH_CHUNK)):
                    digest.update(chunk)
                    done += len(chunk)
        except OSError:
            return False
        self.hashes[path.name] = (digest, done, ino)
        return done > start

    def finish(self, path: Path) -> str:
        """The checksum of ``path`` now that criu has exited, reusing what was read meanwhile."""
        with open(path, "rb") as f:
            ino = os.fstat(f.fileno()).st_ino
            digest, done, known = self.hashes.get(path.name, (_Checksum(), 0, ino))
            if known != ino or os.fstat(f.fileno()).st_size < done:
                digest, done = _Checksum(), 0
            f.seek(done)
            while chunk := f.read(HASH_CHUNK):
                digest.update(chunk)
        return digest.hexdigest()


def _finish_manifest(image: Path, hasher: _TailHasher, manifest: dict[str, Any]) -> tuple[dict[str, str], int]:
    hasher.stop()  # lets it catch up with what criu wrote last
    files: dict[str, str] = {}
    stamp: dict[str, list[int]] = {}
    size = 0
    for path in sorted(image.iterdir()):
        if not path.is_file() or not _checksummed(path.name):
            continue
        files[path.name] = hasher.finish(path)
        st = path.stat()
        stamp[path.name] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        size += st.st_size
    manifest["files"] = files
    manifest["size_bytes"] = size
    _write_json(image / STAMP, stamp)
    _write_json(image / MANIFEST, manifest)
    return files, size


def verify_image(image: Path, name: str, kind: str) -> dict[str, Any]:
    """Read and check a checkpoint directory; raise TaskError naming what is wrong."""
    if not image.is_dir():
        raise TaskError(f"checkpoint directory {image} does not exist", code="no-image")
    try:
        manifest = json.loads((image / MANIFEST).read_text())
    except FileNotFoundError:
        raise TaskError(f"{image} has no {MANIFEST}: the dump never finished (or this is not a Kumo checkpoint); "
                        "take a new checkpoint", code="image-incomplete") from None
    except (OSError, ValueError) as exc:
        raise TaskError(f"{image / MANIFEST} is unreadable ({exc}): the checkpoint is damaged", code="image-corrupt") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise TaskError(f"{image / MANIFEST} is not a format-{MANIFEST_FORMAT} Kumo manifest", code="image-corrupt")
    if manifest.get("name") != name or manifest.get("kind") != kind:
        raise TaskError(f"{image} is a checkpoint of {manifest.get('kind')} instance {manifest.get('name')!r}, "
                        f"not of {kind} instance {name!r}", code="image-mismatch")
    files: dict[str, str] = manifest["files"]
    on_disk = {p.name for p in image.iterdir() if p.is_file() and _checksummed(p.name)}
    missing = sorted(set(files) - on_disk)
    extra = sorted(on_disk - set(files))
    if missing or extra:
        what = f"missing {', '.join(missing)}" if missing else f"unexpected {', '.join(extra)}"
        raise TaskError(f"checkpoint {image} is incomplete or altered ({what}): restore refused, nothing was changed",
                        code="image-corrupt")
    try:
        stamp = json.loads((image / STAMP).read_text())
    except (OSError, ValueError):
        stamp = {}
    bad = []
    for fname, expected in files.items():
        st = (image / fname).stat()
        if stamp.get(fname) == [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]:
            continue  # untouched since this node checked it
        if _file_checksum(image / fname) != expected:
            bad.append(fname)
    if bad:
        raise TaskError(f"checkpoint {image} is corrupt: the checksum of {', '.join(sorted(bad))} does not match its manifest; "
                        "restore refused, nothing was changed: take a new checkpoint or copy the image again",
                        code="image-checksum")
    return manifest


# -- transfer ------------------------------------------------------------------------


def _padded(size: int) -> int:
    return -(-size // TAR_BLOCK) * TAR_BLOCK


def _transfer_members(image: Path, manifest: Mapping[str, Any]) -> list[tuple[bytes, Path, int]]:
    """(tar header, path, size) of everything a migration carries; the manifest goes first."""
    entries = [(f"image/{n}", image / n) for n in [MANIFEST, *sorted(manifest["files"])]]
    if manifest.get("kind") == "process":
        entries += [(_carried_name(path, manifest), Path(path)) for path in manifest.get("open_files") or ()]
    members = []
    now = int(time.time())
    for arcname, path in entries:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise TaskError(f"{path} cannot be read for the migration: {exc.strerror}", code="missing-files") from exc
        info = tarfile.TarInfo(arcname)
        info.size, info.mode, info.mtime = size, 0o600, now
        members.append((info.tobuf(format=tarfile.PAX_FORMAT), path, size))
    return members


def _container_members(directory: Path) -> list[tuple[bytes, Path, int]]:
    """(tar header, path, size) of a stopped container's directory, ``container/config`` first."""
    if not (directory / "config").is_file():
        raise TaskError(f"{directory} holds no lxc config: the container to migrate is not there",
                        code="missing-files")
    paths = [directory / "config", directory]
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        paths += [Path(dirpath, n) for n in sorted(dirnames + filenames) if Path(dirpath, n) != directory / "config"]
    members = []
    first_of: dict[tuple[int, int], str] = {}  # (device, inode) -> arcname, for hardlinks
    for path in paths:
        arcname = "container" + ("/" + path.relative_to(directory).as_posix() if path != directory else "")
        try:
            info = _tarinfo(path, arcname, first_of)
        except OSError as exc:
            raise TaskError(f"{path} cannot be read for the migration: {exc.strerror}", code="missing-files") from exc
        if info is not None:
            members.append((info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape"), path, info.size))
    return members


def _tarinfo(path: Path, arcname: str, first_of: dict[tuple[int, int], str]) -> tarfile.TarInfo | None:
    """The header of one file as it is, or None for a socket (whoever bound it binds it again)."""
    st = os.lstat(path)
    info = tarfile.TarInfo(arcname)
    info.mode, info.uid, info.gid, info.mtime = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime
    info.uname = info.gname = ""  # ids are numeric: names differ between hosts, and shifted ids have none
    if stat.S_ISREG(st.st_mode):
        key = (st.st_dev, st.st_ino)
        if st.st_nlink > 1 and key in first_of:
            info.type, info.linkname = tarfile.LNKTYPE, first_of[key]
        else:
            first_of[key] = arcname
            info.size = st.st_size
    elif stat.S_ISDIR(st.st_mode):
        info.type = tarfile.DIRTYPE
    elif stat.S_ISLNK(st.st_mode):
        info.type, info.linkname = tarfile.SYMTYPE, os.readlink(path)
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
        info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
    elif stat.S_ISFIFO(st.st_mode):
        info.type = tarfile.FIFOTYPE
    else:
        return None
    # BINARY: xattr values (security.capability) and file names need not be UTF-8.
    info.pax_headers = {"hdrcharset": "BINARY"}
    for attr in os.listxattr(path, follow_symlinks=False):
        value = os.getxattr(path, attr, follow_symlinks=False)
        info.pax_headers[XATTR + attr] = value.decode("utf-8", "surrogateescape")
    return info


async def _tar_chunks(members: list[tuple[bytes, Path, int]]) -> Any:
    """The tar stream of ``members``, read from disk a chunk at a time."""
    for header, path, size in members:
        yield header
        if not size:  # directories, links and devices are all header
            continue
        f = await asyncio.to_thread(open, path, "rb")
        try:
            left = size
            while left:
                chunk = await asyncio.to_thread(f.read, min(HASH_CHUNK, left))
                if not chunk:
                    raise TaskError(f"{path} shrank while it was being sent: the checkpoint changed underneath",
                                    code="image-changed")
                left -= len(chunk)
                yield chunk
        finally:
            await asyncio.to_thread(f.close)
        if _padded(size) > size:
            yield b"\0" * (_padded(size) - size)
    yield b"\0" * (2 * TAR_BLOCK)


def _tls_context(identity: Any) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(identity.ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(identity.certificate), str(identity.key))
    return context


class _BodyReader:
    """A blocking ``read`` over an aiohttp body, for tarfile in a worker thread; counts and hashes."""

    def __init__(self, content: Any, loop: asyncio.AbstractEventLoop):
        self.content = content
        self.loop = loop
        self.digest = hashlib.sha256()
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        want = HASH_CHUNK if size is None or size < 0 else size
        data = asyncio.run_coroutine_threadsafe(self.content.read(want), self.loop).result(STALL_TIMEOUT)
        self.digest.update(data)
        self.count += len(data)
        return data


def _unpack(body: _BodyReader, incoming: Path, own_root: Path, stage: Any) -> dict[str, Any]:
    """Write a migration tar into ``incoming`` (carried files in place, a container where
    ``stage(config)`` says); hash as it goes."""
    hashes: dict[str, str] = {}
    carried: list[str] = []
    container = _ContainerWriter(stage)
    with tarfile.open(fileobj=body, mode="r|", bufsize=HASH_CHUNK) as tar:  # type: ignore[call-overload]
        for member in tar:
            kind, _, rest = member.name.partition("/")
            if kind == "container":
                container.add(tar, member, rest)
                continue
            source = tar.extractfile(member) if member.isfile() else None
            if source is None:
                raise TaskError(f"the image stream holds {member.name!r}, which is not a regular file", code="image-corrupt")
            if kind == "image" and IMAGE_NAME_RE.match(rest):
                hashes[rest] = _copy_hashed(source, incoming / rest)
            elif kind == "files" and rest and os.path.normpath("/" + rest) == "/" + rest:
                carried.append(_place_carried(source, Path("/" + rest), incoming, own_root))
            elif kind == "state" and rest and os.path.normpath("/" + rest) == "/" + rest:
                carried.append(_place_carried(source, own_root / rest, incoming, own_root))
            else:
                raise TaskError(f"the image stream holds an unexpected entry {member.name!r}", code="image-corrupt")
        # tarfile stops at the end-of-archive blocks; what follows them must be nothing.
        while body.read(HASH_CHUNK):
            pass
    container.finish()
    return {"hashes": hashes, "files": carried, "bytes": body.count, "sha256": body.digest.hexdigest()}


class _ContainerWriter:
    """Unpacks the ``container/`` members of a migration tar into the lxc plugin's staging directory.

    Every member's parent must be a directory this writer made (the sender walks top
    down), so no symlink in the stream is ever followed; hardlinks may point only at files
    it wrote. Directories get their mode and times last, once nothing more is written in them.
    """

    def __init__(self, stage: Any):
        self.stage = stage
        self.root: Path | None = None
        self.dirs: dict[str, tarfile.TarInfo | None] = {}
        self.files: set[str] = set()

    def add(self, tar: tarfile.TarFile, member: tarfile.TarInfo, rel: str) -> None:
        if self.stage is None:
            raise TaskError(f"the image stream of a process holds a container entry {member.name!r}",
                            code="image-corrupt")
        if self.root is None:
            if rel != "config" or not member.isfile() or member.size > MAX_CONFIG_BYTES:
                raise TaskError("the container in the image stream does not begin with its config", code="image-corrupt")
            source = tar.extractfile(member)
            assert source is not None
            data = source.read()
            self.root = self.stage(data.decode("utf-8", "replace"))
            self.dirs[""] = None
            self._write(member, rel, io.BytesIO(data))
            return
        if rel == "" and member.isdir():
            self.dirs[""] = member
            return
        parent, _, leaf = rel.rpartition("/")
        if (not leaf or leaf in (".", "..") or parent not in self.dirs or rel in self.dirs or rel in self.files
                or os.path.normpath(rel) != rel):
            raise TaskError(f"the image stream holds an unexpected container entry {member.name!r}", code="image-corrupt")
        target = self.root / rel
        if member.isfile():
            self._write(member, rel, tar.extractfile(member))
            return
        if member.isdir():
            os.mkdir(target, 0o700)
            self.dirs[rel] = member
            return
        if member.issym():
            os.symlink(member.linkname, target)
        elif member.islnk():
            link = member.linkname.partition("/")[2]
            if not member.linkname.startswith("container/") or link not in self.files:
                raise TaskError(f"the hardlink {member.name!r} in the image stream points at {member.linkname!r}, "
                                "which it did not carry", code="image-corrupt")
            os.link(self.root / link, target, follow_symlinks=False)
            self.files.add(rel)
            return  # the inode's metadata came with its first name
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            os.mknod(target, kind | 0o600, os.makedev(member.devmajor, member.devminor))
        elif member.isfifo():
            os.mkfifo(target, 0o600)
        else:
            raise TaskError(f"the image stream holds {member.name!r} of a type a container cannot have",
                            code="image-corrupt")
        _set_metadata(target, member)

    def _write(self, member: tarfile.TarInfo, rel: str, source: Any) -> None:
        assert self.root is not None
        target = self.root / rel
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(source, out, HASH_CHUNK)
        self.files.add(rel)
        _set_metadata(target, member)

    def finish(self) -> None:
        """Directories' modes and times, deepest first."""
        for rel in sorted(self.dirs, key=lambda r: -r.count("/") - bool(r)):
            member = self.dirs[rel]
            if member is not None and self.root is not None:
                _set_metadata(self.root / rel if rel else self.root, member)


def _set_metadata(path: Path, member: tarfile.TarInfo) -> None:
    # Order matters: chown clears setuid bits and file capabilities, so it comes first.
    os.chown(path, member.uid, member.gid, follow_symlinks=False)
    if not member.issym():
        os.chmod(path, member.mode)
    for key, value in member.pax_headers.items():
        if key.startswith(XATTR):
            os.setxattr(path, key[len(XATTR):], value.encode("utf-8", "surrogateescape"), follow_symlinks=False)
    os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)


def _copy_hashed(source: Any, target: Path) -> str:
    digest = _Checksum()
    with open(target, "xb") as out:
        while chunk := source.read(HASH_CHUNK):
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def _carried_name(path: str, manifest: Mapping[str, Any]) -> str:
    """The tar name of an open file: relative to the agent's state directory when inside it."""
    state = manifest.get("state_dir")
    if state and Path(path).is_relative_to(state):
        return f"state/{Path(path).relative_to(state)}"
    return f"files{path}"


def _local_path(path: str, manifest: Mapping[str, Any], own_state: Path) -> Path:
    """Where an open file of the checkpointed process is on this node (see _carried_name)."""
    state = manifest.get("state_dir")
    if state and Path(path).is_relative_to(state):
        return own_state / Path(path).relative_to(state)
    return Path(path)


def _place_carried(source: Any, path: Path, incoming: Path, own_root: Path) -> str:
    """Put a file the process had open at ``path``, where CRIU expects it; the path."""
    tmp = incoming / f"kumo-carried-{secrets.token_hex(4)}"
    received = _copy_hashed(source, tmp)
    if path.is_file() and _file_checksum(path) == received:
        tmp.unlink()
        return str(path)
    # Inside our own state a differing file can only be a leftover of an earlier attempt
    # (instance names are unique in the fleet): replace it. Elsewhere it is someone's data.
    if not path.resolve().is_relative_to(own_root.resolve()):
        if path.exists():
            raise TaskError(f"{path}, which the process had open, exists on this node with other content: move it "
                            "away (or give both nodes the same file) and migrate again", code="file-conflict")
        raise TaskError(f"{path}, which the process had open, is missing on this node and lies outside the agent's "
                        f"state ({own_root}): provide it at the same path (shared storage) and migrate again",
                        code="missing-files")
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    shutil.move(tmp, path)
    return str(path)


def _check_received(image: Path, name: str, kind: str, hashes: Mapping[str, str]) -> None:
    """Check what arrived against its manifest and stamp it, so the restore need not hash it again."""
    try:
        manifest = json.loads((image / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise TaskError(f"the received checkpoint has no readable {MANIFEST} ({exc})", code="image-corrupt") from exc
    if manifest.get("name") != name or manifest.get("kind") != kind or not isinstance(manifest.get("files"), dict):
        raise TaskError(f"the received checkpoint is of {manifest.get('kind')} instance {manifest.get('name')!r}, "
                        f"not of {kind} instance {name!r}", code="image-mismatch")
    got = {n: h for n, h in hashes.items() if n != MANIFEST}
    if got != manifest["files"]:
        bad = sorted(n for n in set(got) | set(manifest["files"]) if got.get(n) != manifest["files"].get(n))
        raise TaskError(f"the received checkpoint does not match its manifest ({', '.join(bad)}): the transfer "
                        "damaged it; nothing was restored", code="image-checksum")
    stamp = {}
    for fname in got:
        st = (image / fname).stat()
        stamp[fname] = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    _write_json(image / STAMP, stamp)


class _Checksum:
    """CRC-32 with hashlib's interface, for the image's files.

    They are checked for damage (a disk, a truncated or bad copy), not against an attacker:
    a migration's stream is sha256-checked end to end, over mutual TLS. zlib's CRC-32 runs
    at almost three times sha256's speed here, which keeps a dump's checksums behind criu's
    own writing (sha256 made a 1 GiB dump 1.6x raw criu).
    """

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)

    def hexdigest(self) -> str:
        return f"{self.value:08x}"


def _file_checksum(path: Path) -> str:
    digest = _Checksum()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _publish(base: Path, image: Path) -> None:
    """Point ``latest`` at the new checkpoint."""
    tmp = base / f".latest-{secrets.token_hex(3)}"
    tmp.symlink_to(image.name)
    os.replace(tmp, base / "latest")


def _prune(base: Path, keep: int) -> None:
    """Remove the oldest complete checkpoints beyond ``keep`` (``latest`` is always the newest)."""
    latest = (base / "latest").resolve()
    complete = sorted(p for p in base.iterdir() if p.is_dir() and not p.is_symlink() and (p / MANIFEST).exists())
    for old in complete[:-keep]:
        if old.resolve() == latest:
            continue
        shutil.rmtree(old, ignore_errors=True)


def _discard_incoming(images: Path) -> None:
    """Remove images half-received by an agent that stopped mid-transfer: the controller has
    rolled that migration back, and nothing else would ever finish or remove them."""
    for incoming in images.glob("*/*/.incoming-*"):
        log.warning("checkpoint: removing %s, left by a transfer that did not finish", incoming)
        shutil.rmtree(incoming, ignore_errors=True)


def _keep_lxc_log(src: Path, dst: Path) -> None:
    with contextlib.suppress(OSError):
        shutil.copyfile(src, dst)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
