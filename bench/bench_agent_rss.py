"""What an idle ``kumo-agent run`` (every installed plugin loaded) costs: memory and CPU.

Targets, for an agent on a node with no VMs and libvirtd running: at most 40 MB resident,
and under 0.5% of one core in all, the agent and every process it starts counted together
(the kvm plugin's libvirtd probe used to start a Python every 30 s: 0.8% of a core on its
own).

Memory baseline, measured in the same run with the same interpreter: a Python that only
imports the design card's dependencies (aiohttp, pluggy, yaml, cryptography, psutil,
prometheus_client and libvirt) and sleeps. libvirt belongs in it: it is one of the
agent's dependencies, the heaviest (~12 MB with libvirt.so and what it links), and the
one an idle agent must not hold, which is what "below the floor" proves; the floor
without it is printed too, so its share is visible. A second floor is what an idle agent
really imports besides Kumo's own modules (pluggy, yaml, psutil, prometheus_client,
importlib.metadata, argparse, ctypes, and the standard library's http.client and ssl it
talks to the controller with; not aiohttp, which only image downloads, migrations and
http probes load, nor cryptography, which only enrolment and renewal load): the agent's
RSS above it is Kumo's own share.

Two agents are joined to a real controller (``kumo-controller init`` + ``run`` in a
temporary directory, through tests/harness with a deployment's defaults): one on a node
with no VMs (an empty kvm instance_dir; the targets are for this one), left to settle, then
measured over a 90 s window (CPU from the agent's own times and its reaped children's, so a
process it starts and waits for counts however short it lived; RSS sampled at the end), and
one with KVM work (an instance directory from before, as after a restart with VMs: the kvm
plugin loads libvirt at startup), whose RSS is sampled once it has settled. Kumo's own
modules are byte-compiled first, as they are once installed. The machine's other load
shows up in the CPU figure (scheduling, cache misses), barely in the RSS one.

    .venv/bin/python bench/bench_agent_rss.py [--window SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.agents import start_agent  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402
from tests.harness.libvirt import ensure_libvirtd  # noqa: E402

TARGET_MB = 40.0
TARGET_CPU_PERCENT = 0.5
SETTLE_SECONDS = 15.0
WINDOW_SECONDS = 90.0
SAMPLES = 5
MB = 1024 * 1024
FLOOR_IMPORTS = "aiohttp, pluggy, yaml, cryptography, cryptography.x509, psutil, prometheus_client"
# What an idle agent imports besides Kumo's own modules (cryptography only enrols and renews;
# aiohttp only streams images and checkpoints; /metrics is served without aiohttp.web).
IDLE_IMPORTS = "pluggy, yaml, psutil, prometheus_client, importlib.metadata, argparse, ctypes, http.client, ssl"
# What `kumo-controller init` writes and an agent.yaml leaves unset: the harness's own faster
# heartbeats and debug logging would not be an idle deployed agent.
CONTROLLER_DEFAULTS = {"heartbeat_interval": 10.0, "poll_timeout": 30.0, "log_level": "info"}


def sample_rss(pid: int) -> float:
    """Median of a few RSS samples, in MB (a single sample can catch a transient allocation)."""
    values = []
    for _ in range(SAMPLES):
        values.append(psutil.Process(pid).memory_info().rss / MB)
        time.sleep(0.5)
    return sorted(values)[len(values) // 2]


def floor_rss(imports: str) -> float:
    code = f"import {imports}, time\nprint('ready', flush=True)\ntime.sleep(3600)\n"
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


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(the process's own CPU seconds, its reaped children's)."""
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system, times.children_user + times.children_system


@dataclasses.dataclass(frozen=True)
class Idle:
    """An idle agent's figures: CPU in percent of one core, RSS in MB."""

    own_cpu: float
    children_cpu: float
    rss: float
    libvirt: bool

    @property
    def cpu(self) -> float:
        return self.own_cpu + self.children_cpu


def idle_agent(ctl: ControllerProcess, work: Path, window: float) -> Idle:
    """The agent of a node with no VMs: its CPU share (percent of one core, own and children's)
    over ``window`` seconds, then its RSS and whether it maps libvirt."""
    agent = start_agent(ctl, work, plugins={"kvm": {"instance_dir": str(work / "kvm-instances")}},
                        settings={"log_level": "info"})
    try:
        assert agent.proc is not None
        pid = agent.proc.pid
        time.sleep(SETTLE_SECONDS)
        own0, children0 = cpu_seconds(pid)
        start = time.monotonic()
        time.sleep(window)
        own1, children1 = cpu_seconds(pid)
        elapsed = time.monotonic() - start
        return Idle(100 * (own1 - own0) / elapsed, 100 * (children1 - children0) / elapsed,
                    sample_rss(pid), maps_libvirt(pid))
    finally:
        agent.stop()


def agent_with_vms_rss(ctl: ControllerProcess, work: Path) -> tuple[float, bool]:
    """The RSS in MB of an agent whose kvm plugin found instance directories from before
    (so loaded libvirt), and whether it maps libvirt."""
    instance_dir = work / "kvm-instances"
    (instance_dir / "vm-from-before").mkdir(parents=True)
    agent = start_agent(ctl, work, plugins={"kvm": {"instance_dir": str(instance_dir)}},
                        settings={"log_level": "info"})
    try:
        assert agent.proc is not None
        time.sleep(SETTLE_SECONDS)
        return sample_rss(agent.proc.pid), maps_libvirt(agent.proc.pid)
    finally:
        agent.stop()


def maps_libvirt(pid: int) -> bool:
    return any("libvirt.so" in m.path for m in psutil.Process(pid).memory_maps())


def report(idle: Idle, vms: float, vms_libvirt: bool, floors: tuple[float, float, float],
           window: float) -> None:
    import aiohttp
    import cryptography
    import libvirt

    def loaded(mapped: bool) -> str:
        return "libvirt loaded" if mapped else "libvirt not loaded"

    floor, floor_without_libvirt, idle_floor = floors
    version = libvirt.getVersion()
    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, cryptography {cryptography.__version__}, "
          f"libvirt {version // 1000000}.{version // 1000 % 1000}.{version % 1000}; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}")
    print(f"import floor (design-card dependencies): {floor:6.1f} MB ({floor_without_libvirt:.1f} MB without libvirt)")
    print(f"kumo-agent run, idle, no VMs:            {idle.rss:6.1f} MB ({loaded(idle.libvirt)})")
    print(f"kumo-agent run, idle, with KVM work:     {vms:6.1f} MB ({loaded(vms_libvirt)})")
    print(f"ratio idle agent/floor: {idle.rss / floor:.2f}x; with KVM work: {vms / floor:.2f}x")
    print(f"what an idle agent imports, without Kumo's modules: {idle_floor:.1f} MB, so Kumo's own share is "
          f"{idle.rss - idle_floor:.1f} MB")
    print(f"CPU over {window:.0f} s, idle, no VMs: {idle.cpu:.2f}% of a core "
          f"(agent {idle.own_cpu:.2f}%, processes it started {idle.children_cpu:.2f}%)")
    rss_ok = idle.rss <= TARGET_MB and not idle.libvirt
    print(f"target: idle agent with no VMs <= {TARGET_MB:.0f} MB, libvirt not loaded -> {'OK' if rss_ok else 'OVER'}")
    print(f"target: idle agent with no VMs < {TARGET_CPU_PERCENT}% of a core in all -> "
          f"{'OK' if idle.cpu < TARGET_CPU_PERCENT else 'OVER'}")


def main(window: float) -> None:
    if ensure_libvirtd() is None:
        sys.exit("bench_agent_rss: libvirtd does not answer on qemu:///system (run `make deps`)")
    with tempfile.TemporaryDirectory(prefix="kumo-bench-rss-") as tmp:
        work = Path(tmp)
        floors = floor_rss(FLOOR_IMPORTS + ", libvirt"), floor_rss(FLOOR_IMPORTS), floor_rss(IDLE_IMPORTS)
        byte_compile()
        ctl = ControllerProcess(work / "controller", CONTROLLER_DEFAULTS)
        ctl.start()
        try:
            (work / "idle").mkdir()
            (work / "vms").mkdir()
            idle = idle_agent(ctl, work / "idle", window)
            vms, vms_libvirt = agent_with_vms_rss(ctl, work / "vms")
        finally:
            ctl.stop()
    report(idle, vms, vms_libvirt, floors, window)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--window", type=float, default=WINDOW_SECONDS, help="seconds of idle CPU measured")
    main(parser.parse_args().window)
