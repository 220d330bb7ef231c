"""A real ``kumo-controller`` for tests: initialised in a temporary directory and run as a
subprocess on 127.0.0.1, so tests go through TLS, the store and the CLI exactly as users do.

    def test_x(controller):
        controller.admin("GET", "/v1/nodes")                 # JSON, AssertionError on >= 400
        status, body = controller.call("GET", "/v1/nodes", cert=None)   # any identity, any status
        controller.kill(); controller.start()                # crash and restart, same state

``controller_factory(**settings)`` makes more (e.g. ``node_cert_ttl=20``);
``controller_factory(share_with=ctl)`` makes a second controller process of the same fleet: a
copy of ``ctl``'s CA and certificates, the same SQLite database, its own ports. Start it after
the nodes it should serve have joined (a controller reads the node certificates it accepts
when it starts). Heartbeats are every second so readiness shows quickly.
"""

from __future__ import annotations

import json
import shutil
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

from tests.harness import free_port

START_TIMEOUT = 30.0


def controller_command() -> list[str]:
    script = Path(sys.executable).with_name("kumo-controller")
    return [str(script)] if script.exists() else [sys.executable, "-m", "controller.cli"]


class ControllerProcess:
    """One initialised controller directory and, while started, its process."""

    def __init__(self, directory: Path, settings: dict[str, Any], share_with: ControllerProcess | None = None):
        self.dir = directory
        self.port, self.enroll_port = free_port(), free_port()
        self.pki = directory / "pki"
        self.url = f"https://127.0.0.1:{self.port}"
        self.config_path = directory / "controller.yaml"
        self.kumoctl_config = directory / "kumoctl.yaml"
        if share_with is None:
            result = subprocess.run(  # noqa: S603 - fixed argument list
                [*controller_command(), "init", "--dir", str(directory), "--listen", f"127.0.0.1:{self.port}",
                 "--enroll-listen", f"127.0.0.1:{self.enroll_port}"],
                capture_output=True, text=True, timeout=60, check=False,
            )
            assert result.returncode == 0, result.stderr
            config = yaml.safe_load(self.config_path.read_text())
        else:
            # The server certificate names 127.0.0.1, so the copy serves on any port of it.
            shutil.copytree(share_with.pki, self.pki)
            config = yaml.safe_load(share_with.config_path.read_text())
            config.update({"pki_dir": str(self.pki), "listen": f"127.0.0.1:{self.port}",
                           "enroll_listen": f"127.0.0.1:{self.enroll_port}", "url": self.url})
            kumoctl = yaml.safe_load(share_with.kumoctl_config.read_text())
            self.kumoctl_config.write_text(yaml.safe_dump({**kumoctl, "controller": self.url,
                                                           "ca": str(self.pki / "ca.crt"),
                                                           "cert": str(self.pki / "admin.crt"),
                                                           "key": str(self.pki / "admin.key")}))
        config.update({"heartbeat_interval": 1.0, "poll_timeout": 5.0, "log_level": "debug", **settings})
        self.config_path.write_text(yaml.safe_dump(config))
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
            f"https://127.0.0.1:{port or self.port}{path}", data=data, method=method,
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

    def start(self) -> None:
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
                self.call("GET", "/v1/openapi.json", cert=self.admin_cert)
                return
            except (OSError, ssl.SSLError):
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

    def log_tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture
def controller_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., ControllerProcess]]:
    """Factory: ``controller_factory(share_with=None, **settings)`` → a started :class:`ControllerProcess`."""
    made: list[ControllerProcess] = []

    def make(share_with: ControllerProcess | None = None, **settings: Any) -> ControllerProcess:
        ctl = ControllerProcess(tmp_path_factory.mktemp("controller"), settings, share_with)
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
