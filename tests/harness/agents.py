"""Real ``kumo-agent`` processes joined to the real controller, for any test that needs a node.

Use the ``kumo_agent`` fixture (a factory) together with the controller fixture of
:mod:`tests.harness.cluster`::

    def test_my_plugin(controller, kumo_agent):
        agent = kumo_agent(plugins={"rsyslog": {"target": "127.0.0.1:5514"}})
        task = controller.admin("POST", "/v1/tasks", {"node": agent.node_id, "kind": "x.run", "payload": {}})
        ...
        agent.restart()          # SIGTERM, start again, wait until ready: same node id
        agent.kill()             # SIGKILL, as a crash (workloads are not touched either way)

Each call makes a join token, runs the real ``kumo-agent join`` and then ``kumo-agent run``
as subprocesses with their own state directory and ``agent.yaml`` (metrics on a free
127.0.0.1 port, log level debug), and waits until the node is ``ready`` in ``GET /v1/nodes``.
Agents are stopped (SIGTERM, then SIGKILL) when the test ends, whatever happened.

Third-party plugins load exactly as built-ins do, through an entry point: install a plugin
project with :func:`install_plugin` (the ``example_plugin`` fixture installs
``tests/example_plugin``), or write a one-module plugin with
:func:`write_plugin_distribution`, and pass the directory in ``pythonpath``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins.kvm.acceleration import VERDICT_FILE, decide
from tests.harness import REPO, free_port

READY_TIMEOUT = 60.0
EXAMPLE_PLUGIN = REPO / "tests" / "example_plugin"
# What the agent logs each time it registers with the controller.
CONNECTED = "connected as node"


def agent_command() -> list[str]:
    """``kumo-agent`` of the interpreter running the tests (the PyPI venv or the Debian one)."""
    script = Path(sys.executable).with_name("kumo-agent")
    return [str(script)] if script.exists() else [sys.executable, "-m", "agent.cli"]


def write_plugin_distribution(directory: Path, name: str, module_source: str, entry: str) -> Path:
    """Make ``directory`` hold an installed third-party plugin: a module and its ``*.dist-info``.

    ``name`` is the plugin (entry point) name, ``module_source`` the module's code and
    ``entry`` the entry point value (``"module:Class"``). Put ``directory`` on PYTHONPATH
    (``kumo_agent(pythonpath=[directory])``) and the agent finds it through
    ``importlib.metadata`` like any pip-installed plugin.
    """
    module = entry.split(":")[0]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{module}.py").write_text(module_source)
    dist = directory / f"kumo_plugin_{name}-0.1.dist-info"
    dist.mkdir(exist_ok=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: kumo-plugin-{name}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[kumo.plugins]\n{name} = {entry}\n")
    return directory


def install_plugin(project: Path, target: Path) -> Path:
    """``pip install --no-deps`` the plugin project ``project`` into the directory ``target``,
    never into the test's venv, and return ``target``: the agent finds the plugin through its
    installed entry point once ``target`` is on its ``pythonpath``.

    The build uses the venv's setuptools (no download) from a copy of the project, so the
    source tree gets no build/ or egg-info.
    """
    source = target.with_name(target.name + "-src")
    shutil.copytree(project, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    result = subprocess.run(  # noqa: S603 - fixed argument list
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, f"pip install {project} failed:\n{result.stdout}{result.stderr}"
    return target


@pytest.fixture(scope="session")
def example_plugin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/example_plugin (the kind ``sleep``) installed with pip into a directory of its own."""
    return install_plugin(EXAMPLE_PLUGIN, tmp_path_factory.mktemp("example-plugin") / "site")


@pytest.fixture(scope="session")
def kvm_verdict(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kvm plugin's acceleration verdict for this boot, probed once for the whole run.

    The plugin proves KVM with a real probe guest once per boot and keeps the verdict in its
    state directory; where /dev/kvm only emulates (CI's machines) the probe waits out its
    5 s. Every test agent starts with a new state directory, so each would wait again (about
    5 minutes of each CI leg): :func:`start_agent` gives it this verdict instead, as an agent
    restarted after its probe has it. test_kvm.py runs the probe itself, and the demo's and
    the packaged agents probe as a new node does.
    """
    directory = tmp_path_factory.mktemp("kvm-verdict")
    asyncio.run(decide("auto", directory))
    return directory / VERDICT_FILE


@dataclasses.dataclass
class AgentProcess:
    """One joined node running ``kumo-agent run``. ``node_id`` is fixed at join and survives restarts."""

    controller: Any
    workdir: Path
    state_dir: Path
    config_path: Path
    log_path: Path
    env: dict[str, str]
    node_id: str = ""
    metrics_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    join_stderr: str = ""  # what `kumo-agent join` said on stderr
    prefix: list[str] = dataclasses.field(default_factory=list)  # runs the agent elsewhere (nsenter ...)

    def start(self, wait_ready: bool = True) -> None:
        """Start ``kumo-agent run`` (output appended to ``log_path``); wait until the node is ready.

        Ready means this new process registered (its log says so) and the controller lists
        the node as ``ready``.
        """
        connected_before = self.log_text().count(CONNECTED)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - fixed argument list
                [*self.prefix, *agent_command(), "run", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.env,
                cwd=self.workdir,
                start_new_session=True,
            )
        if wait_ready:
            self.wait_log(CONNECTED, timeout=READY_TIMEOUT, count=connected_before + 1)
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT, since: float | None = None) -> dict[str, Any]:
        """Wait until ``GET /v1/nodes/{id}`` says ready (and, with ``since``, was seen after it)."""
        deadline = time.monotonic() + timeout
        node: dict[str, Any] = {}
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"kumo-agent exited {self.proc.returncode}:\n{self.log_tail()}")
            node = self.node()
            if node.get("state") == "ready" and (since is None or _seen_after(node, since)):
                return node
            time.sleep(0.3)
        raise AssertionError(f"node {self.node_id} not ready after {timeout:.0f} s ({node}):\n{self.log_tail()}")

    def node(self) -> dict[str, Any]:
        """The controller's view of this node (``GET /v1/nodes/{id}``)."""
        return self.controller.admin("GET", f"/v1/nodes/{self.node_id}")

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM and wait; SIGKILL if it does not stop. Returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"kumo-agent ignored SIGTERM for {timeout:.0f} s:\n{self.log_tail()}") from None

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self, wait_ready: bool = True) -> None:
        """Stop cleanly (SIGTERM) and start again with the same state dir and config."""
        code = self.stop()
        assert code == 0, f"kumo-agent exited {code} on SIGTERM:\n{self.log_tail()}"
        self.start(wait_ready=wait_ready)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1) -> None:
        """Wait until ``text`` appears ``count`` times in the agent log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.log_text().count(text) >= count:
                return
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"kumo-agent exited {self.proc.returncode}:\n{self.log_tail()}")
            time.sleep(0.2)
        raise AssertionError(f"{text!r} not seen {count}x in the agent log after {timeout:.0f} s:\n{self.log_tail()}")


def wait_for(predicate: Callable[[], Any], what: str, limit: float = 60.0, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something true, and return that; AssertionError
    naming ``what`` after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what}")


def reported(agent: AgentProcess, name: str) -> dict[str, Any] | None:
    """The instance as the node itself last reported it (its heartbeat), or None."""
    return next((i for i in agent.node()["instances"] if i["name"] == name), None)


def running_on(agent: AgentProcess, name: str) -> dict[str, Any] | None:
    state = reported(agent, name)
    return state if state and state["state"] == "running" else None


def _seen_after(node: Mapping[str, Any], since: float) -> bool:
    from datetime import datetime

    try:
        return datetime.fromisoformat(str(node["last_seen"]).replace("Z", "+00:00")).timestamp() >= since
    except (KeyError, ValueError):
        return True


def join_agent(controller: Any, state_dir: Path, env: Mapping[str, str] | None = None,
               force: bool = False, enroll_port: int | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real ``kumo-agent join`` (``--force`` with ``force``) with a fresh single-use
    token (its join string names the controller; with ``enroll_port``, that port instead of
    the controller's enrollment port: a proxy's); returns the finished process."""
    token = controller.admin("POST", "/v1/tokens", {"ttl_seconds": 600, "uses": 1})["join"]
    if enroll_port is not None:
        prefix, _, rest = token.split(":", 2)
        token = f"{prefix}:{enroll_port}:{rest}"
    return subprocess.run(  # noqa: S603 - fixed argument list
        [*agent_command(), "join", "--token", token, "--state-dir", str(state_dir), *(["--force"] if force else [])],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(env or _base_env()),
        check=False,
    )


def _base_env(pythonpath: list[Path] | tuple[Path, ...] = ()) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(p) for p in pythonpath] + [str(REPO)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def start_agent(
    controller: Any,
    workdir: Path,
    plugins: Mapping[str, Any] | None = None,
    settings: Mapping[str, Any] | None = None,
    pythonpath: list[Path] | tuple[Path, ...] = (),
    start: bool = True,
    enroll_port: int | None = None,
    kvm_verdict: Path | None = None,
) -> AgentProcess:
    """Join a new node to ``controller`` with its state under ``workdir`` (through
    ``enroll_port`` if given) and (unless ``start=False``) run it; what the ``kumo_agent``
    fixture and the benchmarks use. ``kvm_verdict``: see the fixture of that name."""
    state_dir = workdir / "state"
    env = _base_env(pythonpath)
    joined = join_agent(controller, state_dir, env, enroll_port=enroll_port)
    assert joined.returncode == 0, f"kumo-agent join failed ({joined.returncode}): {joined.stderr}"
    if kvm_verdict is not None and kvm_verdict.exists():
        kvm_state = state_dir / "plugins" / "kvm"
        kvm_state.mkdir(mode=0o700, parents=True)
        shutil.copy(kvm_verdict, kvm_state / VERDICT_FILE)
    node_id = json.loads((state_dir / "join.json").read_text())["node_id"]
    metrics_port = free_port()
    config: dict[str, Any] = {
        "state_dir": str(state_dir),
        "log_level": "debug",
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        "image_cache": {"path": str(workdir / "images")},
        "plugins": dict(plugins or {}),
    }
    config.update(settings or {})
    config_path = workdir / "agent.yaml"
    config_path.write_text(yaml.safe_dump(config))
    agent = AgentProcess(
        controller=controller,
        workdir=workdir,
        state_dir=state_dir,
        config_path=config_path,
        log_path=workdir / "agent.log",
        env=env,
        node_id=node_id,
        metrics_port=metrics_port,
        join_stderr=joined.stderr,
    )
    if start:
        agent.start()
    return agent


@pytest.fixture
def kumo_agent(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, kvm_verdict: Path
) -> Iterator[Callable[..., AgentProcess]]:
    """Factory: ``kumo_agent(plugins=None, settings=None, pythonpath=(), start=True, controller=None,
    enroll_port=None, prefix=None)``.

    Returns an :class:`AgentProcess`. ``plugins`` becomes the ``plugins:`` table of
    agent.yaml; ``settings`` adds or overrides other top-level keys (``{"tasks":
    {"concurrency": 2}}``); ``pythonpath`` directories are put first on the agent's
    PYTHONPATH (third-party plugins); ``start=False`` joins and writes the config but does not
    run the agent; ``controller`` joins another controller than the ``controller`` fixture
    (e.g. one made with a short certificate lifetime); ``enroll_port`` joins through that port
    (a proxy to the enrollment port); ``prefix`` is put before the agent's command (``nsenter
    ...``: it runs on another "host"). Every agent is stopped when the test ends.
    """
    started: list[AgentProcess] = []

    def make(
        plugins: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        pythonpath: list[Path] | tuple[Path, ...] = (),
        start: bool = True,
        controller: Any = None,
        enroll_port: int | None = None,
        prefix: list[str] | None = None,
    ) -> AgentProcess:
        if controller is None:
            controller = request.getfixturevalue("controller")
        agent = start_agent(controller, tmp_path_factory.mktemp("agent"), plugins, settings, pythonpath, start=False,
                            enroll_port=enroll_port, kvm_verdict=kvm_verdict)
        agent.prefix = list(prefix or [])
        started.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in started:
        try:
            agent.stop()
        except AssertionError:
            pass
