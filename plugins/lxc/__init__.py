"""The ``lxc`` plugin: system containers on liblxc.

Read top to bottom: settings, the plugin (hooks, then one method per task kind), then the
pieces it is made of — the create payload, the container config, root filesystems, images,
and the small helpers that run the lxc tools.

- liblxc is driven through its own command-line tools (``lxc-create``, ``lxc-start``,
  ``lxc-stop``, ``lxc-ls``, ``lxc-destroy``) as asyncio subprocesses with argument lists.
  The python3-lxc binding is a C extension built against one liblxc (Debian ships it only
  for /usr/bin/python3, so a venv cannot import it), and its calls block (and fork) inside
  the agent process; each tool costs a few milliseconds, never blocks the event loop and
  keeps liblxc out of the agent's memory.
- Every container lives under one ``lxcpath`` that the plugin owns: whatever has a config
  there is a Kumo instance whose name is the container name. Nothing else is recorded, so
  an agent restart adopts what liblxc shows (running containers keep running) and the
  checkpoint plugin finds a container through ``details.lxcpath``.
- State comes from liblxc: ``lxc-ls`` at start-up and every ``poll_interval`` seconds
  (containers started or stopped by other tools, such as a CRIU restore), and a pidfd on
  each running container's init, so a container whose init dies (kill -9) is seen at once.
  liblxc's monitor process cleans up the cgroups and the veth when init exits; the plugin
  reports the container stopped when liblxc does, that is after that cleanup.
- Containers stay checkpointable (RECIPES.md 4c): no console, no ttys or ptys
  (``lxc.console.path = none``, ``lxc.tty.max = 0``, ``lxc.pty.max = 0``) and no AppArmor
  line. Busybox containers get an inittab without getty or console entries; their boot
  output goes to ``/var/log/console.log`` inside the root filesystem, which ``lxc.console``
  returns (with the tail of liblxc's own log of the container).
- Limits use cgroup2 keys (``lxc.cgroup2.memory.max``, ``lxc.cgroup2.cpu.max``) where the
  controller sits on the unified hierarchy, and the cgroup v1 equivalents where it does
  not: on hybrid hosts the memory and cpu controllers are v1 and a cgroup2 key would stop
  the container from starting.
- The first-boot seed comes from ``kumo_instance_seed`` (the cloudinit plugin) as a
  directory, copied to ``/var/lib/cloud/seed/nocloud/`` in the root filesystem. Paths in
  a root filesystem are opened one component at a time without following symlinks, so an
  image cannot point a host-side write (or a console read) outside its root.
- A container migrating here (the checkpoint plugin carries its directory with the CRIU
  image) arrives in two steps. ``lxc.stage`` gets its config as soon as it arrives and
  checks that this node has what it needs — the bridges it plugs into, the host paths it
  binds (they are host paths, never carried: the busybox template's /lib and /usr/lib),
  the files it includes, a searchable lxcpath for a user namespace — and answers with a
  hidden directory under lxcpath to unpack it into (liblxc lists no dot-directory).
  ``lxc.import`` takes it over before the restore: paths into the source's container
  directory are rewritten to ours, the same checks run again, and the directory is renamed
  into place. The container keeps its own idmap, since its files are shifted by it.
- Unprivileged containers (``unprivileged: true``) map container root to
  ``idmap_start`` and up on the host. Root runs liblxc, so no newuidmap is needed, but the
  mapped root must be able to traverse every directory above its root filesystem.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import ipaddress
import json
import logging
import os
import re
import shutil
import ssl
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import psutil

from agent.sdk import (
    ConfigError,
    Fingerprint,
    InstanceState,
    PluginContext,
    TaskError,
    hookimpl,
    parse_section,
)

log = logging.getLogger(__name__)

KIND = "lxc"
TASK_KINDS = ("lxc.create", "lxc.start", "lxc.stop", "lxc.delete", "lxc.console", "lxc.stage", "lxc.import")
TOOLS = ("lxc-create", "lxc-start", "lxc-stop", "lxc-ls", "lxc-info", "lxc-destroy")
TEMPLATE_DIR = Path("/usr/share/lxc/templates")
LXC_CONFIG_DIR = Path("/usr/share/lxc/config")
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_MEMORY_MIB = 16
OPTION_FIELDS = ("hostname", "network", "template")
CPU_PERIOD_US = 100_000
CONSOLE_TAIL_BYTES = 64 * 1024
CONSOLE_LOG = "var/log/console.log"
SEED_DIR = "var/lib/cloud/seed/nocloud"
META_FILE = "kumo.json"
LXC_LOG = "lxc.log"
# Config keys the plugin decides whatever a template wrote: the template's values are
# dropped and ours appended (later lines win for single-valued keys, but list keys such
# as lxc.net.0.ipv4.address would accumulate).
OWNED_KEYS = ("lxc.uts.name", "lxc.tty.max", "lxc.pty.max", "lxc.console.", "lxc.log.", "lxc.net.",
              "lxc.cgroup.memory.", "lxc.cgroup.cpu.", "lxc.cgroup2.memory.", "lxc.cgroup2.cpu.",
              "lxc.apparmor.")
STATES = {
    "RUNNING": "running", "STOPPING": "running", "STARTING": "creating", "STOPPED": "stopped",
    "FROZEN": "paused", "FREEZING": "paused", "THAWED": "running", "ABORTING": "failed",
}


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """A host bridge the plugin creates at start-up when it is missing.

    ``address`` (CIDR, e.g. ``10.40.0.1/24``) is put on the bridge: the containers' gateway.
    """

    name: str
    address: str | None = None


@dataclasses.dataclass(frozen=True)
class NetworkDefaults:
    """The network of a container whose create payload names none."""

    mode: Literal["none", "empty", "veth"] = "empty"
    bridge: str | None = None
    dhcp: bool = False


@dataclasses.dataclass(frozen=True)
class LxcConfig:
    """Settings under ``plugins.lxc``.

    ``lxcpath`` holds every Kumo container; the plugin owns it. It is outside the agent's
    0700 state directory because an unprivileged container's root must traverse to it.
    ``templates`` are the lxc templates a create may name (busybox works offline).
    """

    lxcpath: Path = Path("/var/lib/kumo-lxc")
    bridge: BridgeConfig | None = None
    network: NetworkDefaults = dataclasses.field(default_factory=NetworkDefaults)
    unprivileged: bool = False
    idmap_start: int = 1_000_000
    idmap_size: int = 65536
    templates: list[str] = dataclasses.field(default_factory=lambda: ["busybox"])
    image_cache: Path = Path("/var/cache/kumo/lxc-images")
    # CA bundle for image URLs served by a private mirror; None trusts the system's CAs.
    image_ca_file: Path | None = None
    stop_timeout: float = 30.0
    poll_interval: float = 2.0


@dataclasses.dataclass
class _Instance:
    """What the plugin knows about one container (kept fresh by lxc-ls and init pidfds)."""

    name: str
    state: str = "unknown"
    pid: int | None = None
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)
    pidfd: int | None = None
    watched_pid: int | None = None
    # The init pid whose exit was seen: never watched again while liblxc still shows it.
    dead_pid: int | None = None


class LxcPlugin:
    """Runs ``kind: lxc`` instances through liblxc."""

    def __init__(self) -> None:
        self.config = LxcConfig()
        self._context: PluginContext | None = None
        self._unavailable = "the lxc plugin has not started yet"
        self._version = ""
        self._cgroups: dict[str, str | None] = {}
        self._instances: dict[str, _Instance] = {}
        self._busy: set[str] = set()
        self._locks: dict[str, asyncio.Lock] = {}
        self._poller: asyncio.Task[None] | None = None
        self._settlers: dict[str, asyncio.Task[None]] = {}
        self._refresh_lock: asyncio.Lock | None = None

    # ---- hooks ---------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        config = parse_section(LxcConfig, section, source)
        if "\n" in str(config.lxcpath) or not config.lxcpath.is_absolute():
            raise ConfigError(f"{source}.lxcpath: expected an absolute path, got {str(config.lxcpath)!r}")
        if config.bridge is not None:
            if not IFNAME_RE.match(config.bridge.name):
                raise ConfigError(f"{source}.bridge.name: expected an interface name of 1-15 letters, "
                                  f"digits, '_', '.' or '-', got {config.bridge.name!r}")
            if config.bridge.address is not None:
                try:
                    ipaddress.ip_interface(config.bridge.address)
                except ValueError:
                    raise ConfigError(f"{source}.bridge.address: expected an address with prefix "
                                      f"(10.40.0.1/24), got {config.bridge.address!r}") from None
        bridge = config.network.bridge
        if bridge is not None and not IFNAME_RE.match(bridge):
            raise ConfigError(f"{source}.network.bridge: expected an interface name, got {bridge!r}")
        if config.network.mode == "veth" and bridge is None and config.bridge is None:
            raise ConfigError(f"{source}.network: mode 'veth' needs network.bridge or a bridge table")
        for template in config.templates:
            if not re.match(r"^[a-z0-9_-]+$", template):
                raise ConfigError(f"{source}.templates: {template!r} is not a template name")
        if config.idmap_start < 1 or config.idmap_size < 65536:
            raise ConfigError(f"{source}.idmap_start/idmap_size: expected a host range of at least 65536 ids "
                              "starting above 0")
        if config.stop_timeout < 0 or config.poll_interval <= 0:
            raise ConfigError(f"{source}.stop_timeout/poll_interval: expected positive seconds")
        self.config = config

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self._context = context
        self._refresh_lock = asyncio.Lock()
        missing = [tool for tool in TOOLS if shutil.which(tool) is None]
        if missing:
            self._unavailable = (
                f"liblxc's tools are not installed ({', '.join(missing)} not found in PATH): "
                "install the lxc package (apt install lxc, or run make deps)"
            )
            return
        self._version = (await _tool_output("lxc-ls", "--version")).strip()
        self._cgroups = await asyncio.to_thread(cgroup_layout)
        problem = await asyncio.to_thread(self._prepare_host)
        if problem:
            self._unavailable = problem
            return
        self._unavailable = ""
        self._poller = asyncio.create_task(self._poll())

    @hookimpl
    async def kumo_shutdown(self) -> None:
        tasks = [t for t in (self._poller, *self._settlers.values()) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._poller = None
        for inst in self._instances.values():
            self._unwatch(inst)
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
                "unprivileged": self.config.unprivileged,
                "templates": [t for t in self.config.templates if (TEMPLATE_DIR / f"lxc-{t}").is_file()],
                "cgroup": {k: v for k, v in self._cgroups.items()},
                "bridge": self.config.bridge.name if self.config.bridge else self.config.network.bridge,
                "instances": len(self._instances),
            },
        )

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return TASK_KINDS

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        handler = {
            "lxc.create": self.create,
            "lxc.start": self.start,
            "lxc.stop": self.stop,
            "lxc.delete": self.delete,
            "lxc.console": self.console,
            "lxc.stage": self.stage,
            "lxc.import": self.import_container,
        }.get(kind)
        if handler is None:
            raise TaskError(f"the lxc plugin does not handle {kind!r}", code="unknown-kind")
        if self._unavailable:
            raise TaskError(f"the lxc plugin is unavailable on this node: {self._unavailable}", code="unavailable")
        name = _name(payload)
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await handler(name, payload)

    @hookimpl
    async def kumo_adopt(self) -> Iterable[InstanceState]:
        """Read every container under lxcpath from liblxc; running ones are left as they are."""
        if not self._unavailable:
            await self._refresh()
        return self.kumo_instances()

    @hookimpl
    def kumo_instances(self) -> list[InstanceState]:
        states = []
        for inst in sorted(self._instances.values(), key=lambda i: i.name):
            details: dict[str, Any] = {"lxcpath": str(self.config.lxcpath)}
            if inst.pid is not None and inst.state == "running":
                details["pid"] = inst.pid
            for key in ("address", "unprivileged", "source"):
                if key in inst.meta:
                    details[key] = inst.meta[key]
            states.append(InstanceState(inst.name, KIND, inst.state, details))  # type: ignore[arg-type]
        return states

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily("kumo_lxc_available", "1 while the lxc plugin can run containers")
        up.add_metric([], 0.0 if self._unavailable else 1.0)
        by_state = GaugeMetricFamily("kumo_lxc_instances", "Kumo's LXC containers by state", labels=["state"])
        states = [inst.state for inst in list(self._instances.values())]
        for state in ("creating", "running", "stopped", "paused", "failed", "unknown"):
            by_state.add_metric([state], float(states.count(state)))
        return [up, by_state]

    # ---- tasks -----------------------------------------------------------------------

    async def create(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Build the root filesystem and config, then start; on failure nothing is left."""
        spec = parse_create(payload, self.config)
        lxcpath = self.config.lxcpath
        if name in self._instances or await asyncio.to_thread((lxcpath / name).exists):
            raise TaskError(
                f"a container named {name!r} already exists on this node (in {lxcpath}): "
                "delete it or choose another name",
                code="exists",
            )
        await asyncio.to_thread(self._check_host_can_give, spec)
        self._busy.add(name)
        self._instances[name] = _Instance(name, state="creating")
        workdir = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f".create-{name}-", dir=lxcpath))
        started = False
        try:
            seed = await self._require_context().hooks.instance_seed(
                instance=payload, medium="directory", workdir=workdir
            )
            image = await self._image(spec.image, spec.image_sha256) if spec.image else None
            meta = {
                "created_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
                "source": f"template:{spec.template}" if image is None else f"image:{spec.image_sha256 or spec.image}",
                "unprivileged": self.config.unprivileged,
                "vcpus": spec.vcpus,
                "memory_mib": spec.memory_mib,
                "network": spec.network.mode,
            }
            if spec.network.address:
                meta["address"] = spec.network.address
            if image is None:
                await self._create_from_template(name, spec, workdir)
            else:
                await asyncio.to_thread(self._create_from_image, name, spec, image)
            await asyncio.to_thread(self._finish_rootfs, name, spec, seed, meta)
            self._instances[name].meta = meta
            await self._lxc_start(name)
            started = True
        except BaseException:
            self._instances.pop(name, None)
            if started or await asyncio.to_thread((lxcpath / name).exists):
                await self._destroy(name)
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, workdir, True)
            self._busy.discard(name)
        await self._refresh()
        inst = self._instances.get(name)
        return {
            "name": name,
            "state": inst.state if inst else "unknown",
            "pid": inst.pid if inst else None,
            "lxcpath": str(lxcpath),
            "address": spec.network.address,
        }

    async def start(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Start a stopped container; starting a running one is not an error."""
        inst = self._known(name)
        await self._refresh()
        if inst.state != "running":
            await self._lxc_start(name)
            await self._refresh()
        return {"name": name, "state": inst.state, "pid": inst.pid}

    async def stop(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Ask init to halt (lxc.signal.halt), then kill if it has not stopped within the timeout."""
        timeout = payload.get("timeout", self.config.stop_timeout)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise TaskError("timeout must be a number of seconds (0 or more)", code="invalid")
        inst = self._known(name)
        await self._refresh()
        forced = False
        if inst.state in ("running", "paused"):
            graceful = await _tool(
                "lxc-stop", "-P", str(self.config.lxcpath), "-n", name, "--nokill", "-t", str(max(1, round(timeout)))
            )
            if graceful.returncode != 0:
                forced = True
                killed = await _tool("lxc-stop", "-P", str(self.config.lxcpath), "-n", name, "-k")
                if killed.returncode != 0 and await self._lxc_state(name) != "STOPPED":
                    raise TaskError(f"lxc-stop could not kill container {name!r}: {killed.error}", code="lxc")
            await self._refresh()
        return {"name": name, "state": inst.state, "forced": forced}

    async def delete(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Kill the container if it runs and destroy it with its root filesystem."""
        self._known(name)
        await self._destroy(name)
        inst = self._instances.pop(name, None)
        if inst is not None:
            self._unwatch(inst)
        self._report_changed()
        return {"name": name, "deleted": True}

    async def console(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The tail of the container's boot output and of liblxc's log of it (``bytes``, default 64 KiB)."""
        size = payload.get("bytes", CONSOLE_TAIL_BYTES)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise TaskError("bytes must be a positive integer", code="invalid")
        self._known(name)
        directory = self.config.lxcpath / name
        text = await asyncio.to_thread(_tail_in_root, directory / "rootfs", CONSOLE_LOG, size)
        lxc_log = await asyncio.to_thread(_tail, directory / LXC_LOG, size)
        return {"name": name, "log": text, "lxc_log": lxc_log}

    async def stage(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Check a migrating container's config against this node; a directory to unpack it into."""
        config, source = payload.get("config"), payload.get("lxcpath")
        if not isinstance(config, str) or not isinstance(source, str) or not source.startswith("/"):
            raise TaskError("lxc.stage needs config (the container's lxc config) and lxcpath (the source's)",
                            code="invalid")
        await self._refuse_existing(name)
        await asyncio.to_thread(self._adapt, name, config, source, None)
        directory = await asyncio.to_thread(tempfile.mkdtemp, prefix=f".import-{name}-", dir=self.config.lxcpath)
        return {"name": name, "directory": directory}

    async def import_container(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Take over a container unpacked into a directory ``lxc.stage`` gave: it is stopped here after."""
        directory, source = payload.get("directory"), payload.get("lxcpath")
        staged = Path(directory) if isinstance(directory, str) else None
        if (staged is None or staged.parent != self.config.lxcpath or not staged.name.startswith(f".import-{name}-")
                or not isinstance(source, str)):
            raise TaskError(f"lxc.import needs a directory lxc.stage gave for {name!r} and the source's lxcpath, "
                            f"got {directory!r}", code="invalid")
        await self._refuse_existing(name)
        target = self.config.lxcpath / name

        def adapt_and_move() -> None:
            config = self._adapt(name, (staged / "config").read_text(), source, staged)
            tmp = staged / "config.kumo-import"
            tmp.write_text(config)
            os.chmod(tmp, stat.S_IMODE(os.stat(staged / "config").st_mode))
            os.replace(tmp, staged / "config")
            os.rename(staged, target)

        await asyncio.to_thread(adapt_and_move)
        await self._refresh()
        log.info("lxc: took over container %s, migrated from %s", name, source)
        return {"name": name, "lxcpath": str(self.config.lxcpath), "state": self._instances[name].state}

    async def _refuse_existing(self, name: str) -> None:
        if name in self._instances or await asyncio.to_thread((self.config.lxcpath / name).exists):
            raise TaskError(f"a container named {name!r} already exists on this node (in {self.config.lxcpath}): "
                            "delete it before migrating one of that name here", code="exists")

    def _adapt(self, name: str, config: str, source_lxcpath: str, arrived: Path | None) -> str:
        """The config with the source's container directory rewritten to ours, or TaskError naming
        what this node lacks; ``arrived`` is where it was unpacked (None: not yet, at stage time)."""
        target = self.config.lxcpath / name
        adapted = rewrite_config(config, Path(source_lxcpath) / name, target)
        problems = import_problems(adapted, target, Path(source_lxcpath), arrived)
        if not problems and any(k == "lxc.idmap" for k, _ in config_items(adapted)):
            blocked = _untraversable(self.config.lxcpath)
            if blocked is not None:
                problems.append(f"it runs in a user namespace and its mapped root cannot search {blocked}: "
                                "chmod o+x it (or set plugins.lxc.lxcpath elsewhere)")
        if problems:
            code = "no-bridge" if any("bridge" in p for p in problems) else "import-refused"
            raise TaskError(f"container {name!r} cannot run on this node: " + "; ".join(problems)
                            + "; then migrate again", code=code)
        return adapted

    # ---- creating ----------------------------------------------------------------------

    def _check_host_can_give(self, spec: CreateSpec) -> None:
        cpus = psutil.cpu_count(logical=True) or 1
        if spec.vcpus is not None:
            if spec.vcpus > cpus:
                raise TaskError(f"vcpus {spec.vcpus} is more than the {cpus} CPUs of this node: ask for at most {cpus}",
                                code="insufficient-cpu")
            if self._cgroups.get("cpu") is None:
                raise TaskError("this node has no cpu cgroup controller, so vcpus cannot be enforced: "
                                "leave vcpus out or use another node", code="limits-unsupported")
        if spec.memory_mib is not None:
            available = psutil.virtual_memory().available // (1024 * 1024)
            if spec.memory_mib > available:
                raise TaskError(f"memory_mib {spec.memory_mib} is more than the {available} MiB available on this node",
                                code="insufficient-memory")
            if self._cgroups.get("memory") is None:
                raise TaskError("this node has no memory cgroup controller, so memory_mib cannot be enforced: "
                                "leave memory_mib out or use another node", code="limits-unsupported")
        if spec.network.mode == "veth":
            bridge = spec.network.bridge or ""
            if not Path("/sys/class/net", bridge, "bridge").is_dir():
                raise TaskError(f"bridge {bridge!r} does not exist on this node: create it (or configure "
                                "plugins.lxc.bridge so the plugin does) or name another bridge", code="no-bridge")
        if spec.template is not None:
            if spec.template not in self.config.templates:
                known = ", ".join(self.config.templates) or "none"
                raise TaskError(f"unknown template {spec.template!r}: this node allows {known} "
                                "(plugins.lxc.templates), or give an image tarball", code="unknown-template")
            if not (TEMPLATE_DIR / f"lxc-{spec.template}").is_file():
                raise TaskError(f"the lxc template {spec.template!r} is not installed on this node "
                                f"({TEMPLATE_DIR}/lxc-{spec.template} is missing)", code="unknown-template")

    async def _create_from_template(self, name: str, spec: CreateSpec, workdir: Path) -> None:
        # The template sees the idmap (to chown the root filesystem) and nothing else:
        # _finish_rootfs writes the rest of the config after it.
        base = workdir / "create.conf"
        await asyncio.to_thread(base.write_text, "".join(self._idmap_lines()) or "lxc.net.0.type = empty\n")
        result = await _tool(
            "lxc-create", "-P", str(self.config.lxcpath), "-n", name, "-t", spec.template or "", "-f", str(base)
        )
        if result.returncode != 0:
            raise TaskError(f"lxc-create -t {spec.template} failed for {name!r}: {result.error}", code="lxc")

    def _create_from_image(self, name: str, spec: CreateSpec, image: Path) -> None:
        directory = self.config.lxcpath / name
        rootfs = directory / "rootfs"
        directory.mkdir(mode=0o770)
        rootfs.mkdir(mode=0o755)
        lines = [_line("lxc.rootfs.path", f"dir:{rootfs}"), _line("lxc.include", str(LXC_CONFIG_DIR / "common.conf"))]
        if self.config.unprivileged:
            lines.append(_line("lxc.include", str(LXC_CONFIG_DIR / "userns.conf")))
        lines += self._idmap_lines()
        (directory / "config").write_text("".join(lines))
        result = _tool_sync("tar", "--extract", "--numeric-owner", "--preserve-permissions",
                            "--file", str(image), "--directory", str(rootfs))
        if result.returncode != 0:
            raise TaskError(f"image {spec.image} is not a root filesystem tarball tar can extract: {result.error}",
                            code="image-invalid")
        if not any(rootfs.iterdir()):
            raise TaskError(f"image {spec.image} is an empty tarball", code="image-invalid")
        if self.config.unprivileged:
            _shift_ownership(rootfs, self.config.idmap_start, self.config.idmap_size)

    def _finish_rootfs(self, name: str, spec: CreateSpec, seed: Path | None, meta: dict[str, Any]) -> None:
        """Our config block over the template's, the busybox boot files, the seed and the record."""
        directory = self.config.lxcpath / name
        rootfs = directory / "rootfs"
        owner = (self.config.idmap_start, self.config.idmap_start) if self.config.unprivileged else (0, 0)
        config_path = directory / "config"
        kept = [line for line in config_path.read_text().splitlines(keepends=True)
                if not line.split("=", 1)[0].strip().startswith(OWNED_KEYS)]
        config_path.write_text("".join(kept) + "\n# Kumo\n" + "".join(self._config_block(name, spec)))
        if spec.template == "busybox":
            _write_in_root(rootfs, "etc/inittab", "::sysinit:/etc/init.d/rcS\n", 0o644, owner)
            _write_in_root(rootfs, "etc/init.d/rcS", _busybox_rcs(name, spec.network), 0o755, owner)
            _write_in_root(rootfs, CONSOLE_LOG, "", 0o640, owner)
        if seed is not None:
            for path in sorted(seed.rglob("*")):
                if path.is_file():
                    rel = f"{SEED_DIR}/{path.relative_to(seed).as_posix()}"
                    _write_in_root(rootfs, rel, path.read_text(), 0o600, owner)
        (directory / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")

    def _config_block(self, name: str, spec: CreateSpec) -> list[str]:
        directory = self.config.lxcpath / name
        lines = [
            _line("lxc.uts.name", spec.hostname or name),
            # CRIU cannot take a tty along (RECIPES.md 4c): no console, ttys or ptys.
            _line("lxc.console.path", "none"),
            _line("lxc.tty.max", "0"),
            _line("lxc.pty.max", "0"),
            _line("lxc.log.file", str(directory / LXC_LOG)),
            _line("lxc.log.level", "NOTICE"),
        ]
        lines += spec.network.config_lines()
        if spec.memory_mib is not None:
            limit = spec.memory_mib * 1024 * 1024
            if self._cgroups.get("memory") == "v2":
                lines.append(_line("lxc.cgroup2.memory.max", str(limit)))
            else:
                lines.append(_line("lxc.cgroup.memory.limit_in_bytes", str(limit)))
        if spec.vcpus is not None:
            quota = spec.vcpus * CPU_PERIOD_US
            if self._cgroups.get("cpu") == "v2":
                lines.append(_line("lxc.cgroup2.cpu.max", f"{quota} {CPU_PERIOD_US}"))
            else:
                lines.append(_line("lxc.cgroup.cpu.cfs_period_us", str(CPU_PERIOD_US)))
                lines.append(_line("lxc.cgroup.cpu.cfs_quota_us", str(quota)))
        return lines

    def _idmap_lines(self) -> list[str]:
        if not self.config.unprivileged:
            return []
        start, size = self.config.idmap_start, self.config.idmap_size
        return [_line("lxc.idmap", f"u 0 {start} {size}"), _line("lxc.idmap", f"g 0 {start} {size}")]

    # ---- images ----------------------------------------------------------------------

    async def _image(self, image: str, sha256: str | None) -> Path:
        """The root filesystem tarball, verified against ``sha256`` when one is given."""
        if image.startswith("https://"):
            if sha256 is None:
                raise TaskError("an image URL needs image_sha256 to verify the download", code="invalid")
            return await self._download(image, sha256)
        if not image.startswith("/"):
            raise TaskError(f"image must be an absolute path on the node or an https:// URL, got {image!r}",
                            code="invalid")
        path = Path(image)
        if not await asyncio.to_thread(path.is_file):
            raise TaskError(f"image {image} does not exist on this node: copy it there or give an https URL",
                            code="image-missing")
        if sha256 is not None:
            _check_digest(await asyncio.to_thread(_sha256_file, path), sha256, image)
        return path

    async def _download(self, url: str, sha256: str) -> Path:
        import aiohttp

        cache = self.config.image_cache
        cached = cache / f"{sha256}.tar"
        if await asyncio.to_thread(cached.is_file):
            return cached
        await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
        partial = cached.with_suffix(f".partial-{os.getpid()}-{id(url)}")
        digest = hashlib.sha256()
        ssl_context = None
        if self.config.image_ca_file is not None:
            ssl_context = await asyncio.to_thread(ssl.create_default_context, cafile=str(self.config.image_ca_file))
        try:
            with open(partial, "wb") as out:
                async with aiohttp.ClientSession(raise_for_status=True) as session:
                    async with session.get(url, ssl=ssl_context) as response:
                        async for chunk in response.content.iter_chunked(1 << 20):
                            digest.update(chunk)
                            await asyncio.to_thread(out.write, chunk)
            _check_digest(digest.hexdigest(), sha256, url)
            await asyncio.to_thread(partial.replace, cached)
        except aiohttp.ClientError as exc:
            raise TaskError(f"could not download {url}: {exc}", code="image-download") from exc
        finally:
            await asyncio.to_thread(partial.unlink, True)
        return cached

    # ---- liblxc ----------------------------------------------------------------------

    async def _lxc_start(self, name: str) -> None:
        result = await _tool("lxc-start", "-P", str(self.config.lxcpath), "-n", name)
        if result.returncode != 0:
            why = await asyncio.to_thread(_last_errors, self.config.lxcpath / name / LXC_LOG)
            raise TaskError(f"lxc-start failed for {name!r}: {why or result.error}", code="lxc")

    async def _lxc_state(self, name: str) -> str:
        return (await _tool_output("lxc-info", "-P", str(self.config.lxcpath), "-n", name, "-sH")).strip()

    async def _destroy(self, name: str) -> None:
        """Kill and destroy a container (``lxc-destroy -f``), then drop any directory left."""
        result = await _tool("lxc-destroy", "-P", str(self.config.lxcpath), "-n", name, "-f")
        directory = self.config.lxcpath / name
        if result.returncode != 0 and await self._lxc_state(name) == "RUNNING":
            raise TaskError(f"lxc-destroy could not remove container {name!r}: {result.error}", code="lxc")
        await asyncio.to_thread(shutil.rmtree, directory, True)

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.config.poll_interval)
            try:
                await self._refresh()
            except Exception:
                log.exception("lxc: reading container states failed")

    async def _refresh(self) -> None:
        """Re-read every container's state from liblxc; report what changed."""
        assert self._refresh_lock is not None
        async with self._refresh_lock:
            out = await _tool_output("lxc-ls", "-P", str(self.config.lxcpath), "-f", "-F", "name,state,pid")
            seen = parse_lxc_ls(out)
            changed = False
            for name in [n for n in self._instances if n not in seen and n not in self._busy]:
                self._unwatch(self._instances.pop(name))
                changed = True
            for name, (lxc_state, pid) in seen.items():
                if name in self._busy:
                    continue
                inst = self._instances.get(name)
                if inst is None:
                    meta = await asyncio.to_thread(_read_meta, self.config.lxcpath / name / META_FILE)
                    inst = self._instances[name] = _Instance(name, meta=meta)
                    changed = True
                state = STATES.get(lxc_state, "unknown")
                if (state, pid) != (inst.state, inst.pid):
                    inst.state, inst.pid = state, pid
                    changed = True
                if state == "running" and pid is not None:
                    self._watch(inst, pid)
                else:
                    self._unwatch(inst)
        if changed:
            self._report_changed()

    def _watch(self, inst: _Instance, pid: int) -> None:
        """Learn the moment a container's init exits: a pidfd readable by the event loop."""
        if pid in (inst.watched_pid, inst.dead_pid):
            return
        self._unwatch(inst)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            inst.dead_pid = pid
            self._settle(inst.name)
            return
        inst.pidfd, inst.watched_pid = pidfd, pid
        asyncio.get_running_loop().add_reader(pidfd, self._init_exited, inst)

    def _unwatch(self, inst: _Instance) -> None:
        if inst.pidfd is not None:
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(inst.pidfd)
            os.close(inst.pidfd)
        inst.pidfd = inst.watched_pid = None

    def _init_exited(self, inst: _Instance) -> None:
        inst.dead_pid = inst.watched_pid
        self._unwatch(inst)
        self._settle(inst.name)

    def _settle(self, name: str) -> None:
        if name in self._settlers:
            return
        task = asyncio.create_task(self._follow_exit(name))
        self._settlers[name] = task
        task.add_done_callback(lambda _t: self._settlers.pop(name, None))

    async def _follow_exit(self, name: str) -> None:
        """After init exits liblxc's monitor cleans up, then says STOPPED: follow it closely."""
        for _ in range(200):
            await self._refresh()
            inst = self._instances.get(name)
            if inst is None or inst.state != "running" or inst.pid != inst.dead_pid:
                return
            await asyncio.sleep(0.05)

    # ---- host preparation --------------------------------------------------------------

    def _prepare_host(self) -> str:
        """Create lxcpath and the configured bridge; the reason the plugin cannot work, or ''."""
        lxcpath = self.config.lxcpath
        try:
            lxcpath.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return f"cannot create lxcpath {lxcpath}: {exc.strerror}"
        if self.config.unprivileged:
            blocked = _untraversable(lxcpath)
            if blocked is not None:
                return (f"unprivileged containers need every directory above their root filesystem to be "
                        f"searchable by the mapped root user, and {blocked} is not (chmod o+x it, or set "
                        "plugins.lxc.lxcpath elsewhere)")
        if self.config.bridge is not None:
            return _ensure_bridge(self.config.bridge)
        return ""

    def _known(self, name: str) -> _Instance:
        inst = self._instances.get(name)
        if inst is None or name in self._busy:
            raise TaskError(f"no Kumo container named {name!r} on this node", code="not-found")
        return inst

    def _require_context(self) -> PluginContext:
        if self._context is None:
            raise TaskError("the lxc plugin has not started", code="unavailable")
        return self._context

    def _report_changed(self) -> None:
        if self._context is not None:
            self._context.report_changed()


# ---- create payload ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A container's network: none (the host's), empty (loopback only) or veth on a bridge."""

    mode: Literal["none", "empty", "veth"]
    bridge: str | None = None
    address: str | None = None
    gateway: str | None = None
    dhcp: bool = False

    def config_lines(self) -> list[str]:
        if self.mode != "veth":
            return [_line("lxc.net.0.type", self.mode)]
        lines = [
            _line("lxc.net.0.type", "veth"),
            _line("lxc.net.0.link", self.bridge or ""),
            _line("lxc.net.0.flags", "up"),
            _line("lxc.net.0.name", "eth0"),
        ]
        if self.address:
            family = "ipv6" if ipaddress.ip_interface(self.address).version == 6 else "ipv4"
            lines.append(_line(f"lxc.net.0.{family}.address", self.address))
            if self.gateway:
                lines.append(_line(f"lxc.net.0.{family}.gateway", self.gateway))
        return lines


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    """The parts of an ``lxc.create`` payload a container is built from."""

    template: str | None
    image: str | None
    image_sha256: str | None
    vcpus: int | None
    memory_mib: int | None
    network: NetworkSpec
    hostname: str | None


def _name(payload: Mapping[str, Any]) -> str:
    name = payload.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TaskError(
            f"name must be 1-63 lowercase letters, digits or '-' (not first or last), got {name!r}",
            code="invalid",
        )
    return name


def parse_create(payload: Mapping[str, Any], config: LxcConfig) -> CreateSpec:
    """Validate an ``lxc.create`` payload against the node's settings; TaskError names the field."""
    kind = payload.get("kind", KIND)
    if kind != KIND:
        raise TaskError(f"kind must be 'lxc' for the lxc plugin, got {kind!r}", code="invalid")
    options = payload.get("options") or {}
    if not isinstance(options, Mapping):
        raise TaskError("options must be a mapping", code="invalid")
    unknown = sorted(set(options) - set(OPTION_FIELDS))
    if unknown:
        raise TaskError(f"options.{unknown[0]}: unknown option (known: {', '.join(OPTION_FIELDS)})", code="invalid")
    # kumoctl sends kind-specific fields as options (--option network='{...}'); the API
    # also takes them at the top level, which wins.
    payload = {**options, **{k: v for k, v in payload.items() if v is not None}}
    image = payload.get("image")
    template = payload.get("template")
    if image is not None and template is not None:
        raise TaskError("give either template or image (a root filesystem tarball), not both", code="invalid")
    if image is not None and (not isinstance(image, str) or not image):
        raise TaskError("image must be a path on the node or an https URL of a root filesystem tarball",
                        code="invalid")
    if image is None:
        template = "busybox" if template is None else template
        if not isinstance(template, str) or not re.match(r"^[a-z0-9_-]{1,64}$", template):
            raise TaskError(f"unknown template {template!r}: templates are lxc template names such as 'busybox'",
                            code="unknown-template")
    sha = payload.get("image_sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha.lower())):
        raise TaskError("image_sha256 must be 64 hexadecimal digits", code="invalid")
    if sha is not None and image is None:
        raise TaskError("image_sha256 is for an image; a template has none", code="invalid")
    vcpus = payload.get("vcpus")
    if vcpus is not None and (not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus < 1):
        raise TaskError(f"vcpus must be a positive integer, got {vcpus!r}", code="invalid")
    memory = payload.get("memory_mib")
    if memory is not None and (not isinstance(memory, int) or isinstance(memory, bool) or memory < MIN_MEMORY_MIB):
        raise TaskError(f"memory_mib must be an integer of at least {MIN_MEMORY_MIB}, got {memory!r}", code="invalid")
    hostname = payload.get("hostname")
    if hostname is not None and (not isinstance(hostname, str) or not HOSTNAME_RE.match(hostname) or len(hostname) > 253):
        raise TaskError(f"hostname must be a DNS name, got {hostname!r}", code="invalid")
    return CreateSpec(
        template=template if image is None else None,
        image=image,
        image_sha256=sha.lower() if sha else None,
        vcpus=vcpus,
        memory_mib=memory,
        network=_parse_network(payload.get("network"), config),
        hostname=hostname,
    )


def _parse_network(value: Any, config: LxcConfig) -> NetworkSpec:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise TaskError("network must be a mapping {mode, bridge, address, gateway, dhcp}", code="invalid")
    unknown = sorted(set(value) - {"mode", "bridge", "address", "gateway", "dhcp"})
    if unknown:
        raise TaskError(f"network.{unknown[0]}: unknown key (known: mode, bridge, address, gateway, dhcp)",
                        code="invalid")
    defaults = config.network
    mode = value.get("mode") or defaults.mode
    if mode not in ("none", "empty", "veth"):
        raise TaskError(f"network.mode must be 'none', 'empty' or 'veth', got {mode!r}", code="invalid")
    address, gateway = value.get("address"), value.get("gateway")
    dhcp = value.get("dhcp", defaults.dhcp if not address else False)
    if not isinstance(dhcp, bool):
        raise TaskError("network.dhcp must be true or false", code="invalid")
    if mode != "veth":
        if address or gateway or value.get("dhcp") or value.get("bridge"):
            raise TaskError(f"network mode {mode!r} has no interface: address, gateway, bridge and dhcp "
                            "need mode 'veth'", code="invalid")
        return NetworkSpec(mode)
    bridge = value.get("bridge") or defaults.bridge or (config.bridge.name if config.bridge else None)
    if not isinstance(bridge, str) or not IFNAME_RE.match(bridge):
        raise TaskError(f"network.bridge must name a host bridge (1-15 characters), got {bridge!r}: "
                        "give one or configure plugins.lxc.bridge", code="invalid")
    if address is not None:
        try:
            parsed = ipaddress.ip_interface(address)
        except (TypeError, ValueError):
            raise TaskError(f"network.address must be an address with prefix (10.40.0.5/24), got {address!r}",
                            code="invalid") from None
        if "/" not in address:
            raise TaskError(f"network.address needs a prefix length (10.40.0.5/24), got {address!r}", code="invalid")
        if dhcp:
            raise TaskError("network.address and network.dhcp exclude each other: choose one", code="invalid")
        address = parsed.with_prefixlen
    if gateway is not None:
        try:
            gw = ipaddress.ip_address(gateway)
        except (TypeError, ValueError):
            raise TaskError(f"network.gateway must be an address, got {gateway!r}", code="invalid") from None
        if address is None:
            raise TaskError("network.gateway needs network.address (with dhcp the server gives the gateway)",
                            code="invalid")
        if gw.version != ipaddress.ip_interface(address).version:
            raise TaskError("network.gateway and network.address must be the same IP version", code="invalid")
        gateway = str(gw)
    return NetworkSpec("veth", bridge, address, gateway, dhcp)


# ---- container config and root filesystem ---------------------------------------------


def _line(key: str, value: str) -> str:
    """One ``key = value`` config line; values come from validated input, this is the last guard."""
    if any(c in value for c in "\n\r\0"):
        raise TaskError(f"{key}: value {value!r} cannot be written into an lxc config", code="invalid")
    return f"{key} = {value}\n"


def config_items(config: str) -> list[tuple[str, str]]:
    """The ``key = value`` lines of an lxc config, in order (comments and blanks left out)."""
    items = []
    for line in config.splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            items.append((key.strip(), value.strip()))
    return items


def rewrite_config(config: str, source: Path, target: Path) -> str:
    """``config`` with every path into the container directory ``source`` pointing into ``target``."""
    pattern = re.compile(re.escape(str(source)) + r"(?=/|\s|$)")
    out = []
    for line in config.splitlines(keepends=True):
        key, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#"):
            line = key + sep + pattern.sub(lambda _m: str(target), value)
        out.append(line)
    return "".join(out)


def import_problems(config: str, target: Path, source_lxcpath: Path, arrived: Path | None) -> list[str]:
    """What this node lacks for a container whose (rewritten) config is ``config``; one sentence each.

    Only the container's own directory travels: a path still inside the source's lxcpath
    (another container's files) or a host path missing here is a problem, as is a bridge or
    interface this node does not have. ``arrived`` is the directory standing in for ``target``
    until the import renames it; None (nothing has arrived yet) skips the rootfs check.
    """
    problems = []
    links: dict[str, dict[str, str]] = {}
    for key, value in config_items(config):
        if re.search(re.escape(str(source_lxcpath)) + r"/", value) and str(target) not in value:
            problems.append(f"{key} = {value} points into the source's lxcpath outside the container's own "
                            "directory, which is not carried: make it a path inside the container's directory")
            continue
        match = re.fullmatch(r"lxc\.net\.(\d+)\.(type|link)", key)
        if match:
            links.setdefault(match.group(1), {})[match.group(2)] = value
        elif key == "lxc.rootfs.path":
            path = Path(value.partition(":")[2] if ":" in value else value)
            if not path.is_relative_to(target):
                problems.append(f"its root filesystem is {value} (lxc.rootfs.path), outside the container's "
                                "directory, and was not carried: only a directory rootfs under lxcpath migrates")
            elif arrived is not None and not (arrived / path.relative_to(target)).is_dir():
                problems.append(f"its root filesystem {path} did not arrive")
        elif key == "lxc.include" and not Path(value).is_relative_to(target) and not Path(value).exists():
            problems.append(f"it includes {value} (lxc.include), which this node does not have: install the "
                            "package that provides it (lxc)")
        elif key == "lxc.mount.entry":
            fields = value.split()
            options = fields[3].split(",") if len(fields) > 3 else []
            if ("bind" in options or "rbind" in options) and fields[0].startswith("/") \
                    and "optional" not in options and not Path(fields[0]).is_relative_to(target) \
                    and not Path(fields[0]).exists():
                problems.append(f"it binds the host path {fields[0]} (lxc.mount.entry), which this node does not "
                                "have: create it (host paths are not carried)")
    for index, net in sorted(links.items()):
        link = net.get("link")
        if not link:
            continue
        if net.get("type") == "veth" and not Path("/sys/class/net", link, "bridge").is_dir():
            problems.append(f"its interface lxc.net.{index} plugs into bridge {link}, which this node does not "
                            f"have: create it (ip link add {link} type bridge; ip link set {link} up) or set "
                            "plugins.lxc.bridge so the plugin does")
        elif net.get("type") != "veth" and not Path("/sys/class/net", link).exists():
            problems.append(f"its interface lxc.net.{index} uses the host interface {link}, which this node "
                            "does not have")
    return problems


def _busybox_rcs(name: str, network: NetworkSpec) -> str:
    lines = [
        "#!/bin/sh",
        "# Written by Kumo: boot output goes to /var/log/console.log (lxc.console returns it).",
        "exec >>/var/log/console.log 2>&1",
        "/bin/mount -a",
    ]
    # The template's rcS always ran udhcpc, whose deconfig step flushes a static address.
    if network.mode == "veth" and network.dhcp:
        lines.append("/bin/udhcpc -b -t 5 -i eth0")
    lines.append(f"echo 'kumo: container {name} booted'")
    return "\n".join(lines) + "\n"


def _open_dir_in_root(root: Path, parts: list[str], create: bool, owner: tuple[int, int]) -> int:
    """An fd of ``root/parts...`` reached without following any symlink inside the root."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        for part in parts:
            if part in ("", ".", ".."):
                raise TaskError(f"unsafe path component {part!r} in a root filesystem path", code="invalid")
            try:
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                os.mkdir(part, 0o755, dir_fd=fd)
                os.chown(part, *owner, dir_fd=fd, follow_symlinks=False)
                nxt = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = nxt
    except OSError as exc:
        os.close(fd)
        if isinstance(exc, FileNotFoundError):
            raise
        raise TaskError(f"{root}/{'/'.join(parts)} is not a plain directory in the root filesystem "
                        f"(a symlink or a file): {exc.strerror}", code="rootfs") from exc
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_in_root(root: Path, rel: str, text: str, mode: int, owner: tuple[int, int]) -> None:
    *dirs, leaf = rel.split("/")
    dfd = _open_dir_in_root(root, dirs, create=True, owner=owner)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(leaf, dir_fd=dfd)
        fd = os.open(leaf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=dfd)
        with os.fdopen(fd, "w") as f:
            f.write(text)
            os.fchown(f.fileno(), *owner)
            os.fchmod(f.fileno(), mode)
    finally:
        os.close(dfd)


def _tail_in_root(root: Path, rel: str, size: int) -> str:
    *dirs, leaf = rel.split("/")
    try:
        dfd = _open_dir_in_root(root, dirs, create=False, owner=(0, 0))
    except (FileNotFoundError, TaskError):
        return ""
    try:
        fd = os.open(leaf, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=dfd)
    except OSError:
        return ""
    finally:
        os.close(dfd)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return ""
        f.seek(max(0, f.seek(0, os.SEEK_END) - size))
        return f.read().decode(errors="replace")


def _shift_ownership(root: Path, start: int, size: int) -> None:
    """Map an extracted tree's ids into the container's range (chown drops setuid: restore modes)."""
    for dirpath, dirnames, filenames in os.walk(root):
        for entry in [dirpath, *(os.path.join(dirpath, n) for n in dirnames + filenames)]:
            st = os.lstat(entry)
            if st.st_uid >= size or st.st_gid >= size:
                raise TaskError(f"{entry} is owned by id {max(st.st_uid, st.st_gid)}, outside the container's "
                                f"{size} ids", code="image-invalid")
            os.chown(entry, start + st.st_uid, start + st.st_gid, follow_symlinks=False)
            if not stat.S_ISLNK(st.st_mode):
                os.chmod(entry, stat.S_IMODE(st.st_mode))


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def parse_lxc_ls(out: str) -> dict[str, tuple[str, int | None]]:
    """``lxc-ls -f -F name,state,pid`` → {name: (STATE, pid or None)}."""
    found: dict[str, tuple[str, int | None]] = {}
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            found[fields[0]] = (fields[1], int(fields[2]) if fields[2].isdigit() else None)
    return found


def cgroup_layout() -> dict[str, str | None]:
    """For the memory and cpu controllers: 'v2', 'v1' or None (not available), from mountinfo."""
    layout: dict[str, str | None] = {"memory": None, "cpu": None}
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return layout
    for line in mounts:
        left, _, right = line.partition(" - ")
        fstype, _source, options = (right.split() + ["", "", ""])[:3]
        mountpoint = left.split()[4]
        if fstype == "cgroup2":
            try:
                controllers = Path(mountpoint, "cgroup.controllers").read_text().split()
            except OSError:
                continue
            for name in layout:
                if name in controllers:
                    layout[name] = "v2"
        elif fstype == "cgroup":
            for name in layout:
                if name in options.split(",") and layout[name] is None:
                    layout[name] = "v1"
    return layout


def _untraversable(path: Path) -> Path | None:
    for directory in [path, *path.parents]:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


def _ensure_bridge(bridge: BridgeConfig) -> str:
    """Create the bridge (and its address) when missing; '' or why it cannot be used."""
    sysfs = Path("/sys/class/net", bridge.name)
    if sysfs.exists() and not (sysfs / "bridge").is_dir():
        return f"plugins.lxc.bridge: {bridge.name} exists but is not a bridge: choose another name"
    steps = [] if sysfs.exists() else [["ip", "link", "add", bridge.name, "type", "bridge"]]
    if bridge.address is not None:
        shown = _tool_sync("ip", "-o", "addr", "show", "dev", bridge.name).stdout if sysfs.exists() else ""
        if f" {ipaddress.ip_interface(bridge.address).with_prefixlen} " not in shown:
            steps.append(["ip", "addr", "add", bridge.address, "dev", bridge.name])
    steps.append(["ip", "link", "set", bridge.name, "up"])
    for argv in steps:
        result = _tool_sync(*argv)
        if result.returncode != 0:
            return f"could not set up bridge {bridge.name} ({' '.join(argv)}): {result.error}"
    return ""


def _check_digest(actual: str, expected: str, source: str) -> None:
    if actual != expected:
        raise TaskError(
            f"image {source} has SHA-256 {actual}, not the expected {expected}: "
            "check the image_sha256 you sent and the image itself",
            code="image-checksum",
        )


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _tail(path: Path, size: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _last_errors(log_file: Path) -> str:
    """The ERROR lines of liblxc's container log from its last start, shortened."""
    errors = [line.split(" - ", 2)[-1] for line in _tail(log_file, 16384).splitlines()
              if line.startswith("lxc-start ") and " ERROR " in line]
    return "; ".join(errors[-3:])


# ---- running the lxc tools -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Result:
    returncode: int
    stdout: str
    stderr: str

    @property
    def error(self) -> str:
        return (self.stderr.strip() or self.stdout.strip() or f"exit status {self.returncode}")[-500:]


async def _tool(*argv: str) -> _Result:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    return _Result(proc.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace"))


async def _tool_output(*argv: str) -> str:
    return (await _tool(*argv)).stdout


def _tool_sync(*argv: str) -> _Result:
    """For code already off the event loop (asyncio.to_thread)."""
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)  # noqa: S603
    return _Result(proc.returncode, proc.stdout, proc.stderr)
