"""Checkpointing as a capability of an instance kind (``kumo_checkpointer``).

The checkpoint plugin keeps what is the same for every kind: CRIU itself, the pre-flight
scan of the process tree, the image directory and its manifest, the checksums, the
migration stream and the rollback. What differs between kinds comes from the kind's own
plugin through a :class:`Checkpointer`: which process tree to dump and how (plain
``criu dump`` for a process, ``lxc-checkpoint`` for a container), what JSON the kind
needs to re-create the instance elsewhere, which directory travels with the image in a
migration, and how the instance is taken over after a restore. The checkpoint plugin
never names a kind.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from agent.sdk.types import InstanceStateName


@dataclasses.dataclass(frozen=True)
class CheckpointSubject:
    """One instance as its kind describes it to the checkpoint plugin.

    ``pid`` is the root of the process tree to dump (None unless running). ``record`` is
    the kind's JSON, kept in the image's manifest and handed back at restore (a process's
    command line, a container's lxcpath). ``directory`` is what travels with the image in a
    migration besides CRIU's files (a container's directory, its rootfs included), None
    when nothing does; ``definition`` is the file in it, relative, that the destination
    checks first (a container's lxc config), before any memory page is sent.
    """

    name: str
    state: InstanceStateName
    pid: int | None
    record: Mapping[str, Any]
    directory: Path | None = None
    definition: str | None = None


@dataclasses.dataclass(frozen=True)
class CriuCommand:
    """A command that runs CRIU (criu itself, or a tool that runs it, such as lxc-checkpoint).

    ``log`` is where CRIU's own log of it ends up, for the error message when it fails.
    ``env`` None means the agent's environment.
    """

    argv: Sequence[str]
    log: Path
    env: Mapping[str, str] | None = None


class Checkpointer(Protocol):
    """What one instance kind supplies so that its instances can be checkpointed, restored
    and migrated. Every method may raise ``TaskError`` with a code from ``ErrorCode``."""

    kind: str

    async def subject(self, name: str) -> CheckpointSubject | None:
        """The instance ``name`` of this kind on this node, or None when there is none."""
        ...

    def dump_command(self, subject: CheckpointSubject, criu: str, image: Path, logs: Path,
                     leave_running: bool) -> CriuCommand:
        """How to dump ``subject`` into the directory ``image``; ``logs`` is a directory for
        logs outside the image. Without ``leave_running`` the tree must be gone afterwards."""
        ...

    def restore_command(self, name: str, record: Mapping[str, Any], criu: str, image: Path,
                        logs: Path) -> CriuCommand:
        """How to restore ``image`` of instance ``name`` (``record`` as dumped) on this node."""
        ...

    async def restored(self, name: str, record: Mapping[str, Any], image: Path) -> int:
        """The restore command succeeded: take the instance over and return its root pid.

        If the kind cannot take it, it ends what was restored and raises
        ``TaskError(code="adopt-failed")``, so nothing runs unmanaged."""
        ...

    async def stage(self, name: str, record: Mapping[str, Any], definition: bytes) -> Path:
        """A migration is arriving: check that this node can run the instance described by
        ``definition`` (the file named by the source's subject) and return an empty
        directory to unpack the travelling directory into. Refuse with a TaskError that says
        what this node lacks. Only called for kinds whose subjects carry a directory."""
        ...

    async def take_over(self, name: str, record: Mapping[str, Any], directory: Path) -> None:
        """Make the unpacked ``directory`` (from :meth:`stage`) instance ``name`` of this node,
        stopped, just before its image is restored into it."""
        ...
