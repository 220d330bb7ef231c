"""The checkpoint plugin against real CRIU: dump, restore, pre-flight blockers, damaged images,
and a missing or broken criu."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from pathlib import Path

import pytest

from agent.sdk import TaskError
from plugins.checkpoint import CheckpointPlugin
from plugins.checkpoint.criu import probe_criu
from tests.harness import read_counter
from tests.harness.criu import CriuNode

PY = "/usr/bin/python3"
# The count is rewritten in place, at a fixed width, in a file held open: its size never
# changes, so a checkpoint taken while it runs on (leave_running) restores whenever it was taken
# (CRIU refuses to restore an open file whose size changed since the dump).
COUNTER = """
import sys, time
i = 0
f = open(sys.argv[1], "w")
while True:
    i += 1
    f.seek(0)
    f.write(f"{i:012d}")
    f.flush()
    time.sleep(0.05)
"""


async def wait_for(predicate, what: str, limit: float = 10.0):
    for _ in range(int(limit / 0.02)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def start_counter(node: CriuNode, tmp_path: Path, name: str = "counter") -> tuple[int, Path]:
    counter = tmp_path / f"{name}.txt"
    created = await node.task(
        "process.create", {"name": name, "kind": "process", "options": {"command": [PY, "-c", COUNTER, str(counter)]}}
    )
    await wait_for(lambda: read_counter(counter) >= 10, "the counter to count")
    return created["details"]["pid"], counter


@pytest.mark.integration
async def test_dump_kill_restore_keeps_counting_with_the_same_pid(criu_required, criu_node, tmp_path):
    pid, counter = await start_counter(criu_node, tmp_path)
    dumped = await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process", "leave_running": False})
    image = Path(dumped["image"])
    assert (image / "kumo-manifest.json").exists()
    assert any(name.startswith("pages-") for name in dumped["manifest"])
    assert dumped["size_bytes"] == sum((image / f).stat().st_size for f in dumped["manifest"])
    assert criu_node.state("counter").state == "stopped"
    frozen = read_counter(counter)
    await asyncio.sleep(0.3)
    assert read_counter(counter) == frozen, "the dumped process was stopped"

    restored = await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert restored["pid"] == pid
    new = await wait_for(lambda: read_counter(counter) != frozen and read_counter(counter), "counting to resume")
    assert frozen < new <= frozen + 5, f"resumed at {new} after {frozen}: it must continue, not start over"
    state = criu_node.state("counter")
    assert state.state == "running" and state.details["pid"] == pid, "the process plugin adopted the restored pid"

    # A restored process is an ordinary instance again: it can be checkpointed and restored once more.
    await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process"})
    again = await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert again["pid"] == pid
    await criu_node.task("process.stop", {"name": "counter", "timeout": 5})
    assert criu_node.state("counter").state == "stopped"


@pytest.mark.integration
async def test_leave_running_dump_then_restore_that_image(criu_required, criu_node, tmp_path):
    pid, counter = await start_counter(criu_node, tmp_path)
    dumped = await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process", "leave_running": True})
    at_dump = read_counter(counter)
    assert criu_node.state("counter").state == "running"
    await wait_for(lambda: read_counter(counter) > at_dump + 3, "the counter to keep counting")
    await criu_node.task("process.stop", {"name": "counter", "timeout": 5})
    later = read_counter(counter)
    restored = await criu_node.task(
        "checkpoint.restore", {"name": "counter", "kind": "process", "checkpoint": dumped["checkpoint"]}
    )
    assert restored["pid"] == pid
    await wait_for(lambda: read_counter(counter) != later, "counting to resume")
    # Back to the state of the dump: the count restarts from the value at dump time.
    assert read_counter(counter) <= at_dump + 6 < later + 6


@pytest.mark.integration
async def test_established_tcp_connection_blocks_and_dump_leaves_it_running(criu_required, criu_node):
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    client = f"import socket, time\ns = socket.create_connection(('127.0.0.1', {port}))\nprint('connected', flush=True)\ntime.sleep(300)"
    created = await criu_node.task("process.create", {"name": "tcp", "kind": "process", "options": {"command": [PY, "-c", client]}})
    conn, _ = await asyncio.to_thread(listener.accept)
    try:
        await wait_for(lambda: "connected" in (criu_node.root / "process/instances/tcp/console.log").read_text(), "connect")
        result = await criu_node.task("checkpoint.preflight", {"name": "tcp", "kind": "process"})
        assert result["ok"] is False
        codes = [b["code"] for b in result["blockers"]]
        assert codes == ["tcp-established"]
        assert f"127.0.0.1:{port}" in result["blockers"][0]["message"]
        with pytest.raises(TaskError) as err:
            await criu_node.task("checkpoint.dump", {"name": "tcp", "kind": "process"})
        assert err.value.code == "tcp-established"
        assert "cannot be checkpointed" in str(err.value)
        assert criu_node.state("tcp").state == "running"
        assert criu_node.state("tcp").details["pid"] == created["details"]["pid"]
    finally:
        conn.close()
        listener.close()


@pytest.mark.integration
async def test_traced_process_blocks(criu_required, criu_node):
    created = await criu_node.task("process.create", {"name": "traced", "kind": "process", "options": {"command": ["/bin/sleep", "300"]}})
    pid = created["details"]["pid"]
    # A tracer of our own: PTRACE_SEIZE from a helper that then just waits.
    tracer_src = (
        "import ctypes, sys, time\n"
        "libc = ctypes.CDLL(None, use_errno=True)\n"
        f"assert libc.ptrace(0x4206, {pid}, None, None) == 0, ctypes.get_errno()\n"
        "print('seized', flush=True)\n"
        "time.sleep(300)\n"
    )
    tracer = subprocess.Popen([PY, "-c", tracer_src], stdout=subprocess.PIPE, text=True)  # noqa: S603
    try:
        assert tracer.stdout.readline().strip() == "seized"
        result = await criu_node.task("checkpoint.preflight", {"name": "traced", "kind": "process"})
        assert [b["code"] for b in result["blockers"]] == ["traced"]
        assert f"traced by pid {tracer.pid}" in result["blockers"][0]["message"]
    finally:
        tracer.kill()
        tracer.wait()
    assert (await criu_node.task("checkpoint.preflight", {"name": "traced", "kind": "process"}))["ok"] is True


@pytest.mark.integration
async def test_unix_socket_to_outside_and_odd_devices_block(criu_required, criu_node, tmp_path):
    path = tmp_path / "outside.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()
    client = (
        "import socket, time\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"s.connect({str(path)!r})\n"
        "k = open('/dev/kmsg', 'rb')\n"
        "import os; master, slave = os.openpty()\n"
        "a, b = socket.socketpair()\n"  # both ends inside: fine
        "print('ready', flush=True)\n"
        "time.sleep(300)\n"
    )
    await criu_node.task("process.create", {"name": "unix", "kind": "process", "options": {"command": [PY, "-c", client]}})
    conn, _ = await asyncio.to_thread(server.accept)
    try:
        await wait_for(lambda: "ready" in (criu_node.root / "process/instances/unix/console.log").read_text(), "ready")
        result = await criu_node.task("checkpoint.preflight", {"name": "unix", "kind": "process"})
        codes = sorted(b["code"] for b in result["blockers"])
        assert codes == ["char-device", "tty", "tty", "unix-external"], result
        assert any("/dev/kmsg" in b["message"] for b in result["blockers"])
        assert any(str(path) in b["message"] for b in result["blockers"])
    finally:
        conn.close()
        server.close()


@pytest.mark.integration
async def test_file_lock_blocks(criu_required, criu_node, tmp_path):
    locker = f"import fcntl, time\nf = open({str(tmp_path / 'lock')!r}, 'w')\nfcntl.flock(f, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(300)"
    await criu_node.task("process.create", {"name": "locker", "kind": "process", "options": {"command": [PY, "-c", locker]}})
    await wait_for(lambda: "locked" in (criu_node.root / "process/instances/locker/console.log").read_text(), "the lock")
    result = await criu_node.task("checkpoint.preflight", {"name": "locker", "kind": "process"})
    assert [b["code"] for b in result["blockers"]] == ["file-lock"]


@pytest.mark.integration
async def test_a_process_in_a_uts_namespace_of_its_own_blocks(criu_required, criu_node):
    # As systemd's ProtectHostname= does for a service inside a container: CRIU refuses the dump.
    command = ["/bin/sh", "-c", "unshare --uts /bin/sh -c 'echo started; exec sleep 300' & wait"]
    await criu_node.task("process.create", {"name": "nested", "kind": "process", "options": {"command": command}})
    await wait_for(lambda: "started" in (criu_node.root / "process/instances/nested/console.log").read_text(), "start")
    result = await criu_node.task("checkpoint.preflight", {"name": "nested", "kind": "process"})
    [blocker] = result["blockers"]
    assert blocker["code"] == "nested-namespace" and "uts namespace of their own: pid " in blocker["message"], blocker


@pytest.mark.reliability("process checkpoint", "criu dump fails")
@pytest.mark.integration
async def test_failed_dump_leaves_the_instance_running(criu_required, tmp_path):
    """criu itself fails (the image disk is full): the error is clear and the process runs on."""
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "kumo-test", str(small)])  # noqa: S603
    assert mounted.returncode == 0
    node = CriuNode(tmp_path / "state", checkpoint_config={"images_dir": str(small)})
    node.root.mkdir()
    await node.start()
    try:
        pid, counter = await start_counter(node, tmp_path)
        with pytest.raises(TaskError) as err:
            await node.task("checkpoint.dump", {"name": "counter", "kind": "process"})
        assert err.value.code == "dump-failed"
        assert "criu dump of process instance 'counter' failed" in str(err.value)
        assert "No space left on device" in str(err.value)
        assert "the instance is still running" in str(err.value)
        assert running(pid) and node.state("counter").details["pid"] == pid
        before = read_counter(counter)
        await wait_for(lambda: read_counter(counter) > before, "the counter to go on")
        assert not any(p.is_dir() for p in (small / "process" / "counter").iterdir()), "no partial image is left"
    finally:
        await node.stop()
        subprocess.run(["umount", str(small)])  # noqa: S603


@pytest.mark.integration
async def test_corrupt_or_partial_image_is_refused_and_nothing_changes(criu_required, criu_node, tmp_path):
    pid, counter = await start_counter(criu_node, tmp_path)
    dumped = await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process"})
    image = Path(dumped["image"])
    pages = next(image / f for f in dumped["manifest"] if f.startswith("pages-"))
    original = pages.read_bytes()
    with open(pages, "r+b") as f:
        f.seek(len(original) // 2)
        f.write(bytes([original[len(original) // 2] ^ 0xFF]))
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert err.value.code == "image-checksum"
    assert pages.name in str(err.value) and "restore refused" in str(err.value)
    assert criu_node.state("counter").state == "stopped"
    assert not running(pid)

    # Partial: a dump that never wrote its manifest.
    pages.write_bytes(original)
    (image / "kumo-manifest.json").rename(image / "manifest.bak")
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process", "checkpoint": image.name})
    assert err.value.code == "image-incomplete"

    # A missing image file.
    (image / "manifest.bak").rename(image / "kumo-manifest.json")
    (image / "pstree.img").unlink()
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert err.value.code == "image-corrupt" and "pstree.img" in str(err.value)
    assert criu_node.state("counter").state == "stopped"


@pytest.mark.integration
async def test_failed_restore_is_clear_and_leaves_the_instance_stopped(criu_required, criu_node, tmp_path):
    workdir = tmp_path / "work"
    workdir.mkdir()
    counter = tmp_path / "counter.txt"
    created = await criu_node.task("process.create", {"name": "counter", "kind": "process", "options": {
        "command": [PY, "-c", COUNTER, str(counter)], "cwd": str(workdir)}})
    pid = created["details"]["pid"]
    await wait_for(lambda: read_counter(counter) >= 3, "the counter")
    await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process"})

    # The process had its console log open: the manifest lists it, so its absence is named up front.
    log = criu_node.root / "process/instances/counter/console.log"
    log.rename(log.with_name("moved.log"))
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert err.value.code == "missing-files" and str(log) in str(err.value)
    log.with_name("moved.log").rename(log)

    # criu itself fails (its working directory is gone): the reason is named, the instance stays stopped.
    workdir.rename(tmp_path / "elsewhere")
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"})
    assert err.value.code == "restore-failed"
    assert "left stopped" in str(err.value) and "No such file or directory" in str(err.value), str(err.value)
    assert criu_node.state("counter").state == "stopped" and not running(pid)

    (tmp_path / "elsewhere").rename(workdir)
    assert (await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process"}))["pid"] == pid


@pytest.mark.integration
async def test_copied_image_is_verified_by_hashing(criu_required, criu_node, tmp_path):
    """An image that arrives from elsewhere (no valid local stamp) is hashed in full, then restores."""
    pid, counter = await start_counter(criu_node, tmp_path)
    dumped = await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process"})
    copy = Path(dumped["image"]).with_name("20200101T000000.000000Z-c0ffee")
    await asyncio.to_thread(subprocess.run, ["cp", "-a", dumped["image"], str(copy)], check=True)
    stamp = json.loads((copy / "kumo-verified.json").read_text())
    assert set(stamp) == set(dumped["manifest"])
    restored = await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process",
                                                           "checkpoint": copy.name})
    assert restored["pid"] == pid


@pytest.mark.integration
async def test_restore_where_the_instance_is_unknown_as_on_a_migration_target(criu_required, criu_node, tmp_path):
    """The manifest carries the create options: the process kind's checkpointer makes the instance from them."""
    pid, counter = await start_counter(criu_node, tmp_path)
    dumped = await criu_node.task("checkpoint.dump", {"name": "counter", "kind": "process"})
    # What a migration target has: the image and the console log (the restored process
    # holds it open), but no record of the instance (once the exit's record is written).
    await criu_node.process.driver.saves_done()
    (criu_node.root / "process/instances/counter/record.json").unlink()
    await criu_node.restart_process_plugin()
    assert criu_node.instances() == []
    restored = await criu_node.task("checkpoint.restore", {"name": "counter", "kind": "process",
                                                           "checkpoint": dumped["checkpoint"]})
    assert restored["pid"] == pid
    state = criu_node.state("counter")
    assert state.state == "running" and state.details["pid"] == pid
    assert state.details["options"]["command"][:2] == [PY, "-c"]
    frozen = read_counter(counter)
    await wait_for(lambda: read_counter(counter) > frozen, "counting to resume")


@pytest.mark.integration
async def test_dump_of_a_missing_or_stopped_instance(criu_required, criu_node):
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.dump", {"name": "ghost", "kind": "process"})
    assert err.value.code == "not-found"
    await criu_node.task("process.create", {"name": "idle", "kind": "process", "options": {"command": ["/bin/sleep", "300"]}})
    await criu_node.task("process.stop", {"name": "idle", "timeout": 5})
    result = await criu_node.task("checkpoint.preflight", {"name": "idle", "kind": "process"})
    assert result == {"ok": False, "blockers": [result["blockers"][0]]} and result["blockers"][0]["code"] == "not-running"


@pytest.mark.integration
async def test_fingerprint_of_a_working_criu(criu_required, criu_node):
    fp = await criu_node.checkpoint.kumo_fingerprint()
    assert fp.available, fp.reason
    assert fp.attributes["criu_version"].split(".")[:2] >= ["4", "1"]
    assert fp.attributes["check"] == "ok"
    assert set(fp.attributes["features"]) >= {"mem_dirty_track", "uffd-noncoop"}
    assert fp.attributes["pre_dump"] == fp.attributes["features"]["mem_dirty_track"]
    assert fp.attributes["instance_kinds"] == ["process"], "the kinds whose plugin supplies a checkpointer"


async def test_a_kind_without_a_checkpointer_is_refused(criu_node):
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.dump", {"name": "vm1", "kind": "kvm"})
    assert err.value.code == "unsupported-kind"
    assert "'kvm' instances cannot be checkpointed on this node (it checkpoints: process)" in str(err.value)
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.dump", {"name": "p", "kind": "process", "leave_running": "yes"})
    assert err.value.code == "bad-request"


# -- no real criu needed below: a missing or broken one ------------------------------

BROKEN_CRIU = """#!/bin/sh
case "$1" in
  --version) echo "Version: 3.17.1"; exit 0 ;;
  check)
    if [ "$2" = "--all" ]; then
      echo "Error (criu/vdso.c:381): vdso: Unexpected rt vDSO area bounds" >&2
      echo "Error (criu/vdso.c:613): vdso: Failed to fill self vdso symtable" >&2
    else
      echo "Error (criu/crtools.c:260): Could not initialize kernel features detection." >&2
    fi
    exit 1 ;;
esac
exit 1
"""


@pytest.mark.parametrize("kind", ["missing", "broken"])
async def test_missing_or_broken_criu_makes_the_plugin_unavailable(tmp_path, kind):
    criu = tmp_path / "criu"
    if kind == "broken":
        criu.write_text(BROKEN_CRIU)
        criu.chmod(0o755)
    node = CriuNode(tmp_path / "state", checkpoint_config={"criu": str(criu)})
    node.root.mkdir()
    await node.start()
    try:
        fp = await node.checkpoint.kumo_fingerprint()
        assert fp.available is False
        if kind == "missing":
            assert fp.reason.startswith(f"criu not found at '{criu}'")
        else:
            assert fp.reason.startswith(f"criu 3.17.1 ({criu}) fails on kernel {os.uname().release}: "
                                        "vdso: Unexpected rt vDSO area bounds")
        assert fp.reason.endswith("install criu >= 4.1: see scripts/deps/30-criu.sh")
        await node.task("process.create", {"name": "p", "kind": "process", "options": {"command": ["/bin/sleep", "60"]}})
        result = await node.task("checkpoint.preflight", {"name": "p", "kind": "process"})
        assert result["blockers"][0] == {"code": "criu-unavailable", "message": fp.reason}
        with pytest.raises(TaskError) as err:
            await node.task("checkpoint.dump", {"name": "p", "kind": "process"})
        assert err.value.code == "criu-unavailable"
        assert node.state("p").state == "running"
    finally:
        await node.stop()


async def test_probe_of_something_that_is_not_criu(tmp_path):
    status = await probe_criu("/bin/false")
    assert not status.usable and "is not a working criu" in status.reason


IDS = ("20260101T000000.000000Z-aaaaaa", "20260102T000000.000000Z-bbbbbb", "20260103T000000.000000Z-cccccc")


def _checkpoints(base: Path, ids=IDS) -> None:
    from plugins.checkpoint.image import MANIFEST, publish

    for checkpoint in ids:
        (base / checkpoint).mkdir(parents=True)
        (base / checkpoint / MANIFEST).write_text(json.dumps({"created_at": checkpoint[:8], "size_bytes": 7,
                                                              "kind": "process", "leave_running": False}))
        publish(base, base / checkpoint)


def test_old_checkpoints_are_pruned(tmp_path):
    from plugins.checkpoint.image import prune, publish

    _checkpoints(tmp_path)
    (tmp_path / "20260104T000000.000000Z-dddddd").mkdir()  # a dump still being written: no manifest
    assert prune(tmp_path, 2) == [IDS[0]]
    assert sorted(p.name for p in tmp_path.iterdir()) == [*IDS[1:], "20260104T000000.000000Z-dddddd", "latest"]
    assert os.readlink(tmp_path / "latest") == IDS[2]
    # Whatever the names say, the checkpoint "latest" points to is never removed.
    publish(tmp_path, tmp_path / IDS[1])
    assert prune(tmp_path, 1) == [IDS[2]]
    assert (tmp_path / IDS[1]).is_dir() and os.readlink(tmp_path / "latest") == IDS[1]


def test_listing_and_removing_checkpoints(tmp_path):
    from plugins.checkpoint.image import STAGED, listing, remove

    base = tmp_path / "process" / "p"
    assert listing(base) == []
    _checkpoints(base)
    (base / "kumo-stray").mkdir()  # not an id: never listed
    shown = listing(base)
    assert [c["id"] for c in shown] == list(reversed(IDS)), "newest first"
    assert [c["latest"] for c in shown] == [True, False, False]
    assert shown[0] == {"id": IDS[2], "created_at": "20260103", "size_bytes": 7, "kind": "process",
                        "leave_running": False, "latest": True}

    # The directory a migration staged with a checkpoint goes with it.
    staged = tmp_path / "staged"
    staged.mkdir()
    (base / IDS[2] / STAGED).write_text(json.dumps({"directory": str(staged)}))
    assert remove(base, IDS[2]) == IDS[1], "latest moves to the newest left"
    assert not staged.exists() and [c["id"] for c in listing(base)] == [IDS[1], IDS[0]]
    assert remove(base, IDS[0]) == IDS[1]
    assert remove(base, IDS[1]) is None and not (base / "latest").is_symlink()

    with pytest.raises(TaskError) as err:
        remove(base, IDS[1])
    assert err.value.code == "not-found" and IDS[1] in str(err.value)


@pytest.mark.parametrize("bad", ["../../etc", "latest", "/tmp/x", "20260101T000000.000000Z-aaaaaa/..", "",
                                 "20260101T000000Z-aaaaaa", "20260101T000000.000000Z-AAAAAA"])
def test_a_checkpoint_id_is_never_a_path(tmp_path, bad):
    from plugins.checkpoint.image import checkpoint_path, remove

    _checkpoints(tmp_path)
    for call in (lambda: checkpoint_path(tmp_path, bad), lambda: remove(tmp_path, bad)):
        with pytest.raises(TaskError) as err:
            call()
        assert err.value.code == "bad-request"
        assert "payload.checkpoint must be a checkpoint id" in str(err.value)
    assert len(list(tmp_path.iterdir())) == 4, "nothing was removed"


async def test_task_payloads_are_checked(criu_node):
    for kind, payload, expected in (
        ("checkpoint.remove", {"checkpoint": "../x"}, "payload.checkpoint must be a checkpoint id"),
        ("checkpoint.restore", {"checkpoint": "latest"}, "payload.checkpoint must be a checkpoint id"),
        ("checkpoint.prune", {"keep": 0}, "payload.keep must be an integer >= 1"),
        ("checkpoint.dump", {"keep": -1}, "payload.keep must be an integer >= 1"),
        ("checkpoint.restore", {"image": "/tmp/x"}, "unknown key"),
    ):
        with pytest.raises(TaskError) as err:
            await criu_node.task(kind, {"name": "p", "kind": "process", **payload})
        assert err.value.code == "bad-request" and expected in str(err.value), (kind, str(err.value))
    assert (await criu_node.task("checkpoint.list", {"name": "p", "kind": "process"})) == {"checkpoints": []}
    with pytest.raises(TaskError) as err:
        await criu_node.task("checkpoint.restore", {"name": "p", "kind": "process", "checkpoint": IDS[0]})
    assert err.value.code == "no-image" and IDS[0] in str(err.value)


async def test_a_start_removes_the_live_sockets_its_agent_left_and_no_others(tmp_path):
    sockets = tmp_path / "migrations"
    node = CriuNode(tmp_path / "state", checkpoint_config={"criu": str(tmp_path / "no-criu"),
                                                           "live_sockets": str(sockets)})
    records = node.root / "checkpoint" / "live-sockets"  # the plugin's state: what this agent made
    records.mkdir(parents=True)
    (records / "m-killed").touch()
    (sockets / "m-killed").mkdir(parents=True)
    (sockets / "m-killed" / "memory.sock").touch()
    (sockets / "m-another-agents").mkdir()
    await node.start()
    try:
        assert [p.name for p in sockets.iterdir()] == ["m-another-agents"]
        assert not list(records.iterdir())
        # A live task's directory, recorded while it runs, goes with its record however it ends.
        with pytest.raises(RuntimeError):
            async with node.checkpoint.live._sockets("m-0123456789abcdef") as made:
                assert made == sockets / "m-0123456789abcdef" and made.is_dir()
                assert [p.name for p in records.iterdir()] == ["m-0123456789abcdef"]
                raise RuntimeError("cut off")
        assert not made.exists() and not list(records.iterdir())
    finally:
        await node.stop()


def test_config_is_strict():
    from agent.sdk import ConfigError

    with pytest.raises(ConfigError, match="plugins.checkpoint.keep"):
        CheckpointPlugin().kumo_configure(section={"keep": 0}, source="agent.yaml: plugins.checkpoint")
    with pytest.raises(ConfigError, match="unknown key"):
        CheckpointPlugin().kumo_configure(section={"criu_path": "/x"}, source="agent.yaml: plugins.checkpoint")
