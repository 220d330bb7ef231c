"""The README's first command: ``make demo`` (scripts/demo.sh) brings up a controller and two
enrolled agents with a process and a container, imports the project's Debian image into the
catalogue and makes a real Debian container from it by name that cloud-init sets up, the
tour's migration moves the process to the second node where it keeps counting, and ``make demo-stop`` leaves nothing running. The
script runs exactly as a newcomer's would, moved into this test's directories and ports."""

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
from tests.harness.lxc import run

# one_leg: `make demo` always runs on .venv's PyPI libraries with the SQLite store; what the
# demo drives is covered on Debian's libraries and PostgreSQL by the rest of the suite.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.one_leg]


def counts(console: str) -> list[int]:
    return [int(m.group(1)) for m in re.finditer(r"^(\d+) \d\d:\d\d:\d\d$", console, re.M)]


@pytest.fixture
def demo(tmp_path, lxc_required):
    ok, why = criu_status()
    require(ok, f"a working criu >= 4.1 ({why}; scripts/deps/30-criu.sh builds one)")
    lxcpath = Path(tempfile.mkdtemp(prefix="kumo-demo-test-", dir="/tmp"))
    lxcpath.chmod(0o711)  # the demo's containers are unprivileged: their mapped root must search it
    state = tmp_path / "demo-state"
    env = {
        **os.environ,
        "KUMO_DEMO_STATE": str(state),
        "KUMO_DEMO_LISTEN": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_UI_LISTEN": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_METRICS": f"127.0.0.1:{free_port(2)}",
        "KUMO_DEMO_LXCPATH": str(lxcpath),
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

    yield script, kumoctl, state, lxcpath
    script("stop")
    for path in (lxcpath, Path(f"{lxcpath}-2")):
        if path.is_dir():
            for entry in path.iterdir():
                run("lxc-stop", "-P", str(path), "-n", entry.name, "-k")
                run("lxc-destroy", "-P", str(path), "-n", entry.name, "-f")
            shutil.rmtree(path, ignore_errors=True)


@pytest.mark.timeout(1200)  # the first Debian test of a run builds the image (debootstrap)
def test_make_demo_runs_the_tour_and_demo_stop_cleans_up(demo):
    script, kumoctl, state, lxcpath = demo
    started = script()
    assert started.returncode == 0, started.stdout[-3000:] + started.stderr[-3000:]
    assert started.stdout.count("is ready") == 2, started.stdout
    assert "eth0 10.77.0.10/24" in started.stdout, started.stdout
    listed = kumoctl("instances", "list", "--output", "json")
    assert listed.returncode == 0, listed.stderr
    assert {i["name"]: i["state"] for i in json.loads(listed.stdout)} == {
        "demo-clock": "running", "demo-box": "running", "demo-debian": "running"}
    # The real cloud-init in the Debian container: its runcmd ran, its hostname and the
    # network-config's address are set (the demo reads them from outside, with lxc-attach).
    assert "cloud-init ran on demo-debian" in started.stdout, started.stdout
    assert "init systemd, hostname demo-debian" in started.stdout, started.stdout
    assert "eth0 10.77.0.20/24" in started.stdout, started.stdout
    images = json.loads(kumoctl("images", "list", "--output", "json").stdout)["images"]
    assert sorted((i["name"], i["kind"]) for i in images) == [("debian-12", "kvm"), ("debian-12", "lxc")], images

    # The tour's migration, as the demo prints it.
    node_a = json.loads((state / "agent" / "join.json").read_text())["node_id"]
    node_b = re.search(r"kumoctl instances migrate demo-clock --to (n-[0-9a-f]+)", started.stdout).group(1)
    assert re.search(r"https://127\.0\.0\.1:\d+/signin/\S+", started.stdout), "the demo prints the web interface's link"
    assert node_b != node_a
    moved = kumoctl("instances", "migrate", "demo-clock", "--to", node_b)
    assert moved.returncode == 0, moved.stderr
    assert f"now runs on node {node_b}" in moved.stdout
    before = counts(kumoctl("instances", "console", "demo-clock").stdout)
    deadline = time.monotonic() + 30
    after = before
    while time.monotonic() < deadline and max(after or [0]) <= max(before or [0]) + 1:
        time.sleep(0.5)
        after = counts(kumoctl("instances", "console", "demo-clock").stdout)
    assert before and max(after) > max(before) + 1, f"demo-clock does not count on {node_b}: {after}"
    assert after == list(range(after[0], after[0] + len(after))), f"the count restarted or skipped: {after}"
    clock = json.loads(kumoctl("instances", "show", "demo-clock", "--output", "json").stdout)["details"]["pid"]
    # The tour's other migration: the privileged busybox container, with its address.
    boxed = kumoctl("instances", "migrate", "demo-box", "--to", node_b)
    assert boxed.returncode == 0 and f"now runs on node {node_b}" in boxed.stdout, boxed.stdout + boxed.stderr

    stopped = script("stop")
    assert stopped.returncode == 0, stopped.stderr
    assert not list(state.glob("*.pid")), "a daemon of the demo is still recorded as running"
    for where in (str(state), str(lxcpath)):
        leftover = subprocess.run(["pgrep", "-af", where], capture_output=True, text=True)  # noqa: S603, S607
        assert leftover.stdout == "", f"processes of the demo still run: {leftover.stdout}"
    assert not Path(f"/proc/{clock}").exists() or "Z" in Path(f"/proc/{clock}/stat").read_text().split()[2], \
        f"demo-clock (pid {clock}) still runs"
