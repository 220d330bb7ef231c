"""Everything a plugin author imports: the hook marker and the types hooks exchange.

A plugin is a class named by an entry point in the group ``kumo.plugins``; the agent makes
one instance of it and registers it under the entry point's name. Its methods marked with
``@hookimpl`` implement the hooks documented in :mod:`agent.hookspecs`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import pluggy

PROJECT = "kumo"
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginError(Exception):
    """A failure a plugin reports to the user: the message says what went wrong and what to do."""


class TaskError(PluginError):
    """A task failed cleanly. ``code`` is a short machine-readable reason (e.g. ``image-checksum``)."""

    def __init__(self, message: str, code: str = "failed", details: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.code = code
        self.details = dict(details or {})


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """What one plugin can do on this node; the scheduler places work by it.

    ``kinds`` are the instance kinds this plugin runs (``kvm``, ``lxc``...), empty for
    plugins that run none. ``attributes`` are free-form facts (``{"acceleration": "tcg"}``).
    An unavailable plugin still reports itself, with ``reason`` saying what is missing.
    """

    available: bool
    reason: str = ""
    kinds: tuple[str, ...] = ()
    attributes: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "available": self.available,
            "reason": self.reason,
            "kinds": list(self.kinds),
            "attributes": dict(self.attributes),
        }


InstanceStateName = Literal["creating", "running", "stopped", "paused", "failed", "unknown"]


@dataclasses.dataclass(frozen=True)
class InstanceState:
    """The truth about one workload a plugin runs, as the plugin sees it now."""

    name: str
    kind: str
    state: InstanceStateName
    details: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "state": self.state, "details": dict(self.details)}


ProbeStatus = Literal["ok", "warning", "critical", "unknown"]


@dataclasses.dataclass(frozen=True)
class ProbeResult:
    """One probe run. ``value`` is the number exported as a metric, when there is one."""

    status: ProbeStatus
    value: float | None = None
    message: str = ""
    labels: Mapping[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Probe:
    """A check another plugin contributes to the monitoring plugin's schedule.

    ``run`` is called every ``interval`` seconds and is cancelled after ``timeout``; it may
    be a coroutine function. It must not block the event loop.
    """

    name: str
    run: Callable[[], ProbeResult | Awaitable[ProbeResult]]
    interval: float = 15.0
    timeout: float = 10.0


@dataclasses.dataclass(frozen=True)
class Identity:
    """The node's own credentials, for plugins that talk TLS to peers (migration, log forwarding)."""

    node_id: str
    key: Path
    certificate: Path
    ca: Path


@dataclasses.dataclass
class PluginContext:
    """What the runtime hands each plugin at start-up.

    ``state_dir`` is this plugin's own directory (created, mode 0700). ``hooks`` calls other
    plugins' hooks (see :class:`agent.pluginmanager.Hooks`). ``report_changed`` asks the
    runtime to send instance states to the controller now instead of at the next heartbeat.
    ``call_controller(method, path, json)`` sends one request over the agent's mutual-TLS
    session (``path`` is relative to ``/v1/nodes/<this node>/``) and returns the decoded
    JSON answer; it raises :class:`ControllerUnavailable` when the controller cannot be
    reached, so a plugin can keep what it meant to send and try again later.
    ``controller_url`` (``https://HOST:PORT``) is for the rare plugin that must stream a body
    too large for ``call_controller`` (checkpoint images), with its own TLS from ``identity``.
    """

    name: str
    state_dir: Path
    identity: Identity | None
    hooks: Any
    report_changed: Callable[[], None]
    call_controller: Callable[..., Awaitable[Any]]
    controller_url: str | None = None


class ControllerUnavailable(PluginError):
    """The controller could not be reached or answered with a server error; try again later."""
