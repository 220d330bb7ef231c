"""Scrape latency, memory and CPU of the agent's ``/metrics`` against node_exporter.

Both run on this host in the same run: a real ``kumo-agent run`` joined to a real
controller, with the monitoring plugin's default probes (cpu, memory, swap, disk, load,
network) plus a TCP, a process and a Nagios command probe, all every second; and Debian's
``prometheus-node-exporter`` with its default collectors. Scrapes alternate between the
two over keep-alive connections, as Prometheus makes them.

What is compared is the cost a Prometheus scrape puts on the node. node_exporter collects
while the scrape waits; the agent's probes run on their own schedules, so a scrape only
renders cached values. The agent's CPU time per probe round (every probe once) is measured
in an idle window with no scrapes.

Targets: agent scrape faster than node_exporter's (ratio < 1); agent RSS within the
agent's 45 MB budget.

    .venv/bin/python bench/bench_monitoring.py [--scrapes 300] [--idle 20]
"""

from __future__ import annotations

import argparse
import http.client
import json
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness import free_port  # noqa: E402
from tests.harness.agents import AgentProcess, _base_env, join_agent  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402

RSS_TARGET_MB = 45.0
MB = 1024 * 1024
INTERVAL = 1.0


def probes(controller_port: int) -> list[dict]:
    """Every built-in type that needs no outside service, each once a second."""
    defaults = [{"name": kind, "type": kind, "interval": INTERVAL} for kind in ("cpu", "memory", "swap", "disk", "load", "network")]
    return [
        *defaults,
        {"name": "controller-port", "type": "tcp", "host": "127.0.0.1", "port": controller_port, "interval": INTERVAL},
        {"name": "agent-process", "type": "process", "process": "kumo-agent", "interval": INTERVAL},
        {"name": "check-true", "type": "command", "command": ["/bin/true"], "interval": INTERVAL},
    ]


class Target:
    """One ``/metrics`` endpoint scraped over a keep-alive connection."""

    def __init__(self, name: str, port: int, pid: int):
        self.name, self.port, self.pid = name, port, pid
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.times: list[float] = []
        self.size = self.series = 0

    def scrape(self) -> None:
        started = time.perf_counter()
        self.conn.request("GET", "/metrics", headers={"Accept": "text/plain;version=0.0.4"})
        response = self.conn.getresponse()
        body = response.read()
        self.times.append(time.perf_counter() - started)
        if response.status != 200:
            sys.exit(f"{self.name}: /metrics answered {response.status}")
        self.size = len(body)
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

    def cpu_seconds(self) -> float:
        times = psutil.Process(self.pid).cpu_times()
        return times.user + times.system

    def rss_mb(self) -> float:
        values = []
        for _ in range(5):
            values.append(psutil.Process(self.pid).memory_info().rss / MB)
            time.sleep(0.2)
        return statistics.median(values)


def wait_port(port: int, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not listen on 127.0.0.1:{port}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def start_agent(controller: ControllerProcess, directory: Path, monitoring: dict) -> AgentProcess:
    """Join and run one agent with this ``plugins.monitoring`` table; metrics on a free port."""
    state = directory / "state"
    env = _base_env()
    joined = join_agent(controller, state, env)
    if joined.returncode != 0:
        sys.exit(f"kumo-agent join failed: {joined.stderr}")
    metrics_port = free_port()
    config = directory / "agent.yaml"
    config.write_text(yaml.safe_dump({
        "state_dir": str(state), "metrics": {"listen": f"127.0.0.1:{metrics_port}"}, "plugins": {"monitoring": monitoring},
    }))
    node_id = json.loads((state / "join.json").read_text())["node_id"]
    agent = AgentProcess(controller, directory, state, config, directory / "agent.log", env, node_id, metrics_port)
    agent.start()
    return agent


def run(work: Path, scrapes: int, idle: float) -> None:
    exporter_bin = shutil.which("prometheus-node-exporter")
    if exporter_bin is None:
        sys.exit("prometheus-node-exporter is missing: run scripts/deps/50-prometheus.sh")
    (work / "controller").mkdir()
    controller = ControllerProcess(work / "controller", {})
    controller.start()
    agents: list[AgentProcess] = []
    exporter: subprocess.Popen[bytes] | None = None
    try:
        textfiles = work / "textfiles"  # both read the same empty textfile directory
        textfiles.mkdir()
        monitoring = {"default_probes": False, "probes": probes(controller.port), "textfile_dir": str(textfiles)}
        agents.append(start_agent(controller, work / "agent", monitoring))
        # The same agent without probes: its idle CPU (heartbeats, long-polls) is subtracted.
        agents.append(start_agent(controller, work / "agent-idle", {"default_probes": False}))

        exporter_port = free_port()
        exporter = subprocess.Popen(  # noqa: S603 - fixed argument list
            [exporter_bin, f"--web.listen-address=127.0.0.1:{exporter_port}", f"--collector.textfile.directory={textfiles}"],
            stdout=subprocess.DEVNULL, stderr=(work / "node_exporter.log").open("wb"), stdin=subprocess.DEVNULL,
        )
        wait_port(exporter_port, "node_exporter")
        pids = [agent.proc.pid for agent in agents if agent.proc is not None]
        targets = [Target("kumo-agent", agents[0].metrics_port, pids[0]), Target("node_exporter", exporter_port, exporter.pid)]
        idle_agent = Target("kumo-agent-idle", agents[1].metrics_port, pids[1])

        # Probe CPU: a quiet window, nothing scraping, both agents side by side.
        time.sleep(3 * INTERVAL)  # every probe has run and the plugin's start-up work is done
        before = [targets[0].cpu_seconds(), idle_agent.cpu_seconds()]
        time.sleep(idle)
        spent = [targets[0].cpu_seconds() - before[0], idle_agent.cpu_seconds() - before[1]]
        per_round = (spent[0] - spent[1]) / (idle / INTERVAL)

        for target in targets:
            for _ in range(10):
                target.scrape()
            target.times.clear()
        cpu_before = [t.cpu_seconds() for t in targets]
        for _ in range(scrapes):
            for target in targets:
                target.scrape()
        cpu_per_scrape = [(t.cpu_seconds() - b) / scrapes for t, b in zip(targets, cpu_before, strict=True)]
        rss = [t.rss_mb() for t in targets]
    finally:
        if exporter is not None:
            exporter.terminate()
            exporter.wait(10)
        for agent in agents:
            agent.stop()
        controller.stop()

    exporter_version = subprocess.run([exporter_bin, "--version"], capture_output=True, text=True, check=False)  # noqa: S603
    print(f"node_exporter: {(exporter_version.stdout or exporter_version.stderr).splitlines()[0]}")
    print(f"{scrapes} alternating scrapes each, keep-alive, 127.0.0.1")
    print(f"{'':15} {'median ms':>10} {'p90 ms':>8} {'bytes':>8} {'series':>7} {'CPU ms/scrape':>14} {'RSS MB':>7}")
    for target, cpu, mb in zip(targets, cpu_per_scrape, rss, strict=True):
        print(f"{target.name:15} {statistics.median(target.times) * 1000:10.2f} {percentile(target.times, 0.9) * 1000:8.2f} "
              f"{target.size:8d} {target.series:7d} {cpu * 1000:14.2f} {mb:7.1f}")
    agent_t, exporter_t = (statistics.median(t.times) for t in targets)
    print(f"scrape latency ratio agent/node_exporter: {agent_t / exporter_t:.2f} (target < 1: "
          f"{'OK' if agent_t < exporter_t else 'MISSED'})")
    print(f"CPU per scrape ratio agent/node_exporter: {cpu_per_scrape[0] / cpu_per_scrape[1]:.2f}")
    print(f"RSS ratio agent/node_exporter: {rss[0] / rss[1]:.2f} (the whole agent, every plugin loaded; target <= {RSS_TARGET_MB:.0f} MB: "
          f"{'OK' if rss[0] <= RSS_TARGET_MB else 'OVER'})")
    print(f"agent CPU per probe round ({len(probes(0))} probes, over {idle:.0f} s): {per_round * 1000:.2f} ms "
          f"(agent with probes {spent[0] * 1000:.0f} ms minus the same agent without {spent[1] * 1000:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=300, help="scrapes of each endpoint (default 300)")
    parser.add_argument("--idle", type=float, default=20.0, help="seconds of probes without scrapes for the CPU figure")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kumo-bench-monitoring-") as tmp:
        run(Path(tmp), args.scrapes, args.idle)


if __name__ == "__main__":
    main()
