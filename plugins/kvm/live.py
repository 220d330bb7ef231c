"""Live migration of a VM: the kvm kind's :class:`agent.sdk.LiveMigrator`.

libvirt's own migration protocol moves the guest while it runs (qemu's pre-copy: memory is
copied while the guest dirties it, then the guest pauses for the last pages), with its disk
copied alongside over NBD (``VIR_MIGRATE_NON_SHARED_INC``: only the qcow2 overlay; the
destination has its own overlay ready, backed by its own copy of the base image). Until the
destination's Finish succeeds the source keeps the domain, so any failure leaves the guest
running on the source and only a transient domain, which libvirt removes, on the
destination.

libvirt 9.0 refuses to copy disks through its tunnelled mode, so the migration is native
and each of its three streams is a unix socket the checkpoint plugin tunnels through the
controller (:mod:`plugins.checkpoint.tunnels`): ``control.sock``, the libvirt connection of
the source agent to the destination's libvirtd (this agent drives the migration as a
libvirt client: "managed" migration); ``memory.sock``, qemu's migration stream (libvirtd
connects it and hands qemu the descriptor); ``disks.sock``, the NBD stream (qemu connects
it). qemu's memory and disk sockets have the same path on both nodes (libvirt gives the
destination's qemu the path the source connects to), so they live in a directory of the
same name on each node; unix sockets rather than TCP, because a loopback port would let
any local user into another node's libvirtd or qemu. The directory is root's, with qemu's
group, which must reach the sockets.

The destination's definition is built on the destination from the controller's create
payload, as a restore builds it: only the saved UUID, machine type and accelerator come
from the source, checked as a checkpoint's record is. What the source says on
``control.sock`` reaches the destination's libvirtd through :mod:`plugins.kvm.rpcfilter`:
only a migration's calls, with that definition.

The directory prepared on the destination is marked (``<instance_dir>/.arriving-<name>``,
naming the agent process that prepared it) until the migration ends either way. An agent
killed in between leaves the mark, and at its next start :func:`discard_arrivals` removes
the directory of a VM that did not arrive, as the checkpoint plugin removes a
half-received image.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import pwd
import shutil
import time
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import (
    NAME_RE,
    LiveOptions,
    LivePrepared,
    TaskError,
    atomic_write,
    boot_id,
    run_command,
    start_time,
)
from plugins.kvm.checkpointing import KvmCheckpointer, parse_saved, save_blockers, saved_vm
from plugins.kvm.disks import backing_file
from plugins.kvm.domain import lookup
from plugins.kvm.rpcfilter import RpcFilter

if TYPE_CHECKING:
    from plugins.kvm.host import Host

log = logging.getLogger(__name__)

QEMU_USER = "libvirt-qemu"  # Debian's: what qemu runs as under libvirtd
SYSTEM_SOCKET = "/run/libvirt/libvirt-sock"
POLL = 0.5  # seconds between two reads of the migration's progress
ABORT_GRACE = 60.0  # seconds libvirt may take to end its job after an abort
CLOSE_TIMEOUT = 10.0
# qemu's largest downtime limit, in ms: set, qemu pauses the guest at once and copies the rest.
STOP_AND_COPY_DOWNTIME_MS = 2_000_000
ARRIVING = ".arriving-"  # the mark of a directory prepared for a live arrival, beside it


def libvirtd_socket(uri: str) -> str | None:
    """The unix socket of the libvirtd behind ``uri`` (``qemu:///system``, or
    ``qemu+unix:///system?socket=PATH``); None for one reached otherwise."""
    parsed = urllib.parse.urlsplit(uri)
    if parsed.scheme not in ("qemu", "qemu+unix") or parsed.path != "/system" or parsed.netloc:
        return None
    return urllib.parse.parse_qs(parsed.query).get("socket", [SYSTEM_SOCKET])[0]


def qemu_group() -> int | None:
    """The group qemu runs as, which must reach the migration's sockets; None: root's."""
    try:
        return pwd.getpwnam(QEMU_USER).pw_gid
    except KeyError:
        return None


def share_with_qemu(path: Path) -> None:
    """Give qemu's group access to ``path`` (a directory or a socket). Blocking."""
    gid = qemu_group()
    if gid is not None:
        os.chown(path, 0, gid)
    path.chmod(0o770 if path.is_dir() else 0o660)


class KvmLiveMigrator(KvmCheckpointer):
    """Save, restore and live migration of the VMs of the kvm plugin."""

    async def live_facts(self, name: str) -> Mapping[str, Any]:
        plugin = self.plugin
        if libvirtd_socket(plugin.config.uri) is None:
            raise TaskError(f"plugins.kvm.uri {plugin.config.uri!r} is not a local libvirtd socket: a live migration "
                            "tunnels its connection to it", code="unsupported-kind")
        facts = await plugin.save_facts(name)
        refused = save_blockers(facts.xml, facts.state, facts.io_error, facts.directory)
        if refused:
            raise TaskError("; ".join(b.message for b in refused), code=refused[0].code)
        if facts.state != "running":
            raise TaskError(f"VM {name!r} is {facts.state}: only a running VM moves live", code="not-running")
        saved = saved_vm(facts.xml, await asyncio.to_thread(backing_file, facts.disk), facts.cache)
        info = await run_command("qemu-img", "info", "-U", "-f", "qcow2", "--output=json", str(facts.disk))
        if info.returncode != 0:
            raise TaskError(f"qemu-img could not read the disk of VM {name!r}: {info.error}", code="failed")
        return {"uuid": saved.uuid, "machine": saved.machine, "domain_type": saved.domain_type, "nic": saved.nic,
                "seed": saved.seed, "disk_bytes": json.loads(info.stdout)["virtual-size"]}

    async def live_prepare(self, name: str, instance: Mapping[str, Any], facts: Mapping[str, Any],
                           sockets: Path) -> LivePrepared:
        plugin = self.plugin
        control = libvirtd_socket(plugin.config.uri)
        if control is None:
            raise TaskError(f"plugins.kvm.uri {plugin.config.uri!r} is not a local libvirtd socket: a live migration "
                            "tunnels its connection to it", code="unsupported-kind")
        size = facts.get("disk_bytes")
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise TaskError(f"the source gave the disk size {size!r:.40}, not a number of bytes", code="import-refused")
        record = {"spec": dict(instance), **{key: facts.get(key) for key in
                                             ("uuid", "machine", "domain_type", "nic", "seed")}}
        saved, spec = parse_saved(record, instance)
        await asyncio.to_thread(share_with_qemu, sockets)
        mark = plugin.config.instance_dir / f"{ARRIVING}{name}"
        await asyncio.to_thread(_mark, mark)  # before the directory exists: a kill at any point leaves it
        try:
            definition = await plugin.prepare_arrival(name, spec, saved, size)
        except BaseException:
            await asyncio.to_thread(mark.unlink, missing_ok=True)
            raise
        import libvirt  # loaded: prepare_arrival connected to libvirtd

        params = migration_params(libvirt, definition, sockets)
        del params[libvirt.VIR_MIGRATE_PARAM_DEST_XML]  # the filter puts it in, whatever the source sent
        flags = migration_flags(libvirt)
        return LivePrepared(definition, {"control": Path(control), "memory": sockets / "memory.sock",
                                         "disks": sockets / "disks.sock"},
                            {"control": lambda: RpcFilter(name, params, flags, definition).feed})

    async def live_migrate(self, name: str, definition: str, sockets: Path, options: LiveOptions,
                           progress: Callable[[Mapping[str, Any]], None]) -> Mapping[str, Any]:
        for path in [sockets, *await asyncio.to_thread(lambda: list(sockets.glob("*.sock")))]:
            await asyncio.to_thread(share_with_qemu, path)
        return await self.plugin.migrate_out(name, definition, sockets, options, progress)

    async def live_arrived(self, name: str, hold: bool) -> bool:
        return await self.plugin.arrived(name, hold)

    async def live_abandon(self, name: str) -> None:
        await self.plugin.abandon_arrival(name)
        await asyncio.to_thread((self.plugin.config.instance_dir / f"{ARRIVING}{name}").unlink, missing_ok=True)


async def discard_arrivals(instance_dir: Path, host: Host) -> None:
    """At start-up: remove the directories prepared for VMs that never arrived (marked by a
    process that no longer runs, and no domain of that name in libvirt). Without a
    connection to libvirtd that cannot be told, and they wait for the next start."""
    marks = await asyncio.to_thread(lambda: list(instance_dir.glob(f"{ARRIVING}*")))
    for mark in marks:
        if await asyncio.to_thread(_preparer_runs, mark):
            continue  # `kumo-agent plugins` beside a running agent: its arrival is under way
        name = mark.name.removeprefix(ARRIVING)
        if not NAME_RE.match(name):
            continue  # not a mark of Kumo's: never a path outside the instance's directory
        directory = instance_dir / name
        if await asyncio.to_thread(directory.exists):
            arrived = await asyncio.to_thread(_defined, host, name)
            if arrived is None:
                log.warning("kvm: %s was prepared for a live migration that did not end, and libvirtd cannot say "
                            "whether the VM arrived: it is kept until the next start", directory)
                continue
            if not arrived:
                log.warning("kvm: removing %s, prepared for a live migration that did not end", directory)
                await asyncio.to_thread(shutil.rmtree, directory, True)
        await asyncio.to_thread(mark.unlink, missing_ok=True)


def _defined(host: Host, name: str) -> bool | None:
    """Whether libvirt has a domain ``name``; None when it cannot be asked. Blocking."""
    if host.conn is None:
        return None
    try:
        return lookup(host.libvirt, host.conn, name) is not None
    except host.libvirt.libvirtError:
        return None


def _mark(path: Path) -> None:
    """Write ``path``, naming this process as no other process is, even after a reboot. Blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # Whole or absent (a full disk fails the task naming it): a torn mark would read as a
    # killed preparer's, and its arrival be discarded under way. Not fsynced: a mark is
    # about this boot only.
    atomic_write(path, json.dumps([boot_id(), os.getpid(), start_time(os.getpid())]), durable=False)


def _preparer_runs(mark: Path) -> bool:
    """Whether the process that wrote ``mark`` runs. Blocking."""
    try:
        boot, pid, started = json.loads(mark.read_text())
    except (OSError, ValueError, TypeError):
        return False
    return boot == boot_id() and isinstance(pid, int) and start_time(pid) == started


def migration_flags(libvirt: Any) -> int:
    """The flags of Kumo's live migrations, the only ones a destination accepts."""
    return (libvirt.VIR_MIGRATE_LIVE | libvirt.VIR_MIGRATE_NON_SHARED_INC | libvirt.VIR_MIGRATE_PERSIST_DEST
            | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE)


def migration_params(libvirt: Any, definition: str, sockets: Path) -> dict[str, Any]:
    """The parameters of Kumo's live migration to the destination that prepared
    ``definition``, the only ones it accepts. The destination's definition is also the
    persistent one it keeps, rather than the source's, which would name the source's files."""
    return {
        libvirt.VIR_MIGRATE_PARAM_URI: f"unix://{sockets / 'memory.sock'}",
        libvirt.VIR_MIGRATE_PARAM_DISKS_URI: f"unix://{sockets / 'disks.sock'}",
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: definition,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: definition,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: ["vda"],  # the overlay; the seed is read-only
    }


def migrate(libvirt: Any, dom: Any, dconn: Any, definition: str, sockets: Path, done: Callable[[], None]) -> None:
    """libvirt's managed migration of ``dom`` to ``dconn``, its streams through ``sockets``. Blocking."""
    try:
        dom.migrate3(dconn, migration_params(libvirt, definition, sockets), migration_flags(libvirt))
    finally:
        done()


def completed(libvirt: Any, dconn: Any, name: str) -> dict[str, Any]:
    """The figures of the finished migration, as the destination's libvirtd recorded them
    (the source's domain is gone); empty when it cannot tell. Blocking.

    The domain handle is released here, in this thread, while the connection is open: a
    handle freed after its remote connection closed blocks the thread that frees it."""
    try:
        dom = dconn.lookupByName(name)
        stats = dom.jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        del dom
    except libvirt.libvirtError:
        return {}
    shown = {key: value for key, value in figures(stats, time.monotonic()).items() if key != "elapsed_ms"}
    return {**shown, "downtime_ms": shown.pop("downtime", None), "total_ms": stats.get("time_elapsed")}


def close(libvirt: Any, conn: Any) -> None:
    """Close a libvirt connection, whatever state it is in. Blocking."""
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()


def figures(stats: Mapping[str, Any], started: float) -> dict[str, Any]:
    """The progress the controller shows, from ``virDomainGetJobStats``."""
    keys = ("memory_total", "memory_remaining", "memory_dirty_rate", "memory_iteration", "disk_total",
            "disk_remaining", "downtime")
    shown = {key: stats[key] for key in keys if key in stats}
    # libvirt gives the dirty rate in pages per second.
    if "memory_dirty_rate" in shown and "memory_page_size" in stats:
        shown["memory_dirty_rate"] = shown["memory_dirty_rate"] * stats["memory_page_size"]
    shown["elapsed_ms"] = round((time.monotonic() - started) * 1000)
    return shown


async def follow(libvirt: Any, dom: Any, finished: asyncio.Event, options: LiveOptions,
                 progress: Callable[[Mapping[str, Any]], None]) -> str | None:
    """Report the job's progress until it ends; past the convergence timeout, pause the guest
    (stop-and-copy) or abort, as ``options`` say. What it did then, None if nothing."""
    started = time.monotonic()
    acted: str | None = None
    while not finished.is_set():
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(finished.wait(), POLL)
        if finished.is_set():
            break
        try:
            stats = await asyncio.to_thread(dom.jobStats, 0)
        except libvirt.libvirtError:
            continue
        shown = figures(stats, started)
        if acted is None and time.monotonic() - started > options.converge_timeout:
            acted = options.on_no_converge
            shown["not_converging"] = acted
            log.warning("kvm: the live migration of %s did not converge in %.0f s: %s", dom.name(),
                        options.converge_timeout, acted)
            # qemu finishes the copy by pausing the guest itself (as at any migration's end,
            # then resuming it wherever the copy ends up), not a pause from outside in the
            # middle of its job: after a virDomainSuspend the TCG guests of the tests ran on
            # the destination with corrupted memory, now and then.
            with contextlib.suppress(libvirt.libvirtError):
                if acted == "stop-and-copy":
                    await asyncio.to_thread(dom.migrateSetMaxDowntime, STOP_AND_COPY_DOWNTIME_MS, 0)
                else:
                    await asyncio.to_thread(dom.abortJob)
        progress(shown)
    return acted

