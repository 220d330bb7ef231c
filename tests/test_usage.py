"""Per-instance usage: the SDK's readers on small fake /proc and cgroup trees, the agent's
``kumo_instance_*`` families and heartbeat summary with fake drivers, then a real process
instance burning CPU, scraped by promtool and by a real Prometheus.

The lxc and kvm kinds' usage is checked on their real components, against the container's
cgroup files and ``virsh domstats`` for the same instance, where those tests already run a
container or a guest (tests/test_lxc.py, tests/test_kvm.py).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from agent.metrics import AgentMetrics, MetricsServer
from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import (
    Cgroups,
    ControllerUnavailable,
    ImageCache,
    InstanceState,
    InstanceUsage,
    PluginContext,
    UsageMeter,
    netns_usage,
    process_tree_usage,
)
from agent.usage import NodeUsage, busy_fraction
from tests.harness import require
from tests.test_drivers import driven

CLK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


# -- cgroup files --------------------------------------------------------------------------


def v1_host(root: Path) -> Cgroups:
    """A hybrid host as these machines are: v1 controllers (cpu and cpuacct co-mounted here),
    cgroup2 beside them without the memory, cpu or io controller."""
    cg = root / "sys/fs/cgroup"
    write(root / "proc/self/mountinfo", "\n".join([
        f"31 23 0:28 / {cg} rw,relatime - tmpfs tmpfs rw,mode=755",
        f"32 31 0:29 / {cg}/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct",
        f"35 31 0:32 / {cg}/memory rw,relatime - cgroup cgroup rw,memory",
        f"38 31 0:35 / {cg}/blkio rw,relatime - cgroup cgroup rw,blkio",
        f"41 31 0:38 / {cg}/unified rw,relatime - cgroup2 cgroup2 rw",
    ]) + "\n")
    write(cg / "unified/cgroup.controllers", "hugetlb\n")
    write(root / "proc/4242/cgroup", "\n".join([
        "9:name=systemd:/lxc.payload.web/init.scope", "7:blkio:/lxc.payload.web/init.scope",
        "4:memory:/lxc.payload.web/init.scope", "2:cpu,cpuacct:/lxc.payload.web/init.scope",
        "0::/lxc.payload.web/init.scope",
    ]) + "\n")
    web = "lxc.payload.web"
    write(cg / f"cpu,cpuacct/{web}/cpuacct.usage", "2500000000\n")
    write(cg / f"memory/{web}/memory.usage_in_bytes", "10485760\n")
    write(cg / f"memory/{web}/memory.stat",
          "cache 4096\nrss 8192\nhierarchical_memory_limit 100663296\ntotal_inactive_file 2097152\n")
    write(cg / f"blkio/{web}/blkio.throttle.io_service_bytes_recursive",
          "8:0 Read 4096\n8:0 Write 8192\n8:0 Sync 0\n8:0 Async 12288\n8:0 Total 12288\n"
          "8:16 Read 1000\n8:16 Write 0\n8:16 Total 1000\nTotal 13288\n")
    write(cg / f"blkio/{web}/blkio.throttle.io_serviced_recursive",
          "8:0 Read 3\n8:0 Write 2\n8:0 Total 5\nTotal 5\n")
    return Cgroups.read(root / "proc")


def test_cgroup_v1_usage_of_a_container_whose_init_sits_in_a_child_cgroup(tmp_path):
    cgroups = v1_host(tmp_path)
    assert set(cgroups.v1) == {"cpuacct", "memory", "blkio"}
    usage = cgroups.usage(4242, enclosing="lxc.payload.web")
    assert usage == InstanceUsage(
        cpu_seconds=2.5, memory_bytes=10485760 - 2097152, memory_limit_bytes=96 << 20,
        block_read_bytes=5096, block_write_bytes=8192, block_read_operations=3, block_write_operations=2)
    # Without the enclosing name the child cgroup itself is read, which has no files here.
    assert cgroups.usage(4242) == InstanceUsage()
    # A pid outside the container's cgroup (recycled since) is not the container.
    assert cgroups.usage(4242, enclosing="lxc.payload.other") == InstanceUsage()
    network = InstanceUsage(network_receive_bytes=1, cpu_seconds=9.0)
    assert usage.join(network) == InstanceUsage(**{**usage.to_json(), "network_receive_bytes": 1})


def test_cgroup_v1_unlimited_memory_and_a_missing_pid(tmp_path):
    cgroups = v1_host(tmp_path)
    stat = tmp_path / "sys/fs/cgroup/memory/lxc.payload.web/memory.stat"
    stat.write_text("hierarchical_memory_limit 9223372036854771712\ntotal_inactive_file 0\n")
    assert cgroups.usage(4242, "lxc.payload.web").memory_limit_bytes is None
    assert cgroups.usage(4242, "lxc.payload.web").memory_bytes == 10485760
    assert cgroups.usage(999999) == InstanceUsage()


def test_cgroup_v2_usage(tmp_path):
    cg = tmp_path / "sys/fs/cgroup"
    # A mount whose root is not the hierarchy's (a cgroup namespace): paths are relative to it.
    write(tmp_path / "proc/self/mountinfo", f"30 23 0:26 /outer {cg} rw - cgroup2 cgroup2 rw,nsdelegate\n")
    write(cg / "cgroup.controllers", "cpuset cpu io memory pids\n")
    write(tmp_path / "proc/77/cgroup", "0::/outer/lxc.payload.db\n")
    box = cg / "lxc.payload.db"
    write(box / "cpu.stat", "usage_usec 1500000\nuser_usec 1000000\nsystem_usec 500000\n")
    write(box / "memory.current", "8388608\n")
    write(box / "memory.stat", "anon 4096\nfile 8192\ninactive_file 1048576\n")
    write(box / "memory.max", "max\n")
    write(box / "io.stat", "8:0 rbytes=4096 wbytes=512 rios=2 wios=1 dbytes=0 dios=0\n"
                           "8:16 rbytes=100 wbytes=0 rios=1 wios=0 dbytes=0 dios=0\n")
    usage = Cgroups.read(tmp_path / "proc").usage(77)
    assert usage == InstanceUsage(
        cpu_seconds=1.5, memory_bytes=8388608 - 1048576, memory_limit_bytes=None,
        block_read_bytes=4196, block_write_bytes=512, block_read_operations=3, block_write_operations=1)
    write(box / "memory.max", "67108864\n")
    assert Cgroups.read(tmp_path / "proc").usage(77).memory_limit_bytes == 64 << 20


def test_the_real_hosts_cgroups_are_found():
    cgroups = Cgroups.read()
    assert cgroups.v1 or cgroups.v2 is not None
    own = cgroups.usage(os.getpid())
    assert own.cpu_seconds is None or own.cpu_seconds > 0


# -- /proc ---------------------------------------------------------------------------------


def fake_stat(pid: int, ppid: int, session: int, utime: int, stime: int, cutime: int, rss: int,
              comm: str = "busy (x)") -> str:
    # Fields from 3 on: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt
    # utime stime cutime cstime priority nice threads itrealvalue starttime vsize rss ...
    rest = ["S", ppid, session, session, 0, -1, 0, 0, 0, 0, 0, utime, stime, cutime, 0, 20, 0, 1, 0, 100, 0, rss]
    return f"{pid} ({comm}) " + " ".join(str(v) for v in rest) + " 0 0 0\n"


def test_a_process_tree_is_its_descendants_and_its_session(tmp_path):
    proc = tmp_path / "proc"
    write(proc / "100/stat", fake_stat(100, 1, 100, utime=CLK, stime=0, cutime=CLK, rss=10))
    write(proc / "101/stat", fake_stat(101, 100, 100, utime=CLK // 2, stime=CLK // 2, cutime=0, rss=5))
    # A child that left the session (setsid) is still a descendant ...
    write(proc / "102/stat", fake_stat(102, 100, 102, utime=CLK, stime=0, cutime=0, rss=1))
    # ... and an orphan reparented to a subreaper is still in the session.
    write(proc / "103/stat", fake_stat(103, 1, 100, utime=0, stime=CLK, cutime=0, rss=1))
    write(proc / "200/stat", fake_stat(200, 1, 200, utime=7 * CLK, stime=0, cutime=0, rss=99))
    write(proc / "100/io", "rchar: 5\nread_bytes: 4096\nwrite_bytes: 512\ncancelled_write_bytes: 0\n")
    write(proc / "101/io", "read_bytes: 4096\nwrite_bytes: 0\n")
    write(proc / "self/stat", "not a pid\n")
    usage = process_tree_usage([100, 300], proc)
    assert set(usage) == {100}, "a root that is gone has no entry"
    assert usage[100] == InstanceUsage(cpu_seconds=5.0, memory_bytes=17 * PAGE,
                                       block_read_bytes=8192, block_write_bytes=512)
    assert process_tree_usage([], proc) == {}


def test_this_process_measures_itself():
    [(pid, usage)] = process_tree_usage([os.getpid()]).items()
    assert pid == os.getpid() and usage.cpu_seconds > 0 and usage.memory_bytes > 1 << 20


def test_a_network_namespace_counts_every_interface_but_loopback(tmp_path):
    proc = tmp_path / "proc"
    write(proc / "5/net/dev",
          "Inter-|   Receive                            |  Transmit\n"
          " face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed\n"
          "    lo:    3469      34    0    0    0     0          0         0     3469      34    0    0    0     0       0          0\n"
          "  eth0:    1000      10    0    0    0     0          0         0      600       6    0    0    0     0       0          0\n"
          "  eth1:      24       1    0    0    0     0          0         0        0       0    0    0    0     0       0          0\n")
    (proc / "5/ns").mkdir()
    (proc / "5/ns/net").write_text("")
    (proc / "self/ns").mkdir(parents=True)
    (proc / "self/ns/net").write_text("")
    assert netns_usage(5, proc) == InstanceUsage(network_receive_bytes=1024, network_transmit_bytes=600,
                                                 network_receive_packets=11, network_transmit_packets=6)
    # The agent's own namespace is the host's: its traffic is no instance's.
    assert netns_usage(os.getpid()) == InstanceUsage()
    assert netns_usage(999999999) == InstanceUsage()


# -- the agent's side ----------------------------------------------------------------------


class Measured:
    """A driver with usage: what ``figures`` holds (``fail`` makes it raise)."""

    def __init__(self, kind: str, figures: Mapping[str, InstanceUsage]):
        self.kind = kind
        self.figures = dict(figures)
        self.fail = False

    def list(self) -> list[InstanceState]:
        return [InstanceState(name, self.kind, "running") for name in self.figures]

    def usage(self) -> dict[str, InstanceUsage]:
        if self.fail:
            raise RuntimeError("cannot read")
        return self.figures


class Unmeasured:
    kind = "plain"

    def list(self) -> list[InstanceState]:
        return [InstanceState("p", self.kind, "running")]




VM = InstanceUsage(cpu_seconds=12.5, memory_bytes=200 << 20, memory_limit_bytes=256 << 20,
                   network_receive_bytes=10, network_transmit_bytes=20, network_receive_packets=1,
                   network_transmit_packets=2, block_read_bytes=4096, block_write_bytes=0,
                   block_read_operations=1, block_write_operations=0)


def promtool(text: str) -> None:
    require(shutil.which("promtool") is not None, "promtool (Debian's prometheus package; make deps)")
    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, check=False)  # noqa: S603, S607
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_usage_is_exported_by_instance_and_kind_and_passes_promtool():
    vms = Measured("vm", {"web": VM, "db": InstanceUsage(cpu_seconds=1.0)})
    hooks = driven(vms, Unmeasured())
    assert isinstance(vms, UsageMeter) and not isinstance(Unmeasured(), UsageMeter)
    text = AgentMetrics(hooks.metrics).render().decode()
    assert 'kumo_instance_cpu_seconds_total{instance="web",kind="vm"} 12.5' in text
    assert 'kumo_instance_cpu_seconds_total{instance="db",kind="vm"} 1.0' in text
    assert 'kumo_instance_memory_limit_bytes{instance="web",kind="vm"} 2.68435456e+08' in text
    assert 'kumo_instance_network_transmit_packets_total{instance="web",kind="vm"} 2.0' in text
    assert 'kumo_instance_block_write_operations_total{instance="web",kind="vm"} 0.0' in text
    # Nothing is made up: what db does not measure, and the kind without usage, have no series.
    assert 'kumo_instance_memory_bytes{instance="db"' not in text
    assert not [line for line in text.splitlines() if line.startswith("kumo_instance_") and 'kind="plain"' in line]
    promtool(text)


def test_one_driver_failing_to_measure_leaves_the_others_measured():
    broken = Measured("box", {"b": InstanceUsage(cpu_seconds=1.0)})
    broken.fail = True
    hooks = driven(Measured("vm", {"web": VM}), broken)
    assert hooks.drivers.usage() == {"vm": {"web": VM}}
    names = [f.name for f in hooks.metrics()]
    assert "kumo_instance_cpu_seconds" in names and "kumo_instances" in names


def test_no_instance_no_usage_family():
    hooks = driven(Measured("vm", {}))
    assert not [f for f in hooks.metrics() if f.name.startswith("kumo_instance_")]


async def test_the_heartbeat_summary_is_compact_json():
    import json

    hooks = driven(Measured("vm", {"web": VM, "db": InstanceUsage(cpu_seconds=1.0)}), Unmeasured())
    usage = NodeUsage()
    summary = await usage.summary(hooks.drivers)
    assert json.loads(json.dumps(summary)) == summary
    assert summary["instances"] == {
        "web": {"kind": "vm", "cpu_seconds": 12.5, "memory_bytes": 200 << 20, "memory_limit_bytes": 256 << 20},
        "db": {"kind": "vm", "cpu_seconds": 1.0},
    }
    node = summary["node"]
    assert set(node) == {"cpu_busy", "cpus", "memory_used_bytes", "memory_total_bytes", "load1", "load5", "load15"}
    assert 0 <= node["cpu_busy"] <= 1 and node["cpus"] >= 1
    assert 0 < node["memory_used_bytes"] < node["memory_total_bytes"]


def test_cpu_busy_is_the_share_of_time_not_idle_between_two_samples():
    import collections

    times = collections.namedtuple("times", "user nice system idle iowait irq softirq steal guest guest_nice")
    before = times(100, 0, 50, 800, 50, 0, 0, 0, 10, 0)
    after = times(130, 0, 60, 850, 60, 0, 0, 0, 40, 0)  # guest is inside user: not counted twice
    assert busy_fraction(before, after) == pytest.approx(40 / 100)
    assert busy_fraction(after, after) == 0.0


# -- a real process instance ---------------------------------------------------------------


async def no_controller(*_args: Any, **_kwargs: Any) -> Any:
    raise ControllerUnavailable("no controller in this test")


async def process_node(state: Path) -> tuple[Hooks, Any]:
    from plugins.process import ProcessPlugin

    plugin = ProcessPlugin()
    hooks = Hooks(make_plugin_manager({"process": plugin}))
    await plugin.kumo_startup(PluginContext("process", state, state, None, hooks, lambda: None, no_controller,
                                            ImageCache(state / "images")))
    hooks.load_drivers()
    return hooks, plugin


def sample(text: str, name: str, instance: str) -> float | None:
    prefix = f'{name}{{instance="{instance}",kind="process"}} '
    return next((float(line[len(prefix):]) for line in text.splitlines() if line.startswith(prefix)), None)


@pytest.mark.integration
async def test_a_process_burning_cpu_shows_in_metrics_and_prometheus_scrapes_it(prometheus):
    state = Path(tempfile.mkdtemp(prefix="kumo-usage-", dir="/tmp"))
    hooks, plugin = await process_node(state)
    name = f"kumo-usage-{uuid.uuid4().hex[:6]}"
    metrics = AgentMetrics(hooks.metrics)
    server = MetricsServer(metrics, "127.0.0.1", 0)
    try:
        # A child does the burning: the tree's CPU is counted, not only the root's.
        await hooks.handle_task("process.create", {"name": name, "options": {
            "command": ["/bin/sh", "-c", "(while :; do :; done) & wait"]}}, "create")
        await server.start()
        text = (await asyncio.to_thread(metrics.render)).decode()
        first = sample(text, "kumo_instance_cpu_seconds_total", name)
        assert first is not None and sample(text, "kumo_instance_memory_bytes", name) > 0, text
        promtool(text)
        deadline = asyncio.get_running_loop().time() + 30
        while (now := sample((await asyncio.to_thread(metrics.render)).decode(),
                             "kumo_instance_cpu_seconds_total", name)) <= first + 0.2:
            assert asyncio.get_running_loop().time() < deadline, f"cpu_seconds stayed at {now}"
            await asyncio.sleep(0.2)

        prom = prometheus({"scrape_configs": [
            {"job_name": "agent", "static_configs": [{"targets": [f"127.0.0.1:{server.port}"]}]}]})
        # The target's own label keeps the name ``instance``: the exposed one is exported_instance.
        query = f'kumo_instance_cpu_seconds_total{{exported_instance="{name}",kind="process"}}'
        found = await asyncio.to_thread(prom.wait_for, query, 60)
        assert found[0]["metric"]["instance"] == f"127.0.0.1:{server.port}"
        assert float(found[0]["value"][1]) > 0
    finally:
        await server.stop()
        await hooks.handle_task("process.delete", {"name": name}, "delete")
        await plugin.kumo_shutdown()
        shutil.rmtree(state, ignore_errors=True)


def test_a_process_trees_counters_never_go_down_while_its_pid_lives(tmp_path, monkeypatch):
    import plugins.process as process

    driver = process.ProcessDriver(tmp_path, process.ProcessConfig(), "boot", lambda: None)
    driver.instances["p"] = process._Instance(name="p", argv=["x"], pid=100)
    measured = {100: InstanceUsage(cpu_seconds=5.0, memory_bytes=10, block_read_bytes=7, block_write_bytes=1)}
    monkeypatch.setattr(process, "process_tree_usage", lambda pids: {p: measured[p] for p in pids if p in measured})
    assert driver.usage()["p"].cpu_seconds == 5.0
    # A member reaped outside the tree took its CPU time and I/O along: held, memory is not.
    measured[100] = InstanceUsage(cpu_seconds=4.0, memory_bytes=8, block_read_bytes=3, block_write_bytes=2)
    assert driver.usage()["p"] == InstanceUsage(cpu_seconds=5.0, memory_bytes=8, block_read_bytes=7, block_write_bytes=2)
    # A new pid (a restart) starts from its own figures.
    driver.instances["p"].pid = 200
    measured[200] = InstanceUsage(cpu_seconds=0.5, memory_bytes=8)
    assert driver.usage()["p"] == InstanceUsage(cpu_seconds=0.5, memory_bytes=8)
    del measured[200]  # exited before the watcher said so: no figures
    assert driver.usage() == {}
