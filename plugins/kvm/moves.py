"""How a VM leaves and enters this node, on libvirt's side: its save and restore, and its
departure and arrival in a live migration. :mod:`plugins.kvm.checkpointing` and
:mod:`plugins.kvm.live` hold the kind's checkpointer and call these through the plugin's
methods of the same names.

These stand apart from the driver's operations (:mod:`plugins.kvm`): a VM that is saved or
leaves is gone from libvirt while its instance lives on elsewhere, and one that is restored
or arrives is defined from a checkpoint's record or the source's migration rather than
from a create. They share with the operations the connection (:class:`~plugins.kvm.host.Host`)
and the instance table (:class:`~plugins.kvm.tracker.Instances`), and leave nothing behind
when they fail, as a create does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import LiveOptions, PluginContext, TaskError
from plugins.kvm import live
from plugins.kvm.acceleration import Acceleration
from plugins.kvm.checkpointing import VmFacts
from plugins.kvm.disks import CONSOLE_LOG, DISK, fresh_dir, make_overlay
from plugins.kvm.domain import DomainFiles, domain_state, domain_xml, lookup, undo_create
from plugins.kvm.host import Host
from plugins.kvm.settings import KvmConfig
from plugins.kvm.tracker import KIND, Instance, Instances

if TYPE_CHECKING:
    from plugins.kvm.checkpointing import Place, SavedVm
    from plugins.kvm.spec import CreateSpec

log = logging.getLogger(__name__)


class Moves:
    """Save, restore, arrival and departure of the VMs of a started kvm plugin: its
    ``config``, ``context``, ``host`` and ``instances``; ``acceleration()`` is the node's."""

    def __init__(self, config: KvmConfig, context: PluginContext, host: Host, instances: Instances,
                 acceleration: Callable[[], Awaitable[Acceleration]]):
        self._config = config
        self._context = context
        self._host = host
        self._instances = instances
        self._acceleration = acceleration
        # VMs a live migration is bringing here: their directory, base image, acceleration
        # and definition, until they run here (then they are instances) or the migration
        # fails (then they go).
        self._arriving: dict[str, tuple[Path, Path, str, str]] = {}

    # ---- for the checkpointer (plugins/kvm/checkpointing.py) ------------------------------

    async def save_facts(self, name: str) -> VmFacts:
        """What a save of ``name`` is decided from, read from libvirt now."""
        conn = await self._host.connection()
        dom = await self._instances.domain(conn, name)
        libvirt = self._host.libvirt
        inst = self._instances.by_name.get(name)
        if inst is None:  # undefined behind Kumo's back while it looked the domain up
            raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")
        xml, (state, reason) = await self._host.call(name, "read", lambda: (dom.XMLDesc(0), dom.state()))
        io_error = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        return VmFacts(xml, await asyncio.to_thread(domain_state, libvirt, dom), io_error, inst.directory,
                       inst.directory / DISK, self._context.images.directory)

    async def save_domain(self, name: str, path: Path) -> None:
        """libvirt's save of the running ``name`` to the file ``path``: the guest stops."""
        conn = await self._host.connection()
        dom = await self._instances.domain(conn, name)
        libvirt = self._host.libvirt
        try:
            await asyncio.to_thread(dom.saveFlags, str(path), None, 0)
        except libvirt.libvirtError as exc:
            running = await asyncio.to_thread(dom.isActive)
            raise TaskError(f"libvirt could not save VM {name!r}: {exc.get_error_message()}; the VM is "
                            + ("still running" if running else "stopped: start it again"), code="dump-failed") from exc
        finally:
            await self._instances.refresh(conn, name)
            self._context.report_changed()

    async def restore_saved(self, name: str, spec: CreateSpec, saved: SavedVm, memory: Path,
                            place: Place | None) -> None:
        """Start ``name`` from the save file ``memory`` with a definition rebuilt from ``spec``
        and ``saved``; ``place`` first puts the checkpoint's files in its directory (None: they
        are there). An instance this node does not have is created for it, and removed again
        if the restore fails."""
        conn = await self._host.connection()
        libvirt = self._host.libvirt
        await self._check_restorable(name, saved)
        inst = self._instances.by_name.get(name)
        if inst is None:
            if await asyncio.to_thread(lookup, libvirt, conn, name) is not None:
                raise TaskError(f"a libvirt domain named {name!r} that Kumo does not manage exists on this node: "
                                "remove it or restore elsewhere", code="exists")
            from plugins.kvm.spec import check_resources

            await asyncio.to_thread(check_resources, spec)
            directory = self._config.instance_dir / name
        else:
            directory = inst.directory
            if await asyncio.to_thread((await self._instances.domain(conn, name)).isActive):
                raise TaskError(f"VM {name!r} is running: stop it before restoring a checkpoint", code="already-running")
        accel = Acceleration(saved.domain_type, "kvm" if saved.domain_type == "kvm" else "tcg", "as saved")
        seed = directory / saved.seed if saved.seed is not None else None
        files = DomainFiles(directory, directory / DISK, seed, directory / CONSOLE_LOG)
        xml = domain_xml(name, spec, accel, files, self._config.network, uuid=saved.uuid, machine=saved.machine)
        base = await self._instances.base_image(self._context.images, spec, cached_first=True)
        defined = False
        try:
            if inst is None:
                await asyncio.to_thread(fresh_dir, directory)
            if place is not None:
                await place(files.disk, base)
            if inst is None:
                self._instances.by_name[name] = Instance(name, directory, "creating", acceleration=accel.name,
                                                         base=base)
                await asyncio.to_thread(conn.defineXML, xml)
                defined = True
            await asyncio.to_thread(conn.restoreFlags, str(memory), xml, 0)
        except BaseException as exc:
            if inst is None:
                self._instances.by_name.pop(name, None)
                await asyncio.to_thread(undo_create, libvirt, conn, name, directory, defined)
            if isinstance(exc, libvirt.libvirtError):
                left = "nothing of it is left on this node" if inst is None else "the VM is left stopped"
                raise TaskError(f"libvirt could not restore VM {name!r}: {exc.get_error_message()}; {left}",
                                code="restore-failed") from exc
            raise
        finally:
            self._instances.fetched.remove(base)
        await self._instances.refresh(conn, name)
        self._context.report_changed()

    # ---- for live migration (plugins/kvm/live.py) --------------------------------------

    async def prepare_arrival(self, name: str, spec: CreateSpec, saved: SavedVm, disk_bytes: int) -> str:
        """Make ``name``'s directory, an empty overlay of ``disk_bytes`` on this node's base
        image and its seed, for a live migration to fill; the domain definition to arrive
        with. Nothing is defined: libvirt defines it when the migration finishes."""
        from plugins.kvm.spec import check_resources

        conn = await self._host.connection()
        libvirt = self._host.libvirt
        await self._check_restorable(name, saved)
        if (name in self._instances.by_name or name in self._arriving
                or await asyncio.to_thread(lookup, libvirt, conn, name)):
            raise TaskError(f"an instance (libvirt domain) named {name!r} already exists on this node", code="exists")
        await asyncio.to_thread(check_resources, spec)
        directory = self._config.instance_dir / name
        base = await self._instances.base_image(self._context.images, spec, cached_first=True)
        try:
            await asyncio.to_thread(fresh_dir, directory)
            seed = await self._context.hooks.instance_seed(
                instance={"name": name, "kind": KIND, **dataclasses.asdict(spec)}, medium="iso", workdir=directory)
            await make_overlay(base, directory / DISK, disk_bytes)
        except BaseException:
            self._instances.fetched.remove(base)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        accel = Acceleration(saved.domain_type, "kvm" if saved.domain_type == "kvm" else "tcg", "as migrated")
        files = DomainFiles(directory, directory / DISK, seed, directory / CONSOLE_LOG)
        definition = domain_xml(name, spec, accel, files, self._config.network, uuid=saved.uuid, machine=saved.machine)
        self._arriving[name] = (directory, base, accel.name, definition)
        return definition

    async def arrived(self, name: str, hold: bool) -> bool:
        """Whether the VM a live migration brought runs here; it is an instance from now on,
        paused first when ``hold`` (see agent.sdk.LiveMigrator.live_arrived), or left running
        when libvirt cannot pause it: the controller's decision then stops one copy."""
        conn = await self._host.connection()
        libvirt = self._host.libvirt
        dom = await asyncio.to_thread(lookup, libvirt, conn, name)
        # An incoming VM is paused until libvirt's Finish succeeds, so one that runs has arrived.
        if dom is None or name not in self._arriving or (await asyncio.to_thread(dom.state))[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        if hold:
            log.warning("kvm: VM %s arrived, but the move is not known to have finished on the source, whose copy "
                        "may run on: it is paused here until the controller decides which one goes on", name)
            try:
                await asyncio.to_thread(dom.suspend)
            except libvirt.libvirtError as exc:
                # Still an arrival the controller must settle: removed here, the VM would be
                # lost if the source did finish.
                log.error("kvm: VM %s could not be paused (%s): it runs here until the controller decides", name,
                          exc.get_error_message())
        directory, base, accel, definition = self._arriving.pop(name)
        self._instances.fetched.remove(base)
        self._instances.by_name[name] = Instance(name, directory, "creating", acceleration=accel, base=base)
        # Its persistent definition came in the source's migration cookie: this node's own
        # replaces it (see plugins/kvm/rpcfilter.py).
        try:
            await asyncio.to_thread(conn.defineXML, definition)
        except libvirt.libvirtError as exc:
            log.error("kvm: VM %s arrived, but libvirt refused this node's definition of it, so its persistent "
                      "definition is the one the source sent: %s", name, exc.get_error_message())
        await self._instances.refresh(conn, name)
        self._context.report_changed()
        return self._instances.by_name[name].state in ("paused", "running")

    async def abandon_arrival(self, name: str) -> None:
        """Remove what :meth:`prepare_arrival` made, unless libvirt holds the VM now."""
        arriving = self._arriving.get(name)
        if arriving is None:
            return
        conn = await self._host.connection()
        if await asyncio.to_thread(lookup, self._host.libvirt, conn, name) is not None:
            return  # the migration finished after all: it is not ours to remove
        del self._arriving[name]
        self._instances.fetched.remove(arriving[1])
        await asyncio.to_thread(shutil.rmtree, arriving[0], True)

    async def migrate_out(self, name: str, definition: str, sockets: Path, options: LiveOptions,
                          progress: Callable[[Mapping[str, Any]], None]) -> dict[str, Any]:
        """Move the running ``name`` to the libvirtd reached through ``sockets/control.sock``
        (see plugins/kvm/live.py); its figures. A failure leaves it running here."""
        conn = await self._host.connection()
        dom = await self._instances.domain(conn, name)
        libvirt = self._host.libvirt
        try:
            dconn = await asyncio.to_thread(libvirt.open, f"qemu+unix:///system?socket={sockets / 'control.sock'}")
        except libvirt.libvirtError as exc:
            raise TaskError(f"the destination's libvirtd cannot be reached through the tunnel: "
                            f"{exc.get_error_message()}", code="migration-failed") from exc
        finished = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            await asyncio.to_thread(dom.migrateSetMaxDowntime, options.max_downtime_ms, 0)
            moving = asyncio.ensure_future(asyncio.to_thread(
                live.migrate, libvirt, dom, dconn, definition, sockets,
                lambda: loop.call_soon_threadsafe(finished.set)))
            acted = await live.follow(libvirt, dom, finished, options, progress)
            try:
                if acted == "abort":
                    # libvirt ends an aborted job by itself, unless it waits on a tunnelled stream
                    # that no longer moves: then closing the tunnels (on the way out) ends it.
                    moving.add_done_callback(lambda f: f.cancelled() or f.exception())
                    await asyncio.wait_for(asyncio.shield(moving), live.ABORT_GRACE)
                else:
                    await moving
            except TimeoutError:
                raise TaskError(f"VM {name!r} did not converge within {options.converge_timeout:.0f} s, and libvirt "
                                f"had not ended the aborted migration {live.ABORT_GRACE:.0f} s later: its streams "
                                "were closed, and it runs here as before", code="not-converging") from None
            except libvirt.libvirtError as exc:
                if acted == "stop-and-copy":
                    with contextlib.suppress(libvirt.libvirtError):
                        await asyncio.to_thread(dom.resume)
                if acted == "abort":
                    raise TaskError(f"VM {name!r} did not converge within {options.converge_timeout:.0f} s "
                                    f"(it dirties memory faster than it is copied): the migration was aborted and "
                                    "it runs here as before", code="not-converging") from exc
                raise TaskError(f"libvirt's live migration of VM {name!r} failed: {exc.get_error_message()}; it "
                                "runs here as before", code="migration-failed") from exc
            stats = await asyncio.to_thread(live.completed, libvirt, dconn, name)
            # libvirt undefined it here (VIR_MIGRATE_UNDEFINE_SOURCE) without an event saying so.
            self._instances.by_name.pop(name, None)
            # An abort that came as the copy converged did nothing: the guest moved all the same.
            return {"not_converging": None if acted == "abort" else acted, **stats}
        finally:
            # A close waits for the destination's answer through the tunnel, which may be stuck.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(live.close, libvirt, dconn), live.CLOSE_TIMEOUT)
            await self._instances.refresh(conn, name)
            self._context.report_changed()

    async def _check_restorable(self, name: str, saved: SavedVm) -> None:
        """Refuse a saved VM whose guest-visible hardware this node would not give it."""
        if saved.domain_type == "kvm" and (await self._acceleration()).domain_type != "kvm":
            raise TaskError(f"VM {name!r} was saved running with KVM, and this node has no working KVM: its "
                            "state cannot be restored under TCG", code="import-refused")
        if saved.nic != (self._config.network != "none"):
            had = "had a network interface" if saved.nic else "had no network interface"
            raise TaskError(f"VM {name!r} {had}, and this node's plugins.kvm.network is {self._config.network!r}: "
                            "its saved state needs the same devices", code="import-refused")

