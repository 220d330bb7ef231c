"""Scrape cost of per-instance usage: does a scrape cost the same per instance with 1, 10 and
100 instances? Against node_exporter's scrape time in the same run.

The agent's side is the real thing minus the controller: the process plugin through the
agent's Hooks, N real process instances (``sleep``), and the agent's own /metrics server
(``MetricsServer``, rendering in a worker thread as a running agent does), in a thread of
this process with its own event loop. Debian's ``prometheus-node-exporter`` with its
default collectors is the baseline. Scrapes alternate between the two over keep-alive
connections, as Prometheus makes them.

Per instance is the scrape time above the same agent's with no instance, divided by N;
flat means it stays about the same from N=1 to N=100. ``usage()`` alone is also timed
directly (the /proc pass and the family building, without HTTP). It prints; it asserts
nothing.

    .venv/bin/python bench/bench_instance_usage.py [--scrapes 200] [--counts 1,10,100]
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Coroutine
from concurrent.futures import Future
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_monitoring import wait_port  # noqa: E402 - a sibling script: bench/ is sys.path[0]

from agent.metrics import AgentMetrics, MetricsServer  # noqa: E402
from agent.pluginmanager import Hooks, make_plugin_manager  # noqa: E402
from agent.sdk import ControllerUnavailable, ImageCache, PluginContext  # noqa: E402
from agent.usage import usage_families  # noqa: E402
from plugins.process import ProcessPlugin  # noqa: E402
from tests.harness import free_port  # noqa: E402

PREFIX = "kumo-usage-bench-"


class Agent:
    """The process plugin and the agent's /metrics server on an event loop in a thread."""

    def __init__(self, state: Path):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="agent-loop", daemon=True)
        self.thread.start()
        self.plugin = ProcessPlugin()
        self.hooks = Hooks(make_plugin_manager({"process": self.plugin}))
        self.metrics = AgentMetrics(self.hooks.metrics)
        self.server = MetricsServer(self.metrics, "127.0.0.1", 0)
        self.names: list[str] = []
        self.run(self._start(state))

    def run(self, coroutine: Coroutine[Any, Any, Any]) -> Any:
        future: Future[Any] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(120)

    async def _start(self, state: Path) -> None:
        async def offline(*_args: Any, **_kwargs: Any) -> Any:
            raise ControllerUnavailable("no controller in this benchmark")

        await self.plugin.kumo_startup(PluginContext("process", state, state, None, self.hooks, lambda: None,
                                                     offline, ImageCache(state / "images")))
        self.hooks.load_drivers()
        await self.server.start()

    async def _task(self, kind: str, payload: dict[str, Any]) -> None:
        await self.hooks.handle_task(kind, payload, f"bench-{kind}")

    def grow(self, count: int) -> None:
        while len(self.names) < count:
            name = f"{PREFIX}{len(self.names)}"
            self.run(self._task("process.create", {"name": name, "options": {"command": ["sleep", "3600"]}}))
            self.names.append(name)

    def usage_ms(self, rounds: int = 50) -> float:
        """Median time of reading every instance's usage and building its families."""
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            usage_families(self.hooks.drivers.usage())
            times.append(time.perf_counter() - started)
        return statistics.median(times) * 1000

    def close(self) -> None:
        for name in self.names:
            self.run(self._task("process.delete", {"name": name}))
        self.run(self.server.stop())
        self.run(self.plugin.kumo_shutdown())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Target:
    """One ``/metrics`` endpoint scraped over a keep-alive connection."""

    def __init__(self, name: str, port: int):
        self.name, self.port = name, port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        self.times: list[float] = []
        self.series = 0

    def scrape(self) -> None:
        started = time.perf_counter()
        self.conn.request("GET", "/metrics")
        response = self.conn.getresponse()
        body = response.read()
        self.times.append(time.perf_counter() - started)
        if response.status != 200:
            sys.exit(f"{self.name}: /metrics answered {response.status}")
        self.series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))

    def median_ms(self) -> float:
        return statistics.median(self.times) * 1000


def measure(targets: list[Target], scrapes: int) -> None:
    for target in targets:
        for _ in range(10):
            target.scrape()
        target.times.clear()
    for _ in range(scrapes):
        for target in targets:
            target.scrape()


def run(work: Path, scrapes: int, counts: list[int]) -> None:
    exporter_bin = shutil.which("prometheus-node-exporter")
    if exporter_bin is None:
        sys.exit("prometheus-node-exporter is missing: run scripts/deps/50-prometheus.sh")
    exporter_port = free_port()
    exporter = subprocess.Popen(  # noqa: S603 - fixed argument list
        [exporter_bin, f"--web.listen-address=127.0.0.1:{exporter_port}"],
        stdout=subprocess.DEVNULL, stderr=(work / "node_exporter.log").open("wb"), stdin=subprocess.DEVNULL,
    )
    (work / "state").mkdir(mode=0o700)
    agent = Agent(work / "state")
    rows = []
    try:
        wait_port(exporter_port, "node_exporter")
        for count in [0, *counts]:
            agent.grow(count)
            targets = [Target("kumo-agent", agent.server.port), Target("node_exporter", exporter_port)]
            measure(targets, scrapes)
            rows.append((count, targets[0].median_ms(), targets[0].series, agent.usage_ms(),
                         targets[1].median_ms(), targets[1].series))
    finally:
        agent.close()
        exporter.terminate()
        exporter.wait(10)

    print(f"{scrapes} alternating scrapes of each endpoint per row, keep-alive, 127.0.0.1; "
          "instances are `sleep` process instances")
    print(f"{'N':>3} {'agent ms':>9} {'series':>7} {'per inst ms':>12} {'marginal ms':>12} {'usage() ms':>11} "
          f"{'usage()/inst ms':>16} {'node_exp ms':>12} {'series':>7} {'ratio':>6}")
    base = rows[0][1]
    previous = rows[0]
    for count, agent_ms, series, usage_ms, exporter_ms, exporter_series in rows:
        per = f"{(agent_ms - base) / count:12.3f}" if count else f"{'-':>12}"
        added = count - previous[0]
        marginal = f"{(agent_ms - previous[1]) / added:12.3f}" if added else f"{'-':>12}"
        per_usage = f"{usage_ms / count:16.3f}" if count else f"{'-':>16}"
        print(f"{count:3d} {agent_ms:9.2f} {series:7d} {per} {marginal} {usage_ms:11.3f} {per_usage} "
              f"{exporter_ms:12.2f} {exporter_series:7d} {agent_ms / exporter_ms:6.2f}")
        previous = (count, agent_ms)
    print("per inst: (scrape at N - scrape at 0) / N, the one /proc pass included; marginal: what each instance "
          "added since the row above; ratio: agent scrape / node_exporter scrape")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=200, help="scrapes of each endpoint per row (default 200)")
    parser.add_argument("--counts", default="1,10,100", help="instance counts, comma-separated (default 1,10,100)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kumo-bench-usage-") as tmp:
        run(Path(tmp), args.scrapes, [int(n) for n in args.counts.split(",")])


if __name__ == "__main__":
    main()
