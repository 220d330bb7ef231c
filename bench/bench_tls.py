"""asyncio's stock TLS layer against the controller's (controller.tls), one aiohttp app, in one run.

What each server costs per idle connection, and whether the smaller buffer slows bulk
transfers. Two servers, the same aiohttp app and the same TLS context (the controller's
certificate chain from ``kumo-controller init``, a client certificate required):

- stock: ``web.TCPSite(ssl_context=...)``, so asyncio's ``SSLProtocol`` with its 256 KiB read
  buffer per connection;
- growing: ``controller.tls.serve``, as the controller's listeners, whose buffer starts at
  4 KiB and doubles when a read fills it.

Memory: ``--connections`` mutual-TLS connections (default 2,000), each holding a request
that the server answers only when the run ends (as a long-poll does), opened by a load
generator in its own process; the server's RSS growth over the connections it holds.
Throughput: a ``--upload-mib`` upload (default 200 MiB, from memory, 1 MiB writes) to a
handler that reads it as the image and migration uploads do, the two servers alternating
over ``--rounds`` rounds so that the machine's other load falls on both alike.

Run: ``.venv/bin/python bench/bench_tls.py`` (about a minute). It prints; it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_fleet import raise_fd_limit, rss_bytes, small_tls_buffers, sockets
from bench_heartbeat import client_context, free_port, stop, tool, wait_for_port

SERVERS = ("stock", "growing")
CONNECT_RATE = 400.0  # new connections a second


def serve(kind: str, port: int, pki: Path) -> None:
    """One server: ``/poll`` answers when the process ends, ``/upload`` counts what it reads."""
    from aiohttp import web

    from controller import tls

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))

    async def poll(request: web.Request) -> web.Response:
        await asyncio.Event().wait()
        return web.json_response({})

    async def upload(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({"bytes": size})

    async def main() -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_get("/poll", poll)
        app.router.add_post("/upload", upload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        if kind == "stock":
            await web.TCPSite(runner, "127.0.0.1", port, ssl_context=context).start()
        else:
            await tls.serve(runner.server, "127.0.0.1", port, context, 30.0)  # asyncio's shutdown timeout
        await asyncio.Event().wait()

    asyncio.run(main())


def hold(port: int, pki: Path, count: int) -> None:
    """The load generator: ``count`` connections, each holding a ``/poll``, until killed. Its
    own side reads into 32 KiB buffers (bench_fleet's small_tls_buffers): the memory that
    matters is the server's."""
    import aiohttp

    small_tls_buffers()
    context = client_context(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")

    async def main() -> None:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context, limit=0),
                                         timeout=aiohttp.ClientTimeout(total=None)) as session:

            async def one(i: int) -> None:
                await asyncio.sleep(i / CONNECT_RATE)  # as a fleet's come, not all at once
                async with session.get(f"https://127.0.0.1:{port}/poll") as response:
                    await response.read()

            await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)

    asyncio.run(main())


async def upload(port: int, context: ssl.SSLContext, mib: int) -> float:
    """MiB/s of one upload of ``mib`` MiB."""
    import aiohttp

    chunk = os.urandom(1 << 20)

    async def body():
        for _ in range(mib):
            yield chunk

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=context)) as session:
        began = time.perf_counter()
        async with session.post(f"https://127.0.0.1:{port}/upload", data=body()) as response:
            answer = await response.json()
        seconds = time.perf_counter() - began
    if answer["bytes"] != mib << 20:
        sys.exit(f"bench: the server read {answer['bytes']} bytes of {mib << 20}")
    return mib / seconds


class Server:
    def __init__(self, kind: str, pki: Path, work: Path):
        self.kind, self.port = kind, free_port()
        self.log = work / f"{kind}-{self.port}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
                [sys.executable, __file__, "--serve", kind, str(self.port), str(pki)],
                stdout=out, stderr=subprocess.STDOUT)
        wait_for_port(self.port, self.proc, self.log)


def memory(kind: str, pki: Path, work: Path, count: int, timeout: float) -> tuple[float, int]:
    """KiB of RSS per connection the ``kind`` server holds, and how many it held."""
    server = Server(kind, pki, work)
    try:
        time.sleep(0.5)
        rss_before, sockets_before = rss_bytes(server.proc.pid), sockets(server.proc.pid)
        load = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
            [sys.executable, __file__, "--hold", str(server.port), str(pki), str(count)])
        try:
            deadline = time.monotonic() + timeout
            while sockets(server.proc.pid) - sockets_before < count and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)  # the last handshakes' garbage settles before the memory is read
            held = sockets(server.proc.pid) - sockets_before
            return (rss_bytes(server.proc.pid) - rss_before) / 1024 / max(1, held), held
        finally:
            load.kill()
            load.wait()
    finally:
        stop(server.proc)


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        serve(sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--hold":
        hold(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=2000, help="idle connections held (default %(default)s)")
    parser.add_argument("--upload-mib", type=int, default=200, help="MiB per upload (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="uploads per server, alternating (default %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=120.0,
                        help="seconds the connections may take to open (default %(default)s)")
    args = parser.parse_args()
    limit = raise_fd_limit(args.connections + 1024)
    if limit < args.connections + 256:
        sys.exit(f"bench: RLIMIT_NOFILE is {limit}; {args.connections} connections need more (run as root)")
    with tempfile.TemporaryDirectory(prefix="kumo-bench-tls-") as tmp:
        work = Path(tmp)
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            [tool("kumo-controller"), "init", "--dir", str(work / "ctl"), "--listen", "127.0.0.1:1",
             "--enroll-listen", "127.0.0.1:2", "--san", "127.0.0.1"], check=True, stdout=subprocess.DEVNULL)
        pki = work / "ctl" / "pki"
        held = {kind: memory(kind, pki, work, args.connections, args.connect_timeout) for kind in SERVERS}
        context = client_context(pki / "ca.crt", pki / "admin.crt", pki / "admin.key")
        rates: dict[str, list[float]] = {kind: [] for kind in SERVERS}
        for _ in range(args.rounds):
            for kind in SERVERS:
                server = Server(kind, pki, work)
                try:
                    rates[kind].append(asyncio.run(upload(server.port, context, args.upload_mib)))
                finally:
                    stop(server.proc)
    print(f"aiohttp TLS server, client certificate required, loopback, {os.cpu_count()} cores, "
          f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]}")
    print(f"  {'':<8} {'KiB/conn':>9} {'held':>6}   upload {args.upload_mib} MiB, MiB/s (median, best of {args.rounds})")
    for kind in SERVERS:
        kib, count = held[kind]
        print(f"  {kind:<8} {kib:9.1f} {count:6d}   {statistics.median(rates[kind]):7.0f} {max(rates[kind]):7.0f}"
              f"   ({', '.join(f'{r:.0f}' for r in rates[kind])})")
    stock, growing = held["stock"][0], held["growing"][0]
    print(f"growing/stock: memory per connection {growing / stock:.2f}×, upload median "
          f"{statistics.median(rates['growing']) / statistics.median(rates['stock']):.2f}×")
    return 0


if __name__ == "__main__":
    sys.exit(main())
