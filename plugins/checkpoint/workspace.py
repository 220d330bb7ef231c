"""What every checkpoint task works with: the plugin's settings, its context, criu's state,
and where an instance's checkpoints and logs are on this node.

It stands apart so that the modules of the plugin's tasks (:mod:`.local`, :mod:`.migration`,
:mod:`.live`) share it without importing the plugin, which imports them.
"""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from agent.sdk import Checkpointer, NativeCheckpointer, PluginContext, TaskError
from plugins.checkpoint import criu

# What a kind supplies: for CRIU, or its own save and restore.
AnyCheckpointer = Checkpointer | NativeCheckpointer


@dataclasses.dataclass
class CheckpointConfig:
    """``plugins.checkpoint`` settings."""

    criu: str = "criu"  # a path, or a name looked up in PATH
    images_dir: Path | None = None  # default: <state_dir>/images
    keep: int = 2  # complete checkpoints kept per instance; older ones are removed
    timeout: float = 600.0  # seconds one criu dump or restore may take
    # Where a live migration's sockets are (one directory per migration): the same path on
    # every node, since a hypervisor may give both ends one path.
    live_sockets: Path = Path("/run/kumo/migrations")


@dataclasses.dataclass
class Target:
    """Every task's payload: the instance."""

    name: str
    kind: str


@dataclasses.dataclass
class Workspace:
    """The plugin's settings (replaced by ``kumo_configure``), its context (set by
    ``kumo_startup``) and the last probe of criu."""

    config: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    context: PluginContext | None = None
    status: criu.CriuStatus = dataclasses.field(default_factory=lambda: criu.CriuStatus(False, "not started"))

    def require_context(self) -> PluginContext:
        assert self.context is not None, "kumo_startup was not called"
        return self.context

    def require_criu(self) -> None:
        if not self.status.usable:
            raise TaskError(self.status.reason, code="criu-unavailable")

    def images_root(self) -> Path:
        return self.config.images_dir or self.require_context().state_dir / "images"

    def images(self, kind: str, name: str) -> Path:
        """The directory of one instance's checkpoints."""
        return self.images_root() / kind / name

    def logs_dir(self, kind: str, name: str) -> Path:
        """The directory of the logs of one instance's last dump and restore."""
        return self.require_context().state_dir / "logs" / kind / name

    async def logs(self, kind: str, name: str) -> Path:
        """:meth:`logs_dir`, created."""
        path = self.logs_dir(kind, name)
        await asyncio.to_thread(path.mkdir, parents=True, exist_ok=True)
        return path
