"""Idle memory of ``kumo-agent run`` (every installed plugin loaded) against its import floor.

Baseline, measured in the same run with the same interpreter: a Python that only imports
the design card's dependencies (aiohttp, pluggy, yaml, cryptography, psutil,
prometheus_client and libvirt) and sleeps. libvirt belongs in it: it is one of the
agent's dependencies, the heaviest (~12 MB with libvirt.so and what it links), and the
one an idle agent must not hold, which is what "below the floor" proves; the floor
without it is printed too, so its share is visible.

Two agents are joined to a real controller (``kumo-controller init`` + ``run`` in a
temporary directory) and left idle until they have heartbeated for a while, then their
resident set size is sampled: one on a node with no VMs (an empty kvm instance_dir; the
target, 45 MB, is for this one) and one with KVM work (an instance directory from
before, as after a restart with VMs: the kvm plugin loads libvirt at startup). Kumo's own
modules are byte-compiled first, as they are once installed.

    .venv/bin/python bench/bench_agent_rss.py
"""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import yaml

TARGET_MB = 45.0
IDLE_SECONDS = 15.0
SAMPLES = 5
MB = 1024 * 1024
FLOOR_IMPORTS = "aiohttp, pluggy, yaml, cryptography, cryptography.x509, psutil, prometheus_client"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name: str) -> list[str]:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        sys.exit(f"{path} is missing: install kumo into this interpreter's environment (make venv)")
    return [str(path)]


def sample_rss(pid: int) -> float:
    """Median of a few RSS samples, in MB (a single sample can catch a transient allocation)."""
    values = []
    for _ in range(SAMPLES):
        values.append(psutil.Process(pid).memory_info().rss / MB)
        time.sleep(0.5)
    return sorted(values)[len(values) // 2]


def floor_rss(libvirt: bool) -> float:
    code = f"import {FLOOR_IMPORTS}{', libvirt' if libvirt else ''}, time\nprint('ready', flush=True)\ntime.sleep(3600)\n"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)  # noqa: S603
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1)
        return sample_rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def byte_compile() -> None:
    """Kumo's modules as installed: byte-compiled (dh_python3 and pip do it at install time).

    Compiled at every start instead (PYTHONDONTWRITEBYTECODE and no .pyc yet), they leave
    ~2 MB of the compiler's heap in the agent, which a deployed agent never carries; the
    dependencies of the floor are byte-compiled already.
    """
    import agent
    import plugins

    subprocess.run([sys.executable, "-m", "compileall", "-q", *agent.__path__, *plugins.__path__], check=True)  # noqa: S603


def admin_post(ctl_dir: Path, port: int, path: str, body: dict) -> dict:
    """One admin request with the certificate ``kumo-controller init`` wrote into DIR/pki."""
    pki = ctl_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(pki / "admin.crt", pki / "admin.key")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status >= 400:
        sys.exit(f"controller refused {path}: {data}")
    return data


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.2)


@contextlib.contextmanager
def controller(work: Path) -> Iterator[tuple[Path, int]]:
    """A real controller in ``work``: (its directory, its port)."""
    ctl_dir = work / "controller"
    port = free_port()
    subprocess.run(  # noqa: S603
        [*script("kumo-controller"), "init", "--dir", str(ctl_dir), "--listen", f"127.0.0.1:{port}", "--san", "127.0.0.1"],
        check=True, capture_output=True,
    )
    with (work / "controller.log").open("wb") as ctl_log:
        proc = subprocess.Popen(  # noqa: S603
            [*script("kumo-controller"), "run", "--config", str(ctl_dir / "controller.yaml")],
            stdout=ctl_log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: _port_open(port), "the controller to listen")
            yield ctl_dir, port
        finally:
            stop(proc)


def agent_rss(work: Path, ctl_dir: Path, port: int, kvm_work: bool) -> tuple[float, bool]:
    """An idle agent's RSS in MB, and whether it has libvirt mapped (the kvm plugin loaded it)."""
    join = admin_post(ctl_dir, port, "/v1/tokens", {"ttl_seconds": 600, "uses": 1})["join"]
    state = work / "agent-state"
    subprocess.run(  # noqa: S603
        [*script("kumo-agent"), "join", "--controller", f"https://127.0.0.1:{port}", "--token", join, "--state-dir", str(state)],
        check=True, capture_output=True,
    )
    # The kvm plugin loads libvirt at startup only when it finds instance directories there.
    instance_dir = work / "kvm-instances"
    if kvm_work:
        (instance_dir / "vm-from-before").mkdir(parents=True)
    config = work / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state),
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "plugins": {"kvm": {"instance_dir": str(instance_dir)}},
    }))
    log = work / "agent.log"
    with log.open("wb") as out:
        agent = subprocess.Popen([*script("kumo-agent"), "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_for(lambda: "connected as node" in log.read_text(), "the agent to register")
        time.sleep(IDLE_SECONDS)
        rss = sample_rss(agent.pid)
        libvirt = any("libvirt.so" in m.path for m in psutil.Process(agent.pid).memory_maps())
        return rss, libvirt
    finally:
        stop(agent)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kumo-bench-rss-") as tmp:
        work = Path(tmp)
        floor, floor_without_libvirt = floor_rss(libvirt=True), floor_rss(libvirt=False)
        byte_compile()
        with controller(work) as (ctl_dir, port):
            (work / "idle").mkdir()
            (work / "vms").mkdir()
            idle, idle_libvirt = agent_rss(work / "idle", ctl_dir, port, kvm_work=False)
            vms, vms_libvirt = agent_rss(work / "vms", ctl_dir, port, kvm_work=True)
    import aiohttp
    import cryptography
    import libvirt

    def loaded(mapped: bool) -> str:
        return "libvirt loaded" if mapped else "libvirt not loaded"

    version = libvirt.getVersion()
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, cryptography {cryptography.__version__}, "
          f"libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000}")
    print(f"import floor (design-card dependencies): {floor:6.1f} MB ({floor_without_libvirt:.1f} MB without libvirt)")
    print(f"kumo-agent run, idle, no VMs:            {idle:6.1f} MB ({loaded(idle_libvirt)})")
    print(f"kumo-agent run, idle, with KVM work:     {vms:6.1f} MB ({loaded(vms_libvirt)})")
    print(f"ratio idle agent/floor: {idle / floor:.2f}x; with KVM work: {vms / floor:.2f}x")
    verdict = "OK" if idle <= TARGET_MB and not idle_libvirt else "OVER"
    print(f"target: idle agent with no VMs <= {TARGET_MB:.0f} MB, libvirt not loaded -> {verdict}")


if __name__ == "__main__":
    main()
