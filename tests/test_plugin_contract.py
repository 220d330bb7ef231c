"""The plugin contract: documented hooks, discovery by entry point, isolation, awaiting."""

from __future__ import annotations

import asyncio
import inspect

import pytest

from agent import hookspecs
from agent.pluginmanager import Hooks, PluginLoadError, make_plugin_manager
from agent.sdk import Fingerprint, PluginError, hookimpl


def test_every_hook_is_documented_and_prefixed():
    hooks = [name for name, fn in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(fn, "kumo_spec")]
    assert hooks, "no hook specifications found"
    for name in hooks:
        assert name.startswith("kumo_"), name
        doc = inspect.getdoc(getattr(hookspecs, name))
        assert doc and len(doc) > 40, f"hook {name} needs a docstring for plugin authors"


def test_builtin_plugins_are_found_through_entry_points():
    pm = make_plugin_manager()
    assert {"process", "lxc", "kvm", "checkpoint"} <= {name for name, _ in pm.list_name_plugin()}


class Good:
    @hookimpl
    async def kumo_fingerprint(self):
        await asyncio.sleep(0)
        return Fingerprint(True, kinds=("thing",))

    @hookimpl
    def kumo_task_kinds(self):
        return ["thing.create"]


class Broken:
    @hookimpl
    def kumo_fingerprint(self):
        raise PluginError("the frobnicator is missing: install frob")

    @hookimpl
    def kumo_task_kinds(self):
        raise RuntimeError("boom")


async def test_one_plugin_failing_does_not_stop_the_others():
    hooks = Hooks(make_plugin_manager({"good": Good(), "broken": Broken()}))
    fps = await hooks.fingerprints()
    assert fps["good"] == Fingerprint(True, kinds=("thing",))
    assert fps["broken"].available is False
    assert "frobnicator is missing" in fps["broken"].reason


def test_task_kind_claimed_twice_is_refused():
    class Other(Good):
        pass

    hooks = Hooks(make_plugin_manager({"a": Good(), "b": Other()}))
    with pytest.raises(PluginLoadError, match="claimed by both 'a' and 'b'"):
        hooks.task_owners()


def test_an_implementation_of_an_unknown_hook_is_refused():
    class Typo:
        @hookimpl
        def kumo_fingerprnt(self):
            return None

    with pytest.raises(PluginLoadError, match="kumo_fingerprnt"):
        make_plugin_manager({"typo": Typo()})


def test_the_core_reports_the_node_facts_the_scheduler_needs():
    from agent.facts import node_facts

    facts = node_facts()
    assert facts["cpus"] >= 1
    assert facts["memory_bytes"] > 0
    assert isinstance(facts["kvm_device"], bool)
