"""A migration's image transfer against a raw file copy over the same link, same run.

A real controller and two real agents on this machine. For each size a process touches that
much memory on node A and is migrated to node B through the controller API; the transfer is
the migration's ``transfer`` phase as the API shows it (the source streams a tar over mTLS
to the controller, which relays it over mTLS to the destination; both ends hash it). The
baseline copies the very same checkpoint files over a plain TCP connection: ``sendfile``
into a socket, a receiver process writing them to disk, no encryption and no checksum, the
fastest copy the link allows. Prints MB/s for both and the ratio (target: Kumo >= 0.8x).

Everything runs in a private network namespace, over two links:

- ``1gbit``: each host's transmit limited to 1 Gbit/s (htb classes on the namespace's
  loopback: the source's uploads to the controller, the controller's sends to the
  destination, the raw copy's sender), the link of a typical private cloud; the target;
- ``loopback``: no limit, so all three "hosts" share this machine's two cores and the
  figure is the CPU cost of two TLS hops and the checksums, for information.

    .venv/bin/python bench/bench_migration.py [--sizes 256,1024] [--rounds 3] [--links 1gbit,loopback]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import free_port  # noqa: E402
from tests.harness.agents import running_on, start_agent, wait_for  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402
from tests.harness.criu import criu_status  # noqa: E402

PY = "/usr/bin/python3"
TOUCHER = """
import sys, time
memory = bytearray(b"\\x01") * (int(sys.argv[1]) << 20)
open(sys.argv[2], "w").write("ready")
while True:
    time.sleep(1)
"""
TARGET = 0.8
MB = 1e6
POLL = 0.01


def kumo_round(ctl: ControllerProcess, source: Any, destination: Any, name: str, mib: int, work: Path) -> tuple[float, int, Path]:
    """(seconds in the transfer phase, bytes relayed, the checkpoint as the destination received it)."""
    ready = work / f"{name}.ready"
    ctl.admin("POST", "/v1/instances", {
        "name": name, "kind": "process", "node": source.node_id, "vcpus": 1, "memory_mib": mib + 64,
        "options": {"command": [PY, "-c", TOUCHER, str(mib), str(ready)]},
    })
    wait_for(ready.exists, f"{name} to touch {mib} MiB", limit=120, interval=POLL)
    wait_for(lambda: running_on(source, name), f"{name} to run on {source.node_id}", interval=POLL)
    migration = ctl.admin("POST", f"/v1/instances/{name}/migrate", {"to": destination.node_id})["migration"]
    started = ended = None
    watch = ctl.watcher()
    while True:
        doc = watch(f"/v1/migrations/{migration['id']}")
        now = time.perf_counter()
        if started is None and doc["phase"] == "transfer":
            started = now
        if started is not None and ended is None and doc["phase"] != "transfer":
            ended = now
        if doc["state"] != "running":
            break
        time.sleep(POLL)
    if doc["state"] != "succeeded" or started is None or ended is None:
        sys.exit(f"bench_migration: the migration of {name} did not succeed: {doc}")
    received = destination.state_dir / "plugins" / "checkpoint" / "images" / "process" / name / Path(doc["image"]).name
    return ended - started, doc["progress"]["bytes_total"], received


RECEIVER = """
import os, socket, struct, sys
out, port = sys.argv[1], int(sys.argv[2])
server = socket.create_server(("127.0.0.1", port))
print("listening", flush=True)
conn, _ = server.accept()
stream = conn.makefile("rb", buffering=1 << 20)
while header := stream.read(12):
    name_len, size = struct.unpack("!IQ", header)
    name = stream.read(name_len).decode()
    with open(os.path.join(out, name), "wb", buffering=0) as f:
        left = size
        while left:
            chunk = stream.read(min(left, 1 << 20))
            f.write(chunk)
            left -= len(chunk)
conn.sendall(b"k")
"""


def raw_round(image: Path, work: Path, port: int) -> tuple[float, int]:
    """(seconds, bytes) to copy the checkpoint's files to a receiver process over TCP."""
    out = Path(tempfile.mkdtemp(dir=work, prefix="raw-"))
    receiver = subprocess.Popen([PY, "-c", RECEIVER, str(out), str(port)], stdout=subprocess.PIPE, text=True)  # noqa: S603
    assert receiver.stdout is not None and receiver.stdout.readline().strip() == "listening"
    files = sorted(p for p in image.iterdir() if p.is_file())
    total = 0
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as conn:
        for path in files:
            size = path.stat().st_size
            name = path.name.encode()
            conn.sendall(struct.pack("!IQ", len(name), size) + name)
            with path.open("rb") as f:
                conn.sendfile(f)
            total += size
        conn.shutdown(socket.SHUT_WR)
        assert conn.recv(1) == b"k", "the receiver did not confirm"
    seconds = time.perf_counter() - started
    receiver.wait(30)
    shutil.rmtree(out)
    return seconds, total


def tc(*args: str) -> None:
    subprocess.run(["tc", *args], check=True, capture_output=True)  # noqa: S603, S607


def limit_links(rate: str, controller_port: int, raw_port: int) -> None:
    """Each sending host's transmit at ``rate``: on a shared loopback, one htb class per flow
    direction (ports tell them apart); everything else (heartbeats' answers, acks) unlimited."""
    tc("qdisc", "add", "dev", "lo", "root", "handle", "1:", "htb", "default", "1")
    tc("class", "add", "dev", "lo", "parent", "1:", "classid", "1:1", "htb", "rate", "100gbit")
    flows = (("dport", controller_port), ("sport", controller_port), ("dport", raw_port))
    for n, (direction, port) in enumerate(flows, start=2):
        tc("class", "add", "dev", "lo", "parent", "1:", "classid", f"1:{n}", "htb", "rate", rate, "ceil", rate)
        tc("filter", "add", "dev", "lo", "parent", "1:", "protocol", "ip", "prio", "1", "u32",
           "match", "ip", direction, str(port), "0xffff", "flowid", f"1:{n}")


def unlimit_links() -> None:
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True, check=False)  # noqa: S603, S607


def in_private_netns() -> None:
    """Re-run this script in a network namespace of its own: its loopback can be shaped
    without touching the machine's, and nothing it does is seen outside."""
    if os.environ.get("KUMO_BENCH_NETNS") == "1":
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)  # noqa: S603, S607
        return
    env = {**os.environ, "KUMO_BENCH_NETNS": "1"}
    code = subprocess.call(["unshare", "--net", "--", sys.executable, *sys.argv], env=env)  # noqa: S603, S607
    sys.exit(code)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256,1024", help="MiB of touched memory, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--links", default="1gbit,loopback", help="comma-separated: a tc rate (1gbit) or loopback")
    args = parser.parse_args()
    in_private_netns()
    ok, why = criu_status()
    if not ok:
        sys.exit(f"bench_migration: {why} (scripts/deps/30-criu.sh)")
    sizes = [int(s) for s in args.sizes.split(",")]
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="kumo-bench-migration-") as tmp:
        work = Path(tmp)
        ctl = ControllerProcess(work / "controller", {"log_level": "info"})
        ctl.start()
        agents: list[Any] = []
        try:
            for label in ("a", "b"):
                (work / label).mkdir()
                agents.append(start_agent(ctl, work / label, settings={"log_level": "info"}))
            print(f"{'link':>9} {'MiB':>5} {'image MB':>9} {'Kumo s':>7} {'Kumo MB/s':>10} {'raw s':>6} "
                  f"{'raw MB/s':>9} {'ratio':>6}")
            for link in args.links.split(","):
                raw_port = free_port()
                if link != "loopback":
                    limit_links(link, ctl.port, raw_port)
                try:
                    for mib in sizes:
                        kumo_rates, raw_rates, image_mb = [], [], 0.0
                        for n in range(args.rounds):
                            source, destination = agents[n % 2], agents[(n + 1) % 2]
                            name = f"bench-{link}-{mib}-{n}"
                            seconds, size, image = kumo_round(ctl, source, destination, name, mib, work)
                            kumo_rates.append(size / seconds / MB)
                            os.sync()  # the copy then reads the same cached, already written image
                            raw_seconds, raw_size = raw_round(image, work, raw_port)
                            raw_rates.append(raw_size / raw_seconds / MB)
                            image_mb = size / MB
                            ctl.admin("DELETE", f"/v1/instances/{name}")
                            shutil.rmtree(image, ignore_errors=True)
                        kumo, raw = statistics.median(kumo_rates), statistics.median(raw_rates)
                        if link != "loopback":
                            verdicts.append(kumo / raw)
                        print(f"{link:>9} {mib:>5} {image_mb:>9.0f} {image_mb / kumo:>7.2f} {kumo:>10.0f} "
                              f"{image_mb / raw:>6.2f} {raw:>9.0f} {kumo / raw:>5.2f}x", flush=True)
                finally:
                    unlimit_links()
        finally:
            for agent in agents:
                agent.stop()
            ctl.stop()
    print(f"median of {args.rounds} rounds")
    if verdicts:
        worst = min(verdicts)
        print(f"target on a limited link: Kumo >= {TARGET}x the raw copy -> {'OK' if worst >= TARGET else 'BELOW'} "
              f"(worst {worst:.2f}x)")


if __name__ == "__main__":
    main()
