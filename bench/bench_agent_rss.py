"""Idle memory of ``kumo-agent run`` (every installed plugin loaded) against its import floor.

Baseline, measured in the same run with the same interpreter: a Python that only imports
the design card's dependencies (aiohttp, pluggy, yaml, cryptography, psutil,
prometheus_client and libvirt) and sleeps. libvirt belongs in it: it is one of the
agent's dependencies, the heaviest (~12 MB with libvirt.so and what it links), and the
one an idle agent must not hold, which is what "below the floor" proves; the floor
without it is printed too, so its share is visible.

Two agents are joined to a real controller (``kumo-controller init`` + ``run`` in a
temporary directory, through tests/harness with a deployment's defaults) and left idle until they have heartbeated for a while, then their
resident set size is sampled: one on a node with no VMs (an empty kvm instance_dir; the
target, 45 MB, is for this one) and one with KVM work (an instance directory from
before, as after a restart with VMs: the kvm plugin loads libvirt at startup). Kumo's own
modules are byte-compiled first, as they are once installed.

    .venv/bin/python bench/bench_agent_rss.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.agents import start_agent  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402

TARGET_MB = 45.0
IDLE_SECONDS = 15.0
SAMPLES = 5
MB = 1024 * 1024
FLOOR_IMPORTS = "aiohttp, pluggy, yaml, cryptography, cryptography.x509, psutil, prometheus_client"


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


# What `kumo-controller init` writes and an agent.yaml leaves unset: the harness's own faster
# heartbeats and debug logging would not be an idle deployed agent.
CONTROLLER_DEFAULTS = {"heartbeat_interval": 10.0, "poll_timeout": 30.0, "log_level": "info"}


def agent_rss(ctl: ControllerProcess, work: Path, kvm_work: bool) -> tuple[float, bool]:
    """An idle agent's RSS in MB, and whether it has libvirt mapped (the kvm plugin loaded it)."""
    # The kvm plugin loads libvirt at startup only when it finds instance directories there.
    instance_dir = work / "kvm-instances"
    if kvm_work:
        (instance_dir / "vm-from-before").mkdir(parents=True)
    agent = start_agent(ctl, work, plugins={"kvm": {"instance_dir": str(instance_dir)}},
                        settings={"log_level": "info"})
    try:
        time.sleep(IDLE_SECONDS)
        assert agent.proc is not None
        rss = sample_rss(agent.proc.pid)
        libvirt = any("libvirt.so" in m.path for m in psutil.Process(agent.proc.pid).memory_maps())
        return rss, libvirt
    finally:
        agent.stop()


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kumo-bench-rss-") as tmp:
        work = Path(tmp)
        floor, floor_without_libvirt = floor_rss(libvirt=True), floor_rss(libvirt=False)
        byte_compile()
        ctl = ControllerProcess(work / "controller", CONTROLLER_DEFAULTS)
        ctl.start()
        try:
            (work / "idle").mkdir()
            (work / "vms").mkdir()
            idle, idle_libvirt = agent_rss(ctl, work / "idle", kvm_work=False)
            vms, vms_libvirt = agent_rss(ctl, work / "vms", kvm_work=True)
        finally:
            ctl.stop()
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
