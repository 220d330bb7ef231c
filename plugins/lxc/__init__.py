"""The ``lxc`` plugin: system containers on liblxc, the ``lxc`` instance kind.

The plugin is the kind's instance driver (:class:`agent.sdk.InstanceDriver`): the agent
routes ``lxc.create|start|stop|delete|console`` to it, checks names and payload fields,
locks per container and shapes the results. What can be checkpointed of a container
comes from :mod:`plugins.lxc.checkpointing` (``kumo_checkpointer``), which calls the
methods at the end of :class:`LxcPlugin` when a container migrates here.

Read top to bottom: the hooks, the driver's operations, then what the checkpointer calls.
The pieces, one concern each:

- :mod:`.settings`: ``plugins.lxc`` and its checks;
- :mod:`.spec`: the create payload and the container's network;
- :mod:`.host`: what the host gives (cgroups, bridges, templates, CPUs, memory) and preparing it;
- :mod:`.liblxc`: running the lxc tools;
- :mod:`.build`, :mod:`.lxcconf`, :mod:`.rootfs`, :mod:`.record`: a new container's
  root filesystem, config, boot files, seed and Kumo's record of it;
- :mod:`.tracker`: each container's state, kept fresh from liblxc;
- usage (:meth:`LxcPlugin.usage`): read from the container's cgroup (liblxc's
  ``lxc.payload.<name>``) and its network namespace, through its init's /proc entry;
- :mod:`.migration`: a container arriving from another node.
"""

from __future__ import annotations

import asyncio
import collections
import glob
import logging
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.sdk import (
    NAME_RE,
    Cgroups,
    Checkpointer,
    ConsoleOutput,
    Fingerprint,
    InstanceState,
    InstanceUsage,
    PluginContext,
    TaskError,
    hookimpl,
    netns_usage,
    tail,
)

from . import liblxc
from .host import CgroupLayout, cgroup_layout, check_can_give, prepare, template_installed
from .liblxc import Liblxc
from .record import new_record
from .settings import LxcConfig, parse_settings
from .tracker import KIND, Container, Containers

# .spec, .build (with .lxcconf and .rootfs) and .migration are imported by the operations
# that use them: an idle agent, which creates and receives no container, does not hold them.
if TYPE_CHECKING:
    from .spec import CreateSpec

log = logging.getLogger(__name__)


class LxcPlugin:
    """Runs ``kind: lxc`` instances through liblxc."""

    kind = KIND

    def __init__(self) -> None:
        self.context: PluginContext | None = None
        # Cached tarballs a create is unpacking: the shared cache must not evict them meanwhile.
        self._unpacking: collections.Counter[Path] = collections.Counter()
        self._unavailable = "the lxc plugin has not started yet"
        self._version = ""
        self._cgroups: CgroupLayout = {}
        self._cgroup_mounts: Cgroups | None = None
        self._use(LxcConfig())

    def _use(self, config: LxcConfig) -> None:
        self.config = config
        self._lxc = Liblxc(config.lxcpath)
        self._containers = Containers(self._lxc, self._report_changed)

    # ---- hooks ---------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        self._use(parse_settings(section, source))

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self.context = context
        context.images.add_in_use(lambda: set(self._unpacking))
        missing = liblxc.missing_tools()
        if missing:
            self._unavailable = (
                f"liblxc's tools are not installed ({', '.join(missing)} not found in PATH): "
                "install the lxc package (apt install lxc, or run make deps)"
            )
            return
        self._version = await liblxc.version()
        self._cgroups = await asyncio.to_thread(cgroup_layout)
        self._cgroup_mounts = await asyncio.to_thread(Cgroups.read)
        problem = await asyncio.to_thread(prepare, self.config)
        if problem:
            self._unavailable = problem
            return
        self._unavailable = ""
        self._containers.start_polling(self.config.poll_interval)

    @hookimpl
    async def kumo_shutdown(self) -> None:
        await self._containers.close()
        if not self._unavailable:
            self._unavailable = "the lxc plugin has stopped"

    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        if self._unavailable:
            return Fingerprint(available=False, reason=self._unavailable, kinds=(KIND,))
        return Fingerprint(
            available=True,
            kinds=(KIND,),
            attributes={
                "lxc_version": self._version,
                "lxcpath": str(self.config.lxcpath),
                "allow_privileged": self.config.allow_privileged,
                "templates": [t for t in self.config.templates if template_installed(t)],
                "cgroup": dict(self._cgroups),
                "bridge": self.config.bridge.name if self.config.bridge else self.config.network.bridge,
                "instances": len(self._containers.by_name),
            },
        )

    @hookimpl
    def kumo_instance_driver(self) -> LxcPlugin:
        return self

    @hookimpl
    def kumo_checkpointer(self) -> Checkpointer | None:
        # A node without liblxc must not offer to move containers.
        if self._unavailable:
            return None
        from plugins.lxc.checkpointing import LxcCheckpointer  # it imports this module

        return LxcCheckpointer(self)

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("kumo_lxc_available", "1 while the lxc plugin can run containers")
        up.add_metric([], 0.0 if self._unavailable else 1.0)
        return [up]

    # ---- the driver ------------------------------------------------------------------

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        """Build the root filesystem and config, then start; on failure nothing is left."""
        from .spec import parse_create

        self._require_available()
        spec = parse_create(payload, self.config)
        await self._refuse_existing(name, "delete it or choose another name")
        await asyncio.to_thread(check_can_give, spec, self.config, self._cgroups)
        self._containers.creating(name)
        try:
            record = await self._build(name, spec, payload)
            await self._lxc.start(name)
        except BaseException:
            try:
                if await asyncio.to_thread((self.config.lxcpath / name).exists):
                    await self._lxc.destroy(name)
            finally:
                await self._containers.release(name)
            raise
        await self._containers.release(name, record)

    async def _build(self, name: str, spec: CreateSpec, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The container's files, ready to start; Kumo's record of it."""
        from . import build

        workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f".create-{name}-", dir=self.config.lxcpath))
        try:
            seed = await self._require_context().hooks.instance_seed(
                instance=payload, medium="directory", workdir=workdir
            )
            if spec.image is None:
                await build.from_template(self._lxc, self.config, name, spec, workdir)
            else:
                image = await self._require_context().images.get(spec.image, spec.image_sha256)
                self._unpacking[image] += 1  # no eviction until the rootfs is out of it
                try:
                    await asyncio.to_thread(build.from_image, self.config, name, spec, image, spec.image)
                finally:
                    self._unpacking[image] -= 1
                    if not self._unpacking[image]:
                        del self._unpacking[image]
            record = new_record(spec)
            await asyncio.to_thread(build.finish, self.config, self._cgroups, name, spec, seed, record)
            return record
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)

    async def start(self, name: str) -> None:
        if (await self._current(name)).state != "running":
            await self._lxc.start(name)
            await self._containers.refresh_one(name)

    async def stop(self, name: str, timeout: float | None) -> bool:
        if (await self._current(name)).state not in ("running", "paused"):
            return False
        forced = await self._lxc.stop(name, self.config.stop_timeout if timeout is None else timeout)
        await self._containers.refresh_one(name)
        return forced

    async def delete(self, name: str) -> None:
        """Kill the container if it runs and destroy it with its root filesystem; what a create
        cut off by a crash left (its work directory, a container directory liblxc does not
        list) is removed too."""
        self._require_available()
        if name not in self._containers.by_name and name not in self._containers.busy:
            leftovers = await asyncio.to_thread(self._create_leftovers, name)
            for path in leftovers:
                await asyncio.to_thread(shutil.rmtree, path, True)
            if leftovers:
                return
        self._known(name)
        self._containers.deleting(name)
        try:
            await self._lxc.destroy(name)
        finally:
            await self._containers.release(name)

    async def console(self, name: str, size: int) -> ConsoleOutput:
        """The tail of the container's boot output, and of liblxc's log of it as ``logs["lxc"]``."""
        from .lxcconf import LXC_LOG
        from .rootfs import CONSOLE_LOG, tail_in_root

        self._known(name)
        directory = self.config.lxcpath / name
        text = await asyncio.to_thread(tail_in_root, directory / "rootfs", CONSOLE_LOG, size)
        lxc_log = await asyncio.to_thread(tail, directory / LXC_LOG, size)
        return ConsoleOutput(text, {"lxc": lxc_log})

    async def adopt(self) -> list[InstanceState]:
        """Read every container under lxcpath from liblxc; running ones are left as they are."""
        if not self._unavailable:
            await self._containers.refresh()
        return self.list()

    def list(self) -> list[InstanceState]:
        return self._containers.states()

    def usage(self) -> dict[str, InstanceUsage]:
        mounts = self._cgroup_mounts
        if mounts is None:
            return {}
        found = {}
        # A copy: a scrape measures from a worker thread while the loop may add or remove.
        for inst in list(self._containers.by_name.values()):
            pid = inst.pid
            if inst.state != "running" or pid is None:
                continue
            usage = mounts.usage(pid, enclosing=f"lxc.payload.{inst.name}")
            if usage.cpu_seconds is None and usage.memory_bytes is None:
                continue  # init is gone, or the pid is no longer the container's
            found[inst.name] = usage.join(netns_usage(pid))
        return found

    # ---- for the checkpointer (plugins/lxc/checkpointing.py) ----------------------------

    async def stage_migration(self, name: str, config: str, source_lxcpath: str,
                              privileged: bool | None) -> tuple[Path, bool]:
        """Check a migrating container's lxc ``config`` (from ``source_lxcpath`` on its node)
        against this node and against whether the controller records it ``privileged`` (None:
        not known); a fresh hidden directory under lxcpath to unpack it into, and whether the
        container is privileged (its config has no user namespace)."""
        from . import migration

        self._require_migratable(name)
        if not source_lxcpath.startswith("/"):
            raise TaskError(f"the source's lxcpath must be an absolute path, got {source_lxcpath!r}",
                            code="bad-request")
        await self._refuse_existing(name, "delete it before migrating one of that name here")
        adapted = await asyncio.to_thread(migration.adapt, self.config, name, config, source_lxcpath, None)
        if privileged is not None:
            migration.require_recorded(name, adapted, privileged)
        directory = await asyncio.to_thread(migration.staging_directory, self.config.lxcpath, name)
        return directory, migration.is_privileged(adapted)

    async def import_migrated(self, name: str, directory: Path, source_lxcpath: str) -> None:
        """Take over a container unpacked into a directory :meth:`stage_migration` gave; it is
        stopped here afterwards."""
        from . import migration

        self._require_migratable(name)
        await self._refuse_existing(name, "delete it before migrating one of that name here")
        await asyncio.to_thread(migration.take_over, self.config, name, Path(directory), source_lxcpath)
        await self._containers.refresh_one(name)
        log.info("lxc: took over container %s, migrated from %s", name, source_lxcpath)

    async def init_pid(self, name: str) -> int | None:
        """The running container's init pid, read afresh from liblxc; None unless it runs."""
        inst = await self._containers.refresh_one(name)
        return inst.pid if inst is not None and inst.state == "running" else None

    # ---- helpers ---------------------------------------------------------------------

    def _require_available(self) -> None:
        if self._unavailable:
            raise TaskError(f"the lxc plugin is unavailable on this node: {self._unavailable}", code="unavailable")

    def _require_migratable(self, name: str) -> None:
        # The agent checks the names of driver tasks; these calls come from the checkpointer.
        self._require_available()
        if not NAME_RE.match(name):
            raise TaskError(f"{name!r} is not an instance name", code="bad-request")

    def _known(self, name: str) -> None:
        self._require_available()
        if name not in self._containers.by_name or name in self._containers.busy:
            raise TaskError(f"no Kumo container named {name!r} on this node", code="not-found")

    def _create_leftovers(self, name: str) -> list[Path]:
        """Directories of ``name`` that liblxc does not list: ``_build``'s work directories (the
        eight characters are mkdtemp's, so ``a`` does not match ``a-b``'s) and a container
        directory without a config. Blocking."""
        found = sorted(self.config.lxcpath.glob(f".create-{glob.escape(name)}-" + "?" * 8))
        directory = self.config.lxcpath / name
        if directory.is_dir():
            found.append(directory)
        return found

    async def _current(self, name: str) -> Container:
        """The container as liblxc shows it now (another tool may have started or stopped it)."""
        self._known(name)
        inst = await self._containers.refresh_one(name)
        if inst is None:
            raise TaskError(f"no Kumo container named {name!r} on this node", code="not-found")
        return inst

    async def _refuse_existing(self, name: str, advice: str) -> None:
        if name in self._containers.by_name or await asyncio.to_thread((self.config.lxcpath / name).exists):
            raise TaskError(f"a container named {name!r} already exists on this node (in {self.config.lxcpath}): "
                            f"{advice}", code="exists")

    def _require_context(self) -> PluginContext:
        if self.context is None:
            raise TaskError("the lxc plugin has not started", code="unavailable")
        return self.context

    def _report_changed(self) -> None:
        if self.context is not None:
            self.context.report_changed()
