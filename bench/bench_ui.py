"""The web interface's fleet page against ``kumoctl nodes list --output json``, same data, same run.

A controller on SQLite is given N registered nodes (default 10,000) written straight into its
store, then serves both. For the page, headless Chromium (Debian's, through selenium) signs
in once and loads the fleet page ``--views`` times; a view's first meaningful paint is the
moment the page has rendered its table with data (``document.body.dataset.loaded``, set by
the page's script) since navigation started. For the listing, ``kumoctl nodes list --output
json`` reads every node, a page of 500 at a time as it always does. Both are charged the
controller process's CPU seconds (utime + stime) over their runs, divided by the runs.

Target (issue 15): first meaningful paint under 1 s, and the controller's CPU per page view
within 2x of the listing's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_fleet import Controller, cpu_seconds
from bench_heartbeat import free_port, tool

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,1000", "--ignore-certificate-errors")


def seed(database: Path, nodes: int) -> None:
    """N nodes as registration leaves them, written in one transaction (the controller must
    have created its schema: it ran once)."""
    facts = json.dumps({"cpus": 8, "memory_bytes": 32 << 30, "memory_available_bytes": 30 << 30})
    plugins = json.dumps({"process": {"available": True, "reason": "", "kinds": ["process"], "attributes": {}},
                          "kvm": {"available": False, "reason": "no /dev/kvm", "kinds": ["kvm"], "attributes": {}}})
    capacity = json.dumps({"cpus": 8, "memory_bytes": 32 << 30})
    now = time.time()
    with sqlite3.connect(database) as conn:
        conn.executemany(
            "INSERT INTO nodes (id, hostname, created_at, last_seen, agent_version, facts, plugins, instances, capacity) "
            "VALUES (?, ?, ?, ?, '0.1.0', ?, ?, '[]', ?)",
            [(f"n-{i:012x}", f"node{i}", now, now, facts, plugins, capacity) for i in range(nodes)],
        )


def kumoctl(config: Path, *args: str) -> str:
    return subprocess.run([tool("kumoctl"), "--config", str(config), *args], check=True,  # noqa: S603
                          capture_output=True, text=True).stdout


def browser(profile: Path):  # noqa: ANN201 - selenium is imported here: only this benchmark needs it
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or sys.exit("bench: chromium is missing (make deps)")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)


def paint_ms(driver, url: str) -> float:  # noqa: ANN001
    driver.get(url)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        loaded = driver.execute_script(
            "return document.querySelector('tr[data-node]') && document.body.dataset.loaded"
            " ? Number(document.body.dataset.loaded) - performance.timeOrigin : null")
        if loaded is not None:
            return float(loaded)
        time.sleep(0.01)
    sys.exit(f"bench: the fleet page at {url} did not render within 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=10_000, help="registered nodes (default 10,000)")
    parser.add_argument("--views", type=int, default=10, help="page views and listings measured (default 10)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kumo-bench-ui-"))
    ctl = Controller(work, "controller", [])
    config = ctl.dir / "controller.yaml"
    ui_port = free_port()
    with config.open("a") as out:
        out.write(f"ui_listen: 127.0.0.1:{ui_port}\n")
    ctl.start()
    driver = None
    try:
        kumoctl(ctl.dir / "kumoctl.yaml", "nodes", "list")  # the schema exists once this answers
        seed(ctl.dir / "controller.db", args.nodes)
        kumoctl_config = ctl.dir / "kumoctl.yaml"
        assert len(json.loads(kumoctl(kumoctl_config, "nodes", "list", "--output", "json"))) == args.nodes

        listing_wall, before = [], cpu_seconds(ctl.proc.pid)
        for _ in range(args.views):
            started = time.perf_counter()
            kumoctl(kumoctl_config, "nodes", "list", "--output", "json")
            listing_wall.append(time.perf_counter() - started)
        listing_cpu = (cpu_seconds(ctl.proc.pid) - before) / args.views

        driver = browser(work / "chromium")
        driver.get(kumoctl(kumoctl_config, "ui", "--no-open").strip())
        page = f"https://127.0.0.1:{ui_port}/"
        paint_ms(driver, page)  # the first view warms the browser's caches of the scripts
        paints, before = [], cpu_seconds(ctl.proc.pid)
        for _ in range(args.views):
            paints.append(paint_ms(driver, page))
        page_cpu = (cpu_seconds(ctl.proc.pid) - before) / args.views
    finally:
        if driver is not None:
            driver.quit()
        ctl.proc.terminate()
        ctl.proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)

    paint = statistics.median(paints)
    print(f"{args.nodes} nodes, {args.views} views each (os.cpu_count()={os.cpu_count()})")
    print(f"fleet page: first meaningful paint median {paint:.0f} ms (max {max(paints):.0f} ms); "
          f"controller CPU {page_cpu * 1000:.1f} ms per view")
    print(f"kumoctl nodes list --output json: {statistics.median(listing_wall) * 1000:.0f} ms wall; "
          f"controller CPU {listing_cpu * 1000:.1f} ms per listing")
    ratio = page_cpu / listing_cpu if listing_cpu else float("inf")
    print(f"controller CPU, page view / JSON listing: {ratio:.2f}x")
    met = paint < 1000 and ratio <= 2
    print(f"target: paint < 1 s and CPU within 2x: {'met' if met else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
