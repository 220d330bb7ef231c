"""The types hooks exchange, the hook marker and the errors a plugin raises."""

from __future__ import annotations

import dataclasses
import ssl
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import pluggy

if TYPE_CHECKING:
    from agent.sdk.hooks import PluginHooks
    from agent.sdk.images import ImageCache

PROJECT = "kumo"
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginError(Exception):
    """A failure a plugin reports to the user: the message says what went wrong and what to do."""


# Every code a task may fail with. The controller, kumoctl and scripts branch on these, so
# the set is closed: a new reason gets a new entry here (and in the README's table), never
# a one-off string in a plugin.
ErrorCode = Literal[
    # the request itself
    "bad-request",        # a payload field is missing, of the wrong type or out of range
    "unknown-kind",       # no plugin on this node handles the task kind
    "not-found",          # no such instance (or checkpoint) on this node
    "exists",             # an instance of that name is already here
    "unavailable",        # the plugin's host support is missing (its fingerprint says why)
    "not-running",        # the operation needs a running instance
    "already-running",    # the operation needs a stopped instance
    "conflict",           # the instance is busy with another operation
    "timeout",            # a tool ran past its configured time and was killed
    "interrupted",        # the agent stopped while the task ran
    "plugin-error",       # a plugin raised something other than TaskError (a bug)
    "result-too-large",   # the result was more than the controller accepts in one request
    "failed",             # the instance's backend (libvirt, liblxc, a tool) refused; message says why
    # placing an instance
    "insufficient-cpu", "insufficient-memory", "limits-unsupported", "no-bridge",
    "unknown-template", "privileged-refused", "bad-command", "invalid-seed", "seed-build", "seed-conflict",
    # images (instance images and checkpoint images)
    "image-missing", "image-download", "image-checksum", "image-invalid", "image-mismatch",
    "image-corrupt", "image-incomplete", "image-changed", "no-image",
    # checkpoint, restore and migration
    "criu-unavailable", "dump-failed", "restore-failed", "adopt-failed", "pid-in-use",
    "missing-files", "file-conflict", "transfer-failed", "no-controller", "import-refused",
    "unsupported-kind", "no-space", "not-converging", "migration-failed",
    # what keeps a process tree from being checkpointed (pre-flight blockers)
    "tcp-established", "tcp-connection", "unix-external", "tty", "char-device", "traced",
    "file-lock", "unsupported-fd", "unsupported-mount", "nested-namespace",
    # what keeps a virtual machine's state from being saved (pre-flight blockers)
    "host-device", "shared-disk", "foreign-disk", "io-error",
    # node services
    "rsyslog-config", "rsyslog-restart", "no-certificate", "unresolvable",
]
ERROR_CODES: frozenset[str] = frozenset(get_args(ErrorCode))


class TaskError(PluginError):
    """A task failed cleanly. ``code`` is one of :data:`ErrorCode`; ``details`` is JSON for scripts."""

    def __init__(self, message: str, code: ErrorCode = "failed", details: Mapping[str, Any] | None = None):
        if code not in ERROR_CODES:
            raise ValueError(f"TaskError code {code!r} is not one of agent.sdk.ErrorCode")
        super().__init__(message)
        self.code = code
        self.details = dict(details or {})


class ControllerUnavailable(PluginError):
    """The controller could not be reached or answered with a server error; try again later."""


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
INSTANCE_STATES: tuple[InstanceStateName, ...] = get_args(InstanceStateName)


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

    def client_tls_context(self) -> ssl.SSLContext:
        """TLS 1.2 or later as this node, trusting only the Kumo CA and only the controller's
        certificate (another node's, signed by the same CA, is refused in the handshake): for
        requests to the controller. Reads the files, so call it off the event loop."""
        from agent.sdk.tls import require_peer_role

        context = ssl.create_default_context(cafile=str(self.ca))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.load_cert_chain(str(self.certificate), str(self.key))
        return require_peer_role(context, "controller")


@dataclasses.dataclass
class PluginContext:
    """What the runtime hands each plugin at start-up.

    ``state_dir`` is this plugin's own directory (created, mode 0700); ``agent_state_dir``
    is the agent's, which holds every plugin's (a plugin writes only in its own, and reads
    the agent's only to recognise its files, as the checkpoint plugin does with an
    instance's console log). ``hooks`` calls other plugins (:class:`agent.sdk.PluginHooks`).
    ``report_changed`` asks the runtime to send instance states to the controller now
    instead of at the next heartbeat. ``call_controller(method, path, json)`` sends one
    request over the agent's mutual-TLS session (``path`` is relative to
    ``/v1/nodes/<this node>/``) and returns the decoded JSON answer; it raises
    :class:`ControllerUnavailable` when the controller cannot be reached, so a plugin can
    keep what it meant to send and try again later. ``images`` is the node's one
    :class:`agent.sdk.ImageCache`, shared by every instance kind. ``controller_url`` (``https://HOST:PORT``)
    is for the rare plugin that must stream a body too large for ``call_controller``
    (checkpoint images), with its own TLS from ``identity``: the controller the agent is
    connected to, which changes when the agent moves to another one, so read it at each use.
    """

    name: str
    state_dir: Path
    agent_state_dir: Path
    identity: Identity | None
    hooks: PluginHooks
    report_changed: Callable[[], None]
    call_controller: Callable[..., Awaitable[Any]]
    images: ImageCache
    controller_url: str | None = None
