"""The plugin contract: every hook a Kumo plugin may implement.

Each docstring is the plugin author's reference. Rules that hold for all hooks:

- Hooks are called with keyword arguments; implement only the arguments you need.
- Any hook may be a plain function or return an awaitable (``async def``); the runtime
  awaits it. Blocking work (libvirt, CRIU, subprocesses, disk) belongs in
  ``asyncio.to_thread`` or an asyncio subprocess, never directly on the event loop.
- The runtime calls each plugin's implementation separately: one plugin raising does not
  stop the others. The error is logged and reported as that plugin's failure.
- Raise :class:`agent.sdk.PluginError` (or ``TaskError`` in task hooks) with a message
  that names what was wrong and what to do; any other exception is reported as a bug.
- Everything named here is imported from :mod:`agent.sdk`, the plugin author's whole API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pluggy

from agent.sdk import (
    PROJECT,
    Checkpointer,
    Fingerprint,
    InstanceDriver,
    NativeCheckpointer,
    PluginContext,
    Probe,
)

hookspec = pluggy.HookspecMarker(PROJECT)


@hookspec
def kumo_configure(section: Mapping[str, Any], source: str) -> None:
    """Validate and keep this plugin's settings. Called once, before anything starts.

    ``section`` is this plugin's own table, ``plugins.<name>`` of the agent config (an
    empty mapping when the config has none). ``source`` names where it came from, for
    messages: ``"/etc/kumo/agent.yaml: plugins.kvm"``. Parse it with
    :func:`agent.sdk.parse_section` or raise :class:`agent.sdk.ConfigError` naming
    the key and what was expected: the agent then refuses to start.
    """


@hookspec
def kumo_startup(context: PluginContext) -> None:
    """Start the plugin's own work (event watchers, background loops).

    Called once after configuration, before the agent registers with the controller.
    Keep ``context``: it carries this plugin's state directory, the node identity and the
    hook caller for other plugins. A plugin whose host support is missing must still start
    and say why in :func:`kumo_fingerprint`.
    """


@hookspec
def kumo_shutdown() -> None:
    """Stop background work. Called once when the agent stops (SIGTERM).

    Workloads (VMs, containers, processes) keep running: an agent restart must not touch them.
    """


@hookspec
def kumo_fingerprint() -> Fingerprint:
    """Say what this plugin can do on this node right now.

    Called at registration and again whenever the runtime refreshes facts, so the answer
    may change (libvirtd stopped, then came back). Never raise for missing host support:
    return ``Fingerprint(available=False, reason="...")``.
    """


@hookspec
def kumo_instance_driver() -> InstanceDriver | None:
    """Return the driver of the instance kind this plugin runs, or None for no kind.

    Called once after :func:`kumo_startup`. The agent then owns the kind's tasks
    (``<kind>.create|start|stop|delete|console``), their payload checks, per-instance
    locking and result shapes, the instances' place in heartbeats and metrics, and their
    adoption after a restart: see :class:`agent.sdk.InstanceDriver` for what the driver
    fills. Each kind has exactly one driver on a node; two plugins driving one kind stop
    the agent at start-up.
    """


@hookspec
def kumo_checkpointer() -> Checkpointer | NativeCheckpointer | None:
    """Return how this plugin's instance kind is checkpointed, or None when it is not.

    A :class:`agent.sdk.Checkpointer` when the kind's instances are process trees CRIU can
    dump (processes, containers); a :class:`agent.sdk.NativeCheckpointer` when the kind
    saves and restores them itself (virtual machines, through the hypervisor). Either way
    the checkpoint plugin checkpoints, restores and migrates them without knowing the kind.
    Nodes publish the kinds they can checkpoint in the checkpoint plugin's fingerprint,
    and the controller migrates only those.
    """


@hookspec
def kumo_instance_deleted(kind: str, name: str) -> None:
    """Instance ``name`` of ``kind`` was deleted on this node (its ``<kind>.delete``
    succeeded): remove what this plugin keeps of it elsewhere (the checkpoint plugin its
    checkpoints and their logs), so that nothing of it is left.

    Called with the instance's lock held, before the delete's result is reported; do not
    take the lock again from another asyncio task. A failure is logged: the delete stands.
    """


@hookspec
def kumo_task_kinds() -> Iterable[str]:
    """Name the task kinds this plugin handles besides its instance driver's, e.g.
    ``["checkpoint.dump", "checkpoint.restore"]``.

    A task kind is ``<plugin or instance kind>.<operation>``. Each kind has exactly one
    owner: two plugins claiming one kind stop the agent at start-up.
    """


@hookspec
def kumo_handle_task(kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
    """Run one task of a kind this plugin declared in :func:`kumo_task_kinds`; return its
    JSON-able result.

    Called only on the plugin that owns ``kind``. Raise :class:`agent.sdk.TaskError`
    for a clean failure: its message reaches the user through the controller. A failed
    task must leave nothing half-made behind (no domain without disk, no stray files).
    The same task may be delivered twice after a crash; the runtime filters repeats by
    idempotency key, so a handler sees each key once.
    """


@hookspec
def kumo_metrics() -> Iterable[Any]:
    """Return ``prometheus_client`` metric families for the agent's ``/metrics``.

    Called at every scrape, off the event loop: answer from cached values, quickly.
    """


@hookspec
def kumo_probes() -> Iterable[Probe]:
    """Contribute health probes for the monitoring plugin to schedule and alert on.

    A probe named ``libvirtd`` from plugin ``kvm`` is scheduled, exported and matched by
    alert rules as ``kvm.libvirtd``.
    """


@hookspec
def kumo_instance_seed(instance: Mapping[str, Any], medium: str, workdir: Path) -> Path | None:
    """Build the first-boot seed of a new instance; return its path, or None for no seed.

    Instance plugins call this (through ``context.hooks``) before they create anything, so
    an invalid seed fails the create with nothing left behind. ``instance`` is the create
    payload (``name``, ``user_data``, ``network_config``...). ``medium`` is ``"iso"``
    (a file to attach as a read-only cdrom) or ``"directory"`` (a tree to copy into a root
    filesystem at ``/var/lib/cloud/seed/nocloud/``). Write only under ``workdir``. Raise
    ``TaskError`` for bad input, naming the line and the reason.
    """
