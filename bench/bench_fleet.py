"""A whole fleet of simulated agents against real controllers and a bare endpoint, in one run.

Issue 13's fleet benchmark. Every simulated agent behaves as ``kumo-agent run`` does on the
wire: its own key and node certificate, ``register``, then a long-poll held open
(``GET /v1/nodes/{id}/tasks?wait=30``) beside a heartbeat every 10 s ± 20 %, each on a mutual-TLS
keep-alive connection of its own (the real agent keeps two for the same reason: HTTP/1.1
cannot send a heartbeat on a connection that holds a poll). When its controller goes away it
moves to the next controller of its list after the agent's own jittered backoff and
registers there. The agents run in ``--procs`` load-generator processes (multiprocessing,
one asyncio loop each), never in a controller's process.

Three setups, one after the other, with the same keys:

(a) one controller on SQLite (the default deployment);
(b) two controllers on one PostgreSQL 15 (a private cluster started here, as the
    ``postgres`` user), the agents split between them, each knowing both; at the end one
    controller is killed with SIGKILL and its agents move to the other;
(c) the bare aiohttp TLS endpoint of bench_heartbeat.py (same certificate chain, client
    certificate required, no work), with the same routes answered trivially and a task
    handed to a waiting poll in memory: the floor that Python, aiohttp and TLS set. It
    serves through the controller's TLS layer (controller.tls), so that the ratios compare
    what Kumo adds; bench_tls.py compares that layer with asyncio's stock one.

Printed per setup, over a steady window after every agent is connected: heartbeat p50/p99,
the server's RSS growth per connection (RSS after the fleet connected minus RSS before,
over the connections held), CPU seconds per 1,000 heartbeats (the server process only, over
the window; it also serves the polls, which every agent renews every 30 s, and for (b) the
PostgreSQL servers' CPU is printed beside it), and dispatch latency: an admin submits a task
through the API (for (b) through the other controller than the agent's) and the time runs
until the agent's long-poll has returned it. For (b)'s failover: the time until every agent
of the killed controller is registered on the survivor, until each has heartbeated there,
and the heartbeat p99 meanwhile. Ratios are against (c), measured in the same run.

Run: ``.venv/bin/python bench/bench_fleet.py`` (10,000 agents; ``--agents 500 --duration 20``
for a quick look; ``--help`` for knobs). It needs root (PostgreSQL runs as ``postgres``, and
the file-descriptor limit is raised). It prints; it never asserts.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import math
import multiprocessing
import os
import pwd
import queue
import random
import resource
import secrets
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from bench_heartbeat import free_port, tool, wait_for_port

TARGET_HEARTBEAT_P99_MS = 100.0
TARGET_DISPATCH_P99_MS = 200.0
TARGET_KIB_PER_CONNECTION = 25.0
TARGET_BACK_S = 60.0
TARGET_STORM_P99_MS = 1000.0

HEARTBEAT_INTERVAL = 10.0  # what kumo-controller init writes, and so what agents use
HEARTBEAT_JITTER = 0.2  # agent/runtime.py's
POLL_WAIT = 30  # init's poll_timeout: the wait the agent asks for
POLL_SLACK = 15.0  # agent/runtime.py's: how much longer than the wait a poll may take
REQUEST_TIMEOUT = 20.0  # agent/client.py's
CONNECTIONS_PER_AGENT = 2  # the poll's and the heartbeat's
# What one idle mTLS connection costs, both ends together: ~60 KiB in a server with
# controller.tls (bench_tls.py), ~90 KiB in the load generator (see small_tls_buffers);
# used only to pick a fleet size this machine's memory can hold.
PLANNED_KIB_PER_CONNECTION = 160

BIN = Path("/usr/lib/postgresql/15/bin")

REGISTER = {
    "hostname": "",
    "agent_version": "bench",
    "facts": {"cpus": 2, "memory_bytes": 8 << 30, "memory_available_bytes": 6 << 30},
    "plugins": {},
    "metrics_url": None,
    "instances": [],
}
HEARTBEAT = {  # the same body as bench_heartbeat.py's
    "instances": [
        {"name": f"vm-{i}", "kind": "kvm", "state": "running", "details": {"vcpus": 2, "memory_mib": 1024}}
        for i in range(3)
    ]
}


# --- small helpers ----------------------------------------------------------------------


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def sockets(pid: int) -> int:
    """Sockets a process holds open: the connections a server is paying memory for, counted
    rather than assumed (agents still connecting or retrying hold fewer than two)."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except OSError:
            continue  # closed meanwhile
    return count


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (/proc/PID/stat fields 14 and 15)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU of ``root`` and every process under it (PostgreSQL forks a backend per connection)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [root]
    while todo:
        pid = todo.pop()
        total += cpu_seconds(pid)
        todo.extend(children.get(pid, ()))
    return total


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from /proc/stat's first line: how much of
    the cores the window used, the servers and load generators together."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return float(sum(fields) - idle), float(sum(fields))


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def client_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (soft and, as root, hard) for this process and what it starts; the
    limit that resulted."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    ceiling = int(Path("/proc/sys/fs/nr_open").read_text())
    target = min(max(wanted, soft), ceiling)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, max(target, hard)))
    except (ValueError, OSError):
        target = min(target, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


# --- the servers ------------------------------------------------------------------------


class Controller:
    """One ``kumo-controller``: initialised here and run as a subprocess."""

    def __init__(self, work: Path, name: str, init_args: list[str]):
        self.dir = work / name
        self.port, self.enroll_port = free_port(), free_port()
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            [tool("kumo-controller"), "init", "--dir", str(self.dir), "--listen", f"127.0.0.1:{self.port}",
             "--enroll-listen", f"127.0.0.1:{self.enroll_port}", "--san", "127.0.0.1", *init_args],
            check=True, stdout=subprocess.DEVNULL,
        )
        self.pki = self.dir / "pki"
        self.url = f"https://127.0.0.1:{self.port}"
        self.log = work / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
                [tool("kumo-controller"), "run", "--config", str(self.dir / "controller.yaml")],
                stdout=out, stderr=subprocess.STDOUT,
            )
        wait_for_port(self.port, self.proc, self.log, timeout=60.0)
        # It listens before its store is open and answers 503 until then.
        context = client_context((self.pki / "ca.crt").read_text(), str(self.pki / "admin.crt"),
                                 str(self.pki / "admin.key"))
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/v1/openapi.json", context=context, timeout=10).close()  # noqa: S310
                return
            except urllib.error.HTTPError as exc:
                if exc.code != 503 or time.monotonic() > deadline:
                    sys.exit(f"bench: {self.url} answered {exc.code}: {exc.read()[:300]!r}")
                time.sleep(0.2)


class Postgres:
    """A private PostgreSQL 15 cluster (the steps of tests/harness/postgres.py): its own
    directory and port, run as ``postgres`` (the server refuses root), password over TCP.
    Durability settings are the defaults (fsync on), as a deployment has them."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.password = secrets.token_urlsafe(12)
        user = pwd.getpwnam("postgres")
        os.chown(root, user.pw_uid, user.pw_gid)
        pwfile = root / "pwfile"
        pwfile.write_text(self.password + "\n")
        os.chown(pwfile, user.pw_uid, user.pw_gid)
        self._as_postgres([str(BIN / "initdb"), "-D", str(root / "data"), "-U", "kumo", "-E", "UTF8",
                           "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"])
        pwfile.unlink()
        self.proc: subprocess.Popen | None = None

    def _as_postgres(self, argv: list[str]) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv],  # noqa: S603,S607 - fixed list
                                capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            sys.exit(f"bench: {argv[0]} failed: {result.stdout}{result.stderr}")

    def start(self) -> str:
        """Start the server and make the fleet's database; its URL."""
        with (self.root / "postgres.log").open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603,S607 - fixed list
                ["runuser", "-u", "postgres", "--", str(BIN / "postgres"), "-D", str(self.root / "data"),
                 "-p", str(self.port), "-k", str(self.root), "-c", "listen_addresses=127.0.0.1",
                 "-c", "max_connections=200"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + 60
        while subprocess.run([str(BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port)],  # noqa: S603
                             capture_output=True, check=False).returncode != 0:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"bench: postgres did not start: {(self.root / 'postgres.log').read_text()[-2000:]}")
            time.sleep(0.2)
        self._as_postgres([str(BIN / "createdb"), "-h", str(self.root), "-p", str(self.port), "-U", "kumo", "kumo"])
        return f"postgresql://kumo:{self.password}@127.0.0.1:{self.port}/kumo"

    def postmaster_pid(self) -> int:
        """The server's own pid (runuser's child); its backends are its children."""
        assert self.proc is not None
        return int((self.root / "data" / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # "fast" shutdown
            self.proc.wait(60)


def serve_bare(port: int, pki: Path) -> None:
    """The baseline: aiohttp, the controller's certificate chain and client-certificate rule,
    and the agent's routes answered with no work; a task POSTed to /v1/tasks is handed to the
    node's waiting poll in memory (the least any dispatch can cost)."""
    from aiohttp import web

    from controller import tls

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.crt"))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))  # the chain: init writes both
    queued: dict[str, list[dict[str, Any]]] = {}
    wakeups: dict[str, asyncio.Event] = {}

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"ok": True, "heartbeat_interval": HEARTBEAT_INTERVAL, "poll_timeout": POLL_WAIT})

    async def poll(request: web.Request) -> web.Response:
        node = request.match_info["id"]
        event = wakeups.setdefault(node, asyncio.Event())
        if not queued.get(node):
            try:
                await asyncio.wait_for(event.wait(), min(60.0, float(request.query.get("wait", "0"))))
            except TimeoutError:
                pass
        event.clear()
        return web.json_response({"tasks": queued.pop(node, [])})

    async def submit(request: web.Request) -> web.Response:
        data = await request.json()
        task = {"id": "t-" + secrets.token_hex(8), "kind": data["kind"], "payload": {}, "idempotency_key": None}
        queued.setdefault(data["node"], []).append(task)
        wakeups.setdefault(data["node"], asyncio.Event()).set()
        return web.json_response(task, status=201)

    app = web.Application()
    app.router.add_post("/v1/nodes/{id}/register", ok)
    app.router.add_post("/v1/nodes/{id}/heartbeat", ok)
    app.router.add_get("/v1/nodes/{id}/tasks", poll)
    app.router.add_post("/v1/nodes/{id}/tasks/{task}/result", ok)
    app.router.add_post("/v1/tasks", submit)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await tls.serve(runner.server, "127.0.0.1", port, context, 30.0)  # asyncio's shutdown timeout
        await asyncio.Event().wait()  # until the bench's SIGTERM

    asyncio.run(main())


# --- enrolling the fleet ----------------------------------------------------------------


def make_keys(count: int, out: Path) -> list[tuple[str, str]]:
    """``count`` node keys (ECDSA P-256, as agents make) and their CSRs, PEM: (key path, CSR)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    made = []
    for i in range(count):
        key = ec.generate_private_key(ec.SECP256R1())
        path = out / f"agent-{i}.key"
        path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
        csr = (x509.CertificateSigningRequestBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"bench-{i}")]))
               .sign(key, hashes.SHA256()))
        made.append((str(path), csr.public_bytes(serialization.Encoding.PEM).decode()))
    return made


async def enroll(controllers: list[Controller], keys: list[tuple[str, str]], out: Path) -> list[dict[str, str]]:
    """Enroll every key through ``POST /v1/enroll`` with join tokens, as ``kumo-agent join``
    does (the controller checks the CSR, signs, stores the node): the honest way, and on
    loopback with kept-alive connections it costs a few milliseconds a node."""
    import aiohttp

    first = controllers[0]
    ca = (first.pki / "ca.crt").read_text()
    admin = client_context(ca, str(first.pki / "admin.crt"), str(first.pki / "admin.key"))
    verify_only = ssl.create_default_context(cadata=ca)
    tokens: list[str] = []
    async with aiohttp.ClientSession() as session:
        for _ in range(math.ceil(len(keys) / 1000)):  # the API's MAX_TOKEN_USES
            async with session.post(f"{first.url}/v1/tokens", json={"ttl_seconds": 3600, "uses": 1000},
                                    ssl=admin) as r:
                answer = await r.json()
                if r.status >= 300:
                    sys.exit(f"bench: creating a token: {answer}")
            tokens.append(answer["join"].split(":")[2])
        limit = asyncio.Semaphore(32)

        async def one(i: int) -> dict[str, str]:
            key_path, csr = keys[i]
            ctl = controllers[i % len(controllers)]
            body = {"token": tokens[i // 1000], "csr": csr, "hostname": f"bench-{i}"}
            async with limit, session.post(f"https://127.0.0.1:{ctl.enroll_port}/v1/enroll", json=body,
                                           ssl=verify_only) as r:
                answer = await r.json()
                if r.status >= 300:
                    sys.exit(f"bench: enroll: {answer}")
            cert_path = out / f"{answer['node_id']}.crt"
            cert_path.write_text(answer["certificate"])
            return {"id": answer["node_id"], "key": key_path, "cert": str(cert_path)}

        return await asyncio.gather(*(one(i) for i in range(len(keys))))


# --- the load generator (its own processes) ---------------------------------------------


def small_tls_buffers() -> None:
    """asyncio gives every TLS connection a 256 KiB read buffer (SSLProtocol.max_size); at
    thousands of connections that, not the servers, would bound the fleet this machine can
    simulate. The load generator, and only it, reads into 32 KiB (two full TLS records): the
    servers measured run unmodified."""
    import asyncio.sslproto

    asyncio.sslproto.SSLProtocol.max_size = 32 * 1024


class AgentSim:
    """One simulated agent: register, then poll and heartbeat until told to stop; on a
    failure, the next controller of its list after the agent's jittered backoff."""

    def __init__(self, node: dict[str, str], urls: list[str], ca: str, stats: dict[str, Any], connect: asyncio.Semaphore):
        import aiohttp

        self.id, self.urls, self.stats, self.connect = node["id"], urls, stats, connect
        self.context = client_context(ca, node["cert"], node["key"])
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=self.context, limit=CONNECTIONS_PER_AGENT, keepalive_timeout=90),
            timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT),
        )
        self.choice = 0
        self.first_heartbeat = asyncio.get_running_loop().create_future()

    async def run(self) -> None:
        import aiohttp

        attempt, registered_before, lost_at = 0, False, 0.0
        base = self.urls[self.choice]
        while True:
            base = self.urls[self.choice]
            try:
                async with self.connect:  # a ramp: the fleet does not handshake all at once at start
                    sent = time.monotonic()
                    async with self.session.post(f"{base}/v1/nodes/{self.id}/register",
                                                 json={**REGISTER, "hostname": self.id}) as r:
                        await r.read()
                        if r.status != 200:
                            raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
                done = time.monotonic()
                self.stats["registers"].append((sent, done - sent))
                attempt = 0
                back = (lost_at, done) if registered_before else None
                registered_before = True
                await self._connected(base, back)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                now = time.monotonic()
                self.stats["errors"].append((now, type(exc).__name__))
                if not lost_at or lost_at < now - 120:
                    lost_at = now
                # agent/client.py's ControllerChoice: the next controller; agent/sdk/backoff.py's
                # full-jitter backoff before trying it.
                self.choice = (self.choice + 1) % len(self.urls)
                delay = random.uniform(0.5, max(0.5, min(30.0, 0.5 * 2**attempt)))
                attempt += 1
                await asyncio.sleep(delay)

    async def _connected(self, base: str, back: tuple[float, float] | None) -> None:
        tasks = [asyncio.create_task(self._heartbeats(base, back)), asyncio.create_task(self._polls(base))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _heartbeats(self, base: str, back: tuple[float, float] | None) -> None:
        import aiohttp

        first = True
        while True:
            if first and not self.first_heartbeat.done():
                # A fleet's agents started at different moments: spread the first beats over
                # one interval instead of beating in lockstep.
                delay = random.uniform(0, HEARTBEAT_INTERVAL)
            else:
                delay = HEARTBEAT_INTERVAL * random.uniform(1 - HEARTBEAT_JITTER, 1 + HEARTBEAT_JITTER)
            await asyncio.sleep(delay)
            sent = time.monotonic()
            async with self.session.post(f"{base}/v1/nodes/{self.id}/heartbeat", json=HEARTBEAT) as r:
                await r.read()
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            done = time.monotonic()
            self.stats["heartbeats"].append((sent, done - sent))
            if not self.first_heartbeat.done():
                self.first_heartbeat.set_result(done)
            if first and back is not None:
                self.stats["backs"].append((*back, done))
            first = False

    async def _polls(self, base: str) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=POLL_WAIT + POLL_SLACK)
        while True:
            async with self.session.get(f"{base}/v1/nodes/{self.id}/tasks?wait={POLL_WAIT}", timeout=timeout) as r:
                answer = await r.json()
                if r.status != 200:
                    raise aiohttp.ClientResponseError(r.request_info, (), status=r.status)
            now = time.monotonic()
            for task in answer.get("tasks") or ():
                self.stats["receipts"][task["id"]] = now
                # Reported as the agent does, so the controller's task table stays as in use.
                asyncio.get_running_loop().create_task(self._report(base, task["id"]))

    async def _report(self, base: str, task_id: str) -> None:
        import aiohttp

        try:
            async with self.session.post(f"{base}/v1/nodes/{self.id}/tasks/{task_id}/result",
                                         json={"state": "succeeded", "result": {}}) as r:
                await r.read()
        except (TimeoutError, aiohttp.ClientError, OSError):
            pass


async def loop_lag(samples: list[tuple[float, float]]) -> None:
    """How late this loop wakes a 50 ms timer: a load generator too busy to read answers
    would add its own delay to every latency it measures, and this shows whether it did."""
    while True:
        due = time.monotonic() + 0.05
        await asyncio.sleep(0.05)
        samples.append((due, time.monotonic() - due))


def load_generator(fleet: list[tuple[dict[str, str], list[str]]], ca: str, events: Any, halt: Any) -> None:
    """A load-generator process: run ``fleet`` until ``halt`` is set; report on ``events``."""
    small_tls_buffers()

    async def main() -> dict[str, Any]:
        stats: dict[str, Any] = {"heartbeats": [], "registers": [], "errors": [], "receipts": {}, "backs": [],
                                 "lags": []}
        connect = asyncio.Semaphore(64)
        agents = [AgentSim(node, urls, ca, stats, connect) for node, urls in fleet]
        running = [asyncio.create_task(agent.run()) for agent in agents]
        ready = asyncio.gather(*(agent.first_heartbeat for agent in agents))
        lag = asyncio.create_task(loop_lag(stats["lags"]))
        reported_ready = False
        reported_backs = reported_connected = 0
        while not halt.is_set():
            await asyncio.sleep(0.2)
            connected = sum(1 for agent in agents if agent.first_heartbeat.done())
            if connected != reported_connected:
                reported_connected = connected
                events.put(("connected", os.getpid(), connected))
            if not reported_ready and ready.done():
                # The fleet's objects live as long as the run: out of the collector's sight,
                # a full collection does not stall this loop (and so every latency measured
                # in it) for the time it takes to walk thousands of sessions.
                gc.collect()
                gc.freeze()
                events.put(("ready", os.getpid()))
                reported_ready = True
            if len(stats["backs"]) != reported_backs:
                reported_backs = len(stats["backs"])
                events.put(("backs", os.getpid(), reported_backs))
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)
        await asyncio.gather(*(agent.session.close() for agent in agents), return_exceptions=True)
        ready.cancel()
        lag.cancel()
        return stats

    stats = asyncio.run(main())
    events.put(("stats", os.getpid(), stats))


# --- one setup: start the load, measure, stop -------------------------------------------


class Setup:
    """One measured setup: its servers' pids, how to submit a task to an agent, the fleet."""

    def __init__(self, name: str, pids: list[int], fleet: list[tuple[dict[str, str], list[str]]],
                 submit_url: Any, admin: ssl.SSLContext, extra_cpu: Any = None):
        self.name, self.pids, self.fleet = name, pids, fleet
        self.submit_url = submit_url  # agent index -> the API that gets the task
        self.admin, self.extra_cpu = admin, extra_cpu


def wait_connected(events: Any, procs: int, agents: int, timeout: float) -> int:
    """Wait until every agent has heartbeated once, or ``timeout``: how many have. A fleet
    the machine cannot connect in time is measured as far as it got, and says so."""
    counts: dict[int, int] = {}
    ready: set[int] = set()
    deadline = time.monotonic() + timeout
    while len(ready) < procs and time.monotonic() < deadline:
        try:
            event = events.get(timeout=1)
        except queue.Empty:
            continue
        if event[0] == "connected":
            counts[event[1]] = event[2]
        elif event[0] == "ready":
            ready.add(event[1])
    return agents if len(ready) == procs else sum(counts.values())


def wait_events(events: Any, want: str, count: int, timeout: float, label: str) -> list[Any]:
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count:
        try:
            event = events.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            sys.exit(f"bench: {label}: {len(got)} of {count} load generators answered in {timeout:g} s")
        if event[0] == want:
            got.append(event)
    return got


async def dispatch(setup: Setup, count: int, seconds: float) -> tuple[dict[str, float], list[str]]:
    """Submit ``count`` tasks spread over ``seconds``, each at its own moment (a slow answer
    does not hold the next back): task id -> when its submit began, and the failed submits."""
    import aiohttp

    submitted: dict[str, float] = {}
    failed: list[str] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def one(at: float) -> None:
            await asyncio.sleep(at - loop.time())
            i = random.randrange(len(setup.fleet))
            began = time.monotonic()
            try:
                async with session.post(f"{setup.submit_url(i)}/v1/tasks", ssl=setup.admin,
                                        json={"node": setup.fleet[i][0]["id"], "kind": "bench.noop"}) as r:
                    answer = await r.json()
                    if r.status >= 300:
                        failed.append(f"HTTP {r.status}: {answer}")
                        return
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                failed.append(f"{type(exc).__name__} after {time.monotonic() - began:.0f} s")
                return
            submitted[answer["id"]] = began

        start = loop.time()
        await asyncio.gather(*(one(start + (k + 0.5) * seconds / max(1, count)) for k in range(count)))
    return submitted, failed


def run_setup(setup: Setup, args: argparse.Namespace, kill: Any = None) -> dict[str, Any]:
    """Connect the fleet, measure a steady window (and dispatch in it), optionally kill a
    server and watch the agents come back, then stop the load; the figures."""
    context = multiprocessing.get_context("spawn")
    events, halt = context.Queue(), context.Event()
    ca = (args.ca_file).read_text()
    rss_before = sum(rss_bytes(pid) for pid in setup.pids)
    sockets_before = sum(sockets(pid) for pid in setup.pids)
    started = time.monotonic()
    procs = [context.Process(target=load_generator, args=(setup.fleet[i::args.procs], ca, events, halt), daemon=True)
             for i in range(args.procs)]
    for proc in procs:
        proc.start()
    print(f"[{setup.name}] {len(setup.fleet)} agents connecting...", file=sys.stderr)
    result: dict[str, Any] = {"name": setup.name, "agents": len(setup.fleet)}
    try:
        result["connected"] = wait_connected(events, args.procs, len(setup.fleet), args.connect_timeout)
        result["connect_s"] = time.monotonic() - started
        if result["connected"] < len(setup.fleet):
            print(f"[{setup.name}] only {result['connected']} agents connected in {args.connect_timeout:g} s; "
                  "measuring what is connected", file=sys.stderr)
        time.sleep(3)  # let the last handshakes' garbage settle before the memory is read
        rss_after = sum(rss_bytes(pid) for pid in setup.pids)
        connections = sum(sockets(pid) for pid in setup.pids) - sockets_before
        result["connections"] = connections
        result["rss_per_connection"] = (rss_after - rss_before) / max(1, connections)
        result["rss_mb"] = (rss_before / 2**20, rss_after / 2**20)
        print(f"[{setup.name}] connecting ended after {result['connect_s']:.0f} s; steady window "
              f"{args.duration:g} s", file=sys.stderr)
        window_start = time.monotonic()
        cpu_start = sum(cpu_seconds(pid) for pid in setup.pids)
        extra_start = setup.extra_cpu() if setup.extra_cpu else 0.0
        busy_start = machine_busy()
        submitted, result["submit_failures"] = asyncio.run(dispatch(setup, args.dispatches, args.duration))
        time.sleep(max(0.0, window_start + args.duration - time.monotonic()))
        window_end = time.monotonic()
        result["cpu"] = sum(cpu_seconds(pid) for pid in setup.pids) - cpu_start
        busy_end = machine_busy()
        result["machine_busy"] = (busy_end[0] - busy_start[0]) / max(1.0, busy_end[1] - busy_start[1])
        result["extra_cpu"] = (setup.extra_cpu() - extra_start) if setup.extra_cpu else None
        result["window"] = (window_start, window_end)
        result["submitted"] = submitted
        if kill is not None:
            result["failover"] = kill(events)
    finally:
        halt.set()
    stats: dict[str, Any] = {"heartbeats": [], "registers": [], "errors": [], "receipts": {}, "backs": [], "lags": []}
    for _, _, part in wait_events(events, "stats", args.procs, 120, "collecting results"):
        for key in ("heartbeats", "registers", "errors", "backs", "lags"):
            stats[key].extend(part[key])
        stats["receipts"].update(part["receipts"])
    for proc in procs:
        proc.join(30)
    result["stats"] = stats
    return result


def steady(result: dict[str, Any]) -> dict[str, Any]:
    """The figures of the steady window."""
    start, end = result["window"]
    stats = result["stats"]
    beats = [latency for sent, latency in stats["heartbeats"] if start <= sent < end]
    errors = [1 for at, _ in stats["errors"] if start <= at < end]
    dispatch = [stats["receipts"][task] - began for task, began in result["submitted"].items()
                if task in stats["receipts"]]
    lags = [lag for due, lag in stats["lags"] if start <= due < end]
    return {
        "lag_p99": percentile(lags, 0.99) * 1000,
        "lag_max": (max(lags) if lags else math.nan) * 1000,
        "dispatch_max": (max(dispatch) if dispatch else math.nan) * 1000,
        "heartbeats": len(beats),
        "errors": len(errors),
        "p50": percentile(beats, 0.50) * 1000,
        "p99": percentile(beats, 0.99) * 1000,
        "max": (max(beats) if beats else math.nan) * 1000,
        "cpu_per_1000": result["cpu"] / len(beats) * 1000 if beats else math.nan,
        "dispatch_p50": percentile(dispatch, 0.50) * 1000,
        "dispatch_p99": percentile(dispatch, 0.99) * 1000,
        "dispatched": f"{len(dispatch)}/{len(result['submitted'])}",
    }


# --- orchestration ----------------------------------------------------------------------


def plan_agents(args: argparse.Namespace) -> tuple[int, list[str]]:
    """The largest fleet up to --agents that this machine's memory and descriptors hold."""
    notes = []
    connections = args.agents * CONNECTIONS_PER_AGENT
    # Descriptors: each connection is one in the server and one in a load generator; the
    # limit is per process, so the controller holding every connection is what counts.
    limit = raise_fd_limit(connections + 4096)
    agents = args.agents
    if limit < connections + 1024:
        agents = (limit - 1024) // CONNECTIONS_PER_AGENT
        notes.append(f"file descriptors: RLIMIT_NOFILE could be raised only to {limit}")
    # Memory: both ends of every connection; keep a quarter of the free memory for the
    # others sharing this machine.
    budget = mem_available() * 0.75
    fits = int(budget / (PLANNED_KIB_PER_CONNECTION * 1024 * CONNECTIONS_PER_AGENT))
    if fits < agents:
        notes.append(f"memory: {mem_available() / 2**30:.1f} GiB available holds ~{fits} agents at "
                     f"~{PLANNED_KIB_PER_CONNECTION} KiB per connection, both ends")
        agents = fits
    return agents, notes


def measure(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    import aiohttp  # noqa: F401 - fail here, not in a load generator, when it is missing

    keys_dir, certs_a, certs_b = work / "keys", work / "certs-a", work / "certs-b"
    for d in (keys_dir, certs_a, certs_b):
        d.mkdir()
    results = []
    print(f"making {args.agents} node keys...", file=sys.stderr)
    keys = make_keys(args.agents, keys_dir)

    # (a) one controller on SQLite.
    a = Controller(work, "sqlite", [])
    args.ca_file = a.pki / "ca.crt"
    ca = args.ca_file.read_text()
    admin = client_context(ca, str(a.pki / "admin.crt"), str(a.pki / "admin.key"))
    a.start()
    try:
        print(f"[sqlite] enrolling {args.agents} nodes...", file=sys.stderr)
        began = time.monotonic()
        fleet_a = asyncio.run(enroll([a], keys, certs_a))
        enroll_s = time.monotonic() - began
        assert a.proc is not None
        setup = Setup("kumo, 1 controller, SQLite", [a.proc.pid], [(node, [a.url]) for node in fleet_a],
                      lambda i: a.url, admin)
        results.append(run_setup(setup, args))
        results[-1]["enroll_s"] = enroll_s
    finally:
        assert a.proc is not None
        stop(a.proc)

    # (b) two controllers on PostgreSQL, sharing (a)'s CA.
    pg_root = Path(tempfile.mkdtemp(prefix="kumo-bench-pg-"))
    pg = Postgres(pg_root)
    try:
        url = pg.start()
        b1 = Controller(work, "pg1", ["--database", url, "--ca-from", str(a.pki)])
        b1.start()
        b2 = Controller(work, "pg2", ["--database", url, "--ca-from", str(a.pki)])
        b2.start()
        try:
            print(f"[postgresql] enrolling {args.agents} nodes...", file=sys.stderr)
            began = time.monotonic()
            fleet_b = asyncio.run(enroll([b1, b2], keys, certs_b))
            enroll_s = time.monotonic() - began
            # Even agents start on b1, odd on b2; each knows both, its own first.
            pair = [b1, b2]
            fleet = [(node, [pair[i % 2].url, pair[1 - i % 2].url]) for i, node in enumerate(fleet_b)]
            assert b1.proc is not None and b2.proc is not None
            postmaster = pg.postmaster_pid()
            setup = Setup("kumo, 2 controllers, PostgreSQL", [b1.proc.pid, b2.proc.pid], fleet,
                          lambda i: pair[1 - i % 2].url, admin, lambda: tree_cpu_seconds(postmaster))
            victims = math.ceil(len(fleet) / 2)

            def kill(events: Any) -> dict[str, Any]:
                """SIGKILL b1; wait until each of its agents heartbeated on b2 (or the limit)."""
                assert b1.proc is not None
                print(f"[postgresql] kill -9 of one controller: {victims} agents move", file=sys.stderr)
                killed_at = time.monotonic()
                b1.proc.kill()
                b1.proc.wait()
                backs: dict[int, int] = {}
                deadline = killed_at + args.failover_timeout
                while sum(backs.values()) < victims and time.monotonic() < deadline:
                    try:
                        event = events.get(timeout=1)
                    except queue.Empty:
                        continue
                    if event[0] == "backs":
                        backs[event[1]] = event[2]
                # A little more, so the storm window's heartbeats of the settled fleet are in.
                time.sleep(2)
                return {"killed_at": killed_at, "victims": victims, "watched_until": time.monotonic()}

            results.append(run_setup(setup, args, kill))
            results[-1]["enroll_s"] = enroll_s
            results[-1]["pg_note"] = True
        finally:
            for c in (b1, b2):
                if c.proc is not None:
                    stop(c.proc)
    finally:
        pg.stop()
        shutil.rmtree(pg_root, ignore_errors=True)

    # (c) the bare endpoint, with (a)'s certificates.
    port = free_port()
    log = work / "bare.log"
    with log.open("wb") as out:
        bare = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
            [sys.executable, __file__, "--bare", str(port), str(a.pki)], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, bare, log, timeout=60.0)
        bare_url = f"https://127.0.0.1:{port}"
        setup = Setup("bare aiohttp TLS endpoint", [bare.pid], [(node, [bare_url]) for node in fleet_a],
                      lambda i: bare_url, admin)
        results.append(run_setup(setup, args))
    finally:
        stop(bare)
    return results


def failover_figures(result: dict[str, Any]) -> dict[str, Any]:
    failover, stats = result["failover"], result["stats"]
    killed_at = failover["killed_at"]
    backs = [(registered, beat) for lost, registered, beat in stats["backs"] if registered >= killed_at]
    back_registered = max((r for r, _ in backs), default=math.nan) - killed_at
    back_beating = max((b for _, b in backs), default=math.nan) - killed_at
    storm_end = max(killed_at + 1, killed_at + (back_beating if backs else 0))
    storm = [latency for sent, latency in stats["heartbeats"] if killed_at <= sent <= storm_end]
    registers = [latency for sent, latency in stats["registers"] if killed_at <= sent <= storm_end]
    return {
        "victims": failover["victims"],
        "back": len(backs),
        "registered_s": back_registered,
        "beating_s": back_beating,
        "storm_p99": percentile(storm, 0.99) * 1000,
        "storm_max": (max(storm) if storm else math.nan) * 1000,
        "storm_beats": len(storm),
        "register_p99": percentile(registers, 0.99) * 1000,
        "errors": sum(1 for at, _ in stats["errors"] if killed_at <= at <= storm_end),
    }


def report(args: argparse.Namespace, results: list[dict[str, Any]], notes: list[str]) -> None:
    figures = [steady(result) for result in results]
    bare = figures[-1]
    bare_rss = results[-1]["rss_per_connection"]
    agents = results[0]["agents"]
    print(f"fleet: {agents} simulated agents, {agents * CONNECTIONS_PER_AGENT} mTLS keep-alive connections "
          f"(a long-poll and a heartbeat each), heartbeat every {HEARTBEAT_INTERVAL:g} s ± "
          f"{HEARTBEAT_JITTER:.0%}, {args.procs} load-generator processes, loopback, {os.cpu_count()} cores")
    if agents < args.requested:
        print(f"NOTE: {args.requested} agents asked for, {agents} run: " + "; ".join(notes))
    print(f"steady window {args.duration:g} s after every agent connected; {args.dispatches} tasks dispatched in it")
    print()
    header = (f"  {'':<32} {'hb/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'err':>4} "
              f"{'KiB/conn':>9} {'CPU s/1k hb':>11} {'disp p50':>9} {'disp p99':>9}  RSS before→after")
    print(header)
    for result, fig in zip(results, figures, strict=True):
        before, after = result["rss_mb"]
        print(f"  {result['name']:<32} {fig['heartbeats'] / args.duration:6.0f} {fig['p50']:7.1f} "
              f"{fig['p99']:7.1f} {fig['max']:7.1f} {fig['errors']:4d} {result['rss_per_connection'] / 1024:9.1f} "
              f"{fig['cpu_per_1000']:11.3f} {fig['dispatch_p50']:9.1f} {fig['dispatch_p99']:9.1f}  "
              f"{before:.0f}→{after:.0f} MB for {result['connections']} connections (dispatched {fig['dispatched']})")
    print("  (machine CPU busy in each window, servers and load generators together: "
          + ", ".join(f"{r['machine_busy']:.0%}" for r in results) + ")")
    print("  (load generators' own loop lag in each window, p99/max, part of every latency above: "
          + ", ".join(f"{f['lag_p99']:.0f}/{f['lag_max']:.0f} ms" for f in figures) + ")")
    print("  (dispatch max in each window: " + ", ".join(f"{f['dispatch_max']:.0f} ms" for f in figures) + ")")
    for result in results:
        if result["submit_failures"]:
            print(f"  ({result['name']}: {len(result['submit_failures'])} task submissions failed, first: "
                  f"{result['submit_failures'][0]})")
    for result in results:
        if result.get("extra_cpu") is not None:
            fig = steady(result)
            print(f"  ({result['name']}: the PostgreSQL server used {result['extra_cpu']:.1f} CPU s more in the window, "
                  f"{result['extra_cpu'] / max(1, fig['heartbeats']) * 1000:.3f} s per 1k heartbeats)")
    for result in results:
        if result["connected"] < result["agents"]:
            print(f"  ({result['name']}: only {result['connected']} of {result['agents']} agents had heartbeated "
                  f"once after {args.connect_timeout:g} s: the machine could not connect the whole fleet)")
    for result in results[:-1]:
        if "enroll_s" in result:
            print(f"  ({result['name']}: enrolling took {result['enroll_s']:.0f} s, connecting and "
                  f"registering the fleet {result['connect_s']:.0f} s)")
    print()
    print("ratios against the bare endpoint (same run):")
    for result, fig in zip(results[:-1], figures[:-1], strict=True):
        print(f"  {result['name']:<32} p99 {fig['p99'] / bare['p99']:.2f}×  memory per connection "
              f"{result['rss_per_connection'] / bare_rss:.2f}×  CPU per heartbeat "
              f"{fig['cpu_per_1000'] / bare['cpu_per_1000']:.2f}×  dispatch p99 "
              f"{fig['dispatch_p99'] / bare['dispatch_p99']:.1f}×")
    for result in results:
        if "failover" in result:
            f = failover_figures(result)
            print()
            print(f"failover ({result['name']}): kill -9 of one controller holding {f['victims']} agents")
            print(f"  back on the survivor: {f['back']} of {f['victims']} agents; all registered after "
                  f"{f['registered_s']:.1f} s, all heartbeating after {f['beating_s']:.1f} s (the first "
                  f"heartbeat comes one interval, {HEARTBEAT_INTERVAL:g} s ± {HEARTBEAT_JITTER:.0%}, after registering)")
            print(f"  during the storm: heartbeat p99 {f['storm_p99']:.0f} ms, max {f['storm_max']:.0f} ms over "
                  f"{f['storm_beats']} heartbeats; register p99 {f['register_p99']:.0f} ms; {f['errors']} failed requests "
                  "(the killed controller's connections, then retries)")
    print()
    print("targets (issue 13):")
    for result, fig in zip(results[:-1], figures[:-1], strict=True):
        kib = result["rss_per_connection"] / 1024
        print(f"  {result['name']}: heartbeat p99 {fig['p99']:.1f} ms (< {TARGET_HEARTBEAT_P99_MS:g}: "
              f"{'met' if fig['p99'] < TARGET_HEARTBEAT_P99_MS else 'NOT met'}), dispatch p99 "
              f"{fig['dispatch_p99']:.1f} ms (< {TARGET_DISPATCH_P99_MS:g}: "
              f"{'met' if fig['dispatch_p99'] < TARGET_DISPATCH_P99_MS else 'NOT met'}), {kib:.0f} KiB per "
              f"connection (< {TARGET_KIB_PER_CONNECTION:g}: {'met' if kib < TARGET_KIB_PER_CONNECTION else 'NOT met'})")
        if "failover" in result:
            f = failover_figures(result)
            met = f["back"] >= f["victims"] and f["beating_s"] < TARGET_BACK_S and f["storm_p99"] < TARGET_STORM_P99_MS
            print(f"  failover: every agent back within {TARGET_BACK_S:g} s with storm p99 < "
                  f"{TARGET_STORM_P99_MS:g} ms: {'met' if met else 'NOT met'}")
    print(f"  memory: the bare endpoint pays {bare_rss / 1024:.0f} KiB per connection too, with the same "
          "4 KiB TLS read buffer (controller.tls): the rest is OpenSSL's state of an mTLS connection "
          "(~28 KiB) and asyncio's and aiohttp's objects, which no Kumo change removes")
    print()
    kumo_rss = max(r["rss_per_connection"] for r in results[:-1])
    conns = 10_000 * CONNECTIONS_PER_AGENT
    print(f"scaling: memory is linear in connections: 10,000 agents ({conns} connections) at "
          f"{kumo_rss / 1024:.0f} KiB each would need {kumo_rss * conns / 2**30:.1f} GiB in one controller "
          f"(half each with two); heartbeat CPU is {figures[0]['cpu_per_1000']:.2f} s per 1,000, and 10,000 "
          f"agents send 1,000/s, so ~{figures[0]['cpu_per_1000']:.2f} of a core on the single SQLite controller "
          f"for heartbeats and polls, on a machine whose 2 cores it shares with the load generators")


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--bare":
        serve_bare(int(sys.argv[2]), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--agents", type=int, default=10_000, help="simulated agents (default %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0,
                        help="seconds of steady measurement per setup (default %(default)s)")
    parser.add_argument("--procs", type=int, default=2, help="load-generator processes (default %(default)s)")
    parser.add_argument("--dispatches", type=int, default=100,
                        help="tasks submitted in each steady window (default %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=300.0,
                        help="seconds the whole fleet may take to connect (default %(default)s)")
    parser.add_argument("--failover-timeout", type=float, default=120.0,
                        help="seconds to wait for the killed controller's agents (default %(default)s)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench: run as root: PostgreSQL is started as the postgres user")
    args.requested = args.agents
    args.agents, notes = plan_agents(args)
    if args.agents < 2:
        sys.exit("bench: this machine holds no fleet: " + "; ".join(notes))
    if notes:
        print(f"bench: running {args.agents} agents, not {args.requested}: " + "; ".join(notes), file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="kumo-bench-fleet-"))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(args, results, notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
