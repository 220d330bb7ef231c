"""Heartbeat load on the controller against a bare aiohttp TLS endpoint, in one run.

Target (the design's fleet size): 10,000 agents heartbeating every 10 s, i.e. 1,000
heartbeats/s, answered with p99 < 100 ms on this 2-core machine, at no less than 0.7× the
throughput of a bare aiohttp endpoint with the same TLS settings.

What runs:

1. A real controller: ``kumo-controller init`` then ``kumo-controller run`` (a subprocess),
   loopback only. ``--certs`` nodes (default 200) enroll through ``POST /v1/enroll`` with
   their own keys and CSRs and register, exactly as agents do.
2. A driver in a separate process (so it does not share the controller's core) opens one
   mutual-TLS keep-alive connection per node certificate and sends heartbeats:
   - at the target rate, open loop: request *i* is due at ``start + i / rate``, latency is
     measured from that due time (so a slow server cannot hide its queue by slowing the
     client down), round-robin over the connections;
   - then flat out (each connection sends its next heartbeat as soon as the last answered)
     to find the throughput ceiling.
3. The same driver, same certificates and same phases against a bare aiohttp server (a
   subprocess too) that serves the controller's own certificate chain, requires a client
   certificate from the same CA, and answers ``{"ok": true}``.

Why a few hundred certificates stand in for 10,000 agents: what a heartbeat costs the
controller (TLS record decryption, identity check of the peer certificate, JSON, the store
write) is the same whichever node sends it, and agents hold keep-alive connections, so the
handshakes are not in the steady-state load. 200 connections each carrying 5 heartbeats/s
put the same request rate on the controller as 10,000 connections each carrying 0.1/s;
what it does not reproduce is the memory of 10,000 idle sockets and their store rows.

Run: ``.venv/bin/python bench/bench_heartbeat.py`` (about a minute; ``--help`` for knobs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_RATE = 1000.0
TARGET_P99_MS = 100.0
TARGET_RATIO = 0.7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool(name: str) -> str:
    """A console script of this venv (the bench runs as .venv/bin/python bench/...)."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if not found:
        sys.exit(f"bench: {name} not found beside {sys.executable} or on PATH: run `make venv`")
    return found


def wait_for_port(port: int, proc: subprocess.Popen, log: Path, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench: server exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(
        f"bench: nothing listens on 127.0.0.1:{port} after {timeout:g} s:\n{log.read_text()[-2000:]}"
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- setting up the fleet ---------------------------------------------------------------


def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert), str(key))
    return context


async def enroll_fleet(pki: Path, api: str, count: int, out: Path) -> list[dict[str, str]]:
    """Enroll and register ``count`` nodes as agents do; return their credential paths."""
    import aiohttp
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    ca = pki / "ca.crt"
    admin = client_context(ca, pki / "admin.crt", pki / "admin.key")
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{api}/v1/tokens", json={"ttl_seconds": 600, "uses": count}, ssl=admin
        ) as r:
            answer = await r.json()
            if r.status >= 300:
                sys.exit(f"bench: creating a token: {answer}")
        _, enroll_port, token, _ = answer["join"].split(":")
        enroll_url = f"https://127.0.0.1:{enroll_port}/v1/enroll"
        verify_only = ssl.create_default_context(cafile=str(ca))
        limit = asyncio.Semaphore(16)

        async def one(i: int) -> dict[str, str]:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = (
                x509.CertificateSigningRequestBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{i}")]))
                .sign(key, hashes.SHA256())
            )
            body = {
                "token": token,
                "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
                "hostname": f"bench-{i}",
            }
            async with limit, session.post(enroll_url, json=body, ssl=verify_only) as r:
                answer = await r.json()
                if r.status >= 300:
                    sys.exit(f"bench: enroll: {answer}")
            node_id = answer["node_id"]
            key_path, cert_path = out / f"{node_id}.key", out / f"{node_id}.crt"
            key_path.write_bytes(
                key.private_bytes(
                    serialization.Encoding.PEM,
                    serialization.PrivateFormat.PKCS8,
                    serialization.NoEncryption(),
                )
            )
            cert_path.write_text(answer["certificate"])
            node = client_context(ca, cert_path, key_path)
            register = {
                "hostname": f"bench-{i}",
                "agent_version": "bench",
                "facts": {"cpus": 2, "memory_bytes": 8 << 30, "memory_available_bytes": 6 << 30},
                "plugins": {},
                "metrics_url": None,
                "instances": [],
            }
            async with (
                limit,
                session.post(f"{api}/v1/nodes/{node_id}/register", json=register, ssl=node) as r,
            ):
                if r.status >= 300:
                    sys.exit(f"bench: register: {await r.text()}")
            return {"id": node_id, "key": str(key_path), "cert": str(cert_path), "ca": str(ca)}

        return await asyncio.gather(*(one(i) for i in range(count)))


# --- the bare endpoint ------------------------------------------------------------------


def serve_bare(port: int, pki: Path) -> None:
    """The baseline: aiohttp, same certificate chain and client-certificate rule, no work."""
    from aiohttp import web

    chain = pki / "bare-chain.pem"
    server_pem = (pki / "server.crt").read_text()
    if server_pem.count("BEGIN CERTIFICATE") == 1:
        server_pem += (pki / "ca.crt").read_text()
    chain.write_text(server_pem)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(chain), str(pki / "server.key"))

    async def heartbeat(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/v1/nodes/{id}/heartbeat", heartbeat)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=context, print=None, access_log=None)


# --- the driver (its own process) -------------------------------------------------------

HEARTBEAT = {
    "instances": [
        {
            "name": f"vm-{i}",
            "kind": "kvm",
            "state": "running",
            "details": {"vcpus": 2, "memory_mib": 1024},
        }
        for i in range(3)
    ]
}


def percentile(sorted_values: list[float], fraction: float) -> float:
    if not sorted_values:
        return math.nan
    return sorted_values[max(0, math.ceil(fraction * len(sorted_values)) - 1)]


def summary(latencies: list[float], errors: int, elapsed: float) -> dict[str, Any]:
    latencies.sort()
    return {
        "ok": len(latencies),
        "errors": errors,
        "rate": len(latencies) / elapsed,
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "max_ms": (latencies[-1] if latencies else math.nan) * 1000,
    }


async def drive(
    fleet: list[dict[str, str]], api: str, rate: float, duration: float
) -> dict[str, Any]:
    import aiohttp

    loop = asyncio.get_running_loop()
    sessions = []
    for node in fleet:
        context = client_context(Path(node["ca"]), Path(node["cert"]), Path(node["key"]))
        connector = aiohttp.TCPConnector(ssl=context, limit=1)
        sessions.append(
            (aiohttp.ClientSession(connector=connector), f"{api}/v1/nodes/{node['id']}/heartbeat")
        )
    errors: list[str] = []

    async def beat(i: int) -> bool:
        session, url = sessions[i % len(sessions)]
        try:
            async with session.post(url, json=HEARTBEAT) as response:
                await response.read()
                if response.status == 200:
                    return True
                errors.append(f"HTTP {response.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            errors.append(repr(exc))
        return False

    try:
        # Warm-up: every connection handshakes once, outside the measurement.
        await asyncio.gather(*(beat(i) for i in range(len(sessions))))
        errors.clear()

        latencies: list[float] = []

        async def due(i: int, at: float) -> None:
            await asyncio.sleep(at - loop.time())
            if await beat(i):
                latencies.append(loop.time() - at)

        start = loop.time() + 0.1
        total = int(rate * duration)
        await asyncio.gather(*(due(i, start + i / rate) for i in range(total)))
        paced = summary(latencies, len(errors), loop.time() - start)
        errors.clear()

        flat: list[float] = []
        deadline = loop.time() + duration

        async def worker(i: int) -> None:
            while loop.time() < deadline:
                sent = loop.time()
                if await beat(i):
                    flat.append(loop.time() - sent)

        start = loop.time()
        await asyncio.gather(*(worker(i) for i in range(len(sessions))))
        ceiling = summary(flat, len(errors), loop.time() - start)
        ceiling["first_error"] = errors[0] if errors else None
        return {"paced": paced, "ceiling": ceiling}
    finally:
        for session, _ in sessions:
            await session.close()


def run_driver(fleet_file: Path, api: str, rate: float, duration: float) -> dict[str, Any]:
    """Start the driver as a separate process and read its JSON result."""
    result = subprocess.run(  # noqa: S603 - an argv list, never a shell
        [sys.executable, __file__, "--drive", str(fleet_file), api, str(rate), str(duration)],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        sys.exit(f"bench: driver failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


# --- orchestration ----------------------------------------------------------------------


def measure(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    ctl_dir, fleet_dir = work / "controller", work / "fleet"
    fleet_dir.mkdir()
    port = free_port()
    subprocess.run(  # noqa: S603 - an argv list, never a shell
        [
            tool("kumo-controller"),
            "init",
            "--dir",
            str(ctl_dir),
            "--listen",
            f"127.0.0.1:{port}",
            "--san",
            "127.0.0.1",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    log = work / "controller.log"
    with log.open("wb") as out:
        controller = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
            [tool("kumo-controller"), "run", "--config", str(ctl_dir / "controller.yaml")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    api = f"https://127.0.0.1:{port}"
    try:
        wait_for_port(port, controller, log)
        print(f"enrolling {args.certs} nodes...", file=sys.stderr)
        fleet = asyncio.run(enroll_fleet(ctl_dir / "pki", api, args.certs, fleet_dir))
        fleet_file = work / "fleet.json"
        fleet_file.write_text(json.dumps(fleet))
        print(f"driving the controller for 2 × {args.duration:g} s...", file=sys.stderr)
        kumo = run_driver(fleet_file, api, args.rate, args.duration)
    finally:
        stop(controller)

    bare_port = free_port()
    bare_log = work / "bare.log"
    with bare_log.open("wb") as out:
        bare = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
            [sys.executable, __file__, "--bare", str(bare_port), str(ctl_dir / "pki")],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(bare_port, bare, bare_log)
        print(f"driving the bare endpoint for 2 × {args.duration:g} s...", file=sys.stderr)
        baseline = run_driver(
            fleet_file, f"https://127.0.0.1:{bare_port}", args.rate, args.duration
        )
    finally:
        stop(bare)
    return kumo, baseline


def report(args: argparse.Namespace, kumo: dict[str, Any], baseline: dict[str, Any]) -> bool:
    def row(name: str, phase: dict[str, Any]) -> str:
        return (
            f"  {name:<10} {phase['rate']:8.0f}/s  p50 {phase['p50_ms']:6.1f} ms  "
            f"p99 {phase['p99_ms']:6.1f} ms  max {phase['max_ms']:6.1f} ms  errors {phase['errors']}"
        )

    print(
        f"heartbeats over mTLS keep-alive, {args.certs} connections, loopback, {os.cpu_count()} cores"
    )
    print(
        f"paced at {args.rate:g}/s for {args.duration:g} s (latency from each request's due time):"
    )
    print(row("kumo", kumo["paced"]))
    print(row("bare", baseline["paced"]))
    print(f"flat out for {args.duration:g} s (throughput ceiling):")
    print(row("kumo", kumo["ceiling"]))
    print(row("bare", baseline["ceiling"]))
    ratio = kumo["ceiling"]["rate"] / baseline["ceiling"]["rate"]
    paced = kumo["paced"]
    kept_up = paced["errors"] == 0 and paced["rate"] >= 0.98 * args.rate
    print(f"ratio kumo/bare throughput: {ratio:.2f} (target >= {TARGET_RATIO})")
    print(
        f"target {TARGET_RATE:g}/s with p99 < {TARGET_P99_MS:g} ms: kumo "
        f"{'kept up' if kept_up else 'did NOT keep up'}, p99 {paced['p99_ms']:.1f} ms"
    )
    if kumo["ceiling"].get("first_error"):
        print(f"first kumo error: {kumo['ceiling']['first_error']}")
    return kept_up and paced["p99_ms"] < TARGET_P99_MS and ratio >= TARGET_RATIO


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        serve_bare(int(sys.argv[2]), Path(sys.argv[3]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--drive":
        fleet = json.loads(Path(sys.argv[2]).read_text())
        print(
            json.dumps(
                asyncio.run(drive(fleet, sys.argv[3], float(sys.argv[4]), float(sys.argv[5])))
            )
        )
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--certs", type=int, default=200, help="node certificates = keep-alive connections"
    )
    parser.add_argument(
        "--rate", type=float, default=TARGET_RATE, help="paced heartbeats per second"
    )
    parser.add_argument(
        "--duration", type=float, default=10.0, help="seconds per phase (two phases per side)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kumo-bench-") as work:
        kumo, baseline = measure(args, Path(work))
    met = report(args, kumo, baseline)
    print("target met" if met else "target NOT met")
    return 0


if __name__ == "__main__":
    sys.exit(main())
