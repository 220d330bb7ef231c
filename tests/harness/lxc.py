"""Real LXC for the lxc plugin's tests: an lxcpath and a bridge of the test's own, and a node.

Every container a test makes lives in its own temporary lxcpath, which teardown empties
(kill, destroy) whatever the test left; bridges have unique names and are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import ControllerUnavailable, ImageCache, InstanceState, PluginContext
from tests.harness import require

TOOLS = ("lxc-create", "lxc-start", "lxc-stop", "lxc-ls", "lxc-info", "lxc-destroy", "lxc-attach", "lxc-cgroup")


def lxc_missing() -> str | None:
    """What of liblxc the tests need is missing here, or None."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return f"lxc tools {', '.join(missing)} (apt install lxc)"
    if not Path("/usr/share/lxc/templates/lxc-busybox").is_file():
        return "the lxc busybox template (/usr/share/lxc/templates/lxc-busybox)"
    if shutil.which("busybox") is None:
        return "busybox-static"
    return None


def run(*argv: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)  # noqa: S603


@pytest.fixture
def lxc_required() -> None:
    missing = lxc_missing()
    require(missing is None, missing or "")


@pytest.fixture
def lxcpath_factory(lxc_required: None) -> Iterator[Callable[[], Path]]:
    """Factory of fresh lxcpaths under /tmp (searchable by an unprivileged container's mapped
    root), one per pretend node; each is emptied (kill, destroy) and removed afterwards."""
    made: list[Path] = []

    def make() -> Path:
        path = Path(tempfile.mkdtemp(prefix="kumo-lxc-test-", dir="/tmp"))
        path.chmod(0o711)
        made.append(path)
        return path

    try:
        yield make
    finally:
        for path in made:
            for entry in path.iterdir():
                if (entry / "config").is_file():
                    run("lxc-stop", "-P", str(path), "-n", entry.name, "-k")
                    run("lxc-destroy", "-P", str(path), "-n", entry.name, "-f")
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def lxcpath(lxcpath_factory: Callable[[], Path]) -> Path:
    """A fresh lxcpath under /tmp (searchable by an unprivileged container's mapped root)."""
    return lxcpath_factory()


@dataclasses.dataclass(frozen=True)
class Bridge:
    name: str
    gateway: str
    subnet: str  # the first three octets: f"{subnet}.12" is an address on it

    def address(self, host: int) -> str:
        return f"{self.subnet}.{host}"


@pytest.fixture
def lxc_bridge(lxc_required: None) -> Iterator[Bridge]:
    """A host bridge with a random 10.232.x.0/24 of its own, removed afterwards."""
    name = f"brl{secrets.token_hex(4)}"
    subnet = f"10.232.{secrets.randbelow(250) + 2}"
    added = run("ip", "link", "add", name, "type", "bridge")
    assert added.returncode == 0, added.stderr
    try:
        run("ip", "addr", "add", f"{subnet}.1/24", "dev", name)
        run("ip", "link", "set", name, "up")
        yield Bridge(name, f"{subnet}.1", subnet)
    finally:
        run("ip", "link", "del", name)


class LxcNode:
    """The lxc and cloudinit plugins of one pretend agent, wired as the agent wires them: one
    Hooks, the lxc driver loaded after start-up, every task through ``hooks.handle_task``."""

    def __init__(self, root: Path, lxcpath: Path, config: Mapping[str, Any] | None = None,
                 others: Mapping[str, object] | None = None):
        self.root, self.lxcpath = root, lxcpath
        self.config = {"lxcpath": str(lxcpath), "poll_interval": 0.5, **dict(config or {})}
        self.images = ImageCache(root / "images")
        self.others = dict(others or {})
        self.changes = 0
        self.plugin: Any = None
        self.hooks: Hooks | None = None

    def _make(self) -> Any:
        from plugins.cloudinit import CloudInitPlugin
        from plugins.lxc import LxcPlugin

        plugin = LxcPlugin()
        plugin.kumo_configure(section=self.config, source="test: plugins.lxc")
        self.hooks = Hooks(make_plugin_manager({"lxc": plugin, "cloudinit": CloudInitPlugin(), **self.others}))
        return plugin

    def context(self, name: str) -> PluginContext:
        """The context the agent would give plugin ``name`` (its state under ``root/plugins``)."""
        state = self.root / "plugins" / name
        state.mkdir(mode=0o700, parents=True, exist_ok=True)

        async def no_controller(*args: Any, **kwargs: Any) -> Any:
            raise ControllerUnavailable("no controller in this test")

        assert self.hooks is not None
        return PluginContext(name, state, self.root, None, self.hooks, self._changed, no_controller, self.images)

    def _changed(self) -> None:
        self.changes += 1

    async def start(self) -> list[InstanceState]:
        """Start a new plugin instance (as an agent start does) and return what it adopted."""
        self.plugin = self._make()
        await self.plugin.kumo_startup(context=self.context("lxc"))
        assert self.hooks is not None
        self.hooks.load_drivers()
        return await self.hooks.adopt()

    async def restart(self) -> list[InstanceState]:
        await self.plugin.kumo_shutdown()
        return await self.start()

    async def task(self, kind: str, payload: Mapping[str, Any]) -> Any:
        assert self.hooks is not None
        return await self.hooks.handle_task(kind, payload, task_id=f"test-{kind}")

    def state(self, name: str) -> InstanceState | None:
        return next((s for s in self.plugin.list() if s.name == name), None)

    async def wait_for(self, predicate: Callable[[], Any], what: str, limit: float = 15.0) -> Any:
        for _ in range(int(limit / 0.05)):
            if value := predicate():
                return value
            await asyncio.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}")

    def attach(self, name: str, *argv: str) -> subprocess.CompletedProcess:
        return run("lxc-attach", "-P", str(self.lxcpath), "-n", name, "--", *argv)

    async def stop(self) -> None:
        if self.plugin is not None:
            await self.plugin.kumo_shutdown()


@pytest.fixture
async def lxc_node(tmp_path: Path, lxcpath: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await lxc_node(config)`` → a started LxcNode on the test's lxcpath; stopped afterwards."""
    nodes: list[LxcNode] = []

    async def make(config: Mapping[str, Any] | None = None, others: Mapping[str, object] | None = None) -> LxcNode:
        node = LxcNode(tmp_path / f"node{len(nodes)}", lxcpath, config, others)
        nodes.append(node)
        await node.start()
        return node

    try:
        yield make
    finally:
        for node in nodes:
            with contextlib.suppress(Exception):
                await node.stop()


def monitor_pids(lxcpath: Path, name: str) -> list[int]:
    """Host pids of liblxc monitor processes for this container."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            cmdline = Path("/proc", entry, "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if cmdline.startswith("[lxc monitor]") and str(lxcpath) in cmdline and f" {name}" in cmdline:
                found.append(int(entry))
    return found


def container_cgroups(name: str) -> list[Path]:
    """cgroup directories liblxc made for a container (payload and monitor), in every hierarchy."""
    root = Path("/sys/fs/cgroup")
    hierarchies = [root, *(p for p in root.iterdir() if p.is_dir())]
    return [
        path
        for hierarchy in hierarchies
        for path in (hierarchy / f"lxc.payload.{name}", hierarchy / f"lxc.monitor.{name}")
        if path.exists()
    ]


def bridge_ports(bridge: str) -> list[str]:
    """Interfaces enslaved to ``bridge`` (the host ends of container veths)."""
    out = run("ip", "-o", "link", "show", "master", bridge).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if ":" in line]
