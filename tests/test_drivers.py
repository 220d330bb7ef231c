"""The instance-driver contract, from both sides.

First the agent's side (agent/instances.py, reached through ``Hooks`` as the runtime reaches
it) with a small fake driver: routing of ``<kind>.<operation>``, the payload checks, the
refusal of unknown keys, one operation at a time per instance, the result shapes, the
``kumo_instances{kind,state}`` family and the refusal of two drivers for one kind.

Then one suite that every instance driver passes, whatever it runs: the example plugin's
``sleep`` (tests/example_plugin, installed with pip and loaded by its entry point) and the
built-in ``process``, ``lxc`` and ``kvm`` on their real components; those that measure
usage (the optional ``usage()``) measure their running instance and not a stopped one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.metadata
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.pluginmanager import Hooks, PluginLoadError, make_plugin_manager
from agent.sdk import (
    CONSOLE_BYTES,
    INSTANCE_STATES,
    ConsoleOutput,
    ControllerUnavailable,
    ImageCache,
    InstanceState,
    PluginContext,
    TaskError,
    UsageMeter,
    hookimpl,
)
from agent.sdk.driver import CONSOLE_BYTES_MAX

# -- the agent's side, with a fake driver ---------------------------------------------------


class FakeDriver:
    """Instances in a dict; every call is recorded, and :meth:`hold` keeps operations waiting
    until the test opens the gate, to see which operations overlap."""

    def __init__(self, kind: str = "fake"):
        self.kind = kind
        self.states: dict[str, str] = {}
        self.calls: list[tuple[Any, ...]] = []
        self.gates: dict[str, asyncio.Event] = {}
        self.active: set[str] = set()
        self.overlapped = False

    async def _enter(self, op: str, name: str, *args: Any) -> None:
        self.calls.append((op, name, *args))
        self.overlapped |= name in self.active
        self.active.add(name)
        try:
            if op in self.gates:
                await self.gates[op].wait()
        finally:
            self.active.discard(name)

    def hold(self, *ops: str) -> asyncio.Event:
        """Operations ``ops`` (all five when none is named) wait until the returned event is set."""
        gate = asyncio.Event()
        self.gates.update(dict.fromkeys(ops or ("create", "start", "stop", "delete", "console"), gate))
        return gate

    def _known(self, name: str) -> None:
        if name not in self.states:
            raise TaskError(f"no fake instance {name!r}", code="not-found")

    async def create(self, name: str, payload: Mapping[str, Any]) -> None:
        await self._enter("create", name, dict(payload))
        self.states[name] = "running"

    async def start(self, name: str) -> None:
        await self._enter("start", name)
        self._known(name)
        self.states[name] = "running"

    async def stop(self, name: str, timeout: float | None) -> bool:
        await self._enter("stop", name, timeout)
        self._known(name)
        self.states[name] = "stopped"
        return timeout == 0

    async def delete(self, name: str) -> None:
        await self._enter("delete", name)
        self._known(name)
        del self.states[name]

    async def console(self, name: str, size: int) -> ConsoleOutput:
        await self._enter("console", name, size)
        self._known(name)
        return ConsoleOutput("x" * min(size, 5), {"extra.log": "more"})

    async def adopt(self) -> list[InstanceState]:
        self.calls.append(("adopt",))
        return self.list()

    def list(self) -> list[InstanceState]:
        return [InstanceState(n, self.kind, s, {"n": len(n)}) for n, s in sorted(self.states.items())]  # type: ignore[arg-type]


class DriverPlugin:
    def __init__(self, driver: Any):
        self.driver = driver

    @hookimpl
    def kumo_instance_driver(self) -> Any:
        return self.driver


def driven(*drivers: Any) -> Hooks:
    """Hooks over one plugin per driver, drivers loaded as the runtime loads them."""
    hooks = Hooks(make_plugin_manager({f"plugin{i}": DriverPlugin(d) for i, d in enumerate(drivers)}))
    hooks.load_drivers()
    return hooks


async def task(hooks: Hooks, kind: str, /, **payload: Any) -> dict[str, Any]:
    return dict(await hooks.handle_task(kind, payload, task_id=f"test-{kind}"))


async def refused(hooks: Hooks, kind: str, /, **payload: Any) -> TaskError:
    with pytest.raises(TaskError) as err:
        await task(hooks, kind, **payload)
    return err.value


async def test_every_operation_of_a_kind_is_routed_to_its_driver_with_the_shapes_of_the_contract():
    driver = FakeDriver()
    hooks = driven(driver)
    owners = hooks.task_owners()
    assert {k: v for k, v in owners.items() if k.startswith("fake.")} == {
        f"fake.{op}": "plugin0" for op in ("create", "start", "stop", "delete", "console")}

    created = await task(hooks, "fake.create", name="a", kind="fake", vcpus=1, options={"x": 1})
    assert created == {"name": "a", "kind": "fake", "state": "running", "details": {"n": 1}}
    # create gets the whole payload: its spec is the driver's to parse.
    assert driver.calls[-1] == ("create", "a", {"name": "a", "kind": "fake", "vcpus": 1, "options": {"x": 1}})
    assert await task(hooks, "fake.stop", name="a") == {
        "name": "a", "kind": "fake", "state": "stopped", "details": {"n": 1}, "forced": False}
    assert driver.calls[-1] == ("stop", "a", None)
    assert (await task(hooks, "fake.stop", name="a", timeout=0))["forced"] is True
    assert await task(hooks, "fake.start", name="a") == {
        "name": "a", "kind": "fake", "state": "running", "details": {"n": 1}}
    assert await task(hooks, "fake.console", name="a") == {
        "name": "a", "kind": "fake", "log": "xxxxx", "logs": {"extra.log": "more"}}
    assert driver.calls[-1] == ("console", "a", CONSOLE_BYTES)
    assert await task(hooks, "fake.delete", name="a") == {"name": "a", "kind": "fake", "state": "deleted"}
    assert driver.states == {}
    assert [i.to_json() for i in await hooks.instances()] == []


async def test_the_stop_timeout_and_the_console_size_are_parsed_for_the_driver():
    driver = FakeDriver()
    hooks = driven(driver)
    await task(hooks, "fake.create", name="a")
    await task(hooks, "fake.stop", name="a", timeout=2.5)
    assert driver.calls[-1] == ("stop", "a", 2.5)
    await task(hooks, "fake.stop", name="a", timeout=3)
    assert driver.calls[-1] == ("stop", "a", 3.0)
    await task(hooks, "fake.console", name="a", bytes=100)
    assert driver.calls[-1] == ("console", "a", 100)
    await task(hooks, "fake.console", name="a", bytes=CONSOLE_BYTES_MAX)
    assert driver.calls[-1] == ("console", "a", CONSOLE_BYTES_MAX)


@pytest.mark.parametrize("kind, payload, message", [
    ("fake.create", {}, "payload.name must be 1-63 letters"),
    ("fake.create", {"name": ""}, "payload.name must be"),
    ("fake.create", {"name": "../etc"}, "got '../etc'"),
    ("fake.create", {"name": "-a"}, "starting with a letter or digit"),
    ("fake.create", {"name": "a" * 64}, "payload.name must be 1-63"),
    ("fake.create", {"name": 7}, "got 7"),
    ("fake.start", {"name": "a b"}, "got 'a b'"),
    ("fake.create", {"name": "a", "kind": "other"}, "payload.kind is 'other' in a fake task"),
    ("fake.stop", {"name": "a", "timeout": "5"}, "payload.timeout must be a number of seconds"),
    ("fake.stop", {"name": "a", "timeout": -1}, "(0 or more), got -1"),
    ("fake.stop", {"name": "a", "timeout": True}, "got True"),
    ("fake.console", {"name": "a", "bytes": 0}, f"payload.bytes must be an integer from 1 to {CONSOLE_BYTES_MAX}"),
    ("fake.console", {"name": "a", "bytes": CONSOLE_BYTES_MAX + 1}, "payload.bytes must be"),
    ("fake.console", {"name": "a", "bytes": 1.5}, "got 1.5"),
    ("fake.console", {"name": "a", "bytes": True}, "got True"),
    ("fake.stop", {"name": "a", "bytes": 10}, "payload.bytes: unknown key for fake.stop (allowed: kind, name, timeout)"),
    ("fake.console", {"name": "a", "timeout": 1}, "payload.timeout: unknown key for fake.console"),
    ("fake.start", {"name": "a", "force": True}, "payload.force: unknown key for fake.start (allowed: kind, name)"),
    ("fake.delete", {"name": "a", "keep_disks": True}, "payload.keep_disks: unknown key for fake.delete"),
])
async def test_bad_payloads_are_bad_requests_that_never_reach_the_driver(kind, payload, message):
    driver = FakeDriver()
    driver.states["a"] = "running"
    hooks = driven(driver)
    error = await refused(hooks, kind, **payload)
    assert error.code == "bad-request"
    assert message in str(error)
    assert driver.calls == []


async def test_the_drivers_errors_reach_the_task_unchanged():
    hooks = driven(FakeDriver())
    for op in ("start", "stop", "delete", "console"):
        error = await refused(hooks, f"fake.{op}", name="ghost")
        assert (error.code, str(error)) == ("not-found", "no fake instance 'ghost'")
    assert (await refused(hooks, "nosuch.create", name="a")).code == "unknown-kind"


async def test_an_interrupted_create_is_undone_with_the_drivers_delete_and_the_outcome_says_so():
    driver = FakeDriver()
    drivers = driven(driver).drivers
    assert await drivers.undo_create("fake.start", {"name": "a"}) is None, "only a create is undone"
    assert await drivers.undo_create("fake.create", {"name": "../a"}) is None, "refused before the driver saw it"
    driver.states["half"] = "stopped"
    assert await drivers.undo_create("fake.create", {"name": "half"}) == "what it had made of fake instance 'half' was removed"
    assert driver.calls[-1] == ("delete", "half") and driver.states == {}
    assert await drivers.undo_create("fake.create", {"name": "half"}) == "it had made nothing of fake instance 'half' on this node"

    async def refusing(name: str) -> None:
        raise TaskError("libvirt refused", code="failed")

    driver.delete = refusing  # type: ignore[method-assign]
    assert await drivers.undo_create("fake.create", {"name": "x"}) == (
        "what it had made of fake instance 'x' could not be removed (libvirt refused): submit a fake.delete of 'x'"
    )


async def test_operations_on_one_instance_run_one_at_a_time_and_on_others_side_by_side():
    driver = FakeDriver()
    hooks = driven(driver)
    await task(hooks, "fake.create", name="a")
    await task(hooks, "fake.create", name="b")
    gate = driver.hold()
    runs = [asyncio.create_task(task(hooks, f"fake.{op}", name=name))
            for op, name in (("stop", "a"), ("start", "a"), ("console", "b"))]
    for _ in range(20):
        await asyncio.sleep(0)
    # The stop of a holds a's lock; the console of b does not wait for it.
    assert driver.calls[2:] == [("stop", "a", None), ("console", "b", CONSOLE_BYTES)]
    gate.set()
    await asyncio.gather(*runs)
    assert driver.calls[-1] == ("start", "a") and not driver.overlapped
    assert driver.states == {"a": "running", "b": "running"}


async def test_a_delete_waits_for_the_create_of_the_same_instance():
    driver = FakeDriver()
    hooks = driven(driver)
    gate = driver.hold()
    creating = asyncio.create_task(task(hooks, "fake.create", name="a"))
    deleting = asyncio.create_task(task(hooks, "fake.delete", name="a"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert [c[0] for c in driver.calls] == ["create"]
    gate.set()
    assert (await creating)["state"] == "running"
    assert (await deleting)["state"] == "deleted"
    assert driver.states == {} and not driver.overlapped


async def test_an_operation_queued_behind_a_delete_still_runs_alone():
    driver = FakeDriver()
    hooks = driven(driver)
    await task(hooks, "fake.create", name="a")
    deleted, created = driver.hold("delete"), driver.hold("create")
    deleting = asyncio.create_task(task(hooks, "fake.delete", name="a"))
    recreating = asyncio.create_task(task(hooks, "fake.create", name="a"))
    for _ in range(20):
        await asyncio.sleep(0)
    deleted.set()  # the delete ends; the create that waited for it runs (and waits at its gate)
    await deleting
    for _ in range(20):
        await asyncio.sleep(0)
    assert driver.active == {"a"}
    starting = asyncio.create_task(task(hooks, "fake.start", name="a"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert not driver.overlapped, "a start ran beside the create of the same instance"
    created.set()
    await asyncio.gather(recreating, starting)
    assert [c[0] for c in driver.calls] == ["create", "delete", "create", "start"]


async def test_another_plugin_holding_an_instance_excludes_its_operations_and_may_run_them_itself():
    # The checkpoint plugin holds the instance while it restores it: a start sent meanwhile
    # waits, and its own undo (a delete) runs inside the hold without deadlocking on it.
    driver = FakeDriver()
    hooks = driven(driver)
    await task(hooks, "fake.create", name="a")
    release = asyncio.Event()

    async def restore_then_undo() -> None:
        async with hooks.instance_lock("fake", "a"):
            await release.wait()
            await task(hooks, "fake.delete", name="a")

    holding = asyncio.create_task(restore_then_undo())
    starting = asyncio.create_task(task(hooks, "fake.start", name="a"))
    for _ in range(20):
        await asyncio.sleep(0)
    assert [c[0] for c in driver.calls] == ["create"], "the start ran while another plugin held the instance"
    release.set()
    await holding
    assert (await refused(hooks, "fake.start", name="a")).code == "not-found"
    with pytest.raises(TaskError):
        await starting  # it ran after the hold, on the deleted instance
    assert [c[0] for c in driver.calls] == ["create", "delete", "start", "start"]


def _samples(hooks: Hooks) -> dict[tuple[str, str], float]:
    families = [f for f in hooks.metrics() if f.name == "kumo_instances"]
    assert len(families) == 1, "one kumo_instances family, whatever the kinds"
    return {(s.labels["kind"], s.labels["state"]): s.value for s in families[0].samples}


async def test_instances_are_counted_by_kind_and_state_in_one_family():
    vms, boxes = FakeDriver("vm"), FakeDriver("box")
    hooks = driven(vms, boxes)
    for name in ("a", "b", "c"):
        await task(hooks, "vm.create", name=name)
    await task(hooks, "vm.stop", name="c")
    samples = _samples(hooks)
    # Every state of every kind is there, zeros included, so a dashboard sees a kind go to 0.
    assert set(samples) == {(k, s) for k in ("vm", "box") for s in INSTANCE_STATES}
    assert samples[("vm", "running")] == 2 and samples[("vm", "stopped")] == 1
    assert sum(samples.values()) == 3
    assert not [f for f in hooks.metrics() if f.name in ("kumo_kvm_instances", "kumo_lxc_instances")]


async def test_adoption_and_listing_go_through_every_driver_and_survive_one_failing():
    good, bad = FakeDriver("good"), FakeDriver("bad")
    good.states["kept"] = "running"

    async def adopt_fails() -> list[InstanceState]:
        raise RuntimeError("cannot read records")

    def list_fails() -> list[InstanceState]:
        raise RuntimeError("cannot list")

    bad.adopt, bad.list = adopt_fails, list_fails  # type: ignore[method-assign]
    hooks = driven(good, bad)
    assert [(i.name, i.kind, i.state) for i in await hooks.adopt()] == [("kept", "good", "running")]
    assert [(i.name, i.kind) for i in await hooks.instances()] == [("kept", "good")]


def test_two_plugins_driving_one_kind_are_refused_at_load():
    with pytest.raises(PluginLoadError, match="instance kind 'fake' is driven by both 'plugin0' and 'plugin1'"):
        driven(FakeDriver(), FakeDriver())


def test_a_driver_without_a_usable_kind_is_refused_at_load():
    for kind in (None, "", "two words", "a.b", "KVM"):
        with pytest.raises(PluginLoadError, match="its instance driver's kind must be 1-32 lower-case"):
            driven(FakeDriver(kind))  # type: ignore[arg-type]


def test_a_plugin_claiming_a_drivers_task_kind_is_refused():
    class Claimer:
        @hookimpl
        def kumo_task_kinds(self) -> list[str]:
            return ["fake.create"]

    hooks = Hooks(make_plugin_manager({"driver": DriverPlugin(FakeDriver()), "claimer": Claimer()}))
    with pytest.raises(PluginLoadError, match="task kind 'fake.create' is claimed by both 'driver' and 'claimer'"):
        hooks.load_drivers()


# -- the suite every instance driver passes ---------------------------------------------------


async def no_controller(*_args: Any, **_kwargs: Any) -> Any:
    raise ControllerUnavailable("no controller in this test")


@dataclasses.dataclass
class Bed:
    """One instance kind on its real component, as the contract suite drives it.

    ``plugins`` makes fresh plugin objects by name (the kind's plugin and any it needs),
    ``settings`` are their ``plugins.<name>`` tables, ``spec`` the create payload's
    kind-specific fields, ``console`` a text the console shows once the instance runs, and
    ``identity`` what stays the same while an instance runs on (a pid, a domain id), to tell
    an adopted instance from a restarted one.
    """

    kind: str
    plugins: Callable[[], dict[str, object]]
    root: Path
    settings: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)
    console: str = ""
    stop_timeout: float | None = None
    identity: Callable[[str, InstanceState], Any] = lambda name, state: state.details.get("pid")
    timeout: float = 30.0
    image_dir: Path | None = None  # the node's image cache; default: under root
    nodes: list[Node] = dataclasses.field(default_factory=list)

    async def node(self) -> Node:
        """A new Node on this bed's state: the first start of an agent, or its restart."""
        node = Node(self)
        self.nodes.append(node)
        node.adopted = await node.start()
        return node


class Node:
    """The bed's plugins started on one state directory as the agent starts them: configured,
    started, drivers loaded, instances adopted. A new Node on the same root is an agent restart."""

    def __init__(self, bed: Bed):
        self.bed = bed
        self.hooks = Hooks(make_plugin_manager(bed.plugins()))
        self.adopted: list[InstanceState] = []
        self.running = True

    async def start(self) -> list[InstanceState]:
        for impl in self.hooks.pm.hook.kumo_configure.get_hookimpls():
            args = {"section": self.bed.settings.get(impl.plugin_name, {}),
                    "source": f"test: plugins.{impl.plugin_name}"}
            impl.function(**{arg: args[arg] for arg in impl.argnames})
        for name in self.hooks.plugin_names():
            state = self.bed.root / "plugins" / name
            state.mkdir(mode=0o700, parents=True, exist_ok=True)
            context = PluginContext(name, state, self.bed.root, None, self.hooks, lambda: None, no_controller,
                                    ImageCache(self.bed.image_dir or self.bed.root / "images"))
            _, failures = await self.hooks.call_each("kumo_startup", only=name, context=context)
            assert not failures, failures
        self.hooks.load_drivers()
        return await self.hooks.adopt()

    async def task(self, op: str, name: str, **payload: Any) -> dict[str, Any]:
        result = await self.hooks.handle_task(f"{self.bed.kind}.{op}", {"name": name, **payload}, f"test-{op}")
        return dict(result)

    async def refused(self, op: str, name: str, **payload: Any) -> TaskError:
        with pytest.raises(TaskError) as err:
            await self.task(op, name, **payload)
        return err.value

    async def listed(self, name: str) -> InstanceState | None:
        return next((i for i in await self.hooks.instances() if i.name == name and i.kind == self.bed.kind), None)

    async def shutdown(self) -> None:
        self.running = False
        await self.hooks.call_each("kumo_shutdown")


def entry_point(site: Path, name: str) -> type:
    """The plugin class the ``kumo.plugins`` entry point ``name`` names in the installed ``site``."""
    (found,) = [ep for dist in importlib.metadata.distributions(path=[str(site)])
                for ep in dist.entry_points if ep.group == "kumo.plugins" and ep.name == name]
    return found.load()


def sleep_bed(request: pytest.FixtureRequest, root: Path) -> Bed:
    site = request.getfixturevalue("example_plugin")
    request.getfixturevalue("monkeypatch").syspath_prepend(str(site))
    plugin = entry_point(site, "sleep")
    return Bed("sleep", lambda: {"sleep": plugin()}, root, spec={"options": {"seconds": 600}}, console="sleeping 600 s")


def process_bed(request: pytest.FixtureRequest, root: Path) -> Bed:
    from plugins.process import ProcessPlugin

    command = ["/bin/sh", "-c", "echo contract-console; exec sleep 600"]
    return Bed("process", lambda: {"process": ProcessPlugin()}, root,
               spec={"options": {"command": command}}, console="contract-console")


def lxc_bed(request: pytest.FixtureRequest, root: Path) -> Bed:
    from plugins.lxc import LxcPlugin

    lxcpath = request.getfixturevalue("lxcpath")
    return Bed("lxc", lambda: {"lxc": LxcPlugin()}, root, settings={"lxc": {"lxcpath": str(lxcpath)}},
               spec={"vcpus": 1, "memory_mib": 64, "options": {"template": "busybox"}},
               console="booted", stop_timeout=5, timeout=60)


def kvm_bed(request: pytest.FixtureRequest, root: Path) -> Bed:
    from plugins.kvm import KvmPlugin
    from tests.harness.libvirt import TEST_INSTANCE_ROOT

    uri = request.getfixturevalue("libvirtd")
    guest = request.getfixturevalue("kvm_guest")
    disks = TEST_INSTANCE_ROOT / f"kumo-contract-{uuid.uuid4().hex[:8]}"
    disks.mkdir(parents=True, mode=0o711)
    request.addfinalizer(lambda: _remove_tree(disks))

    def domain_id(name: str, state: InstanceState) -> int:
        import libvirt

        conn = libvirt.open(uri)
        try:
            return conn.lookupByName(name).ID()
        finally:
            conn.close()

    settings = {"uri": uri, "instance_dir": str(disks / "instances"),
                "acceleration": "tcg", "shutdown_timeout": 60}
    spec = {"image": str(guest.disk), "image_sha256": guest.disk_sha256, "vcpus": 1, "memory_mib": 192,
            "options": {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                        "cmdline": f"{guest.cmdline} kumo.hold"}}
    return Bed("kvm", lambda: {"kvm": KvmPlugin()}, root, settings={"kvm": settings}, spec=spec,
               console="GUEST-HOLDING", stop_timeout=60, identity=domain_id, timeout=240, image_dir=disks / "images")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


BEDS = {"sleep": sleep_bed, "process": process_bed, "lxc": lxc_bed, "kvm": kvm_bed}


@pytest.fixture(params=[
    "sleep",
    pytest.param("process", marks=pytest.mark.integration),
    pytest.param("lxc", marks=pytest.mark.integration),
    pytest.param("kvm", marks=[pytest.mark.integration, pytest.mark.slow]),
])
async def bed(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A Bed for each kind; afterwards whatever instance the test left is deleted (through
    a node that adopts it when the test's last node was shut down) and every plugin stopped."""
    root = tmp_path / "state"
    root.mkdir(mode=0o700)
    made = BEDS[request.param](request, root)
    yield made
    if not made.nodes:
        return
    live = made.nodes[-1] if made.nodes[-1].running else await made.node()
    for instance in await live.hooks.instances():
        with contextlib.suppress(TaskError):
            await live.task("delete", instance.name)
    for node in made.nodes:
        if node.running:
            await node.shutdown()


async def eventually(predicate: Callable[[], Any], what: str, limit: float) -> Any:
    deadline = asyncio.get_running_loop().time() + limit
    while not (value := await predicate()):
        assert asyncio.get_running_loop().time() < deadline, f"timed out after {limit:.0f} s waiting for {what}"
        await asyncio.sleep(0.2)
    return value


async def test_every_instance_driver_keeps_the_contract(bed: Bed) -> None:
    node = await bed.node()
    name = f"contract-{uuid.uuid4().hex[:6]}"

    created = await node.task("create", name, kind=bed.kind, **bed.spec)
    assert set(created) == {"name", "kind", "state", "details"}
    assert (created["name"], created["kind"], created["state"]) == (name, bed.kind, "running")
    assert (await node.listed(name)).state == "running"

    async def console() -> str:
        shown = await node.task("console", name)
        assert set(shown) == {"name", "kind", "log", "logs"} and isinstance(shown["log"], str)
        return bed.console in shown["log"]

    await eventually(console, f"{bed.console!r} on the console", bed.timeout)
    # A driver that measures usage (optional) measures its running instance, off the loop.
    driver = node.hooks.drivers.by_kind[bed.kind].driver
    if isinstance(driver, UsageMeter):
        usage = (await asyncio.to_thread(driver.usage))[name]
        assert usage.cpu_seconds is not None and usage.cpu_seconds >= 0 and usage.memory_bytes > 0

    stopped = await node.task("stop", name, **({} if bed.stop_timeout is None else {"timeout": bed.stop_timeout}))
    assert (stopped["state"], type(stopped["forced"])) == ("stopped", bool)
    assert (await node.listed(name)).state == "stopped"
    if isinstance(driver, UsageMeter):
        assert name not in await asyncio.to_thread(driver.usage), "a stopped instance uses nothing"
    assert (await node.task("start", name))["state"] == "running"
    before = bed.identity(name, await node.listed(name))
    assert before is not None

    # An agent restart: fresh plugin objects on the same state adopt the instance as it runs.
    await node.shutdown()
    again = await bed.node()
    assert [(i.name, i.kind, i.state) for i in again.adopted if i.name == name] == [(name, bed.kind, "running")]
    assert bed.identity(name, await again.listed(name)) == before, "adopted, not restarted"

    duplicate = await again.refused("create", name, kind=bed.kind, **bed.spec)
    assert duplicate.code == "exists"
    assert await again.task("delete", name) == {"name": name, "kind": bed.kind, "state": "deleted"}
    assert await again.listed(name) is None
    for op in ("start", "stop", "delete", "console"):
        assert (await again.refused(op, name)).code == "not-found", op
