"""Checkpointing as a capability of an instance kind (``kumo_checkpointer``).

The checkpoint plugin keeps what is the same for every kind: CRIU itself, the pre-flight
scan of the process tree, the image directory and its manifest, the checksums, the
migration stream and the rollback. What differs between kinds comes from the kind's own
plugin through a :class:`Checkpointer`: which process tree to dump and how (plain
``criu dump`` for a process, ``lxc-checkpoint`` for a container), what JSON the kind
needs to re-create the instance elsewhere, and how the instance is taken over after a
restore. A kind whose instances take a directory along when they migrate (a container's
rootfs) is a :class:`DirectoryCheckpointer`. A kind whose instances are not process trees
(a virtual machine: its hypervisor writes and reads its state) saves and restores them
itself as a :class:`NativeCheckpointer`: the checkpoint plugin then keeps only the image
directory, its manifest, the checksums, pruning, the migration stream and the rollback,
and calls the kind instead of CRIU. The checkpoint plugin never names a kind.

What the checkpoint plugin decides from the tree itself, the same for every kind: a tree
in the agent's own network namespace cannot take TCP connections or unix sockets to the
outside along, and one in the agent's mount namespace cannot take file locks along (their
other holders share the host); a tree with namespaces of its own is dumped with CRIU's
container options (``--tcp-established``, ``--file-locks``, as ``lxc-checkpoint`` passes
them), so only mounts CRIU cannot handle block it. Regular files a tree in the agent's
mount namespace holds open travel with a migration; a tree with its own mount namespace
finds its files in its own directory. A tree in the agent's pid namespace is restored
under its old pids, which must then be free.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from agent.sdk.types import ErrorCode, InstanceStateName

# A checkpoint's id: the name of its directory, its UTC creation time to the microsecond
# and a random suffix, so ids sort by age. Never a path: the controller and the checkpoint
# plugin check every id they are given against this before it names a directory.
CHECKPOINT_ID_RE = re.compile(r"^[0-9]{8}T[0-9]{6}\.[0-9]{6}Z-[0-9a-f]{6}\Z")


@dataclasses.dataclass(frozen=True)
class CheckpointSubject:
    """One instance as its kind describes it to the checkpoint plugin.

    ``pid`` is the root of the process tree to dump (None unless running). ``record`` is
    the kind's JSON, kept in the image's manifest and handed back at restore (a process's
    command line, a container's lxcpath). ``directory`` is what travels with the image in a
    migration besides CRIU's files (a container's directory, its rootfs included), None
    when nothing does; ``definition`` names the file at the top of it that the destination
    checks first (a container's lxc config), before any memory page is sent. A subject
    with a directory comes only from a :class:`DirectoryCheckpointer`.
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
    ``env`` None means the agent's environment. Its output goes to a file, never a pipe:
    what a restore starts may inherit it and hold it open for the instance's whole life.
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

    async def dump_command(self, subject: CheckpointSubject, criu: str, image: Path, logs: Path,
                           leave_running: bool) -> CriuCommand:
        """How to dump ``subject`` into the directory ``image`` with the criu at path ``criu``;
        ``logs`` is a directory for logs outside the image. Without ``leave_running`` the tree
        must be gone afterwards."""
        ...

    async def restore_command(self, name: str, record: Mapping[str, Any], criu: str, image: Path,
                              logs: Path, inherit_fds: Mapping[int, str]) -> CriuCommand:
        """How to restore ``image`` of instance ``name`` (``record`` as dumped) on this node.

        ``inherit_fds`` maps descriptors the checkpoint plugin opened and passes to the
        command to the path, as CRIU names it (no leading ``/``), of the file each replaces
        (criu's ``--inherit-fd fd[N]:PATH``): files that moved into this agent's state
        directory. It is empty for a tree that had a mount namespace of its own."""
        ...

    async def restored(self, name: str, record: Mapping[str, Any], image: Path) -> int:
        """The restore command succeeded: take the instance over and return its root pid.

        If the kind cannot take it, it ends what was restored and raises
        ``TaskError(code="adopt-failed")``, so nothing runs unmanaged."""
        ...


@dataclasses.dataclass(frozen=True)
class StagedDirectory:
    """Where a migrating instance's directory is unpacked (:meth:`DirectoryCheckpointer.stage`)
    and which host ids its files may carry: ``ids`` is the instance's user namespace on this
    node (a container's mapped host uids and gids), None for an instance without one (a
    privileged container). The source may be compromised: in a namespaced instance an owner
    outside ``ids`` becomes the namespace's nobody and loses its setuid/setgid bits and file
    capabilities, and only ``user.*`` and ``security.capability`` extended attributes are
    kept; in every instance, device nodes other than the harmless character devices
    (null, zero, full, random, urandom, tty, console, ptmx) are left out."""

    path: Path
    ids: range | None


@runtime_checkable
class DirectoryCheckpointer(Checkpointer, Protocol):
    """A :class:`Checkpointer` whose instances take a directory along when they migrate
    (:attr:`CheckpointSubject.directory`). A restore whose :meth:`take_over` succeeded and
    whose CRIU then failed is undone with the kind's ``delete`` operation, so a failed
    migration leaves no copy behind."""

    async def stage(self, name: str, record: Mapping[str, Any], definition: bytes,
                    instance: Mapping[str, Any] | None) -> StagedDirectory:
        """A migration is arriving: check that this node can run the instance described by
        ``definition`` (the file the source's subject named) and return a new empty
        directory to unpack the travelling directory into, with the ids its files may have
        here. Refuse with a TaskError that says what this node lacks.

        ``instance`` is the instance's create payload as the controller keeps it (None from a
        controller that does not send it). ``record`` and ``definition`` come from a node
        this one does not control: what decides how the instance is confined here (a
        container's user namespace) is taken from ``instance``, and a definition that says
        otherwise is refused with ``import-refused``."""
        ...

    async def take_over(self, name: str, record: Mapping[str, Any], directory: Path) -> None:
        """Make the unpacked ``directory`` (from :meth:`stage`) instance ``name`` of this node,
        stopped, just before its image is restored into it."""
        ...


@dataclasses.dataclass(frozen=True)
class CheckpointBlocker:
    """Why an instance cannot be checkpointed now: a code from ``ErrorCode`` and a sentence
    for the user that names the cause and what to do about it."""

    code: ErrorCode
    message: str


@dataclasses.dataclass(frozen=True)
class SavedState:
    """What a :meth:`NativeCheckpointer.save` returns besides the files it wrote.

    ``record`` is the JSON its restore needs (kept in the manifest). ``images`` are the
    SHA-256 digests of images in the node's image cache that the restore needs too and
    that are too big to copy into every checkpoint (a VM's base image): a migration carries
    those the destination's cache lacks, and they are in its cache before the restore."""

    record: Mapping[str, Any]
    images: Sequence[str] = ()


@runtime_checkable
class NativeCheckpointer(Protocol):
    """What a kind supplies when it checkpoints its instances with a mechanism of its own,
    not CRIU (a VM: the hypervisor saves its memory state, the kind copies its disk).

    The checkpoint plugin makes the image directory, and after :meth:`save` checksums every
    file the kind wrote there, writes the manifest (``record`` in it), publishes and prunes
    the checkpoint, carries it whole in a migration (sha256 end to end) and verifies it
    before every :meth:`restore`. So everything a restore needs, on this node or another,
    must be in the image, in the image cache (:attr:`SavedState.images`) or named by the
    record; the name of a file the kind writes must
    not start with ``kumo-``, ``stats-`` or ``.`` nor end in ``.log`` (those are not
    checksummed, so they would not travel). Every method may raise ``TaskError``."""

    kind: str

    async def subject(self, name: str) -> CheckpointSubject | None:
        """The instance ``name`` of this kind on this node, or None when there is none
        (``pid`` None: there is no process tree to dump)."""
        ...

    async def blockers(self, name: str) -> Sequence[CheckpointBlocker]:
        """Pre-flight: what prevents saving instance ``name`` now (it is not running, it
        uses something its state cannot be saved with), empty when nothing does. Changes
        nothing; a save refuses what this returns before it begins."""
        ...

    async def save(self, name: str, image: Path, leave_running: bool) -> SavedState:
        """Save instance ``name`` into the new, empty directory ``image``; what a restore
        needs besides those files (the record is handed to :meth:`restore`).

        Without ``leave_running`` the instance is stopped afterwards. A save that fails
        leaves the instance as it was (running); the checkpoint plugin removes ``image``."""
        ...

    async def restore(self, name: str, record: Mapping[str, Any], image: Path,
                      instance: Mapping[str, Any] | None) -> None:
        """Bring instance ``name`` back to the point ``image`` was saved at, running.

        ``image`` has been checked against its checksums, and the images the save named are
        in this node's image cache. ``instance`` is the instance's create payload as the
        controller keeps it (None when the restore did not come through the controller).
        The image may come from another node (a migration): then ``name`` does not exist
        here yet, and ``record`` and the files come from a node this one does not control,
        so the kind builds the instance from ``instance`` and from what it would itself
        accept in a create (never a path, device or program the source names) and refuses
        anything else with ``import-refused``. A restore that fails leaves no new instance
        behind."""
        ...


@dataclasses.dataclass(frozen=True)
class LiveOptions:
    """How a live migration runs: the longest pause of the guest allowed for its last copy
    (``max_downtime_ms``), how long the copy may go on before the guest counts as never
    converging (``converge_timeout``, seconds), and then what to do: ``stop-and-copy``
    pauses the guest so the copy finishes, ``abort`` gives up and leaves it running on the
    source."""

    max_downtime_ms: int = 300
    converge_timeout: float = 120.0
    on_no_converge: str = "abort"


@dataclasses.dataclass(frozen=True)
class LivePrepared:
    """What a destination made ready for a live migration (:meth:`LiveMigrator.live_prepare`):
    ``definition`` is what the source hands its hypervisor as the destination's definition
    of the instance (built here, from what a create accepts); ``targets`` maps each channel
    the source's hypervisor opens (``control``: the hypervisor's own API, ``memory``,
    ``disks``...) to the local unix socket a tunnelled connection of that channel reaches
    on this node. ``filters`` gives, for a channel whose target must not hear everything
    the source may send (a hypervisor's API), what makes the filter of one connection: a
    function given the source's bytes as they come, returning those to pass on, raising
    ValueError to close the connection."""

    definition: str
    targets: Mapping[str, Path]
    filters: Mapping[str, Callable[[], Callable[[bytes], bytes]]] = dataclasses.field(default_factory=dict)


@runtime_checkable
class LiveMigrator(NativeCheckpointer, Protocol):
    """A :class:`NativeCheckpointer` whose instances also move while they run (a VM: its
    hypervisor copies memory and disks while the guest runs, then pauses it briefly).

    The hypervisors of the two nodes talk only through tunnels the checkpoint plugin opens
    through the controller: every connection the source's hypervisor makes to one of the
    unix sockets :meth:`live_migrate` is given becomes one connection to the matching
    target on the destination. Any failure must leave the instance running on the source
    and nothing of it on the destination (:meth:`live_abandon`)."""

    async def live_facts(self, name: str) -> Mapping[str, Any]:
        """On the source: what the destination needs to prepare for instance ``name``
        besides its create payload (JSON), read now; TaskError when it cannot move live."""
        ...

    async def live_prepare(self, name: str, instance: Mapping[str, Any], facts: Mapping[str, Any],
                           sockets: Path) -> LivePrepared:
        """On the destination: make instance ``name`` ready to arrive, from the controller's
        create payload ``instance`` and the source's ``facts`` (checked as strictly as a
        restore checks a record: the source may be compromised). ``sockets`` is the
        directory the migration's sockets live in, the same path on both nodes."""
        ...

    async def live_migrate(self, name: str, definition: str, sockets: Path, options: LiveOptions,
                           progress: Callable[[Mapping[str, Any]], None]) -> Mapping[str, Any]:
        """On the source: move running instance ``name`` to the destination whose
        :class:`LivePrepared` ``definition`` is given, its channels reached through the
        sockets ``sockets/<channel>.sock``; ``progress`` is called with the copy's figures
        as it goes. Returns figures of the finished move (``downtime_ms``...). On failure
        the instance runs here as before."""
        ...

    async def live_arrived(self, name: str, hold: bool) -> bool:
        """On the destination, after the source's move ended (or the controller went away
        without saying how): whether instance ``name`` came here (then it is this node's, as
        a restored instance is). ``hold``: the move is not known to have finished on the
        source, whose hypervisor may have resumed its own copy (the answer to the last step
        of the move can be lost on its way back), so an instance that came here is paused
        and kept paused until the controller decides which copy goes on (``start`` resumes
        it, ``delete`` removes it)."""
        ...

    async def live_abandon(self, name: str) -> None:
        """On the destination: the move failed; remove what :meth:`live_prepare` made,
        unless the instance runs here."""
        ...
