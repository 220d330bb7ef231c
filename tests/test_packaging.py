"""The .debs on this machine: build, ``apt-get install``, init, enroll, upgrade, remove, purge.

Both packages are built from this checkout and installed with apt, so Debian 12 resolves
every dependency and the packaged programs run on /usr/bin/python3 with Debian's
python3-* modules, never the repo or a venv. There is no systemd as PID 1 here, so each
service is started as exactly what its installed unit runs: the ExecStart line, as the
unit's User/Group and UMask, with an empty environment but PATH, from /, and inside the
parts of its sandbox a process can set up for itself (NoNewPrivileges=, an empty
CapabilityBoundingSet=, MemoryDenyWriteExecute=); `systemd-analyze verify` checks the rest
of each unit.

Everything lives at the packaged paths (/etc/kumo, /var/lib/kumo, /var/lib/kumo-controller)
and the packages are purged at the end, also when a test fails.
"""

from __future__ import annotations

import configparser
import datetime as dt
import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import re
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.harness import REPO, free_port, require

# one_leg: the packaged programs run on /usr/bin/python3 with their own store whichever
# interpreter and store the suite runs on.
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.one_leg]

PACKAGES = ("kumo-agent", "kumo-controller")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"
DIST_PACKAGES = "/usr/lib/python3/dist-packages/"
UNITS = Path("/lib/systemd/system")
ETC = Path("/etc/kumo")
CONTROLLER_CONFIG = ETC / "controller.yaml"
AGENT_CONFIG = ETC / "agent.yaml"
CONTROLLER_DIR = Path("/var/lib/kumo-controller")
AGENT_STATE = Path("/var/lib/kumo")
KUMOCTL_CONFIG = CONTROLLER_DIR / "kumoctl.yaml"
SERVICE_USER = "kumo-controller"
# What the agent writes outside /var/lib/kumo and its purge deletes.
AGENT_CACHE = Path("/var/cache/kumo")
COLLECTED_LOGS = Path("/var/log/kumo-remote")
RSYSLOG_SNIPPET = Path("/etc/rsyslog.d/60-kumo.conf")
# Paths a run of these tests creates and purge must take away again.
OWNED_PATHS = (CONTROLLER_CONFIG, CONTROLLER_DIR, AGENT_STATE, AGENT_CACHE, COLLECTED_LOGS, RSYSLOG_SNIPPET)
# Where the packaged programs may import from: the stdlib, Debian's python3-* and their own
# private directory.
ALLOWED_ORIGINS = ("/usr/lib/python3.11/", "/usr/lib/python3/dist-packages/", "/usr/share/kumo-agent/",
                   "/usr/share/kumo-controller/")
# Two runs of this module at once (two checkouts on one machine) would share /etc/kumo.
LOCK = Path("/run/lock/kumo-test-packaging.lock")
READY_TIMEOUT = 60.0
# MemoryDenyWriteExecute= without systemd: PR_SET_MDWE (Linux 6.3+) refuses the same
# write+exec mappings, and execve keeps it. An older kernel runs the service without it.
MDWE_SHIM = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None, use_errno=True).prctl(65, 1, 0, 0, 0) != 0:\n"
    "    print('test: no PR_SET_MDWE on this kernel, running without MemoryDenyWriteExecute', file=sys.stderr)\n"
    "os.execv(sys.argv[1], sys.argv[1:])\n"
)


def run(argv: list[str], env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a packaged command the way an admin's root shell on a stock Debian would."""
    result = subprocess.run(  # noqa: S603 - fixed argument lists
        argv, env={"PATH": SYSTEM_PATH, **(env or {})}, cwd="/",
        capture_output=True, text=True, timeout=timeout, check=False,
    )
    assert result.returncode == 0, f"{shlex.join(argv)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return result


def apt_get(*args: str) -> None:
    # confold: the test edits the agent.yaml conffile, as an admin would, and upgrades keep it.
    run(["apt-get", "-y", "-q", "-o", "DPkg::Lock::Timeout=300", "-o", "Dpkg::Options::=--force-confold", *args],
        env={"DEBIAN_FRONTEND": "noninteractive"}, timeout=600)


def package_status(name: str) -> str:
    """``install ok installed``, ``deinstall ok config-files``, or "" when dpkg knows nothing."""
    result = subprocess.run(["dpkg-query", "-W", "-f", "${Status}", name],  # noqa: S603, S607
                            capture_output=True, text=True, check=False)
    return result.stdout.strip() if result.returncode == 0 else ""


def installed_version(name: str) -> str:
    return run(["dpkg-query", "-W", "-f", "${Version}", name]).stdout


def purge_packages() -> None:
    present = [name for name in PACKAGES if package_status(name) not in ("", "unknown ok not-installed")]
    if present:
        apt_get("purge", *present)


def read_unit(path: Path) -> dict[str, str]:
    """The [Unit] and [Service] settings of an installed unit file (later duplicates win)."""
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(path)
    return {**parser["Unit"], **parser["Service"]}


class Service:
    """One packaged service, started as its installed unit would start it."""

    def __init__(self, name: str, logs: Path):
        self.name = name
        self.logs = logs
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = dt.datetime.now(dt.UTC)

    def start(self) -> None:
        unit = read_unit(UNITS / f"{self.name}.service")
        condition = unit.get("ConditionPathExists")
        assert condition is None or Path(condition).exists(), f"{self.name}: systemd would not start it: {condition} is missing"
        argv = shlex.split(unit["ExecStart"])
        if unit.get("MemoryDenyWriteExecute") == "yes":
            argv = ["/usr/bin/python3", "-c", MDWE_SHIM, *argv]
        sandbox = []
        if "User" in unit:
            user = unit["User"]
            sandbox += [f"--reuid={user}", f"--regid={unit.get('Group', user)}", "--init-groups"]
        if unit.get("NoNewPrivileges") == "yes":
            sandbox.append("--no-new-privs")
        if unit.get("CapabilityBoundingSet") == "":
            sandbox += ["--bounding-set=-all", "--inh-caps=-all"]
        if sandbox:
            argv = ["setpriv", *sandbox, "--", *argv]
        self.started_at = dt.datetime.now(dt.UTC)
        with (self.logs / f"{self.name}.log").open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - the unit's own command line
                argv, env={"PATH": SYSTEM_PATH}, cwd="/", umask=int(unit.get("UMask", "0022"), 8),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )

    def check_running(self) -> None:
        assert self.proc is not None and self.proc.poll() is None, f"{self.name} exited:\n{self.log_tail()}"

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def log_tail(self) -> str:
        path = self.logs / f"{self.name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-40:]) if path.exists() else ""

    def proc_file(self, name: str) -> str:
        assert self.proc is not None
        return Path(f"/proc/{self.proc.pid}/{name}").read_text(errors="replace")


class Deployment:
    """The installed packages, the initialised controller and the enrolled agent."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.port, self.enroll_port, self.metrics_port = free_port(), free_port(), free_port()
        self.controller = Service("kumo-controller", logs)
        self.agent = Service("kumo-agent", logs)
        self.node_id = ""

    def kumoctl(self, *args: str) -> str:
        return run(["/usr/bin/kumoctl", *args], env={"KUMOCTL_CONFIG": str(KUMOCTL_CONFIG)}).stdout

    def wait_controller(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            self.controller.check_running()
            result = subprocess.run(  # noqa: S603
                ["/usr/bin/kumoctl", "nodes", "list", "--output", "json"],
                env={"PATH": SYSTEM_PATH, "KUMOCTL_CONFIG": str(KUMOCTL_CONFIG)},
                capture_output=True, text=True, check=False,
            )
            if result.returncode == 0:
                return
            assert time.monotonic() < deadline, f"controller not answering: {result.stderr}\n{self.controller.log_tail()}"
            time.sleep(0.5)

    def wait_node_ready(self) -> dict[str, Any]:
        """The node, once ready with a heartbeat from the agent process started last."""
        deadline = time.monotonic() + READY_TIMEOUT
        node: dict[str, Any] = {}
        while time.monotonic() < deadline:
            self.controller.check_running()
            self.agent.check_running()
            nodes = json.loads(self.kumoctl("nodes", "list", "--output", "json"))
            node = next((n for n in nodes if n["id"] == self.node_id), {})
            seen = node.get("last_seen")
            if node.get("state") == "ready" and seen and dt.datetime.fromisoformat(seen) >= self.agent.started_at:
                return node
            time.sleep(1)
        raise AssertionError(f"node {self.node_id} not ready: {node}\n{self.agent.log_tail()}")

    def stop(self) -> None:
        self.agent.stop()
        self.controller.stop()


@pytest.fixture(scope="module")
def debs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """Both .debs at the changelog's version and at a higher one (in that order), built once."""
    require(shutil.which("dpkg-buildpackage") is not None and shutil.which("apt-get") is not None,
            "dpkg-buildpackage and apt-get (scripts/deps/60-debbuild.sh)")
    require(os.geteuid() == 0, "root, to install packages")
    require(shutil.which("systemd-analyze") is not None, "systemd-analyze (scripts/deps/60-debbuild.sh)")
    changelog = REPO / "packaging" / "debian" / "changelog"
    base = run(["dpkg-parsechangelog", "-l", str(changelog), "-S", "Version"]).stdout.strip()
    upgrade = base + "+1"
    run(["dpkg", "--compare-versions", upgrade, "gt", base])
    built = {}
    for version in (base, upgrade):
        out = tmp_path_factory.mktemp("deb")
        env = {"KUMO_DEB_VERSION": version} if version != base else {}
        run([str(REPO / "packaging" / "build-deb.sh"), str(out)], env=env, timeout=600)
        built[version] = sorted(out.glob("kumo-*.deb"))
        assert [p.name for p in built[version]] == [f"{name}_{version}_all.deb" for name in PACKAGES]
    return built


@pytest.fixture(scope="module")
def deployment(debs: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    """apt-get install the first version, init the controller, enroll and start the agent."""
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield from _deploy(debs, tmp_path_factory)


def _deploy(debs: dict[str, list[Path]], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    # Leftovers of an earlier run that was killed before its cleanup are this test's own.
    purge_packages()
    for path in OWNED_PATHS:
        require(not path.exists(), f"{path} is absent (it belongs to no kumo package, so it is not ours to replace)")
    # With systemd as PID 1 the maintainer scripts would start the units beside the test's own
    # processes; a runtime mask stops that and vanishes at reboot.
    systemd = Path("/run/systemd/system").is_dir()
    units = [f"{name}.service" for name in PACKAGES]
    if systemd:
        run(["systemctl", "mask", "--runtime", *units])
    deployment = Deployment(tmp_path_factory.mktemp("packaging-logs"))
    try:
        # Recommends (criu, lxc, libvirt...) are left out: the rest of the suite uses the
        # components the deps scripts prepared (e.g. criu 4.1.1 built, not Debian's).
        apt_get("install", "--no-install-recommends", *map(str, next(iter(debs.values()))))
        for name in PACKAGES:
            assert package_status(name) == "install ok installed"
        run(["/usr/bin/kumo-controller", "init", "--dir", str(CONTROLLER_DIR), "--config", str(CONTROLLER_CONFIG),
             "--owner", SERVICE_USER, "--listen", f"127.0.0.1:{deployment.port}",
             "--enroll-listen", f"127.0.0.1:{deployment.enroll_port}"])
        deployment.controller.start()
        deployment.wait_controller()
        join = deployment.kumoctl("token", "create").splitlines()[0]
        config = yaml.safe_load(AGENT_CONFIG.read_text())
        config.update({"state_dir": str(AGENT_STATE), "metrics": {"listen": f"127.0.0.1:{deployment.metrics_port}"}})
        AGENT_CONFIG.write_text(yaml.safe_dump(config))
        run(["/usr/bin/kumo-agent", "join", "--controller", f"https://127.0.0.1:{deployment.port}", "--token", join])
        deployment.node_id = json.loads((AGENT_STATE / "join.json").read_text())["node_id"]
        deployment.agent.start()
        yield deployment
    finally:
        deployment.stop()
        purge_packages()
        if systemd:
            run(["systemctl", "unmask", "--runtime", *units])


def imported_files(argv: list[str], env: dict[str, str] | None = None) -> set[str]:
    """Every module file a packaged program loads, from ``python3 -v``'s trace."""
    trace = run(["/usr/bin/python3", "-v", *argv], env=env).stderr
    return set(re.findall(r"^# (?:code object|extension module '[^']+' loaded) from '([^']+)'$", trace, re.MULTILINE))


def survivors() -> dict[str, str]:
    """Hashes of the config, keys and identity an upgrade must not touch."""
    files = [CONTROLLER_CONFIG, AGENT_CONFIG, KUMOCTL_CONFIG, *sorted((CONTROLLER_DIR / "pki").iterdir()),
             *(AGENT_STATE / name for name in ("node.key", "node.crt", "ca.crt", "join.json"))]
    return {str(path): hashlib.sha256(path.read_bytes()).hexdigest() for path in files}


def test_packaged_controller_and_agent_run_on_debian_python(deployment: Deployment) -> None:
    node = deployment.wait_node_ready()
    # Every plugin's entry point was found in the private directory's dist-info, and the
    # node's facts (the core's, not a plugin's) place it.
    assert {"kvm", "lxc", "process", "checkpoint", "cloudinit", "monitoring"} <= set(node["plugins"])
    assert node["facts"]["cpus"] >= 1 and node["facts"]["memory_bytes"] > 0, node["facts"]

    conffiles = run(["dpkg-query", "-W", "-f", "${Conffiles}", "kumo-agent"]).stdout
    assert f" {AGENT_CONFIG} " in conffiles, conffiles
    service_user = pwd.getpwnam(SERVICE_USER)
    for key in ("ca.key", "server.key", "admin.key"):
        info = (CONTROLLER_DIR / "pki" / key).stat()
        assert (info.st_uid, info.st_mode & 0o777) == (service_user.pw_uid, 0o600), key
    assert (CONTROLLER_CONFIG.stat().st_gid, CONTROLLER_CONFIG.stat().st_mode & 0o777) == (service_user.pw_gid, 0o640)
    assert (CONTROLLER_DIR / "controller.db").stat().st_uid == service_user.pw_uid
    # The web interface's pages ship with the controller: nothing is built on the machine.
    static = Path("/usr/share/kumo-controller/controller/ui/static")
    assert {"fleet.html", "kumo.js", "kumo.css"} <= {path.name for path in static.iterdir()}
    status = deployment.controller.proc_file("status")
    assert f"Uid:\t{service_user.pw_uid}\t" in status, status
    # ...and inside the unit's sandbox, as far as it can be had without systemd.
    assert "NoNewPrivs:\t1" in status and "CapBnd:\t0000000000000000" in status, status

    # Compiled modules in the running services show where their libraries came from (the
    # controller's aiohttp and cryptography; the agent's psutil and yaml: it imports aiohttp
    # only to stream images and cryptography only when it renews).
    for service, needed in ((deployment.controller, ("aiohttp", "cryptography")), (deployment.agent, ("psutil", "yaml"))):
        argv = service.proc_file("cmdline").split("\0")
        assert argv[:2] == ["/usr/bin/python3", f"/usr/bin/{service.name}"], argv
        libraries = {line.split()[-1] for line in service.proc_file("maps").splitlines() if "-packages/" in line}
        assert not [path for path in libraries if not path.startswith(DIST_PACKAGES)], libraries
        for library in needed:
            assert any(path.startswith(f"{DIST_PACKAGES}{library}/") for path in libraries), (library, libraries)

    # Pure-Python modules leave nothing in /proc/PID/maps: trace every module one run of each
    # program loads. Only the stdlib, Debian's python3-* and the private directory may appear.
    agent = (["/usr/bin/kumo-agent", "plugins", "--output", "json"], {}, "/usr/share/kumo-agent/", ("pluggy", "yaml"))
    kumoctl = (["/usr/bin/kumoctl", "nodes", "list", "--output", "json"], {"KUMOCTL_CONFIG": str(KUMOCTL_CONFIG)},
               "/usr/share/kumo-controller/", ("yaml",))
    for argv, env, own, libraries in (agent, kumoctl):
        files = imported_files(argv, env)
        assert not [path for path in files if not path.startswith(ALLOWED_ORIGINS)], files
        assert any(path.startswith(own) for path in files), files
        for library in libraries:
            assert any(path.startswith(f"{DIST_PACKAGES}{library}/") for path in files), (library, files)

    # systemd itself is not running, but its parser checks the installed units (it warns on
    # stderr and still exits 0 for an unknown key or a bad value).
    verify = run(["systemd-analyze", "verify", "--man=no", *(str(UNITS / f"{n}.service") for n in PACKAGES)])
    assert verify.stdout + verify.stderr == "", verify.stderr

    # The short import names stay out of Debian's python3 path.
    probe = run(["/usr/bin/python3", "-c", "import importlib.util as u; print([u.find_spec(n) for n in "
                 "('agent', 'controller', 'plugins')])"])
    assert probe.stdout.strip() == "[None, None, None]", probe.stdout
    # ...while this suite keeps importing the repo's.
    assert Path(importlib.util.find_spec("agent").origin).is_relative_to(REPO)


def test_upgrade_keeps_config_keys_store_and_node(deployment: Deployment, debs: dict[str, list[Path]]) -> None:
    deployment.wait_node_ready()
    before = survivors()
    upgrade = list(debs)[-1]
    # As with systemd, the services keep running through the upgrade and restart after it.
    apt_get("install", "--no-install-recommends", *map(str, debs[upgrade]))
    for name in PACKAGES:
        assert installed_version(name) == upgrade
    deployment.controller.restart()
    deployment.wait_controller()
    deployment.agent.restart()
    node = deployment.wait_node_ready()
    assert node["id"] == deployment.node_id
    assert survivors() == before
    assert [n["id"] for n in json.loads(deployment.kumoctl("nodes", "list", "--output", "json"))] == [deployment.node_id]


def test_remove_keeps_state_and_purge_deletes_it(deployment: Deployment) -> None:
    deployment.stop()
    # What the agent writes outside /var/lib/kumo on other nodes (kvm and lxc image caches,
    # a log collector's files, log forwarding): purge takes these too.
    planted = [AGENT_CACHE / "images" / "base.qcow2", COLLECTED_LOGS / "node-a.log", RSYSLOG_SNIPPET]
    if not RSYSLOG_SNIPPET.parent.is_dir():
        planted.remove(RSYSLOG_SNIPPET)
    for path in planted:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("written by the kumo-agent packaging test\n")
    apt_get("remove", *PACKAGES)
    for name in PACKAGES:
        assert package_status(name) == "deinstall ok config-files"
    assert not Path("/usr/bin/kumo-agent").exists() and not Path("/usr/bin/kumoctl").exists()
    assert not Path("/usr/share/kumo-agent").exists() and not Path("/usr/share/kumo-controller").exists()
    for path in (AGENT_CONFIG, CONTROLLER_CONFIG, CONTROLLER_DIR / "pki" / "ca.key", CONTROLLER_DIR / "controller.db",
                 AGENT_STATE / "node.key", AGENT_STATE / "join.json", *planted):
        assert path.exists(), f"remove deleted {path}"

    apt_get("purge", *PACKAGES)
    for name in PACKAGES:
        assert package_status(name) in ("", "unknown ok not-installed")
    for path in (ETC, CONTROLLER_DIR, AGENT_STATE, AGENT_CACHE, COLLECTED_LOGS, *planted):
        assert not path.exists(), f"purge left {path}"
