"""Benchmark: the lxc plugin's ``lxc.create`` (to running) against ``lxc-create`` + ``lxc-start``.

Both make the same busybox container (64 MiB and 1 CPU limits, a veth with a static
address on a bridge made for the run) in the same lxcpath. Kumo's time covers everything
its create does (checks, cloud-init seed, lxc-create, its config block and boot files,
lxc-start, reading the state back) until the task returns with the container running;
the baseline is the two commands with the same settings in their ``-f`` config. Runs
alternate and the medians are compared. Target: Kumo ≤ 1.1× the baseline.

Run: ``.venv/bin/python bench/bench_lxc.py [--runs N]`` (root, liblxc installed: ``make deps``).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from plugins.lxc.host import cgroup_layout  # noqa: E402
from tests.harness.lxc import LxcNode, lxc_missing  # noqa: E402

TARGET = 1.1


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)  # noqa: S603


def baseline_config(bridge: str, address: str) -> str:
    """The settings Kumo's create gives its container, with the limit keys this host takes."""
    layout = cgroup_layout()
    memory = ([("lxc.cgroup2.memory.max", str(64 << 20))] if layout["memory"] == "v2"
              else [("lxc.cgroup.memory.limit_in_bytes", str(64 << 20))])
    cpu = ([("lxc.cgroup2.cpu.max", "100000 100000")] if layout["cpu"] == "v2"
           else [("lxc.cgroup.cpu.cfs_period_us", "100000"), ("lxc.cgroup.cpu.cfs_quota_us", "100000")])
    return "".join(f"{key} = {value}\n" for key, value in [
        ("lxc.net.0.type", "veth"), ("lxc.net.0.link", bridge), ("lxc.net.0.flags", "up"),
        ("lxc.net.0.name", "eth0"), ("lxc.net.0.ipv4.address", address),
        ("lxc.console.path", "none"), *memory, *cpu,
    ])


async def main(runs: int) -> None:
    missing = lxc_missing()
    if missing:
        sys.exit(f"bench_lxc: missing {missing}: run `make deps` first")
    work = Path(tempfile.mkdtemp(prefix="kumo-bench-lxc-", dir="/tmp"))
    work.chmod(0o711)
    lxcpath = work / "lxc"
    lxcpath.mkdir()
    bridge, subnet = f"brb{secrets.token_hex(4)}", f"10.234.{secrets.randbelow(250) + 2}"
    run("ip", "link", "add", bridge, "type", "bridge")
    node = LxcNode(work / "state", lxcpath)
    kumo: list[float] = []
    base: list[float] = []
    try:
        run("ip", "addr", "add", f"{subnet}.1/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        await node.start()
        conf = work / "baseline.conf"
        conf.write_text(baseline_config(bridge, f"{subnet}.3/24"))
        lxc = ["-P", str(lxcpath), "-n"]
        for i in range(runs + 1):  # the first pair warms the page cache and is not counted
            payload = {"name": "bench-kumo", "kind": "lxc", "vcpus": 1, "memory_mib": 64,
                       "network": {"mode": "veth", "bridge": bridge, "address": f"{subnet}.2/24"}}
            t0 = time.perf_counter()
            result = await node.task("lxc.create", payload)
            t1 = time.perf_counter()
            assert result["state"] == "running", result
            await node.task("lxc.delete", {"name": "bench-kumo"})

            t2 = time.perf_counter()
            await asyncio.to_thread(run, "lxc-create", *lxc, "bench-base", "-t", "busybox", "-f", str(conf))
            await asyncio.to_thread(run, "lxc-start", *lxc, "bench-base")
            t3 = time.perf_counter()
            await asyncio.to_thread(run, "lxc-destroy", *lxc, "bench-base", "-f")
            if i:
                kumo.append(t1 - t0)
                base.append(t3 - t2)
    finally:
        await node.stop()
        for name in ("bench-kumo", "bench-base"):
            subprocess.run(["lxc-destroy", "-P", str(lxcpath), "-n", name, "-f"], capture_output=True)  # noqa: S603
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)  # noqa: S603
        shutil.rmtree(work, ignore_errors=True)
    k, b = statistics.median(kumo), statistics.median(base)
    ratio = k / b
    print(f"lxc create-to-running, busybox with limits and a veth, median of {runs} alternating runs:")
    print(f"  kumo lxc.create        {k * 1000:7.1f} ms  (min {min(kumo) * 1000:.1f})")
    print(f"  lxc-create + lxc-start {b * 1000:7.1f} ms  (min {min(base) * 1000:.1f})")
    print(f"  ratio {ratio:.2f}x (target <= {TARGET}x): {'OK' if ratio <= TARGET else 'ABOVE TARGET'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    asyncio.run(main(parser.parse_args().runs))
