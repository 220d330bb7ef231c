"""The ``kvm`` plugin: virtual machines as persistent libvirt domains, this node's ``kvm``
instance driver.

Read top to bottom: the hooks, the driver's operations, then what the checkpointer and
live migration call. The pieces are this package's modules, one concern each:
:mod:`~plugins.kvm.settings`, :mod:`~plugins.kvm.spec` (the create payload),
:mod:`~plugins.kvm.acceleration` (KVM or TCG), :mod:`~plugins.kvm.domain` (domain XML,
metadata, states), :mod:`~plugins.kvm.disks` (instance directory, qcow2 overlay),
:mod:`~plugins.kvm.host` (libvirt, its connection and events),
:mod:`~plugins.kvm.tracker` (the instance table those events keep fresh),
:mod:`~plugins.kvm.liveness` (libvirtd as seen by a node with no VMs, libvirt not loaded),
:mod:`~plugins.kvm.usage` (what each VM uses, from one bulk stats call),
:mod:`~plugins.kvm.checkpointing` and :mod:`~plugins.kvm.live` (save, restore and live
migration: the kind's ``LiveMigrator``), with :mod:`~plugins.kvm.moves` (their libvirt
side: a VM saved, restored, leaving or arriving).

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
from plugins.kvm.disks import CONSOLE_LOG, DISK, fresh_dir, has_instance_dirs, make_overlay
from plugins.kvm.domain import DomainFiles, domain_xml, lookup, undo_create
from plugins.kvm.host import NO_BINDING, Host
from plugins.kvm.live import KvmLiveMigrator, discard_arrivals
from plugins.kvm.liveness import Liveness
from plugins.kvm.moves import Moves
from plugins.kvm.settings import KvmConfig, parse_config
from plugins.kvm.tracker import KIND, Instance, Instances

if TYPE_CHECKING:
    from plugins.kvm.checkpointing import Place, SavedVm, VmFacts
    from plugins.kvm.spec import CreateSpec

log = logging.getLogger(__name__)

SHUTDOWN_RETRY = 10.0  # seconds between presses of the power button while a stop waits


class KvmPlugin:
    """Runs ``kind: kvm`` instances through libvirt; it is its own instance driver."""

    kind = KIND

    def __init__(self) -> None:
        self._context: PluginContext | None = None
        self._host: Host | None = None
        self._liveness: Liveness | None = None
        self._moves: Moves | None = None
        self._acceleration_task: asyncio.Task[Acceleration] | None = None
        self._stopped = False
        self._use(KvmConfig())

    def _use(self, config: KvmConfig) -> None:
        self.config = config
        self._instances = Instances(config.instance_dir, lambda: self._require_host().libvirt, self._report_changed)

    # ---- hooks ---------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self._use(parse_config(section, source))

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self._context = context
        instances = self._instances
        self._host = Host(self.config.uri, instances.connected, instances.lost, instances.lifecycle)
        self._liveness = Liveness(self.config.uri)
        self._moves = Moves(self.config, context, self._host, instances, self._acceleration)
        context.images.add_in_use(instances.bases_in_use)
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
                "instances": len(self._instances.by_name),
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
        host = self._require_host()
        conn = await host.connection()
        libvirt = host.libvirt
        if name in self._instances.by_name or await asyncio.to_thread(lookup, libvirt, conn, name) is not None:
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
            base = await self._instances.base_image(self._require_context().images, spec)
            await make_overlay(base, files.disk)
            xml = domain_xml(name, spec, accel, files, self.config.network)
            self._instances.by_name[name] = Instance(name, directory, "creating", acceleration=accel.name, base=base)
            dom = await asyncio.to_thread(conn.defineXML, xml)
            defined = True
            await asyncio.to_thread(dom.create)
        except BaseException as exc:
            self._instances.by_name.pop(name, None)
            await asyncio.to_thread(undo_create, libvirt, conn, name, directory, defined)
            if isinstance(exc, libvirt.libvirtError):
                raise TaskError(f"libvirt refused to create {name!r}: {exc.get_error_message()}",
                                code="failed") from exc
            raise
        finally:
            if base is not None:
                self._instances.fetched.remove(base)
        await self._instances.refresh(conn, name)
        self._report_changed()

    async def start(self, name: str) -> None:
        """Start a stopped domain, resume a paused one (a live migration's arrival held for
        the controller to decide); starting a running one is not an error."""
        host = self._require_host()
        conn = await host.connection()
        dom = await self._instances.domain(conn, name)
        if not await asyncio.to_thread(dom.isActive):
            await host.call(name, "start", dom.create)
        elif (await asyncio.to_thread(dom.state))[0] == host.libvirt.VIR_DOMAIN_PAUSED:
            await host.call(name, "resume", dom.resume)
        await self._instances.refresh(conn, name)

    async def stop(self, name: str, timeout: float | None) -> bool:
        """ACPI shutdown, then destroy if the guest has not powered off within ``timeout``
        (None: ``shutdown_timeout``); whether it had to destroy."""
        if timeout is None:
            timeout = self.config.shutdown_timeout
        host = self._require_host()
        conn = await host.connection()
        dom = await self._instances.domain(conn, name)
        forced = False
        if await asyncio.to_thread(dom.isActive):
            await host.call(name, "shut down", dom.shutdown)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + timeout
            # A guest can miss the power button (still booting, its listener not yet there):
            # it is pressed again every SHUTDOWN_RETRY seconds until the timeout, as nova does.
            while not await self._instances.wait_state(name, ("stopped", "failed"),
                                                        max(0.0, min(SHUTDOWN_RETRY, deadline - loop.time()))):
                if loop.time() >= deadline:
                    if await asyncio.to_thread(dom.isActive):
                        forced = True
                        await host.call(name, "destroy", dom.destroy)
                    break
                with contextlib.suppress(host.libvirt.libvirtError):  # it stopped meanwhile
                    await asyncio.to_thread(dom.shutdown)
        await self._instances.refresh(conn, name)
        self._report_changed()
        return forced

    async def delete(self, name: str) -> None:
        """Destroy (if running) and undefine the domain, and remove its disk, seed and log; an
        instance directory without a domain (a create cut off by a crash) is removed too."""
        host = self._require_host()
        conn = await host.connection()
        try:
            dom = await self._instances.domain(conn, name)
        except TaskError as exc:
            directory = self.config.instance_dir / name
            if exc.code != "not-found" or not await asyncio.to_thread(directory.is_dir):
                raise
            await asyncio.to_thread(shutil.rmtree, directory, True)
            return
        inst = self._instances.by_name.get(name)
        if inst is None:  # undefined behind Kumo's back while it looked the domain up
            self._refuse_unknown(name)
        directory = inst.directory
        if await asyncio.to_thread(dom.isActive):
            await host.call(name, "destroy", dom.destroy)
        flags = host.libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | host.libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        await host.call(name, "undefine", dom.undefineFlags, flags)
        self._instances.by_name.pop(name, None)
        await asyncio.to_thread(shutil.rmtree, directory, True)
        self._report_changed()

    async def console(self, name: str, size: int) -> ConsoleOutput:
        """The end of the serial console log, which the guest's serial port writes directly."""
        inst = self._instances.by_name.get(name)
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
        return self._instances.states()

    def usage(self) -> dict[str, InstanceUsage]:
        """This agent's running VMs, from one ``getAllDomainStats`` call; nothing while
        libvirt is not loaded or not connected (``kumo_kvm_libvirt_up`` says so)."""
        host = self._host
        conn = host.conn if host is not None else None
        names = set(self._instances.by_name)
        if conn is None or not names:
            return {}
        from plugins.kvm.usage import domain_usage

        try:
            return domain_usage(host.libvirt, conn, names)
        except host.libvirt.libvirtError as exc:
            log.warning("kvm: reading domain stats failed: %s", exc.get_error_message())
            return {}

    # ---- what the checkpointer and live migration call (plugins/kvm/moves.py does it) ----

    async def save_facts(self, name: str) -> VmFacts:
        return await self._require_moves().save_facts(name)

    async def save_domain(self, name: str, path: Path) -> None:
        await self._require_moves().save_domain(name, path)

    async def restore_saved(self, name: str, spec: CreateSpec, saved: SavedVm, memory: Path,
                            place: Place | None) -> None:
        await self._require_moves().restore_saved(name, spec, saved, memory, place)

    async def prepare_arrival(self, name: str, spec: CreateSpec, saved: SavedVm, disk_bytes: int) -> str:
        return await self._require_moves().prepare_arrival(name, spec, saved, disk_bytes)

    async def arrived(self, name: str, hold: bool) -> bool:
        return await self._require_moves().arrived(name, hold)

    async def abandon_arrival(self, name: str) -> None:
        await self._require_moves().abandon_arrival(name)

    async def migrate_out(self, name: str, definition: str, sockets: Path, options: LiveOptions,
                          progress: Callable[[Mapping[str, Any]], None]) -> dict[str, Any]:
        return await self._require_moves().migrate_out(name, definition, sockets, options, progress)

    # ---- what the operations are made of -----------------------------------------------

    def _refuse_unknown(self, name: str) -> NoReturn:
        reason = self._unavailable()
        if reason:
            raise TaskError(f"the kvm plugin is unavailable: {reason}", code="unavailable")
        raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")

    async def _acceleration(self) -> Acceleration:
        if self._acceleration_task is None:
            self._acceleration_task = asyncio.create_task(
                decide(self.config.acceleration, self._require_context().state_dir)
            )
        return await asyncio.shield(self._acceleration_task)

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

    def _require_moves(self) -> Moves:
        if self._moves is None:
            raise TaskError("the kvm plugin has not started", code="unavailable")
        return self._moves

    def _report_changed(self) -> None:
        if self._context is not None:
            self._context.report_changed()
