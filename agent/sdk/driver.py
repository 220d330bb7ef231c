"""The instance-driver contract: what a plugin fills to run one kind of instance.

A driver owns the kind's mechanics (libvirt domains, liblxc containers, host processes);
the agent owns everything around them, the same for every kind:

- the task kinds ``<kind>.create|start|stop|delete|console``, routed to the driver;
- the payload: ``name`` checked against :data:`NAME_RE`, ``timeout`` (stop) and ``bytes``
  (console) parsed and defaulted, unknown keys refused, all with ``bad-request``;
  ``create`` gets the whole payload and parses its own spec with :func:`agent.sdk.parse_payload`;
- one operation at a time per instance (a lock per name), so a driver never sees a
  delete racing the create of the same instance;
- the results, identical for every kind: ``create``, ``start`` and ``stop`` answer
  ``{"name", "kind", "state", "details"}`` (the instance as :meth:`InstanceDriver.list`
  shows it after the operation; ``stop`` adds ``"forced"``), ``delete`` answers
  ``{"name", "kind", "state": "deleted"}``, ``console`` ``{"name", "kind", "log", "logs"}``;
- ``kumo_instances{kind,state}`` on the agent's /metrics, and the instance list in every
  heartbeat, both from :meth:`InstanceDriver.list`;
- adoption after an agent restart: :meth:`InstanceDriver.adopt` is called once after
  start-up, before any task;
- per-instance usage on the agent's /metrics (``kumo_instance_*{instance,kind}``) and in the
  usage summary heartbeats carry, for a driver that can measure it: the optional
  :meth:`UsageMeter.usage`.

A driver raises :class:`agent.sdk.TaskError` with a code from :data:`agent.sdk.ErrorCode`
and leaves nothing half-made behind: a failed create removes what it made. A create the agent
could not finish (killed mid-create) is undone after the restart with the driver's
:meth:`InstanceDriver.delete`, so delete also removes a half-made instance.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, runtime_checkable

from agent.sdk.types import InstanceState
from agent.sdk.usage import InstanceUsage

OPERATIONS = ("create", "start", "stop", "delete", "console")
# One rule for every kind: a name that is a valid hostname label, a file name and a
# libvirt/liblxc name, so it can be all of these at once.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}\Z")
# An instance kind: the first part of its task kinds (``kvm.create``) and of metric labels.
KIND_RE = re.compile(r"^[a-z0-9_-]{1,32}\Z")
CONSOLE_BYTES = 65536  # what ``console`` returns when the payload has no ``bytes``
CONSOLE_BYTES_MAX = 16 << 20


@dataclasses.dataclass(frozen=True)
class ConsoleOutput:
    """The end of an instance's console, and other logs worth showing beside it, by name
    (a container's liblxc log)."""

    text: str
    logs: Mapping[str, str] = dataclasses.field(default_factory=dict)


class InstanceDriver(Protocol):
    """One instance kind. A plugin returns it from ``kumo_instance_driver``.

    Every method but :meth:`list` may be ``async`` and may block only through
    ``asyncio.to_thread`` or asyncio subprocesses. A name passed in is valid
    (:data:`NAME_RE`); except for ``create`` it may not exist here: answer
    ``TaskError(code="not-found")``. When the host support is missing, every operation
    answers ``TaskError(code="unavailable")`` with the fingerprint's reason.
    """

    kind: str

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        """Make and start a new instance from the create payload (``name``, ``kind`` and the
        kind's own spec). ``exists`` when the name is taken; on any failure nothing is left."""
        ...

    async def start(self, name: str) -> None:
        """Start a stopped instance; starting a running one is not an error."""
        ...

    async def stop(self, name: str, timeout: float | None) -> bool:
        """Stop gracefully, then force after ``timeout`` seconds (None: the kind's configured
        default). Returns whether it had to force. Stopping a stopped instance is not an error."""
        ...

    async def delete(self, name: str) -> None:
        """Stop the instance if it runs and remove it with everything it owns on this node,
        also when a create cut off by a crash made only part of it (``not-found`` only when
        nothing of it is here)."""
        ...

    async def console(self, name: str, size: int) -> ConsoleOutput:
        """The last ``size`` bytes of the instance's console output."""
        ...

    async def adopt(self) -> Iterable[InstanceState]:
        """Find the instances this driver started before the agent restarted and take them
        over: re-attach watchers, never restart or stop what runs. Returns what it found."""
        ...

    def list(self) -> Iterable[InstanceState]:
        """Every instance of this kind here, from what the driver already knows (kept fresh by
        events): called at every heartbeat and scrape, so no slow calls. A scrape calls it
        from a worker thread, as it does ``kumo_metrics``: iterate over a copy of what the
        event loop changes (``list(self.instances.values())``)."""
        ...


@runtime_checkable
class UsageMeter(Protocol):
    """The optional part of the driver contract: a driver that can measure what its instances
    use also has this method, and the agent exports it (``kumo_instance_cpu_seconds_total``
    and the rest, labelled ``instance`` and ``kind``) and summarises it for heartbeats. A
    driver without it is still a driver; its instances just have no usage series.
    """

    def usage(self) -> Mapping[str, InstanceUsage]:
        """What each running instance uses now, by name; an instance missing from the answer
        (stopped, or gone meanwhile) has no usage, and a field the kind cannot measure is None.

        Called at every scrape and heartbeat from a worker thread, never on the event loop:
        it may read files and make one call to its backend for all instances together
        (libvirt's bulk domain stats), never one call per instance and never fork, so that a
        scrape costs the same per instance however many there are. Iterate over a copy of
        what the event loop changes, as :meth:`InstanceDriver.list` does.
        """
        ...
