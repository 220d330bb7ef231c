"""Idle memory of ``kumo-agent run`` (every installed plugin loaded) against its import floor.

Baseline, measured in the same run with the same interpreter: a Python that only imports
the agent's dependencies (aiohttp, pluggy, yaml, cryptography, psutil, prometheus_client)
and sleeps. The agent is joined to a real controller (``kumo-controller init`` + ``run`` in
a temporary directory), left idle until it has heartbeated for a while, and its resident
set size is sampled. Target: 45 MB.

    .venv/bin/python bench/bench_agent_rss.py
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

TARGET_MB = 45.0
IDLE_SECONDS = 15.0
SAMPLES = 5
MB = 1024 * 1024
FLOOR_CODE = (
    "import aiohttp, pluggy, yaml, cryptography, cryptography.x509, psutil, prometheus_client, sys, time\n"
    "print('ready', flush=True)\n"
    "time.sleep(3600)\n"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def script(name: str) -> list[str]:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        sys.exit(f"{path} is missing: install kumo into this interpreter's environment (make venv)")
    return [str(path)]


def sample_rss(pid: int) -> float:
    """Median of a few RSS samples, in MB (a single sample can catch a transient allocation)."""
    values = []
    for _ in range(SAMPLES):
        values.append(psutil.Process(pid).memory_info().rss / MB)
        time.sleep(0.5)
    return sorted(values)[len(values) // 2]


def floor_rss() -> float:
    proc = subprocess.Popen([sys.executable, "-c", FLOOR_CODE], stdout=subprocess.PIPE)  # noqa: S603
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
        time.sleep(1)
        return sample_rss(proc.pid)
    finally:
        proc.kill()
        proc.wait()


def admin_post(ctl_dir: Path, port: int, path: str, body: dict) -> dict:
    """One admin request with the certificate ``kumo-controller init`` wrote into DIR/pki."""
    pki = ctl_dir / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(pki / "admin.crt", pki / "admin.key")
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    data = json.loads(response.read())
    if response.status >= 400:
        sys.exit(f"controller refused {path}: {data}")
    return data


def wait_for(predicate, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.2)


def agent_rss(work: Path) -> tuple[float, bool]:
    """The idle agent's RSS in MB, and whether it has libvirt loaded (the kvm plugin connected)."""
    ctl_dir = work / "controller"
    port = free_port()
    subprocess.run(  # noqa: S603
        [*script("kumo-controller"), "init", "--dir", str(ctl_dir), "--listen", f"127.0.0.1:{port}", "--san", "127.0.0.1"],
        check=True, capture_output=True,
    )
    ctl_log = (work / "controller.log").open("wb")
    controller = subprocess.Popen(  # noqa: S603
        [*script("kumo-controller"), "run", "--config", str(ctl_dir / "controller.yaml")], stdout=ctl_log, stderr=subprocess.STDOUT
    )
    agent = None
    try:
        wait_for(lambda: _port_open(port), "the controller to listen")
        join = admin_post(ctl_dir, port, "/v1/tokens", {"ttl_seconds": 600, "uses": 1})["join"]
        state = work / "agent-state"
        subprocess.run(  # noqa: S603
            [*script("kumo-agent"), "join", "--controller", f"https://127.0.0.1:{port}", "--token", join, "--state-dir", str(state)],
            check=True, capture_output=True,
        )
        config = work / "agent.yaml"
        config.write_text(yaml.safe_dump({"state_dir": str(state), "metrics": {"listen": f"127.0.0.1:{free_port()}"}}))
        log = work / "agent.log"
        with log.open("wb") as out:
            agent = subprocess.Popen([*script("kumo-agent"), "run", "--config", str(config)], stdout=out, stderr=subprocess.STDOUT)  # noqa: S603
        wait_for(lambda: "connected as node" in log.read_text(), "the agent to register")
        time.sleep(IDLE_SECONDS)
        rss = sample_rss(agent.pid)
        libvirt = any("libvirt.so" in m.path for m in psutil.Process(agent.pid).memory_maps())
        return rss, libvirt
    finally:
        for proc in (agent, controller):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        ctl_log.close()


def _port_open(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    return True


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kumo-bench-rss-") as tmp:
        floor = floor_rss()
        agent, libvirt = agent_rss(Path(tmp))
    import aiohttp
    import cryptography
    import prometheus_client  # noqa: F401 - versions are part of the result

    print(f"python {sys.version.split()[0]}, aiohttp {aiohttp.__version__}, cryptography {cryptography.__version__}")
    print(f"import floor (dependencies only): {floor:6.1f} MB")
    print(f"kumo-agent run, idle, all plugins: {agent:6.1f} MB")
    # libvirt and the libraries it links (~11 MB) stay resident once the kvm plugin connects.
    print(f"libvirt loaded in the agent (kvm plugin connected): {'yes' if libvirt else 'no'}")
    print(f"ratio agent/floor: {agent / floor:.2f}x; agent above floor: {agent - floor:.1f} MB")
    verdict = "OK" if agent <= TARGET_MB else "OVER"
    print(f"target: agent <= {TARGET_MB:.0f} MB -> {verdict}")


if __name__ == "__main__":
    main()
