"""Instances end to end: kumoctl → the real controller → two real agents → libvirtd and liblxc.

The scheduler places by what each node reports; the kvm plugin boots a TCG guest with the
user's cloud-init seed; a container runs beside it; every failure names its cause.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.harness.libvirt import TEST_INSTANCE_ROOT

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def kumoctl(controller, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).with_name("kumoctl")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "controller.kumoctl"]
    env = {**os.environ, "KUMOCTL_CONFIG": str(controller.kumoctl_config)}
    result = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300, env=env, check=False)  # noqa: S603
    if check:
        assert result.returncode == 0, f"kumoctl {' '.join(args)}: {result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result


def show(controller, name: str) -> dict:
    return json.loads(kumoctl(controller, "instances", "show", name, "--output", "json").stdout)


def wait_state(controller, name: str, state: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance = show(controller, name)
        if instance["state"] == state:
            return instance
        time.sleep(0.5)
    raise AssertionError(f"{name} is {instance['state']}, not {state}")


@pytest.fixture
def two_nodes(controller, kumo_agent, libvirtd, lxcpath_factory):
    """Two agents with kvm, cloudinit and lxc, each with its own instance directories."""
    agents, roots = [], []
    for _ in range(2):
        root = TEST_INSTANCE_ROOT / f"kumo-e2e-{uuid.uuid4().hex[:8]}"
        root.mkdir(parents=True, mode=0o711)
        roots.append(root)
        # Under /tmp, searchable: containers are unprivileged, and their mapped root must reach it.
        lxcpath = lxcpath_factory()
        plugins = {
            "kvm": {"uri": libvirtd, "instance_dir": str(root / "instances"),
                    "acceleration": "tcg", "shutdown_timeout": 10},
            "lxc": {"lxcpath": str(lxcpath)},
        }
        # Under the qemu-readable root: the cache holds the VMs' base images.
        agents.append(kumo_agent(plugins=plugins, settings={"image_cache": {"path": str(root / "images")}}))
    yield agents
    for name in [i["name"] for i in json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout)]:
        kumoctl(controller, "instances", "delete", name, "--timeout", "60s", check=False)
    for root in roots:
        subprocess.run(["rm", "-rf", str(root)], check=False)  # noqa: S603, S607


def create_vm(controller, guest, name: str, tmp_path: Path, *extra: str, check: bool = True):
    user_data = tmp_path / f"{name}.yaml"
    user_data.write_text(f"#cloud-config {name}-marker\nruncmd:\n  - echo hello\n")
    return kumoctl(
        controller, "instances", "create", name, "--kind", "kvm", "--image", str(guest.disk),
        "--image-sha256", guest.disk_sha256, "--vcpus", "1", "--memory", "128", "--user-data", str(user_data),
        "--option", f"kernel={guest.kernel}", "--option", f"initrd={guest.initrd}",
        "--option", f"cmdline={guest.cmdline} kumo.hold", *extra, check=check,
    )


def test_vms_spread_over_nodes_and_a_container_runs_beside_them(controller, two_nodes, kvm_guest, tmp_path):
    a, b = two_nodes
    created = create_vm(controller, kvm_guest, "vm-one", tmp_path)
    assert "is on node" in created.stdout
    first = wait_state(controller, "vm-one", "running")
    create_vm(controller, kvm_guest, "vm-two", tmp_path)
    second = wait_state(controller, "vm-two", "running")
    assert {first["node"], second["node"]} == {a.node_id, b.node_id}, "the scheduler spreads by vCPU load"
    assert first["placement"]["filtered"] == {} and first["seeded"] is True

    marker, deadline = "CIDATA-USERDATA-FIRSTLINE: #cloud-config vm-one-marker", time.monotonic() + 180
    while marker not in kumoctl(controller, "instances", "console", "vm-one").stdout:
        assert time.monotonic() < deadline, "the guest never printed its seed on the serial console"
        time.sleep(2)

    kumoctl(controller, "instances", "create", "box", "--kind", "lxc", "--vcpus", "1", "--memory", "64",
            "--option", "template=busybox", "--node", a.node_id)
    listed = {i["name"]: i for i in json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout)}
    assert {n: (i["kind"], i["state"]) for n, i in listed.items()} == {
        "vm-one": ("kvm", "running"), "vm-two": ("kvm", "running"), "box": ("lxc", "running")}
    table = kumoctl(controller, "instances", "list").stdout
    assert table.splitlines()[0].split()[:4] == ["NAME", "KIND", "NODE", "STATE"]

    kumoctl(controller, "instances", "stop", "vm-one", "--timeout", "60s")
    assert show(controller, "vm-one")["state"] == "stopped"
    kumoctl(controller, "instances", "start", "vm-one")
    wait_state(controller, "vm-one", "running")
    for name in ("vm-one", "vm-two", "box"):
        kumoctl(controller, "instances", "delete", name)
    assert json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout) == []
    virsh = subprocess.run(["virsh", "list", "--all", "--name"], capture_output=True, text=True, check=True)  # noqa: S603, S607
    assert "vm-one" not in virsh.stdout and "vm-two" not in virsh.stdout


def test_placement_says_why_each_node_was_filtered(controller, two_nodes, kvm_guest, tmp_path):
    a, b = two_nodes
    kumoctl(controller, "nodes", "drain", a.node_id)
    create_vm(controller, kvm_guest, "vm-placed", tmp_path)
    placed = show(controller, "vm-placed")
    assert placed["node"] == b.node_id
    assert "drained" in placed["placement"]["filtered"][a.node_id]

    # More vCPUs than 2 CPUs × the default overcommit 4.0 allow: refused with each node's reason.
    too_big = kumoctl(controller, "instances", "create", "vm-big", "--kind", "kvm", "--image", str(kvm_guest.disk),
                      "--vcpus", "9", "--memory", "64", check=False)
    assert too_big.returncode == 1
    assert "no node can run this kvm instance" in too_big.stderr
    assert f"{a.node_id}: node is drained" in too_big.stderr and "not enough vCPUs" in too_big.stderr
    nothing = kumoctl(controller, "instances", "create", "x", "--kind", "nosuch", "--vcpus", "1", "--memory", "8", check=False)
    assert "no plugin on the node runs nosuch instances" in nothing.stderr
    kumoctl(controller, "nodes", "undrain", a.node_id)


def test_bad_user_data_fails_the_create_and_leaves_nothing(controller, two_nodes, kvm_guest, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("#cloud-config\nruncmd: [\n")
    result = kumoctl(controller, "instances", "create", "vm-bad", "--kind", "kvm", "--image", str(kvm_guest.disk),
                     "--vcpus", "1", "--memory", "128", "--user-data", str(bad), check=False)
    assert result.returncode == 1 and "line" in result.stderr, result.stderr
    assert json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout) == []
    duplicate = create_vm(controller, kvm_guest, "vm-dup", tmp_path)
    assert duplicate.returncode == 0
    again = create_vm(controller, kvm_guest, "vm-dup", tmp_path, check=False)
    assert again.returncode == 1 and "already exists" in again.stderr


def test_a_third_party_kind_is_placed_on_the_node_that_offers_it_and_driven_by_kumoctl(
        controller, kumo_agent, example_plugin):
    """tests/example_plugin, pip-installed beside the agent, is found by its entry point; the
    controller and kumoctl know nothing of the kind ``sleep`` and need not."""
    plain = kumo_agent()
    sleeper = kumo_agent(pythonpath=[example_plugin], plugins={"sleep": {"stop_timeout": 5}})
    offered = sleeper.node()["plugins"]["sleep"]
    assert (offered["available"], offered["kinds"]) == (True, ["sleep"])
    assert "sleep" not in plain.node()["plugins"]

    created = kumoctl(controller, "instances", "create", "nap", "--kind", "sleep", "--vcpus", "1",
                      "--memory", "16", "--option", "seconds=600")
    assert f"is on node {sleeper.node_id}" in created.stdout
    placed = wait_state(controller, "nap", "running", timeout=30)
    assert placed["placement"]["filtered"] == {plain.node_id: "no plugin on the node runs sleep instances"}
    pid = placed["details"]["pid"]
    assert Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[1] == b"600"
    assert "sleeping 600 s" in kumoctl(controller, "instances", "console", "nap").stdout

    kumoctl(controller, "instances", "stop", "nap")
    wait_state(controller, "nap", "stopped", timeout=30)
    assert gone(pid)
    kumoctl(controller, "instances", "start", "nap")
    pid = wait_state(controller, "nap", "running", timeout=30)["details"]["pid"]
    metrics = urllib.request.urlopen(f"http://127.0.0.1:{sleeper.metrics_port}/metrics", timeout=10).read().decode()
    assert 'kumo_instances{kind="sleep",state="running"} 1.0' in metrics

    # The agent restarts; the process runs on and the new agent adopts it.
    sleeper.restart()
    assert wait_state(controller, "nap", "running", timeout=30)["details"]["pid"] == pid
    assert "adopted 1 instance(s): sleep/nap" in sleeper.log_text()

    kumoctl(controller, "instances", "delete", "nap")
    assert json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout) == []
    assert gone(pid)


def gone(pid: int) -> bool:
    """No such process, or only its zombie (after an agent restart, not the agent's to reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
