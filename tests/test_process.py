"""The process plugin with real processes, driven through the agent's instance-driver routing:
lifecycle, console, stop escalation, adoption; and the agent core's subreaper it relies on."""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import sys

import pytest

from agent.sdk import TaskError

PY = sys.executable


async def wait_for(predicate, what: str, limit: float = 10.0):
    for _ in range(int(limit / 0.02)):
        value = predicate()
        if value:
            return value
        await asyncio.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def test_create_console_stop_start_delete(criu_node):
    script = "import time\nprint('hello from', 'kumo', flush=True)\nwhile True: time.sleep(1)"
    created = await criu_node.task(
        "process.create",
        {"name": "p1", "kind": "process", "options": {"command": [PY, "-c", script], "cwd": "/tmp", "env": {"X": "1"}}},
    )
    assert created["state"] == "running"
    pid = created["details"]["pid"]
    assert alive(pid)
    assert os.getsid(pid) == pid, "the command runs in its own session"
    log = await wait_for(lambda: (criu_node.root / "process/instances/p1/console.log").read_text(), "output")
    assert "hello from kumo" in log
    assert (await criu_node.task("process.console", {"name": "p1"}))["log"] == log

    stopped = await criu_node.task("process.stop", {"name": "p1"})
    assert stopped["state"] == "stopped" and stopped["forced"] is False
    assert stopped["details"]["exit_code"] == -15
    assert not alive(pid)

    started = await criu_node.task("process.start", {"name": "p1"})
    assert started["state"] == "running" and started["details"]["pid"] != pid
    new_pid = started["details"]["pid"]

    assert await criu_node.task("process.delete", {"name": "p1"}) == {"name": "p1", "kind": "process", "state": "deleted"}
    assert not alive(new_pid)
    assert not (criu_node.root / "process/instances/p1").exists()
    assert criu_node.instances() == []


async def test_stop_escalates_to_sigkill(criu_node):
    script = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)"
    await criu_node.task("process.create", {"name": "stubborn", "kind": "process", "options": {"command": [PY, "-c", script]}})
    await wait_for(lambda: "ready" in (criu_node.root / "process/instances/stubborn/console.log").read_text(), "ready")
    stopped = await criu_node.task("process.stop", {"name": "stubborn", "timeout": 0.3})
    assert stopped["state"] == "stopped" and stopped["forced"] is True
    assert stopped["details"]["exit_code"] == -9


async def test_exit_is_reported_without_polling_the_plugin(criu_node):
    await criu_node.task("process.create", {"name": "short", "kind": "process", "options": {"command": ["/bin/sh", "-c", "sleep 0.3; exit 3"]}})
    before = criu_node.changes
    await wait_for(lambda: criu_node.state("short").state == "stopped", "the exit")
    assert criu_node.state("short").details["exit_code"] == 3
    assert criu_node.changes > before


async def test_adoption_by_a_new_plugin_instance(criu_node):
    created = await criu_node.task(
        "process.create", {"name": "keeper", "kind": "process", "options": {"command": ["/bin/sleep", "300"]}}
    )
    pid = created["details"]["pid"]
    await criu_node.restart_process_plugin()
    state = criu_node.state("keeper")
    assert state.state == "running"
    assert state.details["pid"] == pid, "adopted, not restarted"
    assert state.details["options"]["command"] == ["/bin/sleep", "300"]
    # The adopted process is watched too: its exit is seen.
    await criu_node.task("process.stop", {"name": "keeper", "timeout": 5})
    assert not alive(pid)
    assert criu_node.state("keeper").state == "stopped"


async def test_a_recycled_pid_is_not_adopted(criu_node):
    created = await criu_node.task(
        "process.create", {"name": "gone", "kind": "process", "options": {"command": ["/bin/sleep", "300"]}}
    )
    record_path = criu_node.root / "process/instances/gone/record.json"
    await criu_node.task("process.stop", {"name": "gone", "timeout": 5})
    # Pretend the record still names a pid, now used by another process (this test runner).
    record = json.loads(record_path.read_text())
    record.update(pid=os.getpid(), start_time=created["details"]["start_time"])
    record_path.write_text(json.dumps(record))
    await criu_node.restart_process_plugin()
    state = criu_node.state("gone")
    assert state.state == "stopped" and state.details["pid"] is None


async def test_delete_removes_what_a_create_cut_off_by_a_crash_left(criu_node):
    """A directory without a record (made just before the spawn) and a record whose process is
    gone: what the agent's clean-up of an interrupted create hands to delete."""
    (criu_node.root / "process/instances/half").mkdir(parents=True)
    await criu_node.task("process.delete", {"name": "half"})
    assert not (criu_node.root / "process/instances/half").exists()
    await criu_node.task("process.create", {"name": "dead", "kind": "process", "options": {"command": ["/bin/true"]}})
    await criu_node.restart_process_plugin()
    await criu_node.task("process.delete", {"name": "dead"})
    assert not (criu_node.root / "process/instances/dead").exists() and criu_node.instances() == []


@pytest.mark.parametrize(
    ("options", "code"),
    [
        ({"command": "sleep 10"}, "bad-request"),
        ({"command": []}, "bad-request"),
        ({"command": ["sleep"], "shell": True}, "bad-request"),
        ({"command": ["/nonexistent/program"]}, "bad-command"),
        ({"command": ["/bin/true"], "cwd": "/nonexistent"}, "bad-command"),
    ],
)
async def test_bad_create_leaves_nothing(criu_node, options, code):
    with pytest.raises(TaskError) as err:
        await criu_node.task("process.create", {"name": "bad", "kind": "process", "options": options})
    assert err.value.code == code
    assert not (criu_node.root / "process/instances/bad").exists()
    assert criu_node.instances() == []


async def test_unknown_instance_and_duplicates(criu_node):
    with pytest.raises(TaskError, match="no process instance named 'nope'"):
        await criu_node.task("process.stop", {"name": "nope"})
    await criu_node.task("process.create", {"name": "twice", "kind": "process", "options": {"command": ["/bin/sleep", "60"]}})
    with pytest.raises(TaskError) as err:
        await criu_node.task("process.create", {"name": "twice", "kind": "process", "options": {"command": ["/bin/true"]}})
    assert err.value.code == "exists"
    with pytest.raises(TaskError, match="payload.name"):
        await criu_node.task("process.create", {"name": "../x", "kind": "process", "options": {"command": ["/bin/true"]}})


async def test_the_agent_is_a_subreaper_and_reaps_orphans(criu_node):
    assert criu_node.reaper.active is True
    # A double fork: the grandchild is orphaned to us (subreaper) and must not stay a zombie.
    proc = await asyncio.create_subprocess_exec("/bin/sh", "-c", "/bin/sleep 0.2 & echo $!", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    orphan = int(out)
    await wait_for(lambda: not os.path.exists(f"/proc/{orphan}"), "the orphan to be reaped", limit=5)
    # Once the reaper stops, this process is an ordinary parent again.
    await criu_node.reaper.stop()
    assert criu_node.reaper.active is False
    libc = ctypes.CDLL(None, use_errno=True)
    flag = ctypes.c_int(-1)
    assert libc.prctl(37, ctypes.byref(flag), 0, 0, 0) == 0  # PR_GET_CHILD_SUBREAPER
    assert flag.value == 0
