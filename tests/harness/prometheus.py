"""A private Prometheus server for tests (Debian's package, started on 127.0.0.1).

    def test_x(prometheus):
        server = prometheus({"scrape_configs": [...]})   # started, ready
        server.query('kumo_probe_value{probe="tcp"}')      # the result vector

Each server has its own config, storage directory and port, and is stopped at the end.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import free_port, require


class PrometheusServer:
    def __init__(self, workdir: Path, config: dict[str, Any]):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = workdir / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, **config}))
        self.log_path = workdir / "prometheus.log"
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argument list
                ["prometheus", f"--config.file={self.config_path}", f"--storage.tsdb.path={workdir / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while not self._ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"prometheus did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.1)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2):  # noqa: S310 - loopback
                return True
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:  # noqa: S310
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        return self.api("/api/v1/query", query=expression)["result"]

    def wait_for(self, expression: str, timeout: float = 60.0, count: int = 1) -> list[dict[str, Any]]:
        """The first result of ``expression`` with at least ``count`` series; fails with the targets' state after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = self.query(expression)
            if len(result) >= count:
                return result
            time.sleep(0.5)
        targets = self.api("/api/v1/targets")["activeTargets"]
        raise AssertionError(f"{expression!r} stayed empty; targets: {json.dumps(targets)[:3000]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[dict[str, Any]], PrometheusServer]]:
    """Factory: ``prometheus(config)`` → a started :class:`PrometheusServer` (``global`` is added)."""
    require(shutil.which("prometheus") is not None, "prometheus (Debian package; make deps)")
    servers: list[PrometheusServer] = []

    def start(config: dict[str, Any]) -> PrometheusServer:
        server = PrometheusServer(tmp_path_factory.mktemp("prometheus"), config)
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
