"""What the plugin knows about each of its VMs, kept fresh by libvirt's lifecycle events.

- The table is read whole only at every (re)connection to libvirtd; from then on lifecycle
  events keep it current. That first reading is also the adoption after an agent restart,
  which never starts or stops anything.
- Only this agent's domains are in it: those whose Kumo metadata puts their directory under
  the plugin's ``instance_dir`` (another agent sharing the libvirtd keeps its own).
- It also holds the base images the instances' disks are overlays of, and those of
  operations still making one, which the node's image cache must never evict.
- The event callbacks (:meth:`Instances.connected`, :meth:`Instances.lost`,
  :meth:`Instances.lifecycle`) are the ones :class:`~plugins.kvm.host.Host` runs on the
  event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import ImageCache, InstanceState, TaskError
from plugins.kvm.checkpointing import device_blockers
from plugins.kvm.disks import CONSOLE_LOG, DISK, backing_file
from plugins.kvm.domain import domain_state, event_state, kumo_domains, lookup

if TYPE_CHECKING:
    from plugins.kvm.spec import CreateSpec

KIND = "kvm"


@dataclasses.dataclass
class Instance:
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


class Instances:
    """This agent's domains under ``instance_dir``, by name; ``libvirt()`` is the loaded
    binding, ``report_changed`` tells the agent to heartbeat now."""

    def __init__(self, instance_dir: Path, libvirt: Callable[[], Any], report_changed: Callable[[], None]):
        self.instance_dir = instance_dir
        self.by_name: dict[str, Instance] = {}
        # Base images of creates, restores and arrivals between fetching the image and
        # recording the instance.
        self.fetched: list[Path] = []
        self._libvirt = libvirt
        self._report_changed = report_changed
        self._changed = asyncio.Event()

    def states(self) -> list[InstanceState]:
        return [inst.shown() for inst in sorted(self.by_name.values(), key=lambda i: i.name)]

    # ---- the base images in use ------------------------------------------------------

    async def base_image(self, images: ImageCache, spec: CreateSpec, cached_first: bool = False) -> Path:
        """The image to back a new disk, fetched into the cache when it names a digest;
        ``cached_first``: an image the cache holds by that digest even if its path or URL
        is not reachable here (a VM restored from another node's checkpoint). It stays in
        :attr:`fetched` until the caller removes it."""
        held = await images.cached(spec.image_sha256) if cached_first and spec.image_sha256 else None
        base = held or await images.get(spec.image, spec.image_sha256)
        # Recorded before anything else can run: another create's eviction must see it.
        self.fetched.append(base)
        return base

    def bases_in_use(self) -> set[Path]:
        """Images that disks of this node's instances are overlays of: never evicted."""
        return {inst.base for inst in self.by_name.values() if inst.base is not None} | set(self.fetched)

    # ---- reading libvirt -------------------------------------------------------------

    async def domain(self, conn: Any, name: str) -> Any:
        """The libvirt domain of the instance ``name``; ``not-found`` when it is not one."""
        dom = await asyncio.to_thread(lookup, self._libvirt(), conn, name) if name in self.by_name else None
        if dom is None:
            raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")
        return dom

    async def refresh(self, conn: Any, name: str) -> None:
        """Re-read one instance's state and checkpoint blockers from libvirt."""
        libvirt = self._libvirt()
        dom = await asyncio.to_thread(lookup, libvirt, conn, name)
        inst = self.by_name.get(name)
        if dom is None or inst is None:
            return
        inst.state = await asyncio.to_thread(domain_state, libvirt, dom)
        with contextlib.suppress(libvirt.libvirtError):  # undefined meanwhile: its event says so
            inst.blockers = device_blockers(await asyncio.to_thread(dom.XMLDesc, 0), inst.directory)
        self._notify()

    async def wait_state(self, name: str, states: tuple[str, ...], timeout: float) -> bool:
        """Whether ``name`` reached one of ``states`` (or went) within ``timeout`` seconds."""
        try:
            async with asyncio.timeout(timeout):
                while (inst := self.by_name.get(name)) is not None and inst.state not in states:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    # ---- the host's callbacks --------------------------------------------------------

    async def connected(self, conn: Any) -> None:
        """At every (re)connection: rebuild the table from libvirt."""
        self.by_name = await asyncio.to_thread(self._read, conn)
        self._notify()
        self._report_changed()

    def lost(self) -> None:
        for inst in self.by_name.values():
            inst.state = "unknown"
        self._notify()

    def lifecycle(self, name: str, event: int, detail: int) -> None:
        inst = self.by_name.get(name)
        if inst is None:
            return
        state = event_state(self._libvirt(), event, detail)
        if state == "deleted":
            self.by_name.pop(name, None)
        elif state is not None:
            inst.state = state
            inst.reason = "crashed" if state == "failed" else ""
        else:
            return
        self._notify()
        self._report_changed()

    def _read(self, conn: Any) -> dict[str, Instance]:
        """This agent's domains, with what their disks are backed by. Blocking."""
        found = kumo_domains(self._libvirt(), conn)
        return {
            name: Instance(name, meta.directory, state, acceleration=meta.acceleration,
                           base=backing_file(meta.directory / DISK), blockers=device_blockers(xml, meta.directory))
            for name, (meta, state, xml) in found.items()
            if meta.directory.is_relative_to(self.instance_dir)
        }

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()
