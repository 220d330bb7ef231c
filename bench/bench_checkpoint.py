"""Checkpoint and restore through Kumo vs raw ``criu dump``/``criu restore``, same run, same process.

For each size a Python process touches that much memory; Kumo checkpoints it with the
checkpoint plugin (pre-flight, dump, CRC-32 manifest) and restores it (manifest check,
restore, taken over by the process kind's checkpointer); the baseline runs the bare criu
command lines an operator would type on an identical process. Prints the median of a few
rounds and the ratios (target: Kumo <= 1.1x raw criu). Also prints, for information, a
restore that re-hashes the whole image (as for an image copied from another node).

    .venv/bin/python bench/bench_checkpoint.py [--rounds 5] [--sizes 256,1024]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.criu import CriuNode  # noqa: E402

PY = "/usr/bin/python3"
TOUCHER = """
import sys, time
memory = bytearray(b"\\x01") * (int(sys.argv[1]) << 20)
print("ready", flush=True)
while True:
    time.sleep(1)
"""
TARGET = 1.1


async def wait_ready(log: Path) -> None:
    while not (log.exists() and "ready" in log.read_text()):
        await asyncio.sleep(0.02)


async def kumo_round(kumo: CriuNode, mib: int, rehash: bool) -> tuple[float, float]:
    name = f"bench-{mib}"
    await kumo.task("process.create", {"name": name, "kind": "process", "options": {"command": [PY, "-c", TOUCHER, str(mib)]}})
    await wait_ready(kumo.root / "process" / "instances" / name / "console.log")
    os.sync()
    t0 = time.perf_counter()
    dumped = await kumo.task("checkpoint.dump", {"name": name, "kind": "process"})
    dump = time.perf_counter() - t0
    os.sync()
    if rehash:
        (Path(dumped["image"]) / "kumo-verified.json").unlink()
    t0 = time.perf_counter()
    await kumo.task("checkpoint.restore", {"name": name, "kind": "process"})
    restore = time.perf_counter() - t0
    await kumo.task("process.delete", {"name": name})
    return dump, restore


def raw_round(criu: str, work: Path, mib: int) -> tuple[float, float]:
    image = work / f"raw-{mib}"
    shutil.rmtree(image, ignore_errors=True)
    image.mkdir(parents=True)
    proc = subprocess.Popen([PY, "-c", TOUCHER, str(mib)], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,  # noqa: S603
                            start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    proc.stdout.close()
    os.sync()
    t0 = time.perf_counter()
    subprocess.run([criu, "dump", "-t", str(proc.pid), "-D", str(image), "-o", "dump.log"], check=True)  # noqa: S603
    dump = time.perf_counter() - t0
    proc.wait()
    os.sync()
    pidfile = image / "restore.pid"
    t0 = time.perf_counter()
    subprocess.run([criu, "restore", "-D", str(image), "-d", "-o", "restore.log", "--pidfile", str(pidfile)],  # noqa: S603
                   check=True)
    restore = time.perf_counter() - t0
    pid = int(pidfile.read_text())
    os.killpg(pid, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):  # ours (the node's reaper makes us the subreaper), unless it reaped it
        os.waitpid(pid, 0)
    shutil.rmtree(image)
    return dump, restore


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="256,1024", help="MiB of touched memory, comma-separated")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench_checkpoint: criu needs root")
    work = Path(tempfile.mkdtemp(prefix="kumo-bench-ckpt-", dir="/var/tmp"))
    try:
        kumo = CriuNode(work / "kumo", checkpoint_config={"keep": 1})
        kumo.root.mkdir()
        await kumo.start()
        fp = await kumo.checkpoint.kumo_fingerprint()
        if not fp.available:
            sys.exit(f"bench_checkpoint: {fp.reason}")
        criu = kumo.checkpoint.workspace.status.path
        assert criu is not None
        print(f"criu {kumo.checkpoint.workspace.status.version} ({criu}), kernel {os.uname().release}, "
              f"{args.rounds} rounds, median seconds; images in {work}")
        print(f"{'memory':>8} {'op':>8} {'kumo':>8} {'raw criu':>9} {'ratio':>6}  target <= {TARGET}x")
        worst = 0.0
        for mib in (int(s) for s in args.sizes.split(",")):
            results: dict[str, list[float]] = {"k-dump": [], "k-restore": [], "r-dump": [], "r-restore": []}
            for i in range(args.rounds):
                # Alternate who goes first: page-cache writeback left by one run slows the next.
                for who in ("raw", "kumo") if i % 2 else ("kumo", "raw"):
                    if who == "raw":
                        d, r = raw_round(criu, work, mib)
                    else:
                        d, r = await kumo_round(kumo, mib, rehash=False)
                    results[f"{who[0]}-dump"].append(d)
                    results[f"{who[0]}-restore"].append(r)
            _, rehashed = await kumo_round(kumo, mib, rehash=True)
            for op in ("dump", "restore"):
                k, r = statistics.median(results[f"k-{op}"]), statistics.median(results[f"r-{op}"])
                worst = max(worst, k / r)
                print(f"{mib:>5} MiB {op:>8} {k:>8.3f} {r:>9.3f} {k / r:>5.2f}x")
            r = statistics.median(results["r-restore"])
            print(f"{mib:>5} MiB {'restore*':>8} {rehashed:>8.3f} {r:>9.3f} {rehashed / r:>5.2f}x  "
                  "(*image re-hashed in full, as after a copy from another node; informational)")
        print(f"worst ratio {worst:.2f}x: {'meets' if worst <= TARGET else 'MISSES'} the target of {TARGET}x")
        await kumo.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
