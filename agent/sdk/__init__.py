"""The plugin SDK: everything a Kumo plugin imports from the agent, and nothing else.

A plugin is a class named by an entry point in the group ``kumo.plugins``; the agent makes
one instance of it and registers it under the entry point's name. Its methods marked with
``@hookimpl`` implement the hooks documented in :mod:`agent.hookspecs`. A plugin imports
the standard library, its declared dependencies and this module; never another module of
the agent and never another plugin (``tests/test_layers.py`` fails when one does).

What is here, by concern:

- the contract: :data:`hookimpl`, :class:`PluginContext` (with :class:`PluginHooks`, the
  calls a plugin makes on the others), :class:`Fingerprint`, :class:`InstanceState`,
  :class:`Probe` and :class:`ProbeResult`, :class:`Identity`;
- errors: :class:`PluginError`, :class:`TaskError` with its closed set of codes
  :data:`ErrorCode`, :class:`ConfigError`, :class:`ControllerUnavailable`;
- input: :func:`parse_section` for the plugin's ``plugins.<name>`` settings and
  :func:`parse_payload` for task payloads, both from a dataclass, both strict; and
  cloud-init seed data checked as cloud-init reads it (:func:`validate_user_data`,
  :func:`validate_network_config`, :func:`problem_line`), by the node and the controller alike;
- running instances: the driver contract (:class:`InstanceDriver`, :class:`ConsoleOutput`,
  :data:`NAME_RE`, :data:`KIND_RE`, and the optional :class:`UsageMeter` answering
  :class:`InstanceUsage`), the checkpoint capability (:class:`Checkpointer`,
  :class:`DirectoryCheckpointer`, :class:`CheckpointSubject`, :class:`CriuCommand`,
  :data:`CHECKPOINT_ID_RE` for a checkpoint's id, and for a
  kind that saves itself without CRIU :class:`NativeCheckpointer` with
  :class:`CheckpointBlocker` and :class:`SavedState`; a kind whose instances take a
  directory along stages it as a :class:`StagedDirectory`) and the node's image cache
  (:class:`ImageCache`, :func:`valid_sha256`);
- mechanics every plugin would otherwise write again: :func:`atomic_write`,
  :func:`append_line` and :func:`tail` for files (:class:`DiskFull` when there is no room), :func:`run_command` for host tools, :class:`ExitWatcher` for
  processes, :func:`stat_fields`, :func:`start_time`, :func:`boot_id` and
  :func:`zombie_children` for /proc, :class:`Cgroups`, :func:`netns_usage` and
  :func:`process_tree_usage` to measure instances without forking, :class:`Backoff` for retries, and
  :func:`require_peer_role` for TLS that checks a Kumo peer's role, not only its CA.
"""

from agent.sdk.backoff import Backoff
from agent.sdk.checkpointing import (
    CHECKPOINT_ID_RE,
    CheckpointBlocker,
    Checkpointer,
    CheckpointSubject,
    CriuCommand,
    DirectoryCheckpointer,
    LiveMigrator,
    LiveOptions,
    LivePrepared,
    NativeCheckpointer,
    SavedState,
    StagedDirectory,
)
from agent.sdk.cloudconfig import problem_line, validate_network_config, validate_user_data
from agent.sdk.commands import CommandResult, run_command, run_command_sync
from agent.sdk.config import ConfigError, controller_url, load_yaml_file, parse_section
from agent.sdk.driver import (
    CONSOLE_BYTES,
    KIND_RE,
    NAME_RE,
    OPERATIONS,
    ConsoleOutput,
    InstanceDriver,
    UsageMeter,
)
from agent.sdk.files import DiskFull, append_line, atomic_write, tail
from agent.sdk.hooks import PluginHooks
from agent.sdk.images import ImageCache, valid_sha256
from agent.sdk.payload import parse_payload
from agent.sdk.procfs import boot_id, start_time, stat_fields, zombie_children
from agent.sdk.tls import require_peer_role
from agent.sdk.types import (
    ERROR_CODES,
    INSTANCE_STATES,
    PROJECT,
    ControllerUnavailable,
    ErrorCode,
    Fingerprint,
    Identity,
    InstanceState,
    InstanceStateName,
    PluginContext,
    PluginError,
    Probe,
    ProbeResult,
    ProbeStatus,
    TaskError,
    hookimpl,
)
from agent.sdk.usage import Cgroups, InstanceUsage, netns_usage, process_tree_usage
from agent.sdk.watch import ExitWatcher

__all__ = [
    "CHECKPOINT_ID_RE",
    "CONSOLE_BYTES",
    "ERROR_CODES",
    "INSTANCE_STATES",
    "KIND_RE",
    "NAME_RE",
    "OPERATIONS",
    "PROJECT",
    "Backoff",
    "Cgroups",
    "CheckpointBlocker",
    "CheckpointSubject",
    "Checkpointer",
    "CommandResult",
    "ConfigError",
    "ConsoleOutput",
    "ControllerUnavailable",
    "CriuCommand",
    "DirectoryCheckpointer",
    "DiskFull",
    "ErrorCode",
    "ExitWatcher",
    "Fingerprint",
    "Identity",
    "ImageCache",
    "InstanceDriver",
    "InstanceState",
    "InstanceStateName",
    "InstanceUsage",
    "LiveMigrator",
    "LiveOptions",
    "LivePrepared",
    "NativeCheckpointer",
    "PluginContext",
    "PluginError",
    "PluginHooks",
    "Probe",
    "ProbeResult",
    "ProbeStatus",
    "SavedState",
    "StagedDirectory",
    "TaskError",
    "UsageMeter",
    "append_line",
    "atomic_write",
    "boot_id",
    "controller_url",
    "hookimpl",
    "load_yaml_file",
    "netns_usage",
    "parse_payload",
    "parse_section",
    "problem_line",
    "process_tree_usage",
    "require_peer_role",
    "run_command",
    "run_command_sync",
    "start_time",
    "stat_fields",
    "tail",
    "valid_sha256",
    "validate_network_config",
    "validate_user_data",
    "zombie_children",
]
