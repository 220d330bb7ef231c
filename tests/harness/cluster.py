"""A real ``kumo-controller`` for tests: initialised in a temporary directory and run as a
subprocess on 127.0.0.1 (or another address of this machine), so tests go through TLS, the
store and the CLI exactly as users do.

    def test_x(controller):
        controller.admin("GET", "/v1/nodes")                 # JSON, AssertionError on >= 400
        status, body = controller.call("GET", "/v1/nodes", cert=None)   # any identity, any status
        controller.kill(); controller.start()                # crash and restart, same state

``controller_factory(**settings)`` makes more (e.g. ``node_cert_ttl=20``);
``controller_factory(init_args=["--database", url])`` makes one on PostgreSQL, and
``controller_factory(share_with=ctl)`` a second controller of ``ctl``'s fleet: the same
PostgreSQL database and CA (``init --database --ca-from``), its own ports and URL;
``controller_factory(host=ADDRESS)`` one that listens on ADDRESS instead of 127.0.0.1 (where
agents in another network namespace reach it: :class:`tests.harness.libvirt.HostNetwork`).
Heartbeats are every second so readiness shows quickly.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from controller.store import is_database_url, open_store
from tests.harness import free_port

START_TIMEOUT = 30.0
STORE = os.environ.get("KUMO_TEST_DATABASE", "sqlite")


def controller_command() -> list[str]:
    script = Path(sys.executable).with_name("kumo-controller")
    return [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]


class ControllerProcess:
    """One initialised controller directory and, while started, its process."""

    def __init__(self, directory: Path, settings: dict[str, Any], init_args: list[str] = (), host: str = "127.0.0.1"):
        self.dir = directory
        # Both listeners on ``host`` alone: init puts it in the server certificate and the URL
        # that join strings and kumoctl.yaml give.
        self.host = host
        self.port, self.enroll_port = free_port(), free_port()
        result = subprocess.run(  # noqa: S603 - fixed argument list
            [*controller_command(), "init", "--dir", str(directory), "--listen", f"{host}:{self.port}",
             "--enroll-listen", f"{host}:{self.enroll_port}", *init_args],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert result.returncode == 0, result.stderr
        self.config_path = directory / "controller.yaml"
        config = yaml.safe_load(self.config_path.read_text())
        # Every test node is this one machine: one busy measurement is every node's, so
        # measured CPU only ranks nodes here (test_scheduler covers the limit itself).
        config.update({"heartbeat_interval": 1.0, "poll_timeout": 5.0, "log_level": "debug",
                       "placement_cpu_busy_max": 1.0, **settings})
        self.config_path.write_text(yaml.safe_dump(config))
        self.database: str = config["database"]
        self.pki = directory / "pki"
        self.url = f"https://{host}:{self.port}"
        self.kumoctl_config = directory / "kumoctl.yaml"
        self.log_path = directory / "controller.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def context(self, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
        """A client TLS context trusting the Kumo CA, presenting ``cert`` (certificate, key) if given."""
        context = ssl.create_default_context(cafile=str(self.pki / "ca.crt"))
        if cert is not None:
            context.load_cert_chain(*cert)
        return context

    @property
    def admin_cert(self) -> tuple[Path, Path]:
        return self.pki / "admin.crt", self.pki / "admin.key"

    def call(self, method: str, path: str, body: Any = None, cert: tuple[Path, Path] | None = None,
             raw: bytes | None = None, port: int | None = None) -> tuple[int, Any]:
        """(status, decoded JSON) of one request; ``raw`` sends bytes as they are."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        request = urllib.request.Request(
            f"https://{self.host}:{port or self.port}{path}", data=data, method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, context=self.context(cert), timeout=30) as response:  # noqa: S310
                status, text = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, text = exc.code, exc.read()
        try:
            return status, json.loads(text) if text else None
        except ValueError:
            return status, text.decode(errors="replace")

    def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, answer = self.call(method, path, body, cert=self.admin_cert)
        if status >= 400:
            raise AssertionError(f"{method} {path} -> {status}: {answer}")
        return answer

    def watcher(self) -> Callable[[str], Any]:
        """``GET path`` as the admin over one kept-alive connection, for a benchmark that polls:
        a connection per poll (:meth:`admin`) costs the controller a TLS handshake each time,
        on the very cores the benchmark measures."""
        conn = http.client.HTTPSConnection(self.host, self.port, context=self.context(self.admin_cert), timeout=30)

        def get(path: str) -> Any:
            for attempt in (1, 2):
                try:
                    conn.request("GET", path)
                    response = conn.getresponse()
                    text = response.read()
                    break
                except (http.client.RemoteDisconnected, ConnectionError):
                    conn.close()  # the controller's keep-alive ran out: once more on a new one
                    if attempt == 2:
                        raise
            if response.status >= 400:
                raise AssertionError(f"GET {path} -> {response.status}: {text!r}")
            return json.loads(text)

        return get

    def delete_instance(self, name: str, limit: float = 60.0) -> None:
        """Delete instance ``name`` and wait for its node to have done it: instances outlive
        their agents, so a test that stops its agents first would leave it running."""
        status, answer = self.call("DELETE", f"/v1/instances/{name}", cert=self.admin_cert)
        task = answer.get("task") if status < 300 and isinstance(answer, dict) else None
        deadline = time.monotonic() + limit
        while task and time.monotonic() < deadline:
            status, shown = self.call("GET", f"/v1/tasks/{task['id']}", cert=self.admin_cert)
            if status != 200 or shown["state"] in ("succeeded", "failed"):
                return
            time.sleep(0.2)

    def start(self, ready: bool = True) -> None:
        """Run it and wait until it answers (``ready``: with its store open, not 503)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argument list
                [*controller_command(), "run", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"kumo-controller exited {self.proc.returncode}:\n{self.log_tail()}")
            try:
                if self.call("GET", "/v1/openapi.json", cert=self.admin_cert)[0] != 503 or not ready:
                    return
            except (OSError, ssl.SSLError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"kumo-controller did not answer within {START_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kumo-controller ignored SIGTERM:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def sql(self, statement: str, *args: Any) -> list[dict[str, Any]]:
        """Run one statement (``?`` placeholders) on the controller's database, whichever it is."""

        async def run() -> list[dict[str, Any]]:
            store = await open_store(self.database).open()
            try:
                async with store.db.transaction() as tx:
                    return await tx.all(statement, *args)
            finally:
                await store.close()

        return asyncio.run(run())

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def controller_factory(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., ControllerProcess]]:
    """Factory: ``controller_factory(init_args=(), share_with=None, host="127.0.0.1", **settings)`` → a started
    :class:`ControllerProcess`.

    With ``KUMO_TEST_DATABASE=postgresql`` in the environment, every controller that does not
    name its database gets a new one on the session's PostgreSQL (the Debian leg of
    ``make test`` runs the whole suite that way; the PyPI leg keeps the SQLite default).
    """
    made: list[ControllerProcess] = []

    def make(init_args: list[str] = (), share_with: ControllerProcess | None = None, host: str = "127.0.0.1",
             **settings: Any) -> ControllerProcess:
        init_args = list(init_args)
        if share_with is not None:
            assert is_database_url(share_with.database), "controllers share a fleet only on PostgreSQL"
            init_args += ["--database", share_with.database, "--ca-from", str(share_with.pki)]
        if STORE == "postgresql" and "--database" not in init_args:
            init_args += ["--database", request.getfixturevalue("postgres").database()]
        ctl = ControllerProcess(tmp_path_factory.mktemp("controller"), settings, init_args, host)
        made.append(ctl)
        ctl.start()
        return ctl

    yield make
    for ctl in made:
        ctl.stop()


@pytest.fixture
def controller(controller_factory: Callable[..., ControllerProcess]) -> ControllerProcess:
    """A started controller with default settings (heartbeats every second)."""
    return controller_factory()
