"""The ``kvm`` plugin: virtual machines as persistent libvirt domains, this node's ``kvm``
instance driver.

Read top to bottom: the hooks, the driver's operations, then the instance table that
libvirt's events keep fresh. The pieces are this package's modules, one concern each:
:mod:`~plugins.kvm.settings`, :mod:`~plugins.kvm.spec` (the create payload),
:mod:`~plugins.kvm.acceleration` (KVM or TCG), :mod:`~plugins.kvm.domain` (domain XML,
metadata, states), :mod:`~plugins.kvm.disks` (instance directory, qcow2 overlay),
:mod:`~plugins.kvm.host` (libvirt, its connection and events),
:mod:`~plugins.kvm.liveness` (libvirtd as seen by a node with no VMs, libvirt not loaded),
:mod:`~plugins.kvm.usage` (what each VM uses, from one bulk stats call) and
:mod:`~plugins.kvm.checkpointing` (save, restore and migration: the kind's
``NativeCheckpointer``).

- A VM is a persistent domain. Its disk is a qcow2 overlay on a base image from the
  node's image cache, or the guest boots a kernel and initrd directly. Its first-boot seed
  comes from whichever plugin implements ``kumo_instance_seed`` (the cloudinit plugin),
  attached read-only as a cdrom. The serial console goes to a file, read by ``console``.
- Instance state comes from libvirt lifecycle events; a full listing is read only at
  connect and reconnect. That first listing is also the adoption after an agent restart,
  which never starts or stops anything.
- libvirt is loaded only once the node has KVM work (instance directories from before, or
  a kvm task); until then the fingerprint and health probe come from
  :class:`~plugins.kvm.liveness.Liveness`.
- Every libvirt call and file operation runs off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from agent.sdk import (
    ConsoleOutput,
    Fingerprint,
    InstanceState,
    InstanceUsage,
    LiveOptions,
    PluginContext,
    Probe,
    ProbeResult,
    TaskError,
    hookimpl,
    tail,
)
from plugins.kvm.acceleration import Acceleration, decide
from plugins.kvm.checkpointing import VmFacts, device_blockers
from plugins.kvm.disks import (
    CONSOLE_LOG,
    DISK,
    backing_file,
    fresh_dir,
    has_instance_dirs,
    make_overlay,
)
from plugins.kvm.domain import (
    DomainFiles,
    domain_state,
    domain_xml,
    event_state,
    kumo_domains,
    lookup,
)
from plugins.kvm.host import NO_BINDING, Host
from plugins.kvm.live import KvmLiveMigrator, discard_arrivals
from plugins.kvm.liveness import Liveness
from plugins.kvm.settings import KvmConfig, parse_config

if TYPE_CHECKING:
    from plugins.kvm.checkpointing import Place, SavedVm
    from plugins.kvm.spec import CreateSpec

log = logging.getLogger(__name__)

KIND = "kvm"


@dataclasses.dataclass
class _Instance:
    """What the plugin knows about one of its domains (kept fresh by lifecycle events)."""

    name: str
    directory: Path
    state: str = "unknown"
    reason: str = ""
    acceleration: str | None = None
    base: Path | None = None  # the image its disk is an overlay of, which must stay cached
    # What its definition has that no checkpoint can hold (a host device...), as it was
    # when the plugin last read it: for `kumoctl instances show`; a dump checks afresh.
    blockers: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def shown(self) -> InstanceState:
        details: dict[str, Any] = {"console_log": str(self.directory / CONSOLE_LOG)}
        if self.acceleration:
            details["acceleration"] = self.acceleration
        if self.reason:
            details["reason"] = self.reason
        if self.blockers:
            details["checkpoint_blockers"] = self.blockers
        return InstanceState(self.name, KIND, self.state, details)  # type: ignore[arg-type]


class KvmPlugin:
    """Runs ``kind: kvm`` instances through libvirt; it is its own instance driver."""

    kind = KIND

    def __init__(self) -> None:
        self.config = KvmConfig()
        self._context: PluginContext | None = None
        self._host: Host | None = None
        self._liveness: Liveness | None = None
        self._instances: dict[str, _Instance] = {}
        # Base images of creates between fetching the image and recording the instance.
        self._fetched: list[Path] = []
        # VMs a live migration is bringing here: their directory, base image, acceleration
        # and definition, until they run here (then they are instances) or the migration
        # fails (then they go).
        self._arriving: dict[str, tuple[Path, Path, str, str]] = {}
        self._changed = asyncio.Event()
        self._acceleration_task: asyncio.Task[Acceleration] | None = None
        self._stopped = False

    # ---- hooks ---------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self.config = parse_config(section, source)

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self._context = context
        self._host = Host(self.config.uri, self._connected, self._lost, self._lifecycle)
        self._liveness = Liveness(self.config.uri)
        context.images.add_in_use(self._bases_in_use)
        self._acceleration_task = asyncio.create_task(decide(self.config.acceleration, context.state_dir))
        # Instance directories from before mean domains to adopt: libvirt is needed now.
        # Otherwise it waits for the first kvm task, and liveness answers for libvirtd.
        if await asyncio.to_thread(has_instance_dirs, self.config.instance_dir):
            await self._host.load()
        else:
            await self._liveness.refresh()
        await discard_arrivals(self.config.instance_dir, self._host)

    @hookimpl
    async def kumo_shutdown(self) -> None:
        self._stopped = True
        task = self._acceleration_task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._liveness is not None:
            await self._liveness.close()
        if self._host is not None:
            await self._host.close()

    @hookimpl
    async def kumo_fingerprint(self) -> Fingerprint:
        host = self._host
        if host is not None and not self._stopped:
            if not host.loaded:
                await self._require_liveness().refresh()
            elif host.conn is None:
                await host.connect()
        reason = self._unavailable()
        if reason:
            return Fingerprint(available=False, reason=reason, kinds=(KIND,))
        accel = await self._acceleration()
        return Fingerprint(
            available=True,
            kinds=(KIND,),
            attributes={
                "acceleration": accel.name,
                "acceleration_reason": accel.reason,
                "uri": self.config.uri,
                **self._versions(),
                "instances": len(self._instances),
            },
        )

    @hookimpl
    def kumo_instance_driver(self) -> KvmPlugin:
        return self

    @hookimpl
    def kumo_checkpointer(self) -> KvmLiveMigrator | None:
        # Without the binding no VM can run here; a libvirtd that is down only for now is
        # the pre-flight's "unavailable", with its reason.
        if self._host is None or self._unavailable() == NO_BINDING:
            return None
        return KvmLiveMigrator(self)

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "kumo_kvm_libvirt_up", "1 while libvirtd answers the kvm plugin (its connection, or its idle probe)"
        )
        up.add_metric([], 0.0 if self._unavailable() else 1.0)
        return [up]

    @hookimpl
    def kumo_probes(self) -> Iterable[Probe]:
        return [Probe(name="kvm-libvirtd", run=self._probe_libvirtd)]

    async def _probe_libvirtd(self) -> ProbeResult:
        """Critical while libvirtd is unreachable: VMs are unmanaged and refused until it is back."""
        host = self._host
        if host is not None and not host.loaded and not self._stopped:
            await self._require_liveness().refresh()
        reason = self._unavailable()
        if host is None or reason == NO_BINDING:
            return ProbeResult("unknown", message=reason)
        if reason:
            return ProbeResult("critical", 0.0, message=reason)
        if not host.loaded:
            return ProbeResult("ok", 1.0, message=f"{self.config.uri} answers (no VMs here: libvirt not loaded)")
        return ProbeResult("ok", 1.0, message=f"connected to {self.config.uri}")

    # ---- the driver's operations -----------------------------------------------------

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        """Define and start a new domain; on any failure nothing of it is left behind."""
        # Create-time code (~0.1 MB resident with its dataclasses): an idle agent does not hold it.
        from plugins.kvm.spec import check_resources, parse_create

        spec = parse_create(payload)
        conn = await self._connection()
        libvirt = self._require_host().libvirt
        if name in self._instances or await asyncio.to_thread(lookup, libvirt, conn, name) is not None:
            raise TaskError(
                f"an instance (libvirt domain) named {name!r} already exists on this node: "
                "delete it or choose another name",
                code="exists",
            )
        await asyncio.to_thread(check_resources, spec)
        accel = await self._acceleration()
        directory = self.config.instance_dir / name
        files = DomainFiles(directory, directory / DISK, None, directory / CONSOLE_LOG)
        defined = False
        base: Path | None = None
        try:
            await asyncio.to_thread(fresh_dir, directory)
            seed = await self._require_context().hooks.instance_seed(instance=payload, medium="iso", workdir=directory)
            files = dataclasses.replace(files, seed=seed)
            base = await self._base_image(spec)
            await make_overlay(base, files.disk)
            xml = domain_xml(name, spec, accel, files, self.config.network)
            self._instances[name] = _Instance(name, directory, "creating", acceleration=accel.name, base=base)
            dom = await asyncio.to_thread(conn.defineXML, xml)
            defined = True
            await asyncio.to_thread(dom.create)
        except BaseException as exc:
            self._instances.pop(name, None)
            await asyncio.to_thread(self._undo_create, conn, name, directory, defined)
            if isinstance(exc, libvirt.libvirtError):
                raise TaskError(f"libvirt refused to create {name!r}: {exc.get_error_message()}",
                                code="failed") from exc
            raise
        finally:
            if base is not None:
                self._fetched.remove(base)
        await self._refresh(conn, name)
        self._report_changed()

    async def start(self, name: str) -> None:
        """Start a stopped domain; starting a running one is not an error."""
        conn = await self._connection()
        dom = await self._domain(conn, name)
        if not await asyncio.to_thread(dom.isActive):
            await self._require_host().call(name, "start", dom.create)
        await self._refresh(conn, name)

    async def stop(self, name: str, timeout: float | None) -> bool:
        """ACPI shutdown, then destroy if the guest has not powered off within ``timeout``
        (None: ``shutdown_timeout``); whether it had to destroy."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        conn = await self._connection()
        dom = await self._domain(conn, name)
        host = self._require_host()
        forced = False
        if await asyncio.to_thread(dom.isActive):
            await host.call(name, "shut down", dom.shutdown)
            if not await self._wait_state(name, ("stopped", "failed"), timeout):
                if await asyncio.to_thread(dom.isActive):
                    forced = True
                    await host.call(name, "destroy", dom.destroy)
        await self._refresh(conn, name)
        self._report_changed()
        return forced

    async def delete(self, name: str) -> None:
        """Destroy (if running) and undefine the domain, and remove its disk, seed and log; an
        instance directory without a domain (a create cut off by a crash) is removed too."""
        conn = await self._connection()
        try:
            dom = await self._domain(conn, name)
        except TaskError as exc:
            directory = self.config.instance_dir / name
            if exc.code != "not-found" or not await asyncio.to_thread(directory.is_dir):
                raise
            await asyncio.to_thread(shutil.rmtree, directory, True)
            return
        host = self._require_host()
        inst = self._instances.get(name)
        if inst is None:  # undefined behind Kumo's back while it looked the domain up
            self._refuse_unknown(name)
        directory = inst.directory
        if await asyncio.to_thread(dom.isActive):
            await host.call(name, "destroy", dom.destroy)
        flags = host.libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | host.libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        await host.call(name, "undefine", dom.undefineFlags, flags)
        self._instances.pop(name, None)
        await asyncio.to_thread(shutil.rmtree, directory, True)
        self._report_changed()

    async def console(self, name: str, size: int) -> ConsoleOutput:
        """The end of the serial console log, which the guest's serial port writes directly."""
        inst = self._instances.get(name)
        if inst is None:
            self._refuse_unknown(name)
        text = await asyncio.to_thread(tail, inst.directory / CONSOLE_LOG, size)
        return ConsoleOutput(text)

    async def adopt(self) -> Iterable[InstanceState]:
        """The domains found at start-up: connecting read them, and events keep them current.

        A node without instance directories has none, and libvirt stays unloaded.
        """
        return self.list()

    def list(self) -> Iterable[InstanceState]:
        return [inst.shown() for inst in sorted(self._instances.values(), key=lambda i: i.name)]

    def usage(self) -> dict[str, InstanceUsage]:
        """This agent's running VMs, from one ``getAllDomainStats`` call; nothing while
        libvirt is not loaded or not connected (``kumo_kvm_libvirt_up`` says so)."""
        host = self._host
        conn = host.conn if host is not None else None
        if conn is None or not self._instances:
            return {}
        from plugins.kvm.usage import domain_usage

        try:
            return domain_usage(host.libvirt, conn, set(self._instances))
        except host.libvirt.libvirtError as exc:
            log.warning("kvm: reading domain stats failed: %s", exc.get_error_message())
            return {}

    # ---- for the checkpointer (plugins/kvm/checkpointing.py) ------------------------------

    async def save_facts(self, name: str) -> VmFacts:
        """What a save of ``name`` is decided from, read from libvirt now."""
        conn = await self._connection()
        dom = await self._domain(conn, name)
        host = self._require_host()
        libvirt = host.libvirt
        inst = self._instances.get(name)
        if inst is None:
            self._refuse_unknown(name)
        xml, (state, reason) = await host.call(name, "read", lambda: (dom.XMLDesc(0), dom.state()))
        io_error = state == libvirt.VIR_DOMAIN_PAUSED and reason == libvirt.VIR_DOMAIN_PAUSED_IOERROR
        return VmFacts(xml, await asyncio.to_thread(domain_state, libvirt, dom), io_error, inst.directory,
                       inst.directory / DISK, self._require_context().images.directory)

    async def save_domain(self, name: str, path: Path) -> None:
        """libvirt's save of the running ``name`` to the file ``path``: the guest stops."""
        conn = await self._connection()
        dom = await self._domain(conn, name)
        libvirt = self._require_host().libvirt
        try:
            await asyncio.to_thread(dom.saveFlags, str(path), None, 0)
        except libvirt.libvirtError as exc:
            running = await asyncio.to_thread(dom.isActive)
            raise TaskError(f"libvirt could not save VM {name!r}: {exc.get_error_message()}; the VM is "
                            + ("still running" if running else "stopped: start it again"), code="dump-failed") from exc
        finally:
            await self._refresh(conn, name)
            self._report_changed()

    async def restore_saved(self, name: str, spec: CreateSpec, saved: SavedVm, memory: Path,
                            place: Place | None) -> None:
        """Start ``name`` from the save file ``memory`` with a definition rebuilt from ``spec``
        and ``saved``; ``place`` first puts the checkpoint's files in its directory (None: they
        are there). An instance this node does not have is created for it, and removed again
        if the restore fails."""
        conn = await self._connection()
        host = self._require_host()
        libvirt = host.libvirt
        await self._check_restorable(name, saved)
        inst = self._instances.get(name)
        if inst is None:
            if await asyncio.to_thread(lookup, libvirt, conn, name) is not None:
                raise TaskError(f"a libvirt domain named {name!r} that Kumo does not manage exists on this node: "
                                "remove it or restore elsewhere", code="exists")
            from plugins.kvm.spec import check_resources

            await asyncio.to_thread(check_resources, spec)
            directory = self.config.instance_dir / name
        else:
            directory = inst.directory
            if await asyncio.to_thread((await self._domain(conn, name)).isActive):
                raise TaskError(f"VM {name!r} is running: stop it before restoring a checkpoint", code="already-running")
        accel = Acceleration(saved.domain_type, "kvm" if saved.domain_type == "kvm" else "tcg", "as saved")
        seed = directory / saved.seed if saved.seed is not None else None
        files = DomainFiles(directory, directory / DISK, seed, directory / CONSOLE_LOG)
        xml = domain_xml(name, spec, accel, files, self.config.network, uuid=saved.uuid, machine=saved.machine)
        base = await self._base_image(spec, cached_first=True)
        defined = False
        try:
            if inst is None:
                await asyncio.to_thread(fresh_dir, directory)
            if place is not None:
                await place(files.disk, base)
            if inst is None:
                self._instances[name] = _Instance(name, directory, "creating", acceleration=accel.name, base=base)
                await asyncio.to_thread(conn.defineXML, xml)
                defined = True
            await asyncio.to_thread(conn.restoreFlags, str(memory), xml, 0)
        except BaseException as exc:
            if inst is None:
                self._instances.pop(name, None)
                await asyncio.to_thread(self._undo_create, conn, name, directory, defined)
            if isinstance(exc, libvirt.libvirtError):
                left = "nothing of it is left on this node" if inst is None else "the VM is left stopped"
                raise TaskError(f"libvirt could not restore VM {name!r}: {exc.get_error_message()}; {left}",
                                code="restore-failed") from exc
            raise
        finally:
            self._fetched.remove(base)
        await self._refresh(conn, name)
        self._report_changed()

    # ---- for live migration (plugins/kvm/live.py) --------------------------------------

    async def prepare_arrival(self, name: str, spec: CreateSpec, saved: SavedVm, disk_bytes: int) -> str:
        """Make ``name``'s directory, an empty overlay of ``disk_bytes`` on this node's base
        image and its seed, for a live migration to fill; the domain definition to arrive
        with. Nothing is defined: libvirt defines it when the migration finishes."""
        from plugins.kvm.spec import check_resources

        conn = await self._connection()
        libvirt = self._require_host().libvirt
        await self._check_restorable(name, saved)
        if name in self._instances or name in self._arriving or await asyncio.to_thread(lookup, libvirt, conn, name):
            raise TaskError(f"an instance (libvirt domain) named {name!r} already exists on this node", code="exists")
        await asyncio.to_thread(check_resources, spec)
        directory = self.config.instance_dir / name
        base = await self._base_image(spec, cached_first=True)
        try:
            await asyncio.to_thread(fresh_dir, directory)
            seed = await self._require_context().hooks.instance_seed(
                instance={"name": name, "kind": KIND, **dataclasses.asdict(spec)}, medium="iso", workdir=directory)
            await make_overlay(base, directory / DISK, disk_bytes)
        except BaseException:
            self._fetched.remove(base)
            await asyncio.to_thread(shutil.rmtree, directory, True)
            raise
        accel = Acceleration(saved.domain_type, "kvm" if saved.domain_type == "kvm" else "tcg", "as migrated")
        files = DomainFiles(directory, directory / DISK, seed, directory / CONSOLE_LOG)
        definition = domain_xml(name, spec, accel, files, self.config.network, uuid=saved.uuid, machine=saved.machine)
        self._arriving[name] = (directory, base, accel.name, definition)
        return definition

    async def arrived(self, name: str) -> bool:
        """Whether the VM a live migration brought runs here; it is an instance from now on."""
        conn = await self._connection()
        libvirt = self._require_host().libvirt
        dom = await asyncio.to_thread(lookup, libvirt, conn, name)
        # An incoming VM is paused until libvirt's Finish succeeds, so one that runs has arrived.
        if dom is None or name not in self._arriving or (await asyncio.to_thread(dom.state))[0] != libvirt.VIR_DOMAIN_RUNNING:
            return False
        directory, base, accel, definition = self._arriving.pop(name)
        self._fetched.remove(base)
        self._instances[name] = _Instance(name, directory, "creating", acceleration=accel, base=base)
        # Its persistent definition came in the source's migration cookie: this node's own
        # replaces it (see plugins/kvm/rpcfilter.py).
        try:
            await asyncio.to_thread(conn.defineXML, definition)
        except libvirt.libvirtError as exc:
            log.error("kvm: VM %s arrived, but libvirt refused this node's definition of it, so its persistent "
                      "definition is the one the source sent: %s", name, exc.get_error_message())
        await self._refresh(conn, name)
        self._report_changed()
        return self._instances[name].state == "running"

    async def abandon_arrival(self, name: str) -> None:
        """Remove what :meth:`prepare_arrival` made, unless libvirt holds the VM now."""
        arriving = self._arriving.get(name)
        if arriving is None:
            return
        conn = await self._connection()
        if await asyncio.to_thread(lookup, self._require_host().libvirt, conn, name) is not None:
            return  # the migration finished after all: it is not ours to remove
        del self._arriving[name]
        self._fetched.remove(arriving[1])
        await asyncio.to_thread(shutil.rmtree, arriving[0], True)

    async def migrate_out(self, name: str, definition: str, sockets: Path, options: LiveOptions,
                          progress: Callable[[Mapping[str, Any]], None]) -> dict[str, Any]:
        """Move the running ``name`` to the libvirtd reached through ``sockets/control.sock``
        (see plugins/kvm/live.py); its figures. A failure leaves it running here."""
        from plugins.kvm import live

        conn = await self._connection()
        dom = await self._domain(conn, name)
        libvirt = self._require_host().libvirt
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
            self._instances.pop(name, None)
            # An abort that came as the copy converged did nothing: the guest moved all the same.
            return {"not_converging": None if acted == "abort" else acted, **stats}
        finally:
            # A close waits for the destination's answer through the tunnel, which may be stuck.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.to_thread(live.close, libvirt, dconn), live.CLOSE_TIMEOUT)
            await self._refresh(conn, name)
            self._report_changed()

    async def _check_restorable(self, name: str, saved: SavedVm) -> None:
        """Refuse a saved VM whose guest-visible hardware this node would not give it."""
        if saved.domain_type == "kvm" and (await self._acceleration()).domain_type != "kvm":
            raise TaskError(f"VM {name!r} was saved running with KVM, and this node has no working KVM: its "
                            "state cannot be restored under TCG", code="import-refused")
        if saved.nic != (self.config.network != "none"):
            had = "had a network interface" if saved.nic else "had no network interface"
            raise TaskError(f"VM {name!r} {had}, and this node's plugins.kvm.network is {self.config.network!r}: "
                            "its saved state needs the same devices", code="import-refused")

    # ---- what the operations are made of -----------------------------------------------

    async def _base_image(self, spec: CreateSpec, cached_first: bool = False) -> Path:
        """The image to back the new disk, fetched into the cache when it names a digest;
        ``cached_first``: an image the cache holds by that digest even if its path or URL
        is not reachable here (a VM restored from another node's checkpoint)."""
        images = self._require_context().images
        held = await images.cached(spec.image_sha256) if cached_first and spec.image_sha256 else None
        base = held or await images.get(spec.image, spec.image_sha256)
        # Recorded before anything else can run: another create's eviction must see it.
        self._fetched.append(base)
        return base

    def _bases_in_use(self) -> set[Path]:
        """Images that disks of this node's instances are overlays of: never evicted."""
        return {inst.base for inst in self._instances.values() if inst.base is not None} | set(self._fetched)

    async def _connection(self) -> Any:
        """The connection a task works through; the first kvm task of an idle node loads libvirt."""
        host = self._require_host()
        if host.conn is None and not await host.load():
            if not host.loaded:
                raise TaskError(f"the kvm plugin is unavailable: {host.unavailable}", code="unavailable")
            raise TaskError(
                f"libvirtd is not reachable: {host.unavailable}; start libvirtd and retry",
                code="unavailable",
            )
        return host.conn

    async def _domain(self, conn: Any, name: str) -> Any:
        host = self._require_host()
        dom = await asyncio.to_thread(lookup, host.libvirt, conn, name) if name in self._instances else None
        if dom is None:
            raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")
        return dom

    def _refuse_unknown(self, name: str) -> NoReturn:
        reason = self._unavailable()
        if reason:
            raise TaskError(f"the kvm plugin is unavailable: {reason}", code="unavailable")
        raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")

    def _undo_create(self, conn: Any, name: str, directory: Path, defined: bool) -> None:
        """Remove what a failed create made. Blocking."""
        libvirt = self._require_host().libvirt
        if defined:
            dom = lookup(libvirt, conn, name)
            if dom is not None:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        shutil.rmtree(directory, ignore_errors=True)

    async def _acceleration(self) -> Acceleration:
        if self._acceleration_task is None:
            self._acceleration_task = asyncio.create_task(
                decide(self.config.acceleration, self._require_context().state_dir)
            )
        return await asyncio.shield(self._acceleration_task)

    # ---- the instance table, kept fresh by libvirt -------------------------------------

    async def _connected(self, conn: Any) -> None:
        """At every (re)connection: rebuild the instance table from libvirt."""
        self._instances = await asyncio.to_thread(self._read_instances, conn)
        self._notify()
        self._report_changed()

    def _read_instances(self, conn: Any) -> dict[str, _Instance]:
        """This agent's domains, with what their disks are backed by. Blocking."""
        found = kumo_domains(self._require_host().libvirt, conn)
        # Only this agent's domains: another Kumo agent sharing the libvirtd (a test bed, or
        # a second agent on one host) keeps its instances under its own instance_dir.
        return {
            name: _Instance(name, meta.directory, state, acceleration=meta.acceleration,
                            base=backing_file(meta.directory / DISK), blockers=device_blockers(xml, meta.directory))
            for name, (meta, state, xml) in found.items()
            if meta.directory.is_relative_to(self.config.instance_dir)
        }

    def _lost(self) -> None:
        for inst in self._instances.values():
            inst.state = "unknown"
        self._notify()

    def _lifecycle(self, name: str, event: int, detail: int) -> None:
        inst = self._instances.get(name)
        if inst is None:
            return
        state = event_state(self._require_host().libvirt, event, detail)
        if state == "deleted":
            self._instances.pop(name, None)
        elif state is not None:
            inst.state = state
            inst.reason = "crashed" if state == "failed" else ""
        else:
            return
        self._notify()
        self._report_changed()

    async def _refresh(self, conn: Any, name: str) -> None:
        libvirt = self._require_host().libvirt
        dom = await asyncio.to_thread(lookup, libvirt, conn, name)
        inst = self._instances.get(name)
        if dom is None or inst is None:
            return
        inst.state = await asyncio.to_thread(domain_state, libvirt, dom)
        with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile: its event says so
            inst.blockers = device_blockers(await asyncio.to_thread(dom.XMLDesc, 0), inst.directory)
        self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    async def _wait_state(self, name: str, states: tuple[str, ...], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                while (inst := self._instances.get(name)) is not None and inst.state not in states:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # ---- small things ----------------------------------------------------------------

    def _unavailable(self) -> str:
        """Why libvirtd cannot be used now, "" when it can: the one truth the fingerprint,
        the metric and the health probe report."""
        if self._stopped:
            return "the kvm plugin has stopped"
        if self._host is None:
            return "the kvm plugin has not started yet"
        if self._host.loaded:
            return self._host.unavailable
        return self._require_liveness().answer.reason

    def _versions(self) -> dict[str, str]:
        if self._host is not None and self._host.loaded:
            return dict(self._host.versions)
        return dict(self._require_liveness().answer.versions)

    def _require_context(self) -> PluginContext:
        if self._context is None:
            raise TaskError("the kvm plugin has not started", code="unavailable")
        return self._context

    def _require_host(self) -> Host:
        if self._host is None:
            raise TaskError("the kvm plugin has not started", code="unavailable")
        return self._host

    def _require_liveness(self) -> Liveness:
        if self._liveness is None:
            raise TaskError("the kvm plugin has not started", code="unavailable")
        return self._liveness

    def _report_changed(self) -> None:
        if self._context is not None:
            self._context.report_changed()
