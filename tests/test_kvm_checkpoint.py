"""Checkpoint and restore of VMs: the kvm kind's own save (libvirt's) driven by the checkpoint
plugin, which knows no kind.

The pre-flight's refusals are checked on XML from libvirt's ``test:///default`` driver and
on records a hostile node could send. The real thing is one small TCG guest (128 MiB, so
the save file is small) that prints a counter on its serial console: booted once for the
module and adopted by each test's fresh kvm plugin, as after an agent restart. A restored
guest must count on from where it was saved, never from 1 (a reboot).
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import re
import tarfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.sdk import TaskError
from plugins.kvm.checkpointing import _copy, parse_saved, save_blockers
from tests.harness import require
from tests.harness.guest import Guest
from tests.harness.libvirt import TEST_INSTANCE_ROOT, KvmNode, KvmTestBed, wait_for

# ---- unit: what the pre-flight refuses ---------------------------------------------------

DIRECTORY = Path("/var/lib/libvirt/images/kumo/vm1")
HOSTILE_DOMAIN = f"""<domain type='test'><name>kumo-vmckpt-preflight</name><memory unit='MiB'>128</memory>
<os><type>hvm</type></os><devices>
<disk type='file' device='disk'><source file='{DIRECTORY}/disk.qcow2'/><target dev='vda' bus='virtio'/></disk>
<disk type='file' device='cdrom'><source file='{DIRECTORY}/cidata.iso'/><target dev='hdc' bus='ide'/><readonly/></disk>
<disk type='file' device='cdrom'><target dev='hdd' bus='ide'/><readonly/></disk>
<disk type='file' device='disk'><source file='/srv/cluster.img'/><target dev='vdb' bus='virtio'/><shareable/></disk>
<disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdc' bus='virtio'/></disk>
<hostdev mode='subsystem' type='pci' managed='yes'>
  <source><address domain='0x0000' bus='0x06' slot='0x02' function='0x0'/></source></hostdev>
</devices></domain>"""


@pytest.fixture
def test_driver_xml() -> Iterator[str]:
    """HOSTILE_DOMAIN as libvirt itself writes it back, running and paused (test:///default)."""
    try:
        import libvirt
    except ImportError:
        require(False, "the libvirt Python binding (pip install -e '.[libvirt]')")
    conn = libvirt.open("test:///default")
    dom = conn.defineXML(HOSTILE_DOMAIN)
    try:
        dom.create()
        dom.suspend()  # paused by the user: a state that can be saved
        assert dom.state()[0] == libvirt.VIR_DOMAIN_PAUSED
        yield dom.XMLDesc(0)
    finally:
        dom.destroy()
        dom.undefine()
        conn.close()


def test_preflight_names_every_device_a_save_cannot_hold(test_driver_xml: str) -> None:
    found = save_blockers(test_driver_xml, "paused", False, DIRECTORY)
    assert [b.code for b in found] == ["host-device", "shared-disk", "foreign-disk"], found
    assert "bus=0x06" in found[0].message and "slot=0x02" in found[0].message
    assert "disk vdb is shareable" in found[1].message
    assert "disk vdc (/dev/sdb) is not in the VM's directory" in found[2].message
    assert all("detach it" in b.message for b in found)


def test_preflight_refuses_a_guest_paused_on_an_io_error_and_a_stopped_one() -> None:
    plain = f"<domain><devices><disk type='file' device='disk'><source file='{DIRECTORY}/disk.qcow2'/>" \
            "<target dev='vda'/></disk></devices></domain>"
    assert save_blockers(plain, "running", False, DIRECTORY) == []
    [io] = save_blockers(plain, "paused", True, DIRECTORY)
    assert io.code == "io-error" and "fix the storage and resume it" in io.message
    [stopped] = save_blockers(plain, "stopped", False, DIRECTORY)
    assert stopped.code == "not-running" and "start it first" in stopped.message


def _record(**changes: Any) -> dict[str, Any]:
    record: dict[str, Any] = {
        "spec": {"name": "vm1", "kind": "kvm", "image": "/var/cache/kumo/images/base.qcow2", "image_sha256": None,
                 "memory_mib": 128, "vcpus": 1, "options": {"kernel": "/boot/k", "cmdline": "console=ttyS0"}},
        "uuid": "0f6b2f51-4d0c-4a43-9f0e-3d5c8e0a1b2c", "machine": "pc-i440fx-7.2", "domain_type": "qemu",
        "nic": False, "seed": "cidata.iso",
    }
    for key, value in changes.items():
        if key in record:
            record[key] = value
        else:
            record["spec"] = {**record["spec"], key: value}
    return record


@pytest.mark.parametrize(("changes", "message"), [
    ({"emulator": "/tmp/evil"}, "unknown key"),  # the record names no program
    ({"xml": "<domain/>"}, "unknown key"),
    ({"kernel": "relative/vmlinuz"}, "options.kernel must be an absolute path"),
    ({"memory_mib": 8}, "memory_mib must be at least"),
    ({"uuid": "../../etc"}, "uuid '../../etc'"),
    ({"machine": "q35,accel=kvm"}, "machine type"),
    ({"seed": "../../etc/shadow"}, "seed file name"),
    ({"seed": "disk.qcow2"}, "seed file name"),
    ({"domain_type": "xen"}, "domain_type"),
])
def test_a_record_a_create_would_not_accept_is_refused(changes: dict[str, Any], message: str) -> None:
    if "kernel" in changes:
        changes = {"options": {"kernel": changes["kernel"]}}
    with pytest.raises(TaskError) as err:
        parse_saved(_record(**changes))
    assert err.value.code == "import-refused" and message in str(err.value), str(err.value)


def test_a_disk_or_seed_put_in_place_is_root_s_alone_whatever_mode_it_came_with(tmp_path: Path) -> None:
    sent = tmp_path / "disk.qcow2.copy"
    sent.write_bytes(b"guest data")
    sent.chmod(0o644)  # as a migration's source may have sent it
    stale = tmp_path / "disk.qcow2"
    stale.write_bytes(b"older and longer")
    stale.chmod(0o666)
    for target in (tmp_path / "seed.iso", stale):
        _copy(sent, target)
        assert target.stat().st_mode & 0o777 == 0o600 and target.read_bytes() == b"guest data"


def test_a_record_the_plugin_wrote_is_accepted() -> None:
    saved, spec = parse_saved(_record())
    assert spec.memory_mib == 128 and spec.options.kernel == "/boot/k" and saved.seed == "cidata.iso"


# ---- one real guest, saved and restored ---------------------------------------------------

COUNT_RE = re.compile(r"GUEST-COUNT (\d+)")


def counts(text: str) -> list[int]:
    return [int(n) for n in COUNT_RE.findall(text)]


@pytest.fixture(scope="module")
def counting_vm(libvirtd: str, kvm_guest: Guest, kvm_state_dir: Path) -> Iterator[tuple[KvmTestBed, str]]:
    """A bed whose instance directory holds one running guest that counts; (bed, its name).

    Made by a kvm plugin that is then shut down (the VM runs on, as across an agent
    restart); each test adopts it with a plugin of its own."""
    root = TEST_INSTANCE_ROOT / f"kumo-vmckpt-{uuid.uuid4().hex[:8]}"
    root.mkdir(mode=0o711)
    root.chmod(0o711)
    bed = KvmTestBed(libvirtd, root, kvm_state_dir)
    bed.prefix = f"kumo-vmckpt-{uuid.uuid4().hex[:6]}"
    name = bed.name("counter")

    async def create() -> None:
        node = await bed.node()
        try:
            await node.task("kvm.create", name=name, kind="kvm", image=str(kvm_guest.disk),
                            image_sha256=kvm_guest.disk_sha256, vcpus=1, memory_mib=128,
                            user_data="#cloud-config\n", options={
                                "kernel": str(kvm_guest.kernel), "initrd": str(kvm_guest.initrd),
                                "cmdline": f"{kvm_guest.cmdline} kumo.hold kumo.count"})
            await wait_for(lambda: len(counts(_console(bed, name))) >= 3, timeout=120)
        finally:
            await node.plugin.kumo_shutdown()

    try:
        asyncio.run(create())
        yield bed, name
    finally:
        bed.cleanup()


def _console(bed: KvmTestBed, name: str) -> str:
    return (bed.root / "instances" / name / "console.log").read_text(errors="replace")


@pytest.fixture
async def vm_node(counting_vm: tuple[KvmTestBed, str]) -> AsyncIterator[KvmNode]:
    """The counting guest's node for one test: kvm, cloudinit and checkpoint plugins."""
    bed, _ = counting_vm
    node = await bed.node(checkpoint={"keep": 1})
    try:
        yield node
    finally:
        await node.checkpoint.kumo_shutdown()
        await node.plugin.kumo_shutdown()
        bed.nodes.remove(node)


async def _counting_past(bed: KvmTestBed, name: str, after: int) -> int:
    """Wait until the console shows a count above ``after``; the last one seen."""
    return await wait_for(lambda: max(counts(_console(bed, name)), default=0) > after
                          and max(counts(_console(bed, name))), timeout=60)


@pytest.mark.integration
async def test_checkpoint_stops_the_guest_and_restore_continues_its_count(
        counting_vm: tuple[KvmTestBed, str], vm_node: KvmNode) -> None:
    bed, name = counting_vm
    assert vm_node.state(name) == "running", "the fresh plugin adopted the running guest"
    preflight = await vm_node.task("checkpoint.preflight", name=name, kind="kvm")
    assert preflight == {"ok": True, "blockers": []}
    fingerprint = await vm_node.checkpoint.kumo_fingerprint()
    assert "kvm" in fingerprint.attributes["instance_kinds"]

    dumped = await vm_node.task("checkpoint.dump", name=name, kind="kvm")
    image = Path(dumped["image"])
    assert sorted(dumped["manifest"]) == ["disk.qcow2", "memory.save", "seed.iso"]
    assert image.parent == bed.root / "checkpoints" / "kvm" / name
    assert vm_node.state(name) == "stopped"
    frozen = counts(_console(bed, name))
    await asyncio.sleep(1)
    assert counts(_console(bed, name)) == frozen, "the saved guest does not run"

    restored = await vm_node.task("checkpoint.restore", name=name, kind="kvm")
    assert restored == {"pid": None, "checkpoint": image.name, "image": str(image)}
    assert vm_node.state(name) == "running"
    await _counting_past(bed, name, frozen[-1] + 3)
    log = _console(bed, name)
    after = counts(log)[len(frozen):]
    assert after[0] == frozen[-1] + 1, f"counted {after[:3]} after {frozen[-1]}: it must go on, not start over"
    assert log.count("GUEST-BOOTED") == 1, "the guest was restored, not booted again"

    with pytest.raises(TaskError) as err:  # a running VM is not restored over
        await vm_node.task("checkpoint.restore", name=name, kind="kvm")
    assert err.value.code == "already-running"


@pytest.mark.integration
async def test_leave_running_then_restore_goes_back_to_that_point(
        counting_vm: tuple[KvmTestBed, str], vm_node: KvmNode) -> None:
    bed, name = counting_vm
    base = bed.root / "checkpoints" / "kvm" / name
    before = sorted(p.name for p in base.glob("*") if p.is_dir() and not p.is_symlink())
    seen = max(counts(_console(bed, name)))
    dumped = await vm_node.task("checkpoint.dump", name=name, kind="kvm", leave_running=True)
    at_dump = max(counts(_console(bed, name)))
    assert vm_node.state(name) == "running"
    later = await _counting_past(bed, name, at_dump + 5)

    await vm_node.task("kvm.stop", name=name, timeout=0)
    shown = len(_console(bed, name))
    await vm_node.task("checkpoint.restore", name=name, kind="kvm", checkpoint=dumped["checkpoint"])
    await wait_for(lambda: counts(_console(bed, name)[shown:]), timeout=60)
    first = counts(_console(bed, name)[shown:])[0]
    assert seen < first <= at_dump + 1 < later, f"resumed at {first}: the checkpoint was taken between {seen} and {at_dump}"

    await vm_node.checkpoint.kumo_shutdown()  # waits for the pruning
    kept = sorted(p.name for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    assert kept == [Path(dumped["image"]).name] and not set(before) & set(kept), "keep: 1 pruned the older"


# ---- the controller: which ways a VM can move ----------------------------------------------


@pytest.mark.integration
def test_show_says_which_ways_a_vm_can_move_and_why_not(controller, tmp_path: Path) -> None:
    from tests.test_controller import enroll_node, register

    plugins = {"kvm": {"available": True, "reason": "", "kinds": ["kvm"], "attributes": {}},
               "checkpoint": {"available": True, "reason": "", "kinds": [], "attributes": {"instance_kinds": ["kvm"]}}}
    source, source_cert = enroll_node(controller, tmp_path)
    other, other_cert = enroll_node(controller, tmp_path)
    register(controller, other, other_cert, plugins=plugins)

    def report(state: str, **details: Any) -> dict[str, Any]:
        register(controller, source, source_cert, plugins=plugins,
                 instances=[{"name": "vm1", "kind": "kvm", "state": state, "details": details}])
        return controller.admin("GET", "/v1/instances/vm1")["migration"]

    register(controller, source, source_cert, plugins=plugins)
    controller.admin("POST", "/v1/instances", {"name": "vm1", "kind": "kvm", "node": source, "vcpus": 1,
                                               "memory_mib": 128, "image": "/i.qcow2"})
    modes = report("running")
    assert modes["stop-and-copy"]["possible"] is True and other in modes["stop-and-copy"]["reason"]
    # Live needs both ends to publish the kind in live_kinds.
    assert modes["live"] == {"possible": False, "reason": f"cannot migrate instance vm1 live: node {source} cannot "
                                                          "move kvm instances live (its live kinds: none)"}
    live = {**plugins, "checkpoint": {**plugins["checkpoint"], "attributes": {"instance_kinds": ["kvm"],
                                                                              "live_kinds": ["kvm"]}}}
    register(controller, source, source_cert, plugins=live, instances=[{"name": "vm1", "kind": "kvm",
                                                                         "state": "running", "details": {}}])
    modes = controller.admin("GET", "/v1/instances/vm1")["migration"]
    assert modes["live"]["possible"] is False and other in modes["live"]["rejected"], modes["live"]
    assert modes["live"]["rejected"][other] == f"node {other} cannot move kvm instances live (its live kinds: none)"
    register(controller, other, other_cert, plugins=live)
    modes = controller.admin("GET", "/v1/instances/vm1")["migration"]
    assert modes["live"]["possible"] is True and other in modes["live"]["reason"], modes["live"]
    register(controller, other, other_cert, plugins=plugins)

    hostdev = {"code": "host-device", "message": "a host device is passed through (bus=0x06): detach it first"}
    modes = report("running", checkpoint_blockers=[hostdev])
    assert modes["stop-and-copy"] == {"possible": False, "reason": f"{hostdev['message']} [host-device]"}
    assert report("stopped")["stop-and-copy"]["reason"].startswith("it is stopped: only a running instance")

    register(controller, other, other_cert, plugins={"kvm": plugins["kvm"]})  # no checkpoint plugin there
    stop = report("running")["stop-and-copy"]
    assert stop["reason"].startswith("no other node can take instance vm1") and "plugin checkpoint is unavailable" in stop["reason"]
    # Each rejected destination with its own reason (the web interface lists them).
    assert list(stop["rejected"]) == [other] and stop["rejected"][other].startswith("plugin checkpoint is unavailable")


# ---- the migration stream: a cached image travels, checked ---------------------------------


def _stream(manifest: dict[str, Any], members: dict[str, bytes]) -> io.BytesIO:
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for arcname, data in {"image/kumo-manifest.json": json.dumps(manifest).encode(), **members}.items():
            info = tarfile.TarInfo(arcname)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body.seek(0)
    return body


@pytest.mark.parametrize("case", ["named", "damaged", "not named"])
def test_a_cached_image_in_the_stream_is_taken_only_as_named_and_intact(tmp_path: Path, case: str) -> None:
    from plugins.checkpoint import stream
    from plugins.checkpoint.image import MANIFEST_FORMAT

    base = b"a base image"
    digest = hashlib.sha256(base).hexdigest()
    manifest = {"format": MANIFEST_FORMAT, "files": {}, "images": [] if case == "not named" else [digest]}
    body = _stream(manifest, {f"cache/{digest}": b"another image" if case == "damaged" else base})

    def unpack() -> dict[str, Any]:
        return stream.unpack(body, tmp_path, tmp_path / "state", lambda *_: tmp_path, "vm1", [])

    if case == "named":
        assert unpack()["images"] == [digest]
        assert (tmp_path / f"{stream.CACHED}{digest}").read_bytes() == base
        return
    with pytest.raises(TaskError) as err:
        unpack()
    assert err.value.code == ("image-checksum" if case == "damaged" else "image-corrupt"), str(err.value)


def test_the_controllers_payload_wins_over_the_record_a_source_wrote() -> None:
    trusted = dict(_record()["spec"])
    # A compromised source names a host file for the destination's qemu to load into the guest.
    saved, spec = parse_saved(_record(options={"kernel": "/boot/k", "initrd": "/etc/shadow"}), trusted)
    assert spec.options.initrd is None and spec.options.kernel == "/boot/k"
    with pytest.raises(TaskError) as err:
        parse_saved(_record(memory_mib=4096), trusted)
    assert err.value.code == "import-refused" and "memory_mib differ" in str(err.value)
