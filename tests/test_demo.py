"""The README's first command: ``make demo`` (scripts/demo.sh) brings up a controller and two
enrolled agents (the second with a libvirtd of its own) with a VM, a process and a container,
imports the project's Debian image into the catalogue and makes a real Debian container from
it by name that cloud-init sets up; the tour's drain moves the VM (live), the process and
the busybox container to the second node, where the VM is a running domain of that node's
libvirtd, the container runs and both count on from where they were, and says why the Debian
container stays; its migration moves the process back; and ``make demo-stop`` leaves nothing
running. The script runs exactly as a newcomer's would, moved into this test's directories
and ports."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.harness import CACHE_DIR, REPO, free_port, require
from tests.harness.criu import criu_status
from tests.harness.libvirt import SYSTEM_URI, TEST_INSTANCE_ROOT
from tests.harness.lxc import run

# one_leg: `make demo` always runs on .venv's PyPI libraries with the SQLite store; what the
# demo drives is covered on Debian's libraries and PostgreSQL by the rest of the suite.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.one_leg]


def counts(console: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^(\d+) \d\d:\d\d:\d\d$", console, re.M)]


def vm_counts(console: str) -> list[int]:
    return [int(n) for n in re.findall(r"^demo-vm count (\d+)$", console, re.M)]


def remove_vms_of(vmdir: Path) -> None:
    """Destroy and undefine the system libvirtd's domains whose files are in ``vmdir``: what a
    demo that failed before its stop left there."""
    import libvirt

    conn = libvirt.open(SYSTEM_URI)
    try:
        for dom in conn.listAllDomains():
            if str(vmdir) in dom.XMLDesc(0):
                if dom.isActive():
                    dom.destroy()
                dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


@pytest.fixture
def demo(tmp_path, lxc_required, libvirtd):
    ok, why = criu_status()
    require(ok, f"a working criu >= 4.1 ({why}; scripts/deps/30-criu.sh builds one)")
    lxcpath = Path(tempfile.mkdtemp(prefix="kumo-demo-test-", dir="/tmp"))
    lxcpath.chmod(0o711)  # the demo's containers are unprivileged: their mapped root must search it
    vmdir = Path(tempfile.mkdtemp(prefix="kumo-demo-test-", dir=TEST_INSTANCE_ROOT))
    vmdir.chmod(0o711)  # qemu (libvirt-qemu) reaches the VMs' files through it
    state = tmp_path / "demo-state"
    env = {
        **os.environ,
        "KUMO_DEMO_STATE": str(state),
        "KUMO_DEMO_LISTEN": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_UI_LISTEN": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_METRICS": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_LXCPATH": str(lxcpath),
        "KUMO_DEMO_VMDIR": str(vmdir),
        "KUMO_DEMO_BIN": str(Path(sys.executable).parent),
        # The image the Debian tests build: built once per run, whoever asks first.
        "KUMO_IMAGE_CACHE": str(CACHE_DIR / "images"),
    }

    def script(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["bash", str(REPO / "scripts" / "demo.sh"), *args], env=env,  # noqa: S603, S607
                              capture_output=True, text=True, timeout=900, check=False)

    def kumoctl(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(Path(sys.executable).parent / "kumoctl"), *args],  # noqa: S603
                              env={**env, "KUMOCTL_CONFIG": str(state / "controller" / "kumoctl.yaml")},
                              capture_output=True, text=True, timeout=180, check=False)

    yield script, kumoctl, state, lxcpath, vmdir
    script("stop")
    remove_vms_of(vmdir)
    shutil.rmtree(vmdir, ignore_errors=True)
    for path in (lxcpath, Path(f"{lxcpath}-2")):
        if path.is_dir():
            for entry in path.iterdir():
                run("lxc-stop", "-P", str(path), "-n", entry.name, "-k")
                run("lxc-destroy", "-P", str(path), "-n", entry.name, "-f")
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1200)  # the first Debian test of a run builds the image (debootstrap)
def test_make_demo_runs_the_tour_and_demo_stop_cleans_up(demo):
    script, kumoctl, state, lxcpath, vmdir = demo
    started = script()
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert started.stdout.count("is ready") == 2, started.stdout
    assert "eth0 10.77.0.10/24" in started.stdout, started.stdout
    listed = kumoctl("instances", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert {i["name"]: i["state"] for i in json.loads(listed.stdout)} == {
        "demo-vm": "running", "demo-clock": "running", "demo-box": "running", "demo-debian": "running"}
    assert vm_counts(started.stdout), f"the demo shows the VM counting on its console: {started.stdout}"
    # The real cloud-init in the Debian container: its runcmd ran, its hostname and the
    # network-config's address are set (the demo reads them from outside, with lxc-attach).
    assert "cloud-init ran on demo-debian" in started.stdout, started.stdout
    assert "init systemd, hostname demo-debian" in started.stdout, started.stdout
    assert "eth0 10.77.0.20/24" in started.stdout, started.stdout
    images = json.loads(kumoctl("images", "list", "--output", "json").stdout)["images"]
    assert sorted((i["name"], i["kind"]) for i in images) == [("debian-12", "kvm"), ("debian-12", "lxc")], images
    assert re.search(r"https://127\.0\.0\.1:\d+/signin/\S+", started.stdout), "the demo prints the web interface's link"

    # The tour's drain, as the demo prints it: the VM (live), the process and the busybox
    # container move; the Debian container's systemd services are in namespaces of their own, which
    # CRIU cannot checkpoint, so it stays and the drain says why.
    node_a, node_b = (json.loads((state / agent / "join.json").read_text())["node_id"] for agent in ("agent", "agent2"))
    assert f"kumoctl nodes drain {node_a}" in started.stdout, started.stdout
    vm_before = vm_counts(kumoctl("instances", "console", "demo-vm").stdout)
    clock_before = counts(kumoctl("instances", "console", "demo-clock").stdout)
    drained = kumoctl("nodes", "drain", node_a)
    assert drained.returncode == 0, drained.stdout + drained.stderr
    for name, mode in (("demo-vm", "live"), ("demo-clock", "stop-and-copy"), ("demo-box", "stop-and-copy")):
        assert f"moved {name} to {node_b} ({mode})" in drained.stdout, drained.stdout
    assert re.search(r"demo-debian stays on .*namespace of their own", drained.stdout), drained.stdout
    where = {i["name"]: (i["node"], i["state"]) for i in json.loads(kumoctl("instances", "list", "-o", "json").stdout)}
    assert where == {"demo-vm": (node_b, "running"), "demo-clock": (node_b, "running"),
                     "demo-box": (node_b, "running"), "demo-debian": (node_a, "running")}, where
    # The VM is a running domain of the second node's libvirtd, and no longer of the first's.
    libvirt_b = f"qemu+unix:///system?socket={state / 'libvirtd2' / 'run' / 'libvirt-sock'}"
    assert run("virsh", "-c", libvirt_b, "domstate", "demo-vm").stdout.strip() == "running"
    assert "demo-vm" not in run("virsh", "-c", SYSTEM_URI, "list", "--all", "--name").stdout.split()
    assert run("lxc-info", "-P", f"{lxcpath}-2", "-n", "demo-box", "-s").stdout.split() == ["State:", "RUNNING"]
    # Both count on from where they were on the first node.
    deadline = time.monotonic() + 30
    vm_after, clock_after = [], []
    while time.monotonic() < deadline and not (len(vm_after) >= 2 and len(clock_after) >= 2):
        time.sleep(0.5)
        vm_after = vm_counts(kumoctl("instances", "console", "demo-vm").stdout)
        clock_after = counts(kumoctl("instances", "console", "demo-clock").stdout)
    assert vm_before and vm_after and vm_after[0] > vm_before[-1], f"demo-vm counted {vm_before} on A, {vm_after} on B"
    assert vm_after == list(range(vm_after[0], vm_after[0] + len(vm_after))), f"the VM's count skipped: {vm_after}"
    assert clock_before and clock_after and max(clock_after) > max(clock_before), \
        f"demo-clock does not count on on {node_b}: {clock_after}"
    assert clock_after == list(range(clock_after[0], clock_after[0] + len(clock_after))), \
        f"the count restarted or skipped: {clock_after}"

    # The tour's migration, one instance back to the undrained first node.
    undrained = kumoctl("nodes", "undrain", node_a)
    assert undrained.returncode == 0, undrained.stderr
    moved = kumoctl("instances", "migrate", "demo-clock", "--to", node_a)
    assert moved.returncode == 0 and f"now runs on node {node_a}" in moved.stdout, moved.stdout + moved.stderr
    clock = json.loads(kumoctl("instances", "show", "demo-clock", "--output", "json").stdout)["details"]["pid"]

    stopped = script("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not list(state.glob("*.pid")), "a daemon of the demo is still recorded as running"
    for where in (str(state), str(lxcpath), str(vmdir)):
        leftover = subprocess.run(["pgrep", "-af", where], capture_output=True, text=True)  # noqa: S603, S607
        assert leftover.stdout == "", f"processes of the demo still run: {leftover.stdout}"
    assert not Path(f"/proc/{clock}").exists() or "Z" in Path(f"/proc/{clock}/stat").read_text().split()[2], \
        f"demo-clock (pid {clock}) still runs"
