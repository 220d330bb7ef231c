"""Nodes pulling a catalogue image against a raw file copy over the same TLS, same run.

A real controller on this machine holds an imported image (a raw disk of ``--size`` MiB).
Enrolled nodes pull it the way an agent does, each in its own process: the agent's
``ImageCache`` over the node's mutual TLS from ``GET /v1/nodes/ID/images/SHA256``, written
to the node's cache, hashed, fsynced and renamed into place. The baseline serves the very
same file with a bare aiohttp ``FileResponse`` behind the same certificates and copies it to
disk in as many processes, without the catalogue lookup and without the hash: the fastest
copy this TLS allows. Printed for one node and for ``--nodes`` at once: MB/s per node and in
all, the ratio (target: Kumo >= 0.8x with one node), the controller's CPU seconds against the
wall time (a controller near one core busy is CPU-bound; otherwise the link or the disk is
the limit, and with every "node" on this machine the readers' CPU is too), and its resident
memory before and at the peak of the pulls (it must not grow with the image's size).

    .venv/bin/python bench/bench_images.py [--size 1024] [--nodes 10]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import free_port  # noqa: E402
from tests.harness.agents import start_agent  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402

TARGET = 0.8
MB = 1e6
CHUNK = 1 << 20
NAME = "bench:1"


# ---- what each "node" process does -------------------------------------------------------


async def pull(url: str, state_dir: Path, sha256: str, into: Path, baseline: bool) -> None:
    from agent.sdk import ImageCache
    from agent.settings import load_identity

    identity = load_identity(state_dir)
    tls = identity.client_tls_context()
    if baseline:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.get(f"{url}/image", ssl=tls) as answer:
            with (into / "copy").open("wb") as out:
                async for chunk in answer.content.iter_chunked(CHUNK):
                    out.write(chunk)
        return
    cache = ImageCache(into)
    cache.pull_from(lambda: (url, f"/v1/nodes/{identity.node_id}", tls))
    await cache.get(f"catalogue:{NAME}", sha256)


def serve_baseline(port: int, pki: Path, image: Path) -> None:
    """The raw copy's server: the same file, the same certificates, nothing else."""
    from aiohttp import web

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(pki / "server.crt", pki / "server.key")
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cafile=str(pki / "ca.crt"))

    async def send(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(image, chunk_size=CHUNK)

    app = web.Application()
    app.router.add_get("/image", send)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context, print=None)


# ---- the driver --------------------------------------------------------------------------


def make_disk(path: Path, mib: int) -> str:
    """A raw disk (boot signature, whole sectors) of incompressible bytes; its sha256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        for index in range(mib):
            block = bytearray(os.urandom(CHUNK))
            if index == 0:
                block[510:512] = b"\x55\xaa"
            f.write(block)
            digest.update(block)
    return digest.hexdigest()


def kumoctl(ctl: ControllerProcess, *args: str) -> None:
    env = {**os.environ, "KUMOCTL_CONFIG": str(ctl.kumoctl_config)}
    result = subprocess.run([sys.executable, "-m", "controller.kumoctl", *args], env=env,  # noqa: S603
                            capture_output=True, text=True, check=False)
    if result.returncode:
        sys.exit(f"bench_images: kumoctl {' '.join(args)}: {result.stderr.strip()}")


def run_pulls(url: str, agents: list, sha256: str, work: Path, baseline: bool,
              server: psutil.Process) -> dict[str, float]:
    """Every agent pulls at once, each in its own process: wall seconds, the server's CPU
    seconds and its peak resident memory meanwhile."""
    dirs = [Path(tempfile.mkdtemp(prefix="pull-", dir=work)) for _ in agents]
    psutil.cpu_percent(interval=None)
    cpu_before = sum(server.cpu_times()[:2])
    peak = [server.memory_info().rss]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            peak[0] = max(peak[0], server.memory_info().rss)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--pull", url, str(agent.state_dir), sha256,  # noqa: S603
                               str(into), "baseline" if baseline else "kumo"])
             for agent, into in zip(agents, dirs, strict=True)]
    codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - started
    machine_busy = psutil.cpu_percent(interval=None) / 100
    done.set()
    sampler.join()
    if any(codes):
        sys.exit(f"bench_images: a {'baseline' if baseline else 'Kumo'} pull failed (exit codes {codes})")
    for into in dirs:
        shutil.rmtree(into)
    return {"wall": wall, "cpu": sum(server.cpu_times()[:2]) - cpu_before, "peak_rss": peak[0],
            "machine_busy": machine_busy}


def main() -> int:
    if len(sys.argv) == 7 and sys.argv[1] == "--pull":
        _, _, url, state_dir, sha256, into, mode = sys.argv
        asyncio.run(pull(url, Path(state_dir), sha256, Path(into), mode == "baseline"))
        return 0
    if len(sys.argv) == 5 and sys.argv[1] == "--serve":
        serve_baseline(int(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=1024, help="MiB of the image (default 1024)")
    parser.add_argument("--nodes", type=int, default=10, help="nodes pulling at once (default 10)")
    args = parser.parse_args()
    verdict = True
    with tempfile.TemporaryDirectory(prefix="kumo-bench-images-") as tmp:
        work = Path(tmp)
        ctl = ControllerProcess(work / "controller", {"log_level": "info", "images_quota_bytes": None})
        ctl.start()
        baseline_server = None
        try:
            image = work / "disk.raw"
            sha256 = make_disk(image, args.size)
            kumoctl(ctl, "images", "import", str(image), "--name", "bench", "--version", "1", "--kind", "kvm")
            agents = []
            for index in range(args.nodes):
                (work / f"node{index}").mkdir()
                agents.append(start_agent(ctl, work / f"node{index}", start=False))
            port = free_port()
            baseline_server = subprocess.Popen([sys.executable, __file__, "--serve", str(port),  # noqa: S603
                                                str(ctl.pki), str(ctl.dir / "images/blobs" / sha256)])
            time.sleep(2)
            controller = psutil.Process(ctl.proc.pid)  # type: ignore[union-attr]
            rss_idle = controller.memory_info().rss
            size_mb = args.size * CHUNK / MB
            print(f"image {args.size} MiB; controller RSS idle {rss_idle / CHUNK:.0f} MiB")
            print(f"{'nodes':>5} {'Kumo s':>7} {'MB/s/node':>10} {'raw s':>6} {'MB/s/node':>10} {'ratio':>6} "
                  f"{'ctl CPU/wall':>12} {'ctl RSS peak MiB':>16}")
            for count in sorted({1, args.nodes}):
                raw = run_pulls(f"https://127.0.0.1:{port}", agents[:count], sha256, work, True,
                                psutil.Process(baseline_server.pid))
                kumo = run_pulls(ctl.url, agents[:count], sha256, work, False, controller)
                ratio = raw["wall"] / kumo["wall"]
                print(f"{count:>5} {kumo['wall']:>7.2f} {size_mb / kumo['wall']:>10.0f} {raw['wall']:>6.2f} "
                      f"{size_mb / raw['wall']:>10.0f} {ratio:>5.2f}x {kumo['cpu'] / kumo['wall']:>12.2f} "
                      f"{kumo['peak_rss'] / CHUNK:>16.0f}")
                if count == 1 and ratio < TARGET:
                    verdict = False
                if count > 1:
                    busy, machine = kumo["cpu"] / kumo["wall"], kumo["machine_busy"]
                    if busy > 0.85:
                        limit = f"the controller's CPU (its event loop {busy:.0%} of a core)"
                    elif machine > 0.85:
                        limit = (f"this machine's CPU ({machine:.0%} busy, the controller {busy:.0%} of a core): "
                                 "every node's TLS, hash and write run here too, not the controller's per request")
                    else:
                        limit = (f"neither CPU (controller {busy:.0%} of a core, machine {machine:.0%}): the "
                                 "nodes' disk writes and fsyncs (the blob is read from the page cache)")
                    print(f"{count} nodes at once: the limit is {limit}")
                grown = (kumo["peak_rss"] - rss_idle) / CHUNK
                print(f"controller RSS grew {grown:.0f} MiB while {count} node(s) pulled "
                      f"{count * args.size} MiB in all")
        finally:
            if baseline_server is not None:
                baseline_server.terminate()
                baseline_server.wait()
            ctl.stop()
    print(f"one node: {'meets' if verdict else 'MISSES'} the target of {TARGET}x the raw copy")
    return 0 if verdict else 1


if __name__ == "__main__":
    sys.exit(main())
