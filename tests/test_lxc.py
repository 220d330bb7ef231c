"""The lxc plugin against real liblxc, driven through the agent's Hooks as the runtime drives
it: busybox and tarball containers, limits, networking, cloud-init seeds, kill -9 of init,
adoption after a restart, unprivileged containers, a container arriving from another
lxcpath and every kind of bad input. Unit tests of the payload parser come first.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
import subprocess
import tarfile
from pathlib import Path

import psutil
import pytest

from agent.metrics import AgentMetrics
from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import ConfigError, TaskError
from plugins.lxc import LxcPlugin
from plugins.lxc.host import cgroup_layout
from plugins.lxc.liblxc import parse_lxc_info, parse_lxc_ls
from plugins.lxc.settings import LxcConfig
from plugins.lxc.spec import parse_create
from tests.harness.lxc import LxcNode, bridge_ports, container_cgroups, monitor_pids, run

# ---- units -----------------------------------------------------------------------------


def test_payload_defaults_to_the_busybox_template_without_limits():
    spec = parse_create({"name": "c1"}, LxcConfig())
    assert (spec.template, spec.image, spec.vcpus, spec.memory_mib) == ("busybox", None, None, None)
    assert spec.network.mode == "empty"


@pytest.mark.parametrize(
    "payload, message",
    [
        ({"template": "busybox", "image": "/x.tar"}, "either template or image"),
        ({"image": "/x.tar", "image_sha256": "abc"}, "64 hexadecimal"),
        ({"vcpus": 0}, "vcpus must be a positive integer"),
        ({"memory_mib": 4}, "memory_mib must be an integer of at least"),
        ({"network": {"mode": "veth", "bridge": "br0", "address": "10.0.0.5"}}, "needs a prefix length"),
        ({"network": {"mode": "veth", "bridge": "br0", "address": "10.0.0.5/24", "dhcp": True}}, "exclude each other"),
        ({"network": {"mode": "empty", "address": "10.0.0.5/24"}}, "need mode 'veth'"),
        ({"network": {"mode": "veth"}}, "network.bridge must name a host bridge"),
        ({"network": {"mode": "veth", "bridge": "br0", "mtu": 9000}}, "network.mtu: unknown key"),
        ({"hostname": "bad host"}, "hostname must be a DNS name"),
        ({"vcpus": "two"}, "payload.vcpus: expected an integer"),
        ({"disk_gib": 10}, "payload.disk_gib: unknown key"),
    ],
)
def test_bad_payload_fields_are_named(payload, message):
    with pytest.raises(TaskError, match=message) as err:
        parse_create({"name": "c1", "kind": "lxc", **payload}, LxcConfig())
    assert err.value.code == "bad-request"


async def test_the_agent_checks_the_name_and_kind_before_the_driver_sees_them():
    plugin = LxcPlugin()
    hooks = Hooks(make_plugin_manager({"lxc": plugin}))
    hooks.load_drivers()
    with pytest.raises(TaskError, match="payload.kind is 'kvm' in a lxc task") as err:
        await hooks.handle_task("lxc.create", {"name": "c1", "kind": "kvm"}, "t-1")
    assert err.value.code == "bad-request"
    with pytest.raises(TaskError, match="payload.name must be") as err:
        await hooks.handle_task("lxc.start", {"name": "../c1"}, "t-2")
    assert err.value.code == "bad-request"
    with pytest.raises(TaskError, match="payload.timeout must be a number") as err:
        await hooks.handle_task("lxc.stop", {"name": "c1", "timeout": "soon"}, "t-3")
    # A plugin that has not started says so, whatever the operation.
    with pytest.raises(TaskError, match="the lxc plugin is unavailable on this node") as err:
        await hooks.handle_task("lxc.console", {"name": "c1"}, "t-4")
    assert err.value.code == "unavailable"


def test_kumoctl_options_carry_template_network_and_hostname():
    spec = parse_create({"name": "c1", "kind": "lxc", "vcpus": 1, "memory_mib": 256, "options": {
        "template": "busybox", "hostname": "c1.example",
        "network": {"mode": "veth", "bridge": "br0", "address": "10.0.0.5/24", "gateway": "10.0.0.1"}}}, LxcConfig())
    assert (spec.template, spec.hostname, spec.network.address) == ("busybox", "c1.example", "10.0.0.5/24")
    with pytest.raises(TaskError, match=r"options.kernel: unknown key \(allowed keys: hostname, network, privileged, template\)"):
        parse_create({"name": "c1", "options": {"kernel": "/boot/vmlinuz"}}, LxcConfig())
    top = parse_create({"name": "c1", "template": "busybox", "hostname": "top.example",
                        "options": {"template": "other", "hostname": "c1.example"}}, LxcConfig())
    assert (top.template, top.hostname) == ("busybox", "top.example"), "the top level wins over options"


def test_a_container_is_privileged_only_when_asked_on_a_node_that_allows_it():
    assert parse_create({"name": "c1"}, LxcConfig()).privileged is False
    allowing = LxcConfig(allow_privileged=True)
    assert parse_create({"name": "c1", "options": {"privileged": True}}, allowing).privileged is True
    with pytest.raises(TaskError, match="plugins.lxc.allow_privileged: true") as err:
        parse_create({"name": "c1", "options": {"privileged": True}}, LxcConfig())
    assert err.value.code == "privileged-refused"
    with pytest.raises(TaskError, match="options.privileged: expected true or false"):
        parse_create({"name": "c1", "options": {"privileged": "yes"}}, allowing)


def test_shifting_a_rootfs_moves_each_inode_into_the_range_once(tmp_path):
    from plugins.lxc.rootfs import shift_ownership

    (tmp_path / "usr/bin").mkdir(parents=True)
    (tmp_path / "usr/bin/gzip").write_text("x")
    os.link(tmp_path / "usr/bin/gzip", tmp_path / "usr/bin/gunzip")
    os.chown(tmp_path / "usr/bin/gzip", 7, 8)
    shift_ownership(tmp_path, 100_000, 65536)
    for path in (tmp_path, tmp_path / "usr", tmp_path / "usr/bin"):
        assert (path.stat().st_uid, path.stat().st_gid) == (100_000, 100_000), path
    assert ((tmp_path / "usr/bin/gunzip").stat().st_uid, (tmp_path / "usr/bin/gunzip").stat().st_gid) == (100_007, 100_008)


def test_lxc_ls_and_lxc_info_output_is_parsed():
    out = "NAME  STATE   PID   \nweb   RUNNING 4242  \nidle  STOPPED -     \n"
    assert parse_lxc_ls(out) == {"web": ("RUNNING", 4242), "idle": ("STOPPED", None)}
    assert parse_lxc_info("State:          RUNNING\nPID:            4242\n") == ("RUNNING", 4242)
    assert parse_lxc_info("State:          STOPPED\n") == ("STOPPED", None)
    assert parse_lxc_info("") is None


def test_config_rejects_veth_without_a_bridge_and_unknown_keys():
    with pytest.raises(ConfigError, match="plugins.lxc.network: mode 'veth' needs"):
        LxcPlugin().kumo_configure({"network": {"mode": "veth"}}, "plugins.lxc")
    with pytest.raises(ConfigError, match="plugins.lxc.lxc_path: unknown key"):
        LxcPlugin().kumo_configure({"lxc_path": "/x"}, "plugins.lxc")


# ---- real containers -----------------------------------------------------------------

integration = pytest.mark.integration


def limit_key(controller: str) -> str:
    """The key lxc-cgroup reads a limit under on this host's cgroup layout."""
    v2 = cgroup_layout()[controller] == "v2"
    return {"memory": "memory.max" if v2 else "memory.limit_in_bytes",
            "cpu": "cpu.max" if v2 else "cpu.cfs_quota_us"}[controller]


def kernel_usage(cgroup: list[str]) -> tuple[float, int]:
    """(CPU seconds, memory in use less the inactive file cache) of a container, from its
    cgroup's own files as lxc-cgroup reads them."""
    def stat(key: str) -> dict[str, int]:
        return {k: int(v) for k, v in (line.split() for line in run(*cgroup, key).stdout.splitlines() if line)}

    if cgroup_layout()["cpu"] == "v2":
        cpu = stat("cpu.stat")["usage_usec"] / 1e6
    else:
        cpu = int(run(*cgroup, "cpuacct.usage").stdout) / 1e9
    if cgroup_layout()["memory"] == "v2":
        return cpu, int(run(*cgroup, "memory.current").stdout) - stat("memory.stat")["inactive_file"]
    return cpu, int(run(*cgroup, "memory.usage_in_bytes").stdout) - stat("memory.stat")["total_inactive_file"]


@integration
async def test_busybox_container_with_limits_and_a_static_address_on_a_bridge(lxc_node, lxc_bridge):
    node = await lxc_node()
    address = lxc_bridge.address(12)
    result = await node.task("lxc.create", {
        "name": "web-1", "kind": "lxc", "vcpus": 1, "memory_mib": 96,
        "network": {"mode": "veth", "bridge": lxc_bridge.name, "address": f"{address}/24",
                    "gateway": lxc_bridge.gateway},
    })
    assert result["name"] == "web-1" and result["kind"] == "lxc"
    assert result["state"] == "running" and result["details"]["pid"] > 0
    assert result["details"]["address"] == f"{address}/24"
    state = node.state("web-1")
    assert state.state == "running"
    assert state.details["lxcpath"] == str(node.lxcpath) and state.details["pid"] == result["details"]["pid"]

    inside = node.attach("web-1", "/bin/sh", "-c", "echo IN-CONTAINER; ip -4 addr show eth0; ip route")
    assert inside.returncode == 0, inside.stderr
    assert "IN-CONTAINER" in inside.stdout and f"inet {address}/24" in inside.stdout
    assert f"default via {lxc_bridge.gateway}" in inside.stdout
    ping = run("busybox", "ping", "-c", "1", "-W", "2", address)
    assert ping.returncode == 0, ping.stdout

    cgroup = ["lxc-cgroup", "-P", str(node.lxcpath), "-n", "web-1"]
    memory = run(*cgroup, limit_key("memory")).stdout.strip()
    assert memory == str(96 * 1024 * 1024)

    # Usage from the container's cgroup and network namespace: what the kernel's cgroup files
    # say (CPU between a reading before and one after), the limit liblxc set, and the ping
    # above among the packets its eth0 received and sent.
    cpu_before, memory_before = kernel_usage(cgroup)
    usage = node.plugin.usage()["web-1"]
    cpu_after, memory_after = kernel_usage(cgroup)
    assert cpu_before <= usage.cpu_seconds <= cpu_after and usage.cpu_seconds > 0, (cpu_before, usage, cpu_after)
    # An idle container's memory moves little, but it moves (a CI run saw it fall by 11 %
    # between two readings): between the two, give or take 5 %.
    low, high = sorted((memory_before, memory_after))
    assert 0.95 * low <= usage.memory_bytes <= 1.05 * high, (memory_before, usage, memory_after)
    assert usage.memory_limit_bytes == 96 * 1024 * 1024 and usage.memory_bytes > 0
    assert usage.network_receive_packets >= 1 and usage.network_transmit_packets >= 1
    assert usage.network_receive_bytes >= 84 and usage.network_transmit_bytes >= 84  # an ICMP echo's IP packet
    assert usage.block_read_bytes is not None and usage.block_write_operations is not None
    text = AgentMetrics(node.hooks.metrics).render().decode()
    limit = 'kumo_instance_memory_limit_bytes{instance="web-1",kind="lxc"} '
    assert [float(line[len(limit):]) for line in text.splitlines() if line.startswith(limit)] == [96 * 1024 * 1024]
    assert 'kumo_instance_network_transmit_packets_total{instance="web-1",kind="lxc"}' in text
    assert run(*cgroup, limit_key("cpu")).stdout.strip().split()[0] == "100000"

    console = await node.task("lxc.console", {"name": "web-1"})
    assert "kumo: container web-1 booted" in console["log"]
    assert console["logs"]["lxc"] == (node.lxcpath / "web-1/lxc.log").read_text()
    assert len((await node.task("lxc.console", {"name": "web-1", "bytes": 8}))["log"]) == 8


@integration
async def test_cloud_init_seed_lands_in_the_root_filesystem(lxc_node):
    node = await lxc_node()
    user_data = "#cloud-config\nruncmd:\n  - [touch, /tmp/seeded]\n"
    await node.task("lxc.create", {"name": "seeded", "user_data": user_data, "instance_id": "i-42",
                                   "hostname": "seeded.example"})
    seed = node.lxcpath / "seeded/rootfs/var/lib/cloud/seed/nocloud"
    assert (seed / "user-data").read_text() == user_data
    assert "instance-id: i-42" in (seed / "meta-data").read_text()
    inside = node.attach("seeded", "/bin/sh", "-c", "cat /var/lib/cloud/seed/nocloud/user-data; hostname")
    assert user_data in inside.stdout and "seeded.example" in inside.stdout


@integration
async def test_invalid_user_data_fails_the_create_and_leaves_nothing(lxc_node):
    node = await lxc_node()
    with pytest.raises(TaskError, match="user_data"):
        await node.task("lxc.create", {"name": "badseed", "user_data": "#cloud-config\nruncmd: [unclosed\n"})
    assert node.state("badseed") is None and list(node.lxcpath.iterdir()) == []


@pytest.mark.reliability("lxc container", "kill -9 of the container's init")
@integration
async def test_kill_9_of_init_reports_stopped_and_liblxc_cleans_up(lxc_node, lxc_bridge):
    node = await lxc_node()
    # As kumoctl sends it: --option network='{...}' arrives under options.
    await node.task("lxc.create", {"name": "victim", "kind": "lxc", "vcpus": 1, "memory_mib": 256, "options": {
        "network": {"mode": "veth", "bridge": lxc_bridge.name, "address": f"{lxc_bridge.address(13)}/24"}}})
    pid = node.state("victim").details["pid"]
    assert bridge_ports(lxc_bridge.name) and container_cgroups("victim") and monitor_pids(node.lxcpath, "victim")
    changes = node.changes

    os.kill(pid, signal.SIGKILL)
    await node.wait_for(lambda: node.state("victim").state == "stopped", "the container reported stopped")
    assert "pid" not in node.state("victim").details
    assert node.changes > changes, "the runtime was not told about the stop"
    await node.wait_for(lambda: not bridge_ports(lxc_bridge.name), "the veth to leave the bridge")
    await node.wait_for(lambda: not container_cgroups("victim"), "the container's cgroups to go")
    await node.wait_for(lambda: not monitor_pids(node.lxcpath, "victim"), "the lxc monitor to exit")

    started = await node.task("lxc.start", {"name": "victim"})
    assert started["state"] == "running" and started["details"]["pid"] != pid


@integration
async def test_a_restarted_plugin_adopts_running_containers_without_restarting_them(lxc_node):
    node = await lxc_node()
    await node.task("lxc.create", {"name": "keeper", "memory_mib": 64})
    await node.task("lxc.create", {"name": "resting"})
    await node.task("lxc.stop", {"name": "resting", "timeout": 10})
    pid = node.state("keeper").details["pid"]

    adopted = {s.name: s for s in await node.restart()}
    assert adopted["keeper"].state == "running" and adopted["keeper"].details["pid"] == pid
    assert adopted["resting"].state == "stopped"
    assert psutil.Process(pid).is_running()
    # The new plugin instance watches the adopted init as closely as its own.
    os.kill(pid, signal.SIGKILL)
    await node.wait_for(lambda: node.state("keeper").state == "stopped", "the adopted container to stop")


@integration
async def test_stop_is_graceful_and_delete_removes_everything(lxc_node):
    node = await lxc_node()
    await node.task("lxc.create", {"name": "short"})
    stopped = await node.task("lxc.stop", {"name": "short", "timeout": 20})
    assert stopped == {"name": "short", "kind": "lxc", "state": "stopped", "forced": False, "details": {
        "lxcpath": str(node.lxcpath), "privileged": False, "source": "template:busybox"}}
    assert (await node.task("lxc.stop", {"name": "short"}))["forced"] is False, "stopping a stopped one is no error"
    deleted = await node.task("lxc.delete", {"name": "short"})
    assert deleted == {"name": "short", "kind": "lxc", "state": "deleted"} and node.state("short") is None
    assert not (node.lxcpath / "short").exists()
    with pytest.raises(TaskError, match="no Kumo container named 'short'") as err:
        await node.task("lxc.start", {"name": "short"})
    assert err.value.code == "not-found"


@integration
async def test_stop_kills_a_container_whose_init_ignores_the_halt_signal(lxc_node):
    node = await lxc_node()
    await node.task("lxc.create", {"name": "stubborn"})
    # Busybox init halts on SIGUSR1 (lxc.signal.halt); point liblxc at a signal init ignores.
    config = node.lxcpath / "stubborn/config"
    config.write_text(config.read_text() + "lxc.signal.halt = SIGURG\n")
    stopped = await node.task("lxc.stop", {"name": "stubborn", "timeout": 1})
    assert stopped == {"name": "stubborn", "kind": "lxc", "state": "stopped", "forced": True, "details": {
        "lxcpath": str(node.lxcpath), "privileged": False, "source": "template:busybox"}}


@integration
async def test_a_start_liblxc_refuses_says_why(lxc_node):
    node = await lxc_node()
    await node.task("lxc.create", {"name": "broken"})
    await node.task("lxc.stop", {"name": "broken", "timeout": 0})
    config = node.lxcpath / "broken/config"
    config.write_text(config.read_text() + "lxc.init.cmd = /no/such/init\n")
    with pytest.raises(TaskError, match="lxc-start failed for .broken.: .*") as err:
        await node.task("lxc.start", {"name": "broken"})
    assert err.value.code == "failed"
    assert node.state("broken").state == "stopped"


def rootfs_tarball(path: Path) -> str:
    """A minimal busybox root filesystem as a tarball; returns its sha256."""
    busybox = shutil.which("busybox")
    assert busybox is not None
    rcs = b"#!/bin/sh\nexec >>/var/log/console.log 2>&1\necho tarball-rootfs-up\n"
    with tarfile.open(path, "w:gz") as tar:
        for directory in ("bin", "sbin", "etc", "etc/init.d", "proc", "sys", "dev", "tmp", "var", "var/log", "root"):
            info = tarfile.TarInfo(directory)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        tar.add(busybox, "bin/busybox")
        for link, target in (("bin/sh", "busybox"), ("sbin/init", "../bin/busybox"), ("bin/ip", "busybox"),
                             ("bin/cat", "busybox"), ("bin/id", "busybox"), ("bin/sleep", "busybox")):
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, target
            tar.addfile(info)
        for name, data, mode in (("etc/inittab", b"::sysinit:/etc/init.d/rcS\n", 0o644),
                                 ("etc/init.d/rcS", rcs, 0o755)):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), mode
            tar.addfile(info, io.BytesIO(data))
    return hashlib.sha256(path.read_bytes()).hexdigest()


@integration
async def test_container_from_a_rootfs_tarball_verified_by_sha256(lxc_node, tmp_path):
    node = await lxc_node()
    image = tmp_path / "rootfs.tar.gz"
    sha = rootfs_tarball(image)
    result = await node.task("lxc.create", {"name": "fromtar", "image": str(image), "image_sha256": sha,
                                            "user_data": "#cloud-config\n{}\n"})
    assert result["state"] == "running"
    assert (node.lxcpath / "fromtar/rootfs/var/lib/cloud/seed/nocloud/meta-data").is_file()
    log = node.lxcpath / "fromtar/rootfs/var/log/console.log"
    await node.wait_for(lambda: log.exists() and "tarball-rootfs-up" in log.read_text(), "the tarball's init to run")
    assert node.state("fromtar").details["source"] == f"image:{sha}"


@integration
async def test_a_container_runs_in_a_user_namespace_unless_created_privileged(lxc_node):
    node = await lxc_node({"idmap_start": 1_300_000, "allow_privileged": True})
    await node.task("lxc.create", {"name": "userns", "user_data": "#cloud-config\n{}\n", "memory_mib": 64})
    inside = node.attach("userns", "/bin/cat", "/proc/self/uid_map")
    assert inside.returncode == 0, inside.stderr
    assert inside.stdout.split() == ["0", "1300000", "65536"]
    rootfs = node.lxcpath / "userns/rootfs"
    assert (rootfs / "bin").stat().st_uid == 1_300_000
    assert (rootfs / "var/lib/cloud/seed/nocloud/user-data").stat().st_uid == 1_300_000
    assert (rootfs / "etc/init.d/rcS").stat().st_uid == 1_300_000
    assert node.state("userns").details["privileged"] is False
    # Init is host uid 1300000, not root: a container escape lands as an unprivileged user.
    init = psutil.Process(node.state("userns").details["pid"])
    assert init.uids().real == 1_300_000
    await node.task("lxc.delete", {"name": "userns"})
    assert not (node.lxcpath / "userns").exists()

    await node.task("lxc.create", {"name": "root", "options": {"privileged": True}})
    assert node.attach("root", "/bin/cat", "/proc/self/uid_map").stdout.split() == ["0", "0", "4294967295"]
    assert (node.lxcpath / "root/rootfs/etc/init.d/rcS").stat().st_uid == 0
    assert node.state("root").details["privileged"] is True
    assert psutil.Process(node.state("root").details["pid"]).uids().real == 0


@integration
async def test_unprivileged_needs_a_searchable_lxcpath(lxc_node, tmp_path):
    hidden = tmp_path / "private"
    hidden.mkdir(mode=0o700)
    node = await lxc_node({"lxcpath": str(hidden / "lxc")})
    fingerprint = node.plugin.kumo_fingerprint()
    assert not fingerprint.available and "chmod o+x" in fingerprint.reason and str(hidden) in fingerprint.reason


# ---- bad input, one test each ----------------------------------------------------------


@integration
async def test_unknown_template(lxc_node):
    node = await lxc_node()
    with pytest.raises(TaskError, match="unknown template 'ubuntu-nope': this node allows busybox") as err:
        await node.task("lxc.create", {"name": "tpl", "template": "ubuntu-nope"})
    assert err.value.code == "unknown-template"
    assert node.state("tpl") is None and list(node.lxcpath.iterdir()) == []


@integration
async def test_image_checksum_mismatch(lxc_node, tmp_path):
    node = await lxc_node()
    image = tmp_path / "rootfs.tar.gz"
    sha = rootfs_tarball(image)
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(TaskError, match=f"has SHA-256 {sha}, not the expected {wrong}") as err:
        await node.task("lxc.create", {"name": "tampered", "image": str(image), "image_sha256": wrong})
    assert err.value.code == "image-checksum"
    assert node.state("tampered") is None and list(node.lxcpath.iterdir()) == []


@integration
async def test_name_already_in_use(lxc_node):
    node = await lxc_node()
    first = await node.task("lxc.create", {"name": "twin"})
    with pytest.raises(TaskError, match="a container named 'twin' already exists") as err:
        await node.task("lxc.create", {"name": "twin", "memory_mib": 64})
    assert err.value.code == "exists"
    assert node.state("twin").state == "running" and node.state("twin").details["pid"] == first["details"]["pid"]


@integration
async def test_bridge_that_does_not_exist(lxc_node):
    node = await lxc_node()
    with pytest.raises(TaskError, match="bridge 'brnope0' does not exist on this node") as err:
        await node.task("lxc.create", {"name": "lost", "network": {"mode": "veth", "bridge": "brnope0"}})
    assert err.value.code == "no-bridge"
    assert node.state("lost") is None and list(node.lxcpath.iterdir()) == []


@integration
async def test_limits_the_host_cannot_give(lxc_node):
    node = await lxc_node()
    cpus = psutil.cpu_count(logical=True)
    with pytest.raises(TaskError, match=f"more than the {cpus} CPUs of this node") as err:
        await node.task("lxc.create", {"name": "greedy", "vcpus": cpus + 1})
    assert err.value.code == "insufficient-cpu"
    too_much = psutil.virtual_memory().total // (1024 * 1024) * 2
    with pytest.raises(TaskError, match=f"memory_mib {too_much} is more than the") as err:
        await node.task("lxc.create", {"name": "greedy", "memory_mib": too_much})
    assert err.value.code == "insufficient-memory"
    assert node.state("greedy") is None and list(node.lxcpath.iterdir()) == []


@integration
async def test_plugin_created_bridge_carries_containers(lxc_node):
    import secrets

    name, subnet = f"brk{secrets.token_hex(4)}", f"10.233.{secrets.randbelow(250) + 2}"
    try:
        node = await lxc_node({"bridge": {"name": name, "address": f"{subnet}.1/24"},
                               "network": {"mode": "veth", "bridge": name}})
        assert node.plugin.kumo_fingerprint().attributes["bridge"] == name
        await node.task("lxc.create", {"name": "onbr", "network": {"address": f"{subnet}.20/24"}})
        assert run("busybox", "ping", "-c", "1", "-W", "2", f"{subnet}.20").returncode == 0
    finally:
        run("ip", "link", "del", name)


@integration
async def test_lxc_missing_leaves_the_plugin_loaded_but_unavailable(tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    node = LxcNode(tmp_path / "node", tmp_path / "lxc")
    await node.start()
    fingerprint = node.plugin.kumo_fingerprint()
    assert not fingerprint.available and fingerprint.kinds == ("lxc",)
    assert "liblxc's tools are not installed" in fingerprint.reason and "apt install lxc" in fingerprint.reason
    with pytest.raises(TaskError, match="the lxc plugin is unavailable on this node") as err:
        await node.task("lxc.create", {"name": "nolxc"})
    assert err.value.code == "unavailable"
    await node.stop()


@integration
async def test_the_checkpoint_plugin_dumps_and_restores_a_container_this_plugin_made(
    lxc_node, lxc_bridge, criu_required
):
    from plugins.checkpoint import CheckpointPlugin

    checkpoint = CheckpointPlugin()
    checkpoint.kumo_configure(section={}, source="test: plugins.checkpoint")
    # CRIU cannot restore a veth inside a user namespace ("netlink: Operation not permitted").
    node = await lxc_node({"allow_privileged": True}, others={"checkpoint": checkpoint})
    await checkpoint.kumo_startup(context=node.context("checkpoint"))
    try:
        address = lxc_bridge.address(14)
        await node.task("lxc.create", {"name": "ckpt", "memory_mib": 64, "privileged": True, "network": {
            "mode": "veth", "bridge": lxc_bridge.name, "address": f"{address}/24", "gateway": lxc_bridge.gateway}})
        pid = node.state("ckpt").details["pid"]
        preflight = await node.task("checkpoint.preflight", {"name": "ckpt", "kind": "lxc"})
        assert preflight == {"ok": True, "blockers": []}

        await node.task("checkpoint.dump", {"name": "ckpt", "kind": "lxc", "leave_running": False})
        await node.wait_for(lambda: node.state("ckpt").state == "stopped", "the dumped container to stop")
        await node.task("checkpoint.restore", {"name": "ckpt", "kind": "lxc"})
        # However the checkpoint plugin learns of the restore, the lxc plugin shows it from liblxc.
        await node.wait_for(lambda: node.state("ckpt").state == "running", "the restored container")
        assert node.state("ckpt").details["pid"] != pid
        inside = node.attach("ckpt", "/bin/ip", "-4", "addr", "show", "eth0")
        assert f"inet {address}/24" in inside.stdout, inside.stdout + inside.stderr
    finally:
        await checkpoint.kumo_shutdown()


@integration
async def test_a_container_from_another_lxcpath_is_staged_checked_and_taken_over(lxc_node, lxcpath_factory, tmp_path):
    source = await lxc_node()
    await source.task("lxc.create", {"name": "mover", "memory_mib": 64})
    await source.task("lxc.stop", {"name": "mover", "timeout": 10})
    here = LxcNode(tmp_path / "here", lxcpath_factory())
    await here.start()
    try:
        with pytest.raises(TaskError, match="container 'web' cannot run on this node: its interface lxc.net.0 "
                                             "plugs into bridge brnope8") as err:
            await here.plugin.stage_migration("web", "lxc.rootfs.path = dir:/src/lxc/web/rootfs\n"
                                              "lxc.idmap = u 0 1000000 65536\nlxc.idmap = g 0 1000000 65536\n"
                                              "lxc.net.0.type = veth\nlxc.net.0.link = brnope8\n", "/src/lxc", None)
        assert err.value.code == "no-bridge"
        assert list(here.lxcpath.iterdir()) == [], "nothing is staged when the node cannot run it"

        config = (source.lxcpath / "mover/config").read_text()
        staged, privileged = await here.plugin.stage_migration("mover", config, str(source.lxcpath), False)
        assert not privileged
        assert staged.parent == here.lxcpath and staged.name.startswith(".import-mover-")
        assert run("cp", "-a", f"{source.lxcpath / 'mover'}/.", str(staged)).returncode == 0
        # liblxc lists no dot-directory: a container still arriving is no instance yet.
        assert [s.name for s in await here.plugin.adopt()] == [] and here.state("mover") is None

        await here.plugin.import_migrated("mover", staged, str(source.lxcpath))
        assert here.state("mover").state == "stopped" and not staged.exists()
        moved = (here.lxcpath / "mover/config").read_text()
        assert f"dir:{here.lxcpath}/mover/rootfs" in moved and str(source.lxcpath) not in moved
        started = await here.task("lxc.start", {"name": "mover"})
        assert started["state"] == "running" and started["details"]["source"] == "template:busybox"
        assert await here.plugin.init_pid("mover") == started["details"]["pid"]
        with pytest.raises(TaskError, match="a container named 'mover' already exists") as err:
            await here.plugin.stage_migration("mover", config, str(source.lxcpath), False)
        assert err.value.code == "exists"
    finally:
        await here.stop()


@integration
async def test_dhcp_address_from_a_server_on_the_bridge(lxc_node, lxc_bridge, tmp_path):
    conf = tmp_path / "udhcpd.conf"
    conf.write_text(
        f"start {lxc_bridge.address(100)}\nend {lxc_bridge.address(110)}\ninterface {lxc_bridge.name}\n"
        f"lease_file {tmp_path / 'leases'}\noption subnet 255.255.255.0\noption router {lxc_bridge.gateway}\n"
    )
    (tmp_path / "leases").touch()
    server = subprocess.Popen(["busybox", "udhcpd", "-f", str(conf)],  # noqa: S603
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        node = await lxc_node()
        await node.task("lxc.create", {"name": "leased", "network": {
            "mode": "veth", "bridge": lxc_bridge.name, "dhcp": True}})

        def leased() -> bool:
            out = node.attach("leased", "/bin/ip", "-4", "addr", "show", "eth0").stdout
            return any(f"inet {lxc_bridge.address(host)}/24" in out for host in range(100, 111))

        await node.wait_for(leased, "a DHCP lease inside the container", limit=30)
    finally:
        server.kill()
        server.wait()
