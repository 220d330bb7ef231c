"""Finding plugins and calling their hooks.

Plugins (built-in and third-party alike) are entry points in the group ``kumo.plugins``
naming a class; the manager makes one instance per agent. The core never calls
``pm.hook.*`` directly: it goes through :class:`Hooks`, which calls every plugin's
implementation on its own, awaits awaitables, and turns one plugin's exception into a
reported failure instead of letting it stop the others.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from agent import hookspecs
from agent.plugin import PROJECT, Fingerprint, InstanceState, PluginError, TaskError

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "kumo.plugins"


class PluginLoadError(Exception):
    """A plugin could not be loaded or its hooks do not match the contract."""


@dataclasses.dataclass(frozen=True)
class PluginFailure:
    """One plugin's hook raised: who, which hook, and the message for the user."""

    plugin: str
    hook: str
    message: str


def make_plugin_manager(plugins: Mapping[str, object] | None = None) -> pluggy.PluginManager:
    """Build the plugin manager.

    With ``plugins`` None, every entry point of ``kumo.plugins`` is loaded (this is how
    the agent runs); tests pass ``{name: instance}`` to build a manager from objects.
    """
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    if plugins is None:
        plugins = {}
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in plugins:
                continue  # the same distribution seen twice on sys.path
            try:
                factory = ep.load()
                plugins[ep.name] = factory() if inspect.isclass(factory) else factory
            except Exception as exc:
                raise PluginLoadError(f"plugin {ep.name!r} ({ep.value}) failed to load: {exc}") from exc
        if not plugins:
            raise PluginLoadError(
                f"no plugins found in the entry point group {ENTRY_POINT_GROUP!r}: "
                "is the kumo distribution installed (pip install -e . or the kumo-agent package)?"
            )
    for name, plugin in plugins.items():
        try:
            pm.register(plugin, name=name)
        except pluggy.PluginValidationError as exc:
            raise PluginLoadError(f"plugin {name!r} does not match the hook contract: {exc}") from exc
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginLoadError(f"a plugin implements a hook that does not exist: {exc}") from exc
    return pm


class Hooks:
    """The one typed way the core (and plugins, through their context) calls hooks."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.failures: list[PluginFailure] = []

    def plugin_names(self) -> list[str]:
        return sorted(name for name, _ in self.pm.list_name_plugin())

    async def call_each(
        self, hook: str, only: str | None = None, **kwargs: Any
    ) -> tuple[dict[str, Any], list[PluginFailure]]:
        """Call ``hook`` on every plugin implementing it (or just ``only``).

        Returns the results by plugin name and the failures; failures are logged once here.
        """
        results: dict[str, Any] = {}
        failures: list[PluginFailure] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            if only is not None and impl.plugin_name != only:
                continue
            try:
                value = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
                if inspect.isawaitable(value):
                    value = await value
                results[impl.plugin_name] = value
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failure = PluginFailure(impl.plugin_name, hook, _describe(exc))
                if isinstance(exc, PluginError):
                    log.error("plugin %s: %s: %s", impl.plugin_name, hook, failure.message)
                else:
                    log.exception("plugin %s: %s raised", impl.plugin_name, hook)
                failures.append(failure)
        return results, failures

    def call_each_sync(self, hook: str, **kwargs: Any) -> tuple[dict[str, Any], list[PluginFailure]]:
        """``call_each`` for hooks that must answer synchronously (configuration, metrics)."""
        results: dict[str, Any] = {}
        failures: list[PluginFailure] = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            try:
                value = impl.function(**{arg: kwargs[arg] for arg in impl.argnames})
                if inspect.isawaitable(value):
                    raise TypeError(f"{hook} must not be async")
                results[impl.plugin_name] = value
            except Exception as exc:
                log.exception("plugin %s: %s raised", impl.plugin_name, hook)
                failures.append(PluginFailure(impl.plugin_name, hook, _describe(exc)))
        return results, failures

    # Typed wrappers, one per hook the core calls.

    async def fingerprints(self) -> dict[str, Fingerprint]:
        results, failures = await self.call_each("kumo_fingerprint")
        out = {name: fp for name, fp in results.items() if isinstance(fp, Fingerprint)}
        for name, fp in results.items():
            if not isinstance(fp, Fingerprint):
                out[name] = Fingerprint(False, f"kumo_fingerprint returned {type(fp).__name__}")
        for failure in failures:
            out[failure.plugin] = Fingerprint(False, f"fingerprint failed: {failure.message}")
        return out

    def task_owners(self) -> dict[str, str]:
        """Map each declared task kind to the plugin that owns it."""
        owners: dict[str, str] = {}
        results, failures = self.call_each_sync("kumo_task_kinds")
        if failures:
            raise PluginLoadError(f"plugin {failures[0].plugin!r}: kumo_task_kinds: {failures[0].message}")
        for plugin, kinds in sorted(results.items()):
            for kind in kinds or ():
                if kind in owners:
                    raise PluginLoadError(
                        f"task kind {kind!r} is claimed by both {owners[kind]!r} and {plugin!r}"
                    )
                owners[kind] = plugin
        return owners

    async def handle_task(self, owner: str, kind: str, payload: Mapping[str, Any], task_id: str) -> Any:
        """Run a task on its owner; exceptions propagate (the runtime reports them)."""
        for impl in self.pm.hook.kumo_handle_task.get_hookimpls():
            if impl.plugin_name == owner:
                args = {"kind": kind, "payload": payload, "task_id": task_id}
                value = impl.function(**{arg: args[arg] for arg in impl.argnames})
                return await value if inspect.isawaitable(value) else value
        raise TaskError(f"plugin {owner!r} declares {kind!r} but does not implement kumo_handle_task")

    async def instances(self, hook: str = "kumo_instances") -> list[InstanceState]:
        results, _ = await self.call_each(hook)
        return [state for states in results.values() for state in (states or ())]

    async def instance_seed(self, instance: Mapping[str, Any], medium: str, workdir: Path) -> Path | None:
        """The seed for a new instance, from whichever plugin builds one; errors propagate.

        Unlike other hooks a seeding failure is not isolated: an instance created without
        the seed the user asked for would be wrong, so the create must fail.
        """
        seeds: list[Path] = []
        for impl in self.pm.hook.kumo_instance_seed.get_hookimpls():
            args = {"instance": instance, "medium": medium, "workdir": workdir}
            value = impl.function(**{arg: args[arg] for arg in impl.argnames})
            value = await value if inspect.isawaitable(value) else value
            if value is not None:
                seeds.append(Path(value))
        if len(seeds) > 1:
            raise TaskError("more than one plugin built a seed for this instance", code="seed-conflict")
        return seeds[0] if seeds else None

    def metrics(self) -> Iterable[Any]:
        results, _ = self.call_each_sync("kumo_metrics")
        for families in results.values():
            yield from families or ()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PluginError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
