"""CRIU for the tests: is a working criu (>= 4.1) here, and a node with the process and
checkpoint plugins wired together exactly as the agent wires them (through Hooks), the
agent core's subreaper included."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
from collections.abc import AsyncIterator, Mapping
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from agent.pluginmanager import Hooks, make_plugin_manager
from agent.reaper import Reaper
from agent.sdk import ControllerUnavailable, ImageCache, InstanceState, PluginContext
from tests.harness import require

SBIN_PATH = os.environ.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"


@cache
def criu_status() -> tuple[bool, str]:
    """(usable, why not): criu >= 4.1 found and `criu check` passing on this kernel."""
    criu = shutil.which("criu", path=SBIN_PATH)
    if criu is None:
        return False, "criu is not installed"
    out = subprocess.run([criu, "--version"], capture_output=True, text=True).stdout  # noqa: S603
    match = re.search(r"Version:\s*(\d+)\.(\d+)", out)
    if not match or (int(match.group(1)), int(match.group(2))) < (4, 1):
        return False, f"{criu} is not criu >= 4.1 ({out.strip() or 'no version'})"
    if os.geteuid() != 0:
        return False, "criu needs root"
    check = subprocess.run([criu, "check"], capture_output=True, text=True)  # noqa: S603
    if check.returncode != 0:
        return False, f"`{criu} check` fails: {check.stdout[-200:]}{check.stderr[-200:]}"
    return True, ""


@pytest.fixture
def criu_required() -> None:
    """Skip (fail in CI) unless a working criu >= 4.1 is installed."""
    ok, why = criu_status()
    require(ok, f"a working criu >= 4.1 ({why}; scripts/deps/30-criu.sh builds one)")


class CriuNode:
    """The process and checkpoint plugins of one pretend agent (and any ``others``, such as the
    lxc plugin), wired together exactly as the agent wires them: one Hooks, the drivers
    loaded after start-up, and a child subreaper (agent.reaper) while it runs."""

    def __init__(self, root: Path, checkpoint_config: Mapping[str, Any] | None = None,
                 others: Mapping[str, object] | None = None):
        from plugins.checkpoint import CheckpointPlugin
        from plugins.process import ProcessPlugin

        self.root = root
        self.changes = 0
        self.process = ProcessPlugin()
        self.checkpoint = CheckpointPlugin()
        self.others = dict(others or {})
        self.checkpoint.kumo_configure(section=dict(checkpoint_config or {}), source="test: plugins.checkpoint")
        self.hooks = self._hooks()
        self.reaper = Reaper(interval=0.2)

    def _hooks(self) -> Hooks:
        return Hooks(make_plugin_manager({"process": self.process, "checkpoint": self.checkpoint, **self.others}))

    def context(self, name: str) -> PluginContext:
        state = self.root / name
        state.mkdir(mode=0o700, exist_ok=True)

        async def no_controller(*args: Any, **kwargs: Any) -> Any:
            raise ControllerUnavailable("no controller in this test")

        return PluginContext(name, state, self.root, None, self.hooks, self._changed, no_controller,
                             ImageCache(self.root / "images"))

    def _changed(self) -> None:
        self.changes += 1

    async def start(self) -> None:
        self.reaper.start()
        for name, plugin in {"process": self.process, **self.others, "checkpoint": self.checkpoint}.items():
            await plugin.kumo_startup(context=self.context(name))  # type: ignore[attr-defined]
        self.hooks.load_drivers()
        await self.hooks.adopt()

    async def restart_process_plugin(self) -> None:
        """Replace the process plugin by a fresh one on the same state dir, as an agent restart does."""
        from plugins.process import ProcessPlugin

        await self.process.kumo_shutdown()
        self.process = ProcessPlugin()
        self.hooks = self._hooks()
        assert self.checkpoint.workspace.context is not None
        self.checkpoint.workspace.context.hooks = self.hooks
        await self.process.kumo_startup(context=self.context("process"))
        self.hooks.load_drivers()
        await self.hooks.adopt()

    async def task(self, kind: str, payload: Mapping[str, Any]) -> Any:
        return await self.hooks.handle_task(kind, payload, task_id=f"test-{kind}")

    def instances(self) -> list[InstanceState]:
        assert self.process.driver is not None
        return self.process.driver.list()

    def state(self, name: str) -> InstanceState:
        return next(s for s in self.instances() if s.name == name)

    async def stop(self) -> None:
        pids = [s.details["pid"] for s in self.instances() if s.details.get("pid")]
        await self.checkpoint.kumo_shutdown()
        for plugin in self.others.values():
            await plugin.kumo_shutdown()  # type: ignore[attr-defined]
        await self.process.kumo_shutdown()
        await self.reaper.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


@pytest.fixture
async def criu_node(tmp_path: Path) -> AsyncIterator[CriuNode]:
    """A started CriuNode under tmp_path; every process it runs is killed afterwards."""
    node = CriuNode(tmp_path / "state")
    node.root.mkdir()
    await node.start()
    try:
        yield node
    finally:
        await node.stop()
