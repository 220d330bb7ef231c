"""The plugin contract: discovery by entry point, isolation, awaiting. (That every hook is
documented is checked with the layers, in tests/test_layers.py; the instance-driver
contract in tests/test_drivers.py.)"""

from __future__ import annotations

import asyncio

import pytest

from agent.pluginmanager import Hooks, PluginLoadError, make_plugin_manager
from agent.sdk import Fingerprint, PluginError, hookimpl


def test_builtin_plugins_are_found_through_entry_points():
    pm = make_plugin_manager()
    names = {name for name, _ in pm.list_name_plugin()}
    assert {"process", "lxc", "kvm", "checkpoint"} <= names
    assert "host" not in names, "node facts come from the agent core (agent/facts.py), not a plugin"


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
