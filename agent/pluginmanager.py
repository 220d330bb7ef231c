"""Finding plugins and calling their hooks.

Plugins (built-in and third-party alike) are entry points in the group ``kumo.plugins``
naming a class; the manager makes one instance per agent. The core never calls
``pm.hook.*`` directly: it goes through :class:`Hooks`, which calls every plugin's
implementation on its own, awaits awaitables, and turns one plugin's exception into a
reported failure instead of letting it stop the others.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
from collections.abc import Iterable, Mapping
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy

from agent import hookspecs
from agent.instances import Driver, Drivers
from agent.sdk import (
    KIND_RE,
    PROJECT,
    Checkpointer,
    Fingerprint,
    InstanceState,
    NativeCheckpointer,
    PluginError,
    Probe,
    TaskError,
)

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
    """The one typed way the core calls hooks; plugins get it as ``context.hooks``, typed as
    :class:`agent.sdk.PluginHooks` (the subset a plugin may call)."""

    def __init__(self, pm: pluggy.PluginManager):
        self.pm = pm
        self.drivers = Drivers({}, self.instance_deleted)
        self._owners: dict[str, str] = {}

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

    def load_drivers(self) -> None:
        """Ask every plugin for its instance driver (``kumo_instance_driver``); after start-up."""
        results, failures = self.call_each_sync("kumo_instance_driver")
        if failures:
            raise PluginLoadError(f"plugin {failures[0].plugin!r}: kumo_instance_driver: {failures[0].message}")
        drivers: dict[str, Driver] = {}
        for plugin, driver in sorted(results.items()):
            if driver is None:
                continue
            kind = getattr(driver, "kind", None)
            if not isinstance(kind, str) or not KIND_RE.match(kind):
                raise PluginLoadError(f"plugin {plugin!r}: its instance driver's kind must be 1-32 lower-case "
                                      f"letters, digits, '_' or '-' (like 'kvm'), got {kind!r}")
            if kind in drivers:
                raise PluginLoadError(f"instance kind {kind!r} is driven by both {drivers[kind].plugin!r} and {plugin!r}")
            drivers[kind] = Driver(plugin, driver)
        self.drivers = Drivers(drivers, self.instance_deleted)
        self._owners = self.task_owners()

    def task_owners(self) -> dict[str, str]:
        """Map each task kind (plugins' own and their drivers' operations) to its plugin."""
        owners = self.drivers.task_kinds()
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

    def instance_lock(self, kind: str, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        return self.drivers.lock(kind, name)

    async def handle_task(self, kind: str, payload: Mapping[str, Any], task_id: str) -> Mapping[str, Any]:
        """Run a task on its owner; exceptions propagate (the runtime reports them)."""
        if self.drivers.owns(kind):
            return await self.drivers.handle(kind, payload)
        owner = self._owners.get(kind)
        for impl in self.pm.hook.kumo_handle_task.get_hookimpls():
            if owner is not None and impl.plugin_name == owner:
                args = {"kind": kind, "payload": payload, "task_id": task_id}
                value = impl.function(**{arg: args[arg] for arg in impl.argnames})
                return await value if inspect.isawaitable(value) else value
        raise TaskError(f"no plugin on this node handles task kind {kind!r}", code="unknown-kind")

    async def instances(self) -> list[InstanceState]:
        return self.drivers.instances()

    async def instance_deleted(self, kind: str, name: str) -> None:
        """Tell every plugin that an instance was deleted; a failure is logged (the delete stands)."""
        await self.call_each("kumo_instance_deleted", kind=kind, name=name)

    async def adopt(self) -> list[InstanceState]:
        return await self.drivers.adopt()

    def checkpointers(self) -> dict[str, Checkpointer | NativeCheckpointer]:
        results, _ = self.call_each_sync("kumo_checkpointer")
        return {cp.kind: cp for cp in results.values() if cp is not None}

    async def probes(self) -> list[tuple[str, Probe]]:
        results, _ = await self.call_each("kumo_probes")
        return [(plugin, probe) for plugin, probes in sorted(results.items()) for probe in probes or ()]

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
        yield from self.drivers.metrics()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PluginError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
