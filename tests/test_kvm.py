"""The kvm plugin: domain XML, payloads and liveness (unit), and real guests through the real
libvirtd, every task routed by the agent's core as on a node.

The guest is Debian's kernel with a busybox initramfs (tests/harness/guest.py) whose /init
prints the cidata seed it finds on the serial console; with ``kumo.hold`` it stays up until
an ACPI power-button press.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import shutil
import socket
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import pytest

from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import ConfigError, ImageCache, InstanceUsage, TaskError
from plugins.kvm import KvmPlugin, liveness
from plugins.kvm.acceleration import Acceleration
from plugins.kvm.disks import backing_file, make_overlay
from plugins.kvm.domain import METADATA_NS, DomainFiles, domain_xml, read_metadata
from plugins.kvm.spec import BootOptions, CreateSpec
from plugins.kvm.usage import usage_from_stats
from tests.harness import REPO, require
from tests.harness.guest import Guest
from tests.harness.libvirt import KvmNode, KvmTestBed, wait_for

# ---- unit -------------------------------------------------------------------------------


def _spec(**options: Any) -> CreateSpec:
    return CreateSpec(name="vm-1", image="/i.qcow2", memory_mib=256, vcpus=2, options=BootOptions(**options))


def _xml(spec: CreateSpec, network: str = "none", accel: str = "qemu") -> ET.Element:
    directory = Path("/d/vm-1")
    files = DomainFiles(directory, directory / "disk.qcow2", directory / "cidata.iso", directory / "console.log")
    acceleration = Acceleration(accel, "tcg" if accel == "qemu" else "kvm", "test")  # type: ignore[arg-type]
    text = domain_xml("vm-1", spec, acceleration, files, network)
    metadata = read_metadata(text)
    assert metadata is not None and metadata.directory == directory
    assert metadata.acceleration == acceleration.name
    return ET.fromstring(text)


def test_domain_xml_direct_kernel_boot_keeps_user_strings_as_text() -> None:
    hostile = "console=ttyS0 '\"/><evil/>&amp;"
    root = _xml(_spec(kernel="/k", initrd="/i", cmdline=hostile))
    assert root.get("type") == "qemu"
    assert root.findtext("os/cmdline") == hostile
    assert root.find(".//evil") is None
    assert root.findtext("os/kernel") == "/k" and root.findtext("os/initrd") == "/i"
    assert root.findtext("memory") == "256" and root.find("memory").get("unit") == "MiB"
    assert root.findtext("vcpu") == "2"
    cdrom = root.find("devices/disk[@device='cdrom']")
    assert cdrom.find("readonly") is not None and cdrom.find("source").get("file") == "/d/vm-1/cidata.iso"
    assert root.find("devices/serial").get("type") == "file"
    assert root.find("devices/serial/source").get("path") == "/d/vm-1/console.log"
    assert root.find("devices/console/target").get("type") == "serial"
    assert root.find(f"metadata/{{{METADATA_NS}}}instance") is not None
    assert root.find("devices/interface") is None


def test_domain_xml_disk_boot_and_networks() -> None:
    root = _xml(_spec(), network="user", accel="kvm")
    assert root.get("type") == "kvm"
    assert root.find("os/boot").get("dev") == "hd" and root.find("os/kernel") is None
    assert root.find("devices/interface").get("type") == "user"
    bridged = _xml(_spec(), network="bridge:br-x")
    assert bridged.find("devices/interface/source").get("bridge") == "br-x"


def test_foreign_domain_has_no_kumo_metadata() -> None:
    assert read_metadata("<domain type='qemu'><name>x</name></domain>") is None


def test_usage_sums_a_domains_devices_from_its_stats_record() -> None:
    record = {
        "state.state": 1, "cpu.time": 2_500_000_000, "cpu.user": 1, "balloon.current": 196608,
        "balloon.maximum": 196608, "balloon.rss": 102400,
        "net.count": 2, "net.0.name": "vnet0", "net.0.rx.bytes": 1000, "net.0.rx.pkts": 10,
        "net.0.tx.bytes": 600, "net.0.tx.pkts": 6, "net.1.name": "vnet1", "net.1.rx.bytes": 24,
        "net.1.rx.pkts": 1, "net.1.tx.bytes": 0, "net.1.tx.pkts": 0,
        "block.count": 2, "block.0.name": "vda", "block.0.rd.reqs": 3, "block.0.rd.bytes": 12288,
        "block.0.wr.reqs": 1, "block.0.wr.bytes": 512, "block.1.name": "hdc", "block.1.rd.reqs": 2,
        "block.1.rd.bytes": 4096,  # a cdrom: no write figures
    }
    assert usage_from_stats(record) == InstanceUsage(
        cpu_seconds=2.5, memory_bytes=100 << 20, memory_limit_bytes=192 << 20,
        network_receive_bytes=1024, network_transmit_bytes=600, network_receive_packets=11,
        network_transmit_packets=6, block_read_bytes=16384, block_write_bytes=512,
        block_read_operations=5, block_write_operations=1)
    # User-mode networking has no host interface to count: no figures rather than zeros.
    assert usage_from_stats({"cpu.time": 1, "net.count": 1, "net.0.name": "user"}).network_receive_bytes is None


async def test_an_overlay_is_root_s_alone_and_backed_by_the_base_it_was_made_from(tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    base = tmp_path / "base.raw"
    base.write_bytes(bytes(1 << 20))
    await make_overlay(base, tmp_path / "disk.qcow2")
    assert (tmp_path / "disk.qcow2").stat().st_mode & 0o777 == 0o600  # the guest's writes, its secrets too
    assert backing_file(tmp_path / "disk.qcow2") == base


def test_backing_file_is_read_from_the_overlay(tmp_path: Path) -> None:
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    base = tmp_path / "base image.raw"
    base.write_bytes(bytes(1 << 20))
    overlay = tmp_path / "disk.qcow2"
    subprocess.run(  # noqa: S603 - an argv list
        ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", str(base), str(overlay)], check=True)
    assert backing_file(overlay) == base
    assert backing_file(base) is None and backing_file(tmp_path / "none") is None


@pytest.mark.parametrize(
    "section",
    [{"network": "bridge:"}, {"acceleration": "fast"}, {"shutdown_timeout": 0}, {"urii": "x"},
     {"image_cache": "/var/cache/kumo/images"}],
)
def test_bad_config_is_refused(section: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        KvmPlugin().kumo_configure(section=section, source="agent.yaml: plugins.kvm")


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"name": "-bad", "image": "/x", "memory_mib": 64}, "payload.name must be"),
        ({"name": "a", "memory_mib": 64}, "payload.image: required key is missing"),
        ({"name": "a", "image": "/x", "memory_mib": 8}, "payload.memory_mib must be at least 32"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "vcpus": 0}, "payload.vcpus must be at least 1"),
        ({"name": "a", "image": "/x", "memory_mib": "lots"}, "payload.memory_mib: expected an integer"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "image_sha256": "abc"}, "64 hexadecimal"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "options": {"bios": 1}}, "payload.options.bios: unknown key"),
        ({"name": "a", "image": "/x", "memory_mib": 64, "options": {"initrd": "/i"}}, "need options.kernel"),
        ({"name": "a", "image": "/x", "memroy_mib": 64}, "payload.memroy_mib: unknown key"),
    ],
)
async def test_bad_payload_is_refused_before_libvirt(payload: dict[str, Any], message: str) -> None:
    hooks = Hooks(make_plugin_manager({"kvm": KvmPlugin()}))  # never started: no libvirt
    hooks.load_drivers()
    with pytest.raises(TaskError, match=re.escape(message)) as err:
        await hooks.handle_task("kvm.create", {"kind": "kvm", **payload}, "t")
    assert err.value.code == "bad-request"


def test_liveness_watches_the_socket_a_local_uri_names() -> None:
    assert liveness.socket_paths("qemu:///system") == liveness.SYSTEM_SOCKETS
    assert liveness.socket_paths("qemu+unix:///system?socket=/tmp/x.sock") == (Path("/tmp/x.sock"),)
    # Nothing local to watch: the child answers for these.
    for uri in ("qemu+ssh://host/system", "qemu+tcp://host/system", "qemu:///session"):
        assert liveness.socket_paths(uri) == ()


def test_liveness_sees_a_listening_socket_and_its_replacement(tmp_path: Path) -> None:
    path = tmp_path / "sock dir" / "libvirt-sock"
    path.parent.mkdir()
    assert liveness.listening((path,)) is None
    inodes = []
    for _ in range(2):  # libvirtd, then a restarted libvirtd
        with socket.socket(socket.AF_UNIX) as server:
            server.bind(str(path))
            assert liveness.listening((path,)) is None  # bound, not yet listening
            server.listen()
            found = liveness.listening((tmp_path / "other", tmp_path / "sock dir" / ".." / "sock dir" / "libvirt-sock"))
            assert found is not None and found[0].endswith("libvirt-sock")
            inodes.append(found[1:])
            path.unlink()
            assert liveness.listening((path,)) is None  # still listening, but unreachable
    assert inodes[0] != inodes[1]


async def test_liveness_asks_the_child_again_only_when_the_socket_cannot_be_trusted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require(_has_binding(), "the libvirt Python binding (pip install -e '.[libvirt]')")
    answers = [liveness.Answer("", {"libvirt_version": "1.2.3"})]
    asked: list[str] = []

    async def child(uri: str) -> liveness.Answer:
        asked.append(uri)
        return answers[-1]

    monkeypatch.setattr(liveness, "ask_child", child)
    monkeypatch.setattr(liveness, "RECHECK_INTERVAL", 0.0)  # "every 30 s" is every refresh here
    path = tmp_path / "libvirt-sock"
    uri = f"qemu+unix:///system?socket={path}"
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))
        server.listen()
        probe = liveness.Liveness(uri)
        for _ in range(3):  # listening, and libvirtd answered: the socket is trusted
            assert (await probe.refresh()).versions == {"libvirt_version": "1.2.3"}
        assert len(asked) == 1
        probe = liveness.Liveness(uri)
        answers.append(liveness.Answer("cannot connect: permission denied"))
        for _ in range(3):  # listening, yet libvirt refuses: only the child can tell
            assert (await probe.refresh()).reason == "cannot connect: permission denied"
        assert len(asked) == 4
    remote = liveness.Liveness("qemu+ssh://host/system")  # no socket to watch at all
    await remote.refresh()
    await remote.refresh()
    assert asked[-2:] == ["qemu+ssh://host/system"] * 2


# A fresh interpreter (this one has libvirt imported already) starts one kvm plugin, and
# reports what it fingerprints and whether libvirt is in sys.modules and mapped, before and
# after a kvm task.
_LAZY_SCRIPT = """
import asyncio, json, sys
from pathlib import Path
from agent.pluginmanager import Hooks, make_plugin_manager
from agent.sdk import ImageCache, PluginContext, TaskError
from plugins.kvm import KvmPlugin

def loaded():
    with open("/proc/self/maps") as maps:
        return {"module": "libvirt" in sys.modules, "mapped": "libvirt.so" in maps.read()}

async def main(uri, instance_dir, state_dir):
    plugin = KvmPlugin()
    hooks = Hooks(make_plugin_manager({"kvm": plugin}))
    plugin.kumo_configure(section={"uri": uri, "instance_dir": instance_dir, "acceleration": "tcg"}, source="t")
    async def no_controller(*args, **kwargs):
        raise AssertionError
    context = PluginContext(name="kvm", state_dir=Path(state_dir), agent_state_dir=Path(state_dir), identity=None,
                            hooks=hooks, report_changed=lambda: None, call_controller=no_controller,
                            images=ImageCache(Path(state_dir) / "images"))
    await plugin.kumo_startup(context=context)
    hooks.load_drivers()
    report = {"startup": loaded(), "fingerprint": (await plugin.kumo_fingerprint()).to_json()}
    report["idle"] = loaded()
    try:
        await hooks.handle_task("kvm.start", {"name": "nope"}, "t")
    except TaskError as exc:
        report["task"] = exc.code
    report["after_task"] = loaded()
    report["fingerprint_after_task"] = (await plugin.kumo_fingerprint()).to_json()
    await plugin.kumo_shutdown()
    print(json.dumps(report))

asyncio.run(main(*sys.argv[1:]))
"""


def _lazy_run(tmp_path: Path, uri: str, instances: tuple[str, ...] = ()) -> dict[str, Any]:
    require(_has_binding(), "the libvirt Python binding (pip install -e '.[libvirt]')")
    for name in instances:
        (tmp_path / "instances" / name).mkdir(parents=True)
    result = subprocess.run(  # noqa: S603 - an argv list
        [sys.executable, "-c", _LAZY_SCRIPT, uri, str(tmp_path / "instances"), str(tmp_path)],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def _has_binding() -> bool:
    try:
        import libvirt  # noqa: F401
    except ImportError:
        return False
    return True


def test_idle_and_loaded_agree_when_libvirtd_is_down(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    report = _lazy_run(tmp_path, uri)
    assert report["idle"] == {"module": False, "mapped": False}
    assert not report["fingerprint"]["available"]
    assert report["fingerprint"]["reason"].startswith(f"cannot connect to {uri}: ")
    assert report["task"] == "unavailable" and report["after_task"]["module"]
    # The child's answer and the in-process connection's say the same.
    assert report["fingerprint_after_task"] == report["fingerprint"]


def test_instance_directories_from_before_load_libvirt_at_startup(tmp_path: Path) -> None:
    uri = f"qemu+unix:///system?socket={tmp_path / 'no-libvirtd.sock'}"
    report = _lazy_run(tmp_path, uri, instances=("vm-1",))
    assert report["startup"] == {"module": True, "mapped": True}


async def test_a_start_removes_no_arrival_under_way_or_that_libvirtd_cannot_judge(tmp_path: Path) -> None:
    """What a start does with the marks of live arrivals without asking libvirt (the
    integration test of a killed destination sees one removed)."""
    import os
    import types

    from agent.sdk import boot_id, start_time
    from plugins.kvm.live import ARRIVING, discard_arrivals

    def not_asked(name: str) -> None:
        raise AssertionError(f"libvirt was asked about {name}")

    instances = tmp_path / "instances"
    (instances / "under-way").mkdir(parents=True)
    (instances / "killed").mkdir()
    # Marked by this process (`kumo-agent plugins` beside a running agent): under way.
    (instances / f"{ARRIVING}under-way").write_text(json.dumps([boot_id(), os.getpid(), start_time(os.getpid())]))
    (instances / f"{ARRIVING}never-made").write_text("[]")  # killed before the directory was made
    (instances / ARRIVING).write_text("[]")  # no mark of Kumo's: it names no instance, it is ignored
    host = types.SimpleNamespace(conn=types.SimpleNamespace(lookupByName=not_asked), libvirt=None)
    await discard_arrivals(instances, host)  # type: ignore[arg-type]
    assert not (instances / f"{ARRIVING}never-made").exists()
    assert (instances / f"{ARRIVING}under-way").exists() and (instances / "under-way").is_dir()
    # Killed, and libvirtd is not reachable: whether it arrived waits for the next start.
    (instances / f"{ARRIVING}under-way").unlink()
    (instances / f"{ARRIVING}killed").write_text(json.dumps([boot_id(), os.getpid(), -1]))
    await discard_arrivals(instances, types.SimpleNamespace(conn=None, libvirt=None))  # type: ignore[arg-type]
    assert sorted(p.name for p in instances.iterdir()) == [ARRIVING, f"{ARRIVING}killed", "killed", "under-way"]


async def test_an_arrival_libvirt_cannot_pause_is_kept_for_the_controller_to_settle(tmp_path: Path) -> None:
    """Held, but the pause fails: removing the VM would lose it if the source did finish, so
    it stays an instance here, running, and the controller stops one copy."""
    import types

    from plugins.kvm.moves import Moves

    class LibvirtError(Exception):
        def get_error_message(self) -> str:
            return str(self)

    libvirt = types.SimpleNamespace(VIR_DOMAIN_RUNNING=1, libvirtError=LibvirtError)

    def suspend() -> None:
        raise LibvirtError("Timed out during operation: cannot acquire state change lock")

    dom = types.SimpleNamespace(state=lambda: [1, 2], suspend=suspend)
    conn = types.SimpleNamespace(lookupByName=lambda name: dom, defineXML=lambda xml: None)

    async def connection() -> Any:
        return conn

    async def refresh(conn: Any, name: str) -> None:
        instances.by_name[name].state = "running"

    base = tmp_path / "base"
    instances = types.SimpleNamespace(by_name={}, fetched=[base], refresh=refresh)
    context = types.SimpleNamespace(report_changed=lambda: None)
    host = types.SimpleNamespace(connection=connection, libvirt=libvirt)
    moves = Moves(None, context, host, instances, None)  # type: ignore[arg-type]
    moves._arriving["vm"] = (tmp_path / "vm", base, "qemu", "<domain/>")
    assert await moves.arrived("vm", hold=True) is True
    assert instances.by_name["vm"].state == "running" and instances.fetched == []


@pytest.mark.integration
def test_idle_node_fingerprints_libvirt_without_loading_it(libvirtd: str, tmp_path: Path) -> None:
    report = _lazy_run(tmp_path, libvirtd)
    assert report["startup"] == report["idle"] == {"module": False, "mapped": False}
    fingerprint = report["fingerprint"]
    assert fingerprint["available"] and fingerprint["kinds"] == ["kvm"]
    attrs = fingerprint["attributes"]
    assert attrs["acceleration"] == "tcg" and "set by configuration" in attrs["acceleration_reason"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", attrs["libvirt_version"])
    assert re.fullmatch(r"\d+\.\d+\.\d+", attrs["qemu_version"])
    assert attrs["instances"] == 0 and attrs["uri"] == libvirtd
    # The first kvm task loads libvirt in the agent (no such domain here, so it fails).
    assert report["task"] == "not-found"
    assert report["after_task"] == {"module": True, "mapped": True}
    assert report["fingerprint_after_task"] == fingerprint


# ---- against the real libvirtd ----------------------------------------------------------


def _payload(bed: KvmTestBed, guest: Guest, name: str, hold: bool = False, **extra: Any) -> dict[str, Any]:
    payload = {
        "name": name,
        "kind": "kvm",
        "image": str(guest.disk),
        "image_sha256": guest.disk_sha256,
        "vcpus": 1,
        "memory_mib": 192,
        "user_data": f"#cloud-config {name}-marker\nruncmd:\n  - echo hello\n",
        "options": {
            "kernel": str(guest.kernel),
            "initrd": str(guest.initrd),
            "cmdline": guest.cmdline + (" kumo.hold" if hold else ""),
        },
    }
    payload.update(extra)
    return payload


def _leftovers(bed: KvmTestBed, name: str) -> list[str]:
    files = [str(p) for p in (bed.root / "images").glob("*")] + [str(p) for p in (bed.root / "instances").glob(f"{name}*")]
    return bed.domains() + files


async def _fingerprint_until(node: KvmNode, available: bool) -> Any:
    for _ in range(150):
        fingerprint = await node.plugin.kumo_fingerprint()
        if fingerprint.available == available:
            return fingerprint
        await asyncio.sleep(0.2)
    pytest.fail(f"the kvm plugin never became {'available' if available else 'unavailable'}")


async def _probe(node: KvmNode) -> Any:
    return await node.plugin.kumo_probes()[0].run()


@pytest.mark.integration
async def test_create_boots_with_the_users_seed(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("seed")
    result = await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name))
    assert (result["name"], result["kind"], result["state"]) == (name, "kvm", "running")
    directory = kvm_bed.root / "instances" / name
    assert result["details"]["console_log"] == str(directory / "console.log")
    assert result["details"]["acceleration"] in ("kvm", "tcg")
    assert kvm_bed.domains() == [name]
    # The guest powers itself off after printing the seed: the STOPPED lifecycle event says so.
    await wait_for(lambda: node.state(name) == "stopped")
    lines = (await node.console(name)).splitlines()  # the serial line ends in CRLF
    assert f"CIDATA-META: instance-id: {name}" in lines
    assert f"CIDATA-USERDATA-FIRSTLINE: #cloud-config {name}-marker" in lines
    assert "GUEST-DONE" in lines
    assert kvm_bed.changes >= 2


def domstats(uri: str, name: str) -> dict[str, int]:
    """``virsh domstats`` of one domain (its CPU, balloon and block figures), by key."""
    out = subprocess.run(["virsh", "-c", uri, "domstats", "--cpu-total", "--balloon", "--block", name],  # noqa: S603, S607
                         capture_output=True, text=True, check=True).stdout
    return {key: int(value) for key, _, value in (line.strip().partition("=") for line in out.splitlines())
            if value.isdigit()}


def block_total(stats: dict[str, int], key: str) -> int:
    return sum(stats.get(f"block.{i}.{key}", 0) for i in range(stats.get("block.count", 0)))


@pytest.mark.integration
async def test_stop_start_delete(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("life")
    await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))

    async def holding(count: int) -> None:
        for _ in range(300):
            if (await node.console(name)).count("GUEST-HOLDING") >= count:
                return
            await asyncio.sleep(0.2)
        pytest.fail(f"guest did not reach GUEST-HOLDING #{count}: {await node.console(name)}")

    await holding(1)
    # Usage from libvirt's bulk stats: the guest has run, and read its initrd's seed cdrom.
    # The figures are virsh domstats's for the same domain: counters between a reading before
    # and one after, the resident memory of an idle guest between the two, give or take 5 %.
    before = domstats(kvm_bed.uri, name)
    usage = node.plugin.usage()[name]
    after = domstats(kvm_bed.uri, name)
    assert usage.cpu_seconds > 0 and usage.memory_bytes > 0 and usage.memory_limit_bytes == 192 << 20
    assert usage.block_read_bytes > 0 and usage.block_read_operations > 0
    assert before["cpu.time"] / 1e9 <= usage.cpu_seconds <= after["cpu.time"] / 1e9, (before, usage, after)
    assert usage.memory_limit_bytes == after["balloon.maximum"] * 1024
    low, high = sorted((before["balloon.rss"] * 1024, after["balloon.rss"] * 1024))
    assert 0.95 * low <= usage.memory_bytes <= 1.05 * high, (before, usage, after)
    for figure, key in (("block_read_bytes", "rd.bytes"), ("block_read_operations", "rd.reqs"),
                        ("block_write_bytes", "wr.bytes"), ("block_write_operations", "wr.reqs")):
        assert block_total(before, key) <= getattr(usage, figure) <= block_total(after, key), (figure, before, usage)
    assert node.metric("kumo_instance_cpu_seconds_total", instance=name, kind="kvm") >= usage.cpu_seconds
    assert node.metric("kumo_instance_block_read_bytes_total", instance=name, kind="kvm") >= usage.block_read_bytes
    stopped = await node.task("kvm.stop", name=name)
    # ACPI power button obeyed
    assert {k: stopped[k] for k in ("name", "kind", "state", "forced")} == {
        "name": name, "kind": "kvm", "state": "stopped", "forced": False}
    assert "GUEST-POWER-BUTTON" in await node.console(name)

    started = await node.task("kvm.start", name=name)
    assert started["state"] == "running" and node.state(name) == "running"
    await holding(2)
    # A zero timeout leaves no time for the guest: the plugin destroys it.
    forced = await node.task("kvm.stop", name=name, timeout=0)
    assert forced["forced"] is True and forced["state"] == "stopped"

    directory = kvm_bed.root / "instances" / name
    assert (directory / "disk.qcow2").exists()
    assert await node.task("kvm.delete", name=name) == {"name": name, "kind": "kvm", "state": "deleted"}
    assert kvm_bed.domains() == [] and not directory.exists()
    assert node.state(name) is None
    with pytest.raises(TaskError) as err:
        await node.task("kvm.start", name=name)
    assert err.value.code == "not-found"


@pytest.mark.integration
async def test_acceleration_is_proven_not_assumed(kvm_bed: KvmTestBed) -> None:
    fingerprint = await (await kvm_bed.node()).plugin.kumo_fingerprint()
    assert fingerprint.available and fingerprint.kinds == ("kvm",)
    attrs = fingerprint.attributes
    cpu_flags = Path("/proc/cpuinfo").read_text().split()
    if "vmx" not in cpu_flags and "svm" not in cpu_flags:
        # No hardware virtualisation: /dev/kvm, where it exists, is a paravirtual or nested
        # implementation under which guests run at emulation speed or fault.
        assert attrs["acceleration"] == "tcg"
        assert "falling back to TCG" in attrs["acceleration_reason"]
        assert "probe guest" in attrs["acceleration_reason"] or "/dev/kvm" in attrs["acceleration_reason"]
    else:
        assert attrs["acceleration"] in ("kvm", "tcg") and attrs["acceleration_reason"]
    forced = await (await kvm_bed.node(acceleration="tcg")).plugin.kumo_fingerprint()
    assert forced.attributes["acceleration"] == "tcg"
    assert "set by configuration" in forced.attributes["acceleration_reason"]


@pytest.mark.integration
async def test_adoption_leaves_the_running_domain_alone(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    import libvirt

    first = await kvm_bed.node()  # idle: its create loads libvirt; the second loads it at startup
    name = kvm_bed.name("adopt")
    await first.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    conn = libvirt.open("qemu:///system")
    try:
        before = conn.lookupByName(name).ID()
        await first.plugin.kumo_shutdown()  # the agent stops; the VM must not

        second = await kvm_bed.node()
        adopted = await second.hooks.adopt()
        assert [(s.name, s.kind, s.state) for s in adopted if s.name.startswith(kvm_bed.prefix)] == [
            (name, "kvm", "running")
        ]
        dom = conn.lookupByName(name)
        assert dom.isActive() and dom.ID() == before  # same qemu process: never restarted
        # The adopted instance is fully managed: events and tasks work.
        await second.task("kvm.stop", name=name, timeout=0)
        assert second.state(name) == "stopped"
    finally:
        conn.close()


@pytest.mark.integration
async def test_missing_image_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("noimg")
    payload = _payload(kvm_bed, kvm_guest, name, image=str(kvm_bed.root / "nope.qcow2"), image_sha256=None)
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **payload)
    assert err.value.code == "image-missing" and "does not exist" in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
@pytest.mark.parametrize("backing", ["/etc/shadow", "data-file"])
async def test_an_image_that_reads_a_host_file_is_refused(kvm_bed: KvmTestBed, kvm_guest: Guest, backing: str) -> None:
    # An image from anywhere (a URL) could name a host path for the guest to read as its disk.
    node = await kvm_bed.node()
    name = kvm_bed.name("backed")
    image = kvm_bed.root / f"{name}.qcow2"
    if backing == "data-file":
        options = f"data_file={kvm_bed.root / (name + '.data')}"
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(image), "1M"]
    else:
        argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-u", "-F", "raw", "-b", backing, str(image), "1M"]
    subprocess.run(argv, check=True)  # noqa: S603 - an argv list
    digest = hashlib.sha256(image.read_bytes()).hexdigest()
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, image=str(image), image_sha256=digest))
    assert err.value.code == "image-invalid" and "reads another file" in str(err.value), str(err.value)
    assert kvm_bed.domains() == [] or name not in kvm_bed.domains()
    assert list((kvm_bed.root / "instances").glob(f"{name}*")) == []


@pytest.mark.integration
async def test_checksum_mismatch_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("badsum")
    wrong = hashlib.sha256(b"not the image").hexdigest()
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, image_sha256=wrong))
    assert err.value.code == "image-checksum"
    assert kvm_guest.disk_sha256 in str(err.value) and wrong in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
async def test_duplicate_name_is_refused_and_the_first_survives(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("dup")
    await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name))
    assert err.value.code == "exists"
    assert kvm_bed.domains() == [name] and node.state(name) == "running"
    assert (kvm_bed.root / "instances" / name / "disk.qcow2").exists()


@pytest.mark.integration
async def test_invalid_user_data_leaves_nothing(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("baduser")
    payload = _payload(kvm_bed, kvm_guest, name, user_data="#cloud-config\nhostname: x\npackagez: [vim]\n")
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **payload)
    assert err.value.code == "invalid-seed"
    assert "user_data line 3" in str(err.value) and "'packagez'" in str(err.value)
    assert _leftovers(kvm_bed, name) == []


@pytest.mark.integration
async def test_idle_and_loaded_fingerprints_agree(kvm_bed: KvmTestBed) -> None:
    idle = await (await kvm_bed.node()).plugin.kumo_fingerprint()  # no instance directory yet
    (kvm_bed.root / "instances" / kvm_bed.name("before")).mkdir(parents=True)
    managing = await (await kvm_bed.node()).plugin.kumo_fingerprint()  # loads libvirt at startup
    assert idle.available and idle.attributes["libvirt_version"] and idle.attributes["qemu_version"]
    assert idle == managing


@pytest.mark.integration
async def test_an_idle_node_asks_libvirt_only_when_libvirtd_changes(
    kvm_bed: KvmTestBed, libvirt_proxy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The child process that speaks to libvirtd is the costly part of an idle node's probe:
    # it runs at start-up and when libvirtd goes or comes back, not at every fingerprint.
    children: list[str] = []
    ask_child = liveness.ask_child

    async def counted(uri: str) -> Any:
        children.append(uri)
        return await ask_child(uri)

    monkeypatch.setattr(liveness, "ask_child", counted)
    node = await kvm_bed.node(uri=libvirt_proxy.uri, acceleration="tcg")
    assert len(children) == 1
    for _ in range(5):
        assert (await node.plugin.kumo_fingerprint()).available
        assert (await _probe(node)).status == "ok"
    assert len(children) == 1

    libvirt_proxy.stop()
    assert not (await node.plugin.kumo_fingerprint()).available
    assert (await _probe(node)).status == "critical"
    assert len(children) == 2

    libvirt_proxy.start()  # a new socket, as a restarted libvirtd makes
    assert (await node.plugin.kumo_fingerprint()).available
    assert (await node.plugin.kumo_fingerprint()).available
    assert len(children) == 3 and children == [libvirt_proxy.uri] * 3


@pytest.mark.integration
@pytest.mark.parametrize("managing", [False, True], ids=["idle", "managing"])
async def test_libvirtd_down_then_back(
    kvm_bed: KvmTestBed, kvm_guest: Guest, libvirt_proxy: Any, managing: bool
) -> None:
    # Idle, the outage is seen by the liveness check at the next fingerprint; managing VMs,
    # by the connection closing. Either way the create loads libvirt and reconnects by itself.
    if managing:
        (kvm_bed.root / "instances" / kvm_bed.name("before")).mkdir(parents=True)
    node = await kvm_bed.node(uri=libvirt_proxy.uri)
    assert (await node.plugin.kumo_fingerprint()).available

    libvirt_proxy.stop()  # to the plugin, libvirtd just died
    fingerprint = await _fingerprint_until(node, available=False)
    assert libvirt_proxy.uri in fingerprint.reason
    name = kvm_bed.name("down")
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name))
    assert err.value.code == "unavailable" and "start libvirtd" in str(err.value)
    assert _leftovers(kvm_bed, name) == []

    assert (await _probe(node)).status == "critical"
    assert node.metric("kumo_kvm_libvirt_up") == 0.0

    libvirt_proxy.start()  # libvirtd is back: the plugin reconnects by itself
    await _fingerprint_until(node, available=True)
    assert (await _probe(node)).status == "ok"
    assert node.metric("kumo_kvm_libvirt_up") == 1.0
    result = await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, hold=True))
    assert result["state"] == "running"
    assert node.metric("kumo_instances", kind="kvm", state="running") == 1.0


@pytest.fixture
async def https_image_server(tmp_path: Path, kvm_guest: Guest) -> Any:
    """Serves the guest disk over HTTPS with a throwaway self-signed CA (``tmp_path/cert.pem``)."""
    from aiohttp import web

    from tests.harness import free_port, tls_server_context

    context = tls_server_context(tmp_path)
    app = web.Application()
    async def disk(request: web.Request) -> web.StreamResponse:
        return web.FileResponse(kvm_guest.disk)

    app.router.add_get("/disk.qcow2", disk)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
    yield f"https://127.0.0.1:{port}/disk.qcow2", tmp_path / "cert.pem"
    await runner.cleanup()


@pytest.mark.integration
async def test_image_from_https_is_verified_and_cached(
    kvm_bed: KvmTestBed, kvm_guest: Guest, https_image_server: tuple[str, Path]
) -> None:
    url, ca = https_image_server
    # Its own cache: a broken download keeps its partial file there, to be resumed.
    untrusting = await kvm_bed.node(images=ImageCache(kvm_bed.root / "untrusting-images"))
    with pytest.raises(TaskError) as err:
        await untrusting.task("kvm.create", **_payload(kvm_bed, kvm_guest, kvm_bed.name("url0"), image=url))
    assert err.value.code == "image-download" and "certificate verify failed" in str(err.value)

    node = await kvm_bed.node(images=ImageCache(kvm_bed.root / "images", ca_file=ca))
    bad = kvm_bed.name("urlbad")
    wrong = hashlib.sha256(b"something else").hexdigest()
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, bad, image=url, image_sha256=wrong))
    assert err.value.code == "image-checksum", str(err.value)
    assert _leftovers(kvm_bed, bad) == []

    good = kvm_bed.name("url")
    payload = _payload(kvm_bed, kvm_guest, good, hold=True, image=url)
    assert (await node.task("kvm.create", **payload))["state"] == "running"
    assert [p.name for p in (kvm_bed.root / "images").iterdir()] == [kvm_guest.disk_sha256]


@pytest.mark.integration
async def test_the_image_cache_never_evicts_a_vms_base_image(kvm_bed: KvmTestBed, kvm_guest: Guest) -> None:
    # Three 1.5 MiB base images in a 2 MiB cache: adding one evicts the least recently used
    # image that no VM's disk is an overlay of, including after an agent restart.
    images = []
    for i in range(3):
        image = kvm_bed.root / f"base-{i}.raw"
        image.write_bytes(bytes([i + 1]) * (3 << 19))
        images.append((image, hashlib.sha256(image.read_bytes()).hexdigest()))
    cache = kvm_bed.root / "images"

    def cached() -> set[str]:
        return {p.name for p in cache.iterdir()}

    node = await kvm_bed.node(images=ImageCache(cache, max_bytes=2 << 20))
    first, second, third = (kvm_bed.name(f"evict{i}") for i in range(3))
    await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, first, hold=True,
                                             image=str(images[0][0]), image_sha256=images[0][1]))
    await node.plugin.kumo_shutdown()
    node = await kvm_bed.node(images=ImageCache(cache, max_bytes=2 << 20))  # a restart: the first VM is adopted
    await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, second, hold=True,
                                             image=str(images[1][0]), image_sha256=images[1][1]))
    assert cached() == {images[0][1], images[1][1]}  # over the limit, but both back a VM

    await node.task("kvm.delete", name=first)
    await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, third, hold=True,
                                             image=str(images[2][0]), image_sha256=images[2][1]))
    assert cached() == {images[1][1], images[2][1]}
    assert node.state(second) == node.state(third) == "running"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("extra", "code"), [({"memory_mib": 1 << 30}, "insufficient-memory"), ({"vcpus": 4096}, "insufficient-cpu")]
)
async def test_resources_are_checked(kvm_bed: KvmTestBed, kvm_guest: Guest, extra: dict[str, int], code: str) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("big")
    with pytest.raises(TaskError) as err:
        await node.task("kvm.create", **_payload(kvm_bed, kvm_guest, name, **extra))
    assert err.value.code == code and "this node" in str(err.value)
    assert _leftovers(kvm_bed, name) == []
