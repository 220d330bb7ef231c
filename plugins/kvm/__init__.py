"""The ``kvm`` plugin: virtual machines as persistent libvirt domains.

Read top to bottom: settings, the plugin (hooks, then one method per task kind), then the
pieces it is made of — acceleration probe, images, domain XML, the libvirt connection, and
the probe an idle node runs in a child process.

- A VM is a persistent domain defined from XML built with ``xml.etree`` (user strings only
  ever become element text or attribute values). Its disk is a qcow2 overlay on a base
  image cached by SHA-256, or the guest boots a kernel and initrd directly. Its first-boot
  seed comes from whichever plugin implements ``kumo_instance_seed`` (the cloudinit
  plugin), attached read-only as a cdrom. The serial console goes to a file, readable
  through ``kvm.console``.
- Kumo's domains carry ``<metadata><kumo:instance>`` in their XML: that is how an agent
  restart finds (adopts) them. Adoption never starts or stops anything.
- Instance state comes from libvirt lifecycle events (libvirt's default event loop runs in
  its own thread; callbacks are handed to asyncio with ``call_soon_threadsafe``); a full
  listing is read only at connect and reconnect.
- Hardware acceleration is proven, not assumed: ``/dev/kvm`` opening is not enough (on
  nested or paravirtual hosts guests run at emulation speed or fault), so a tiny real guest
  must finish under ``-accel kvm`` within a few seconds. The verdict is cached per boot.
- libvirt (the binding, libvirt.so with what it links, and its event thread: ~12 MB) is
  loaded only once the node has KVM work: instance directories from before (domains to
  adopt) or a kvm task. It then stays loaded, since libvirt cannot unregister its event
  loop. Until then the fingerprint comes from a short-lived child running this module
  (``python -m plugins.kvm URI``), which connects through the same :func:`_open` as the
  plugin (keepalive, events, versions, failure messages alike) and exits.
- Every libvirt call and file operation runs off the event loop (``asyncio.to_thread`` or
  asyncio subprocesses).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import re
import shutil
import ssl
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import psutil

from agent.sdk import (
    ConfigError,
    Fingerprint,
    InstanceState,
    PluginContext,
    Probe,
    ProbeResult,
    TaskError,
    hookimpl,
    parse_section,
)

log = logging.getLogger(__name__)

KIND = "kvm"
TASK_KINDS = ("kvm.create", "kvm.start", "kvm.stop", "kvm.delete", "kvm.console")
METADATA_NS = "https://kumo.dev/xmlns/kvm/1"
NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MIN_MEMORY_MIB = 32
CONSOLE_TAIL_BYTES = 64 * 1024
PROBE_TIMEOUT = 5.0
QEMU = "qemu-system-x86_64"
# An idle node's libvirtd probe is a child process (~0.1 s of CPU): once per fingerprint
# refresh (every 30 s by default), never more often even when other plugins' changes make
# the runtime refresh sooner.
IDLE_PROBE_INTERVAL = 30.0
# libvirtd may probe QEMU's capabilities at a first connection, which takes seconds.
IDLE_PROBE_TIMEOUT = 30.0
NO_BINDING = (
    "the libvirt Python binding is not installed "
    "(apt install python3-libvirt or pip install libvirt-python)"
)


@dataclasses.dataclass(frozen=True)
class KvmConfig:
    """Settings under ``plugins.kvm``.

    ``network``: ``none`` (no NIC), ``user`` (QEMU user-mode NAT, needs no bridge),
    ``network:NAME`` (a libvirt network) or ``bridge:NAME`` (an existing host bridge).
    """

    uri: str = "qemu:///system"
    image_cache: Path = Path("/var/cache/kumo/images")
    # Under libvirt's own image directory: qemu (user libvirt-qemu) must be able to reach
    # the overlays, which it could not inside the agent's 0700 state directory.
    instance_dir: Path = Path("/var/lib/libvirt/images/kumo")
    acceleration: Literal["auto", "kvm", "tcg"] = "auto"
    shutdown_timeout: float = 60.0
    network: str = "none"
    # CA bundle for image URLs served by a private mirror; None trusts the system's CAs.
    image_ca_file: Path | None = None


@dataclasses.dataclass
class _Instance:
    """What the plugin knows about one of its domains (kept fresh by lifecycle events)."""

    name: str
    directory: Path
    state: str = "unknown"
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class _Acceleration:
    domain_type: Literal["kvm", "qemu"]
    name: Literal["kvm", "tcg"]
    reason: str


class KvmPlugin:
    """Runs ``kind: kvm`` instances through libvirt."""

    def __init__(self) -> None:
        self.config = KvmConfig()
        self._context: PluginContext | None = None
        self._libvirt: Any = None  # the module, once this node has KVM work
        self._conn: Any = None
        self._event_callback: int | None = None
        # Empty while libvirtd answers (the connection, or the idle probe): the one truth
        # the fingerprint, the metric and the health probe all report.
        self._unavailable = "the kvm plugin has not started yet"
        self._versions: dict[str, str] = {}
        self._probed_at: float | None = None
        self._instances: dict[str, _Instance] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._changed = asyncio.Event()
        self._connect_lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._acceleration_task: asyncio.Task[_Acceleration] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped = False

    # ---- hooks ---------------------------------------------------------------------

    @hookimpl
    def kumo_configure(self, section: Mapping[str, Any], source: str) -> None:
        config = parse_section(KvmConfig, section, source)
        kind, _, target = config.network.partition(":")
        if not (config.network in ("none", "user") or (kind in ("network", "bridge") and target)):
            raise ConfigError(
                f"{source}.network: expected 'none', 'user', 'network:NAME' or 'bridge:NAME', "
                f"got {config.network!r}"
            )
        if config.shutdown_timeout <= 0:
            raise ConfigError(f"{source}.shutdown_timeout: expected a positive number of seconds")
        self.config = config

    @hookimpl
    async def kumo_startup(self, context: PluginContext) -> None:
        self._context = context
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._acceleration_task = asyncio.create_task(self._decide_acceleration())
        # Instance directories from before mean domains to adopt: libvirt is needed now.
        # Otherwise it waits for the first kvm task, and a probe child answers for it.
        if await asyncio.to_thread(_has_instance_dirs, self.config.instance_dir):
            await self._load()
        else:
            await self._probe_idle()

    @hookimpl
    async def kumo_shutdown(self) -> None:
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reconnect_task
        if self._acceleration_task is not None and not self._acceleration_task.done():
            self._acceleration_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._acceleration_task
        self._stopped = True
        conn, self._conn = self._conn, None
        self._unavailable = "the kvm plugin has stopped"
        if conn is not None:
            await asyncio.to_thread(_close, conn, self._event_callback)

    @hookimpl
    async def kumo_fingerprint(self) -> Fingerprint:
        if self._libvirt is None:
            await self._probe_idle()
        elif self._conn is None:
            await self._connect()
        if self._unavailable:
            return Fingerprint(available=False, reason=self._unavailable, kinds=(KIND,))
        accel = await self._acceleration()
        return Fingerprint(
            available=True,
            kinds=(KIND,),
            attributes={
                "acceleration": accel.name,
                "acceleration_reason": accel.reason,
                "uri": self.config.uri,
                **self._versions,
                "instances": len(self._instances),
            },
        )

    @hookimpl
    def kumo_task_kinds(self) -> Iterable[str]:
        return TASK_KINDS

    @hookimpl
    async def kumo_handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        handler = {
            "kvm.create": self.create,
            "kvm.start": self.start,
            "kvm.stop": self.stop,
            "kvm.delete": self.delete,
            "kvm.console": self.console,
        }.get(kind)
        if handler is None:
            raise TaskError(f"the kvm plugin does not handle {kind!r}", code="unknown-kind")
        name = _name(payload)
        async with self._locks.setdefault(name, asyncio.Lock()):
            return await handler(name, payload)

    @hookimpl
    async def kumo_adopt(self) -> Iterable[InstanceState]:
        """Re-read Kumo's domains from libvirt; running ones are left exactly as they are.

        A node without instance directories has none, and libvirt stays unloaded.
        """
        if self._conn is not None:
            await self._resync(self._conn)
        return self.kumo_instances()

    @hookimpl
    def kumo_instances(self) -> list[InstanceState]:
        return [
            InstanceState(
                name=inst.name,
                kind=KIND,
                state=inst.state,  # type: ignore[arg-type]
                details={"reason": inst.reason} if inst.reason else {},
            )
            for inst in sorted(self._instances.values(), key=lambda i: i.name)
        ]

    @hookimpl
    def kumo_metrics(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        up = GaugeMetricFamily(
            "kumo_kvm_libvirt_up", "1 while libvirtd answers the kvm plugin (its connection, or its idle probe)"
        )
        up.add_metric([], 0.0 if self._unavailable else 1.0)
        by_state = GaugeMetricFamily("kumo_kvm_instances", "Kumo's KVM instances by state", labels=["state"])
        states = [inst.state for inst in list(self._instances.values())]
        for state in ("creating", "running", "stopped", "paused", "failed", "unknown"):
            by_state.add_metric([state], float(states.count(state)))
        return [up, by_state]

    @hookimpl
    def kumo_probes(self) -> Iterable[Probe]:
        return [Probe(name="kvm-libvirtd", run=self._probe_libvirtd)]

    def _probe_libvirtd(self) -> ProbeResult:
        """Critical while libvirtd is unreachable: VMs are unmanaged and refused until it is back."""
        if self._context is None or self._unavailable == NO_BINDING:
            return ProbeResult("unknown", message=self._unavailable)
        if self._unavailable:
            return ProbeResult("critical", 0.0, message=self._unavailable)
        if self._libvirt is None:
            return ProbeResult("ok", 1.0, message=f"{self.config.uri} answers (no VMs here: libvirt not loaded)")
        return ProbeResult("ok", 1.0, message=f"connected to {self.config.uri}")

    # ---- tasks -----------------------------------------------------------------------

    async def create(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Define and start a new domain; on any failure nothing of it is left behind."""
        spec = _parse_create(payload)
        conn = await self._connection()
        if name in self._instances or await asyncio.to_thread(_lookup, conn, name) is not None:
            raise TaskError(
                f"an instance (libvirt domain) named {name!r} already exists on this node: "
                "delete it or choose another name",
                code="exists",
            )
        await asyncio.to_thread(_check_resources, spec)
        accel = await self._acceleration()
        directory = self.config.instance_dir / name
        defined = False
        try:
            await asyncio.to_thread(_fresh_dir, directory)
            seed = await self._require_context().hooks.instance_seed(
                instance=payload, medium="iso", workdir=directory
            )
            base, base_format = await self._image(spec.image, spec.image_sha256)
            disk = directory / "disk.qcow2"
            await _run(
                "qemu-img", "create", "-q", "-f", "qcow2", "-F", base_format, "-b", str(base), str(disk)
            )
            xml = domain_xml(
                name=name,
                spec=spec,
                accel=accel,
                disk=disk,
                seed=seed,
                console_log=directory / "console.log",
                directory=directory,
                network=self.config.network,
            )
            self._instances[name] = _Instance(name, directory, state="creating")
            dom = await asyncio.to_thread(conn.defineXML, xml)
            defined = True
            await asyncio.to_thread(dom.create)
        except BaseException as exc:
            self._instances.pop(name, None)
            await asyncio.to_thread(self._undo_create, conn, name, directory, defined)
            if isinstance(exc, self._libvirt.libvirtError):
                raise TaskError(
                    f"libvirt refused to create {name!r}: {exc.get_error_message()}", code="libvirt"
                ) from exc
            raise
        await self._refresh(conn, name)
        self._report_changed()
        return {
            "name": name,
            "state": self._instances[name].state,
            "acceleration": accel.name,
            "console_log": str(directory / "console.log"),
        }

    async def start(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Start a stopped domain; starting a running one is not an error."""
        conn = await self._connection()
        dom = await self._domain(conn, name)
        if not await asyncio.to_thread(dom.isActive):
            await self._libvirt_call(name, "start", dom.create)
        await self._refresh(conn, name)
        return {"name": name, "state": self._instances[name].state}

    async def stop(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """ACPI shutdown, then destroy if the guest has not powered off within the timeout."""
        timeout = payload.get("timeout", self.config.shutdown_timeout)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or timeout < 0:
            raise TaskError("timeout must be a number of seconds (0 or more)", code="invalid")
        conn = await self._connection()
        dom = await self._domain(conn, name)
        forced = False
        if await asyncio.to_thread(dom.isActive):
            await self._libvirt_call(name, "shut down", dom.shutdown)
            if not await self._wait_state(name, ("stopped", "failed"), timeout):
                if await asyncio.to_thread(dom.isActive):
                    forced = True
                    await self._libvirt_call(name, "destroy", dom.destroy)
        await self._refresh(conn, name)
        self._report_changed()
        return {"name": name, "state": self._instances[name].state, "forced": forced}

    async def delete(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """Destroy (if running) and undefine the domain, and remove its disk, seed and log."""
        conn = await self._connection()
        dom = await self._domain(conn, name)
        directory = self._instances[name].directory
        if await asyncio.to_thread(dom.isActive):
            await self._libvirt_call(name, "destroy", dom.destroy)
        flags = self._libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | self._libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        await self._libvirt_call(name, "undefine", dom.undefineFlags, flags)
        self._instances.pop(name, None)
        await asyncio.to_thread(shutil.rmtree, directory, True)
        self._report_changed()
        return {"name": name, "state": "deleted"}

    async def console(self, name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
        """The tail of the serial console log (``bytes``, default 64 KiB)."""
        size = payload.get("bytes", CONSOLE_TAIL_BYTES)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise TaskError("bytes must be a positive integer", code="invalid")
        inst = self._instances.get(name)
        if inst is None:
            raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")
        text = await asyncio.to_thread(_tail, inst.directory / "console.log", size)
        return {"name": name, "log": text}

    # ---- images ----------------------------------------------------------------------

    async def _image(self, image: str, sha256: str | None) -> tuple[Path, str]:
        """The base image to back an overlay: (path, qemu format), verified when a hash is given."""
        if image.startswith("https://"):
            if sha256 is None:
                raise TaskError("an image URL needs image_sha256 to verify the download", code="invalid")
            path = await self._download(image, sha256)
        elif image.startswith("/"):
            path = Path(image)
            if not await asyncio.to_thread(path.is_file):
                raise TaskError(
                    f"image {image} does not exist on this node: copy it there or give an https URL",
                    code="image-missing",
                )
            if sha256 is not None:
                path = await asyncio.to_thread(self._cache_local, path, sha256)
        else:
            raise TaskError(
                f"image must be an absolute path on the node or an https:// URL, got {image!r}",
                code="invalid",
            )
        return path, await _image_format(path)

    def _cache_local(self, source: Path, sha256: str) -> Path:
        cached = self.config.image_cache / f"{sha256}.img"
        if cached.is_file():
            return cached
        self.config.image_cache.mkdir(parents=True, exist_ok=True)
        partial = cached.with_suffix(f".partial-{os.getpid()}-{threading.get_ident()}")
        digest = hashlib.sha256()
        try:
            with source.open("rb") as src, partial.open("wb") as dst:
                while chunk := src.read(1 << 20):
                    digest.update(chunk)
                    dst.write(chunk)
            _check_digest(digest.hexdigest(), sha256, str(source))
            partial.chmod(0o644)
            partial.replace(cached)
        finally:
            partial.unlink(missing_ok=True)
        return cached

    async def _download(self, url: str, sha256: str) -> Path:
        import aiohttp

        cached = self.config.image_cache / f"{sha256}.img"
        if await asyncio.to_thread(cached.is_file):
            return cached
        await asyncio.to_thread(self.config.image_cache.mkdir, parents=True, exist_ok=True)
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

    # ---- acceleration ----------------------------------------------------------------

    async def _acceleration(self) -> _Acceleration:
        if self._acceleration_task is None:
            self._acceleration_task = asyncio.create_task(self._decide_acceleration())
        return await asyncio.shield(self._acceleration_task)

    async def _decide_acceleration(self) -> _Acceleration:
        mode = self.config.acceleration
        if mode == "tcg":
            return _Acceleration("qemu", "tcg", "set by configuration (acceleration: tcg)")
        works, why = await self._kvm_verdict()
        if mode == "kvm":
            note = "" if works else f"; the probe disagrees: {why}"
            return _Acceleration("kvm", "kvm", f"set by configuration (acceleration: kvm){note}")
        if works:
            return _Acceleration("kvm", "kvm", why)
        return _Acceleration("qemu", "tcg", f"KVM is not usable, falling back to TCG: {why}")

    async def _kvm_verdict(self) -> tuple[bool, str]:
        """Whether a real guest runs under KVM here; cached per boot in the state dir."""
        state_dir = self._require_context().state_dir
        cache = state_dir / "acceleration.json"
        boot_id = await asyncio.to_thread(_boot_id)
        qemu = shutil.which(QEMU)
        key = {"boot_id": boot_id, "qemu": qemu}
        with contextlib.suppress(OSError, ValueError):
            saved = json.loads(await asyncio.to_thread(cache.read_text))
            if saved.get("key") == key:
                return bool(saved["works"]), str(saved["reason"])
        works, reason = await _probe_kvm(qemu, state_dir)
        record = json.dumps({"key": key, "works": works, "reason": reason})
        await asyncio.to_thread(cache.write_text, record)
        return works, reason

    # ---- connection and events -------------------------------------------------------

    async def _connection(self) -> Any:
        """The connection a task works through; the first kvm task of an idle node loads libvirt."""
        if self._conn is None and not await self._load():
            if self._libvirt is None:
                raise TaskError(f"the kvm plugin is unavailable: {self._unavailable}", code="unavailable")
            raise TaskError(
                f"libvirtd is not reachable: {self._unavailable}; start libvirtd and retry",
                code="unavailable",
            )
        return self._conn

    async def _load(self) -> bool:
        """Load libvirt and connect (or keep reconnecting); False while there is no connection."""
        if self._libvirt is None:
            try:
                self._libvirt = await asyncio.to_thread(_EventThread.load)
            except ImportError:
                self._unavailable = NO_BINDING
                return False
            log.info("kvm: libvirt loaded (this node has KVM work)")
        if await self._connect():
            return True
        self._start_reconnecting()
        return False

    async def _connect(self) -> bool:
        """Open the connection, watch events, and re-read Kumo's domains; False if libvirtd is down."""
        async with self._connect_lock:
            if self._conn is not None:
                return True
            if self._stopped:
                return False
            try:
                conn, callback, versions = await asyncio.to_thread(
                    _open, self._libvirt, self.config.uri, self._on_close, self._on_lifecycle
                )
            except self._libvirt.libvirtError as exc:
                self._unavailable = _cannot_connect(self.config.uri, exc)
                return False
            self._conn, self._event_callback, self._versions = conn, callback, versions
            self._unavailable = ""
            await self._resync(conn)
            log.info("kvm: connected to %s", self.config.uri)
            return True

    async def _probe_idle(self) -> None:
        """Without libvirt loaded: whether libvirtd answers and its versions, from a child process."""
        async with self._probe_lock:
            fresh = self._probed_at is not None and time.monotonic() - self._probed_at < IDLE_PROBE_INTERVAL
            if self._libvirt is not None or self._stopped or fresh:
                return
            self._probed_at = time.monotonic()
            answer = await _probe_in_child(self.config.uri)
            # A task may have loaded libvirt meanwhile: its connection knows better.
            if self._libvirt is None and not self._stopped:
                self._unavailable, self._versions = answer["reason"], answer["versions"]

    def _on_close(self, conn: Any, reason: int, opaque: Any) -> None:
        """libvirt's event thread: the connection dropped (libvirtd stopped or crashed)."""
        self._to_loop(self._disconnected, conn, reason)

    def _disconnected(self, conn: Any, reason: int) -> None:
        if self._conn is not conn:
            return
        self._conn = None
        self._unavailable = f"lost the connection to libvirtd at {self.config.uri} (close reason {reason})"
        log.warning("kvm: %s; reconnecting", self._unavailable)
        for inst in self._instances.values():
            inst.state = "unknown"
        self._notify()
        threading.Thread(target=_close, args=(conn, None), daemon=True).start()
        self._start_reconnecting()

    def _start_reconnecting(self) -> None:
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.create_task(self._reconnect())

    async def _reconnect(self) -> None:
        delay = 0.5
        while not await self._connect():
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)
        self._report_changed()

    def _on_lifecycle(self, conn: Any, dom: Any, event: int, detail: int, opaque: Any) -> None:
        """libvirt's event thread: hand the event to asyncio without touching plugin state here."""
        self._to_loop(self._lifecycle, dom.name(), event, detail)

    def _to_loop(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is None:
            return
        # The agent's loop may already be closed when a late libvirt event arrives.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(callback, *args)

    def _lifecycle(self, name: str, event: int, detail: int) -> None:
        inst = self._instances.get(name)
        if inst is None:
            return
        state = _event_state(self._libvirt, event, detail)
        if state == "deleted":
            self._instances.pop(name, None)
        elif state is not None:
            inst.state = state
            inst.reason = "crashed" if state == "failed" else ""
        else:
            return
        self._notify()
        self._report_changed()

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

    async def _resync(self, conn: Any) -> None:
        """Rebuild the instance table from libvirt (at connect and reconnect)."""
        found = await asyncio.to_thread(_kumo_domains, self._libvirt, conn)
        # Only this agent's domains: another Kumo agent sharing the libvirtd (a test bed, or a
        # second agent on one host) keeps its instances under its own instance_dir.
        self._instances = {
            name: _Instance(name, directory, state)
            for name, (directory, state) in found.items()
            if directory.is_relative_to(self.config.instance_dir)
        }
        self._notify()

    async def _refresh(self, conn: Any, name: str) -> None:
        dom = await asyncio.to_thread(_lookup, conn, name)
        inst = self._instances.get(name)
        if dom is None or inst is None:
            return
        inst.state = await asyncio.to_thread(_domain_state, self._libvirt, dom)
        self._notify()

    async def _domain(self, conn: Any, name: str) -> Any:
        dom = await asyncio.to_thread(_lookup, conn, name) if name in self._instances else None
        if dom is None:
            raise TaskError(f"no Kumo instance named {name!r} on this node", code="not-found")
        return dom

    async def _libvirt_call(self, name: str, what: str, func: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except self._libvirt.libvirtError as exc:
            raise TaskError(f"libvirt could not {what} {name!r}: {exc.get_error_message()}", code="libvirt") from exc

    def _undo_create(self, conn: Any, name: str, directory: Path, defined: bool) -> None:
        if defined:
            dom = _lookup(conn, name)
            if dom is not None:
                with contextlib.suppress(self._libvirt.libvirtError):
                    if dom.isActive():
                        dom.destroy()
                with contextlib.suppress(self._libvirt.libvirtError):
                    dom.undefineFlags(self._libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
        shutil.rmtree(directory, ignore_errors=True)

    def _require_context(self) -> PluginContext:
        if self._context is None:
            raise TaskError("the kvm plugin has not started", code="unavailable")
        return self._context

    def _report_changed(self) -> None:
        if self._context is not None:
            self._context.report_changed()


class _EventThread:
    """libvirt's default event loop, run in one daemon thread for the whole process.

    libvirt allows registering its event implementation once per process and offers no way
    to unregister it, so the thread lives as long as the process; plugins only add and
    remove their callbacks.
    """

    _lock = threading.Lock()
    _started = False

    @classmethod
    def load(cls) -> Any:
        """Import libvirt and start the event thread once; the module (ImportError without it)."""
        import libvirt

        with cls._lock:
            if not cls._started:
                # Errors are raised as exceptions; libvirt would also print each one to stderr.
                libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
                libvirt.virEventRegisterDefaultImpl()
                threading.Thread(target=cls._run, args=(libvirt,), name="libvirt-events", daemon=True).start()
                cls._started = True
        return libvirt

    @staticmethod
    def _run(libvirt: Any) -> None:
        while True:
            libvirt.virEventRunDefaultImpl()


# ---- create payload ------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    """The parts of a ``kvm.create`` payload the domain is built from."""

    image: str
    image_sha256: str | None
    vcpus: int
    memory_mib: int
    kernel: str | None
    initrd: str | None
    cmdline: str | None


def _name(payload: Mapping[str, Any]) -> str:
    name = payload.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise TaskError(
            f"name must be 1-63 lowercase letters, digits or '-' (not first or last), got {name!r}",
            code="invalid",
        )
    return name


def _parse_create(payload: Mapping[str, Any]) -> CreateSpec:
    image = payload.get("image")
    if not isinstance(image, str) or not image:
        raise TaskError("image is required: a path on the node or an https URL", code="invalid")
    sha = payload.get("image_sha256")
    if sha is not None and (not isinstance(sha, str) or not SHA256_RE.match(sha.lower())):
        raise TaskError("image_sha256 must be 64 hexadecimal digits", code="invalid")
    vcpus = payload.get("vcpus", 1)
    if not isinstance(vcpus, int) or isinstance(vcpus, bool) or vcpus < 1:
        raise TaskError(f"vcpus must be a positive integer, got {vcpus!r}", code="invalid")
    memory = payload.get("memory_mib")
    if not isinstance(memory, int) or isinstance(memory, bool) or memory < MIN_MEMORY_MIB:
        raise TaskError(f"memory_mib must be an integer of at least {MIN_MEMORY_MIB}, got {memory!r}", code="invalid")
    options = payload.get("options") or {}
    if not isinstance(options, Mapping):
        raise TaskError("options must be a mapping", code="invalid")
    unknown = sorted(set(options) - {"kernel", "initrd", "cmdline"})
    if unknown:
        raise TaskError(f"options.{unknown[0]}: unknown option (known: kernel, initrd, cmdline)", code="invalid")
    for key in ("kernel", "initrd"):
        value = options.get(key)
        if value is not None and (not isinstance(value, str) or not value.startswith("/")):
            raise TaskError(f"options.{key} must be an absolute path on the node", code="invalid")
    cmdline = options.get("cmdline")
    if cmdline is not None and not isinstance(cmdline, str):
        raise TaskError("options.cmdline must be a string", code="invalid")
    if options.get("kernel") is None and (options.get("initrd") or cmdline):
        raise TaskError("options.initrd and options.cmdline need options.kernel", code="invalid")
    return CreateSpec(
        image=image,
        image_sha256=sha.lower() if sha else None,
        vcpus=vcpus,
        memory_mib=memory,
        kernel=options.get("kernel"),
        initrd=options.get("initrd"),
        cmdline=cmdline,
    )


def _check_resources(spec: CreateSpec) -> None:
    cpus = psutil.cpu_count(logical=True) or 1
    if spec.vcpus > cpus:
        raise TaskError(
            f"vcpus {spec.vcpus} is more than the {cpus} CPUs of this node: ask for at most {cpus}",
            code="insufficient-cpu",
        )
    available = psutil.virtual_memory().available // (1024 * 1024)
    if spec.memory_mib > available:
        raise TaskError(
            f"memory_mib {spec.memory_mib} is more than the {available} MiB available on this node",
            code="insufficient-memory",
        )
    for path in (spec.kernel, spec.initrd):
        if path is not None and not os.path.isfile(path):
            raise TaskError(f"{path} does not exist on this node (direct kernel boot)", code="image-missing")


# ---- domain XML ------------------------------------------------------------------------


def domain_xml(
    *,
    name: str,
    spec: CreateSpec,
    accel: _Acceleration,
    disk: Path,
    seed: Path | None,
    console_log: Path,
    directory: Path,
    network: str,
) -> str:
    """The libvirt domain definition, built element by element."""
    # Imported here, as libvirt is: an idle node with no VMs never builds XML (~0.3 MB).
    import xml.etree.ElementTree as ET

    ET.register_namespace("kumo", METADATA_NS)
    domain = ET.Element("domain", type=accel.domain_type)
    ET.SubElement(domain, "name").text = name
    metadata = ET.SubElement(ET.SubElement(domain, "metadata"), f"{{{METADATA_NS}}}instance")
    ET.SubElement(metadata, f"{{{METADATA_NS}}}directory").text = str(directory)
    ET.SubElement(metadata, f"{{{METADATA_NS}}}image").text = spec.image
    ET.SubElement(metadata, f"{{{METADATA_NS}}}acceleration").text = accel.name
    ET.SubElement(metadata, f"{{{METADATA_NS}}}created").text = (
        datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    )
    ET.SubElement(domain, "memory", unit="MiB").text = str(spec.memory_mib)
    ET.SubElement(domain, "vcpu").text = str(spec.vcpus)
    os_el = ET.SubElement(domain, "os")
    ET.SubElement(os_el, "type", arch="x86_64", machine="pc").text = "hvm"
    if spec.kernel:
        ET.SubElement(os_el, "kernel").text = spec.kernel
        if spec.initrd:
            ET.SubElement(os_el, "initrd").text = spec.initrd
        ET.SubElement(os_el, "cmdline").text = spec.cmdline or "console=ttyS0"
    else:
        ET.SubElement(os_el, "boot", dev="hd")
    features = ET.SubElement(domain, "features")
    ET.SubElement(features, "acpi")
    ET.SubElement(features, "apic")
    ET.SubElement(domain, "clock", offset="utc")
    for event, action in (("on_poweroff", "destroy"), ("on_reboot", "restart"), ("on_crash", "destroy")):
        ET.SubElement(domain, event).text = action
    devices = ET.SubElement(domain, "devices")
    root = ET.SubElement(devices, "disk", type="file", device="disk")
    ET.SubElement(root, "driver", name="qemu", type="qcow2")
    ET.SubElement(root, "source", file=str(disk))
    ET.SubElement(root, "target", dev="vda", bus="virtio")
    if seed is not None:
        cdrom = ET.SubElement(devices, "disk", type="file", device="cdrom")
        ET.SubElement(cdrom, "driver", name="qemu", type="raw")
        ET.SubElement(cdrom, "source", file=str(seed))
        ET.SubElement(cdrom, "target", dev="hdc", bus="ide")
        ET.SubElement(cdrom, "readonly")
    kind, _, target = network.partition(":")
    if kind == "user":
        nic = ET.SubElement(devices, "interface", type="user")
        ET.SubElement(nic, "model", type="virtio")
    elif kind in ("network", "bridge"):
        nic = ET.SubElement(devices, "interface", type=kind)
        ET.SubElement(nic, "source", {kind: target})
        ET.SubElement(nic, "model", type="virtio")
    # The serial port writes straight to a file that survives the guest and the agent.
    serial = ET.SubElement(devices, "serial", type="file")
    ET.SubElement(serial, "source", path=str(console_log), append="on")
    ET.SubElement(serial, "target", port="0")
    console = ET.SubElement(devices, "console", type="file")
    ET.SubElement(console, "source", path=str(console_log), append="on")
    ET.SubElement(console, "target", type="serial", port="0")
    rng = ET.SubElement(devices, "rng", model="virtio")
    ET.SubElement(rng, "backend", model="random").text = "/dev/urandom"
    ET.SubElement(ET.SubElement(devices, "video"), "model", type="none")
    ET.SubElement(devices, "memballoon", model="none")
    return ET.tostring(domain, encoding="unicode")


def _metadata_directory(xml: str) -> Path | None:
    """The instance directory recorded in a domain's Kumo metadata; None if not Kumo's."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    found = root.find(f"metadata/{{{METADATA_NS}}}instance/{{{METADATA_NS}}}directory")
    return Path(found.text) if found is not None and found.text else None


# ---- blocking libvirt helpers (always called through asyncio.to_thread) --------------


def _lookup(conn: Any, name: str) -> Any:
    import libvirt

    try:
        return conn.lookupByName(name)
    except libvirt.libvirtError as exc:
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise


def _kumo_domains(libvirt: Any, conn: Any) -> dict[str, tuple[Path, str]]:
    found = {}
    for dom in conn.listAllDomains():
        try:
            directory = _metadata_directory(dom.XMLDesc(0))
            if directory is not None:
                found[dom.name()] = (directory, _domain_state(libvirt, dom))
        except libvirt.libvirtError:
            continue  # undefined while we listed
    return found


def _domain_state(libvirt: Any, dom: Any) -> str:
    state, _reason = dom.state()
    return {
        libvirt.VIR_DOMAIN_RUNNING: "running",
        libvirt.VIR_DOMAIN_BLOCKED: "running",
        libvirt.VIR_DOMAIN_PAUSED: "paused",
        libvirt.VIR_DOMAIN_PMSUSPENDED: "paused",
        libvirt.VIR_DOMAIN_SHUTDOWN: "running",
        libvirt.VIR_DOMAIN_SHUTOFF: "stopped",
        libvirt.VIR_DOMAIN_CRASHED: "failed",
    }.get(state, "unknown")


def _event_state(libvirt: Any, event: int, detail: int) -> str | None:
    if event == libvirt.VIR_DOMAIN_EVENT_UNDEFINED:
        return "deleted"
    if event == libvirt.VIR_DOMAIN_EVENT_STOPPED:
        failed = (libvirt.VIR_DOMAIN_EVENT_STOPPED_CRASHED, libvirt.VIR_DOMAIN_EVENT_STOPPED_FAILED)
        return "failed" if detail in failed else "stopped"
    return {
        libvirt.VIR_DOMAIN_EVENT_STARTED: "running",
        libvirt.VIR_DOMAIN_EVENT_RESUMED: "running",
        libvirt.VIR_DOMAIN_EVENT_SUSPENDED: "paused",
        libvirt.VIR_DOMAIN_EVENT_PMSUSPENDED: "paused",
        libvirt.VIR_DOMAIN_EVENT_CRASHED: "failed",
    }.get(event)


def _versions(conn: Any) -> dict[str, str]:
    import libvirt

    def dotted(number: int) -> str:
        return f"{number // 1000000}.{number // 1000 % 1000}.{number % 1000}"

    try:
        return {"libvirt_version": dotted(conn.getLibVersion()), "qemu_version": dotted(conn.getVersion())}
    except libvirt.libvirtError:
        return {}


def _open(libvirt: Any, uri: str, on_close: Any, on_lifecycle: Any) -> tuple[Any, int, dict[str, str]]:
    """Connect the way the plugin manages VMs through: (connection, event callback id, versions)."""
    conn = libvirt.open(uri)
    try:
        # Keepalive notices a daemon that vanished without closing the socket.
        conn.setKeepAlive(5, 3)
        conn.registerCloseCallback(on_close, None)
        callback = conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, on_lifecycle, None)
    except libvirt.libvirtError:
        conn.close()
        raise
    # Versions change only with a libvirtd restart, which is a reconnect.
    return conn, callback, _versions(conn)


def _close(conn: Any, callback: int | None) -> None:
    with contextlib.suppress(Exception):
        if callback is not None:
            conn.domainEventDeregisterAny(callback)
        conn.unregisterCloseCallback()
    with contextlib.suppress(Exception):
        conn.close()


def _cannot_connect(uri: str, exc: Any) -> str:
    return f"cannot connect to {uri}: {exc.get_error_message()}"


# ---- files and processes ---------------------------------------------------------------


def _has_instance_dirs(instance_dir: Path) -> bool:
    """Whether instances from before may exist: each Kumo domain has its directory here."""
    try:
        with os.scandir(instance_dir) as entries:
            return any(entry.is_dir() for entry in entries)
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: load libvirt and let adoption look


def _fresh_dir(directory: Path) -> None:
    """A new, empty instance directory; leftovers of a crashed create (no domain) are dropped."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    directory.parent.chmod(0o711)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(mode=0o711)


def _check_digest(actual: str, expected: str, source: str) -> None:
    if actual != expected:
        raise TaskError(
            f"image {source} has SHA-256 {actual}, not the expected {expected}: "
            "check the image_sha256 you sent and the image itself",
            code="image-checksum",
        )


def _tail(path: Path, size: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - size))
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE
    )
    _, err = await proc.communicate()
    if proc.returncode != 0:
        raise TaskError(f"{argv[0]} failed: {err.decode(errors='replace').strip()[-400:]}", code="disk")


_formats: dict[tuple[str, float], str] = {}


async def _image_format(path: Path) -> str:
    """qcow2 or raw (as qemu-img sees it), remembered per file version."""
    stat = await asyncio.to_thread(path.stat)
    key = (str(path), stat.st_mtime)
    if key not in _formats:
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "info", "--output=json", str(path),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        out, err = await proc.communicate()
        if proc.returncode != 0:
            raise TaskError(
                f"image {path} is not a disk image qemu-img can read: {err.decode(errors='replace').strip()}",
                code="image-invalid",
            )
        _formats[key] = json.loads(out)["format"]
    return _formats[key]


# A 512-byte boot sector (16-bit real mode): install an int3 handler, print "K" on COM1,
# trap into it (prints "3"), spin 16M iterations, then leave through isa-debug-exit with
# status 0x31 (QEMU exits with (0x31 << 1) | 1 = 99). Under working hardware acceleration
# it finishes in milliseconds after QEMU starts; under TCG in a fraction of a second; on
# hosts whose /dev/kvm emulates guest instructions (RECIPES.md 1b) it takes 10 s or faults.
_PROBE_CODE = bytes.fromhex(
    "FA31C08ED88ED0BC007CC7060C002E7CC7060E000000BAF803B04BEECC"
    "66B900000001664975FCB031E6F4F4EBFDB033EECF"
)
_PROBE_SECTOR = _PROBE_CODE + bytes(510 - len(_PROBE_CODE)) + b"\x55\xaa"
_PROBE_EXIT = 99


async def _probe_kvm(qemu: str | None, workdir: Path) -> tuple[bool, str]:
    """Run the probe guest under ``-accel kvm``; (works, why)."""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        os.close(fd)
    except OSError as exc:
        return False, f"/dev/kvm cannot be opened ({exc.strerror})"
    if qemu is None:
        return False, f"{QEMU} is not installed"
    image = workdir / "kvm-probe.img"
    await asyncio.to_thread(image.write_bytes, _PROBE_SECTOR)
    proc = await asyncio.create_subprocess_exec(
        qemu, "-accel", "kvm", "-nodefaults", "-display", "none", "-no-reboot", "-m", "16",
        "-serial", "stdio", "-monitor", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-drive", f"file={image},format=raw,if=ide",
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), PROBE_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        return False, (
            f"/dev/kvm opens, but a probe guest under -accel kvm did not finish within "
            f"{PROBE_TIMEOUT:g} s (TCG takes well under 1 s): guest instructions are being emulated, "
            "not accelerated (nested or paravirtual KVM)"
        )
    if proc.returncode == _PROBE_EXIT and out.startswith(b"K3"):
        return True, "a probe guest ran under -accel kvm"
    last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no error output"]
    return False, f"/dev/kvm opens, but a probe guest under -accel kvm failed (exit {proc.returncode}): {last[0]}"


# ---- the idle node's libvirtd probe (a child process) ----------------------------------


def _probe_libvirt(uri: str) -> dict[str, Any]:
    """What the child prints: ``{"reason": "" or why libvirtd cannot be used, "versions": {...}}``."""
    try:
        libvirt = _EventThread.load()
    except ImportError:
        return {"reason": NO_BINDING, "versions": {}}
    try:
        conn, callback, versions = _open(libvirt, uri, lambda *_: None, lambda *_: None)
    except libvirt.libvirtError as exc:
        return {"reason": _cannot_connect(uri, exc), "versions": {}}
    _close(conn, callback)
    return {"reason": "", "versions": versions}


async def _probe_in_child(uri: str) -> dict[str, Any]:
    """Run :func:`_probe_libvirt` in a fresh interpreter, so this process never maps libvirt."""
    # The child must import this very file: put its import root first (the Debian wrapper
    # adds it to sys.path by hand), and keep the working directory off sys.path (-P).
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-P", "-m", "plugins.kvm", uri,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        async with asyncio.timeout(IDLE_PROBE_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        return {"reason": f"{uri} did not answer within {IDLE_PROBE_TIMEOUT:g} s", "versions": {}}
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    try:
        answer = json.loads(out)
        return {"reason": str(answer["reason"]), "versions": dict(answer["versions"])}
    except (ValueError, TypeError, KeyError):
        last = err.decode(errors="replace").strip().splitlines()[-1:] or ["no error output"]
        why = f"the libvirtd probe (python -m plugins.kvm) failed (exit {proc.returncode}): {last[0]}"
        return {"reason": why, "versions": {}}


if __name__ == "__main__":
    print(json.dumps(_probe_libvirt(sys.argv[1])))
