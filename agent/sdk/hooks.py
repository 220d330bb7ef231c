"""``context.hooks``: how a plugin reaches the other plugins, without importing them."""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from agent.sdk.checkpointing import Checkpointer, NativeCheckpointer
    from agent.sdk.types import InstanceState, Probe


class PluginHooks(Protocol):
    """The calls a plugin may make on the others (the agent's ``Hooks`` implements them).

    Each call goes through every plugin that implements the hook behind it; one plugin
    failing is logged and left out, except where a method says its errors propagate.
    """

    async def instances(self) -> list[InstanceState]:
        """Every instance of every kind on this node, as their drivers see them now."""
        ...

    async def instance_seed(self, instance: Mapping[str, Any], medium: str, workdir: Path) -> Path | None:
        """The first-boot seed of a new instance (``kumo_instance_seed``), or None when no
        plugin builds one. Errors propagate: a create must fail rather than boot unseeded."""
        ...

    def checkpointers(self) -> dict[str, Checkpointer | NativeCheckpointer]:
        """What each instance kind that can be checkpointed supplies (``kumo_checkpointer``),
        by kind. A kind missing here cannot be checkpointed on this node."""
        ...

    async def probes(self) -> list[tuple[str, Probe]]:
        """Every plugin's contributed probes (``kumo_probes``), with the contributing plugin's name."""
        ...

    def instance_lock(self, kind: str, name: str) -> AbstractAsyncContextManager[None]:
        """``async with``: hold instance ``name`` of ``kind`` against every other operation on
        it (its ``<kind>.*`` tasks included) for as long as the block runs. For a plugin that
        works on another's instances, as the checkpoint plugin dumps and restores them.
        Re-entrant within one asyncio task: the block may call :meth:`handle_task` on the
        same instance."""
        ...

    async def handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        """Run one task on whichever plugin owns ``kind``, as if the controller had sent it.

        For a plugin that drives another's instances (the checkpoint plugin deletes a
        container whose restore failed with ``lxc.delete``). Errors propagate;
        an unknown kind is ``TaskError(code="unknown-kind")``."""
        ...
