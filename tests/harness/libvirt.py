"""The real libvirtd for the kvm plugin's tests, and a plugin factory wired to it.

No init system runs libvirtd and virtlogd on these machines: the ``libvirtd`` fixture
starts them when they are not running and leaves them running, since other tests (and
engineers) share the one daemon. ``second_libvirtd`` runs another one as a second host, for
a test that needs two (a VM's migration: domain names are unique per libvirtd): in a mount
namespace with its own state and sockets, and a network namespace (``second_host``) that
reaches this machine only through a veth pair and, there, only the ports it is allowed (the
controller's), so that what works between the two "hosts" needs no network route between
them; a program runs on that host with :func:`host_of`. "libvirtd goes down" is simulated with
:class:`LibvirtSocketProxy`, a socket forwarder the plugin connects through, so the test
never stops the shared daemon.

:class:`KvmTestBed` builds a node's view of the plugin: the kvm plugin and the cloudinit
plugin in one plugin manager, started, with the instance drivers loaded, so every task goes
through ``hooks.handle_task`` as the agent routes it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.harness import require

if TYPE_CHECKING:
    from agent.sdk import ImageCache

SYSTEM_URI = "qemu:///system"
SYSTEM_SOCKET = Path("/run/libvirt/libvirt-sock")
# The checkpoint plugin's default live_sockets: each libvirtd's "host" has its own (a bind
# mount in the second one's namespace), as each real host has, since a live migration's qemu
# sockets have the same path on both ends. An agent of the second "host" runs in its
# namespaces (:func:`host_of`).
MIGRATION_DIR = Path("/run/kumo/migrations")
# Must be reachable by qemu (user libvirt-qemu): pytest's tmp_path is under a 0700 dir.
TEST_INSTANCE_ROOT = Path("/var/lib/libvirt/images")


def _libvirt_answers() -> bool:
    result = subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["virsh", "-c", SYSTEM_URI, "version"], capture_output=True, timeout=30, check=False
    )
    return result.returncode == 0


def _running(name: str) -> bool:
    found = subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["pgrep", "-x", name], capture_output=True, check=False
    )
    return found.returncode == 0


def remove_domains(uri: str, prefix: str = "") -> None:
    """Destroy and undefine (with any saved state or NVRAM) the domains on ``uri`` whose names
    start with ``prefix``: what a test or benchmark made, also when it was interrupted."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        for dom in conn.listAllDomains():
            if dom.name().startswith(prefix):
                with contextlib.suppress(libvirt.libvirtError):
                    dom.destroy()
                with contextlib.suppress(libvirt.libvirtError):
                    dom.undefineFlags(libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM)
    finally:
        conn.close()


def relocated_xml(xml: str, directory: Path, name: str | None = None) -> str:
    """Domain ``xml`` with every file it names moved into ``directory`` (same base names);
    with ``name``, a new domain of that name (no uuid or metadata: libvirt makes its own)."""
    root = ET.fromstring(xml)
    if name is not None:
        root.find("name").text = name
        for tag in ("uuid", "metadata"):
            element = root.find(tag)
            if element is not None:
                root.remove(element)
    for source in root.iter("source"):
        for attr in ("file", "path"):
            if source.get(attr):
                source.set(attr, str(directory / Path(source.get(attr)).name))
    return ET.tostring(root, encoding="unicode")


def ensure_libvirtd() -> str | None:
    """Start virtlogd and libvirtd unless they run, and wait until libvirtd answers; returns
    its URI, or None when it does not answer within 30 s."""
    if not _running("virtlogd"):
        subprocess.run(["virtlogd", "-d"], check=True)  # noqa: S607
    if not _running("libvirtd"):
        subprocess.run(["libvirtd", "-d"], check=True)  # noqa: S607
    deadline = time.monotonic() + 30
    while not _libvirt_answers():
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)
    return SYSTEM_URI


@pytest.fixture(scope="session")
def libvirtd() -> str:
    """A running libvirtd (qemu driver) with virtlogd; returns its URI."""
    require(shutil.which("libvirtd") is not None, "libvirtd (libvirt-daemon-system)")
    require(shutil.which("virsh") is not None, "virsh (libvirt-clients)")
    require(shutil.which("qemu-system-x86_64") is not None, "qemu-system-x86_64 (qemu-system-x86)")
    try:
        import libvirt  # noqa: F401
    except ImportError:
        require(False, "the libvirt Python binding (pip install -e '.[libvirt]')")
    uri = ensure_libvirtd()
    require(uri is not None, f"libvirtd answering on {SYSTEM_URI}")
    return SYSTEM_URI


# Second hosts' networks: a /30 each, in a range no other test uses (lxc's bridges take
# 10.231-10.234, the demo 10.77).
HOST_NETWORKS = ipaddress.ip_network("10.235.0.0/16")
# The namespace's filter: nothing from this machine gets in but answers, nothing goes out but
# to loopback and to the ports HostNetwork.allow opens (inserted before the final REJECT).
# REJECT, not DROP: a connection that must fail fails at once, without waiting out a timeout.
_HOST_FILTER = """*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
-A INPUT -i lo -j ACCEPT
-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A INPUT -j REJECT
-A OUTPUT -o lo -j ACCEPT
-A OUTPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A OUTPUT -j REJECT
COMMIT
"""


def _run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")


@dataclasses.dataclass
class HostNetwork:
    """A network namespace that stands for another host's network: it reaches this machine
    only through a veth pair (``gateway`` is this machine's end, ``address`` its own) and,
    there, only the TCP ports :meth:`allow` opens; this machine cannot connect into it."""

    name: str  # the namespace, as ``ip netns`` names it
    link: str  # this machine's end of the veth pair
    gateway: str
    address: str

    @property
    def enter(self) -> list[str]:
        """The command prefix that runs a program in the namespace."""
        return ["nsenter", f"--net=/run/netns/{self.name}", "--"]

    def allow(self, *ports: int) -> None:
        """Let the namespace connect to these TCP ports of ``gateway`` (a controller's)."""
        for port in ports:
            _run(*self.enter, "iptables", "-w", "-I", "OUTPUT", "1", "-d", self.gateway, "-p", "tcp",
                 "--dport", str(port), "-j", "ACCEPT")

    def connects(self, host: str, port: int) -> bool:
        """Whether a TCP connection from inside the namespace to ``host``:``port`` is accepted."""
        probe = "import socket, sys; socket.create_connection((sys.argv[1], int(sys.argv[2])), 5).close()"
        return subprocess.run([*self.enter, sys.executable, "-c", probe, host, str(port)],  # noqa: S603
                              capture_output=True, check=False).returncode == 0


def _free_subnet() -> ipaddress.IPv4Network:
    """A /30 of HOST_NETWORKS that no address of this machine is in (another run's)."""
    shown = subprocess.run(["ip", "-4", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout  # noqa: S607
    used = [ipaddress.ip_interface(fields[3]).network for fields in map(str.split, shown.splitlines())]
    for _ in range(100):
        subnet = ipaddress.ip_network(f"{HOST_NETWORKS[secrets.randbelow(HOST_NETWORKS.num_addresses // 4) * 4]}/30")
        if not any(subnet.overlaps(network) for network in used):
            return subnet
    raise RuntimeError(f"no free /30 in {HOST_NETWORKS}")


@contextlib.contextmanager
def host_network() -> Iterator[HostNetwork]:
    """A new :class:`HostNetwork` (names and subnet of its own: other engineers run tests on
    this machine too); the namespace and the veth pair are deleted on exit."""
    suffix = secrets.token_hex(4)
    subnet = _free_subnet()
    network = HostNetwork(f"kumo-host-{suffix}", f"kh{suffix}", str(subnet[1]), str(subnet[2]))
    _run("ip", "netns", "add", network.name)
    try:
        _run("ip", "link", "add", network.link, "type", "veth", "peer", "name", "eth0", "netns", network.name)
        _run("ip", "addr", "add", f"{network.gateway}/30", "dev", network.link)
        _run("ip", "link", "set", network.link, "up")
        _run("ip", "-n", network.name, "addr", "add", f"{network.address}/30", "dev", "eth0")
        _run("ip", "-n", network.name, "link", "set", "eth0", "up")
        _run("ip", "-n", network.name, "link", "set", "lo", "up")
        _run(*network.enter, "iptables-restore", stdin=_HOST_FILTER)
        yield network
    finally:
        # Deleting the link removes both ends at once. The namespace's end would otherwise go
        # only when the kernel frees the namespace: later, and not before every mount namespace
        # made meanwhile (another run's second libvirtd) that holds its /run/netns mount ends.
        subprocess.run(["ip", "link", "del", network.link], capture_output=True, check=False)  # noqa: S603, S607
        subprocess.run(["ip", "netns", "del", network.name], capture_output=True, check=False)  # noqa: S603, S607


@pytest.fixture(scope="module")
def second_host() -> Iterator[HostNetwork]:
    """The network of the second libvirtd's host (:func:`host_network`) for a module's tests."""
    for tool in ("ip", "iptables", "nsenter"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/deps/00-base.sh installs it)")
    try:
        with host_network() as network:
            yield network
    except RuntimeError as exc:
        require(False, f"a network namespace for a second host: {exc}")


# Runs in a mount namespace of its own (argv: the daemon's directory): libvirt's state,
# config, cache, logs and sockets become that directory's, so a second libvirtd manages
# domains of the same names as the first, as another host would, and then becomes libvirtd.
_SECOND_LIBVIRTD = """
import os, subprocess, sys
home, MIGRATION_DIR = sys.argv[1:3]
for where, own in (("/run/libvirt", "run"), ("/etc/libvirt", "etc"), ("/var/lib/libvirt/qemu", "lib"),
                   ("/var/cache/libvirt", "cache"), ("/var/log/libvirt", "log"), (MIGRATION_DIR, "migrate")):
    subprocess.run(["mount", "--bind", os.path.join(home, own), where], check=True)
os.execvp("libvirtd", ["libvirtd", "--pid-file", os.path.join(home, "run", "libvirtd.pid")])
"""


@contextlib.contextmanager
def another_libvirtd(home: Path, network: HostNetwork | None = None) -> Iterator[str]:
    """Run a second libvirtd on this machine that behaves as another host's (its own domains,
    sockets and state under ``home``; the same instance image directory), in ``network``
    when given (its qemu processes too), else in this machine's; its URI. Its domains are
    destroyed and it is stopped on exit. Raises RuntimeError when it does not answer within
    30 s."""
    import libvirt

    for sub in ("run", "etc/qemu", "lib", "cache", "log/qemu", "migrate"):
        (home / sub).mkdir(parents=True)
    for conf in Path("/etc/libvirt").glob("*.conf"):
        shutil.copy(conf, home / "etc" / conf.name)
    # qemu's output goes to a file libvirtd writes: no virtlogd needed in the namespace.
    with (home / "etc" / "qemu.conf").open("a") as conf:
        conf.write('\nstdio_handler = "file"\n')
    # libvirt refuses to migrate a VM to a host with its own host UUID.
    with (home / "etc" / "libvirtd.conf").open("a") as conf:
        conf.write(f'\nhost_uuid = "{uuid.uuid4()}"\n')
    MIGRATION_DIR.mkdir(parents=True, exist_ok=True)
    shutil.chown(home / "lib", "libvirt-qemu", "libvirt-qemu")
    (home / "lib").chmod(0o750)
    daemon = subprocess.Popen(  # noqa: S603 - an argv list, never a shell
        [*(network.enter if network else []), "unshare", "--mount", "--propagation", "private", "--",
         sys.executable, "-c", _SECOND_LIBVIRTD, str(home), str(MIGRATION_DIR)],
        stdout=(home / "libvirtd.out").open("wb"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    uri = f"qemu+unix:///system?socket={home / 'run' / 'libvirt-sock'}"
    deadline = time.monotonic() + 30
    while subprocess.run(["virsh", "-c", uri, "version"], capture_output=True, check=False).returncode != 0:  # noqa: S603, S607
        if daemon.poll() is not None or time.monotonic() > deadline:
            daemon.kill()
            raise RuntimeError(f"a second libvirtd answering on {uri}: {(home / 'libvirtd.out').read_text()[-500:]}")
        time.sleep(0.2)
    try:
        yield uri
    finally:
        with contextlib.suppress(libvirt.libvirtError):
            remove_domains(uri)
        daemon.terminate()
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait()


@pytest.fixture(scope="module")
def second_libvirtd(libvirtd: str, second_host: HostNetwork, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """:func:`another_libvirtd` in ``second_host`` for a module's tests; its URI. Its agents
    reach the controller only when it listens on ``second_host.gateway`` and allows it there."""
    try:
        with another_libvirtd(tmp_path_factory.mktemp("libvirtd2"), second_host) as uri:
            yield uri
    except RuntimeError as exc:
        require(False, str(exc))


def host_of(uri: str) -> list[str]:
    """The command prefix that runs a program on the "host" of the libvirtd at ``uri``: in
    the mount and network namespaces of a second libvirtd (:func:`another_libvirtd`),
    nothing for the system one."""
    socket_path = uri.partition("?socket=")[2]
    if not socket_path:
        return []
    pid = (Path(socket_path).parent / "libvirtd.pid").read_text().strip()
    return ["nsenter", "--target", pid, "--mount", "--net", "--"]


class LibvirtSocketProxy:
    """Forwards a private unix socket to libvirtd's; ``stop()`` looks like libvirtd dying."""

    def __init__(self, path: Path, target: Path = SYSTEM_SOCKET):
        self.path = path
        self.target = target
        self._listener: socket.socket | None = None
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def uri(self) -> str:
        return f"qemu+unix:///system?socket={self.path}"

    def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(self.path))
        listener.listen(16)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def stop(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect(str(self.target))
            with self._lock:
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def libvirt_proxy(libvirtd: str, tmp_path: Path) -> Any:
    """A LibvirtSocketProxy, started; stopped at the end."""
    proxy = LibvirtSocketProxy(tmp_path / "libvirt-proxy.sock")
    proxy.start()
    yield proxy
    proxy.stop()


@dataclasses.dataclass
class KvmNode:
    """One started kvm plugin and the hooks the agent would route its tasks through."""

    plugin: Any  # plugins.kvm.KvmPlugin
    hooks: Any  # agent.pluginmanager.Hooks
    checkpoint: Any = None  # plugins.checkpoint.CheckpointPlugin, when asked for

    async def task(self, kind: str, /, **payload: Any) -> Any:
        """Run task ``kind`` (``kvm.create``...) as the agent does; its result."""
        return await self.hooks.handle_task(kind, payload, f"{kind}-test")

    async def console(self, name: str) -> str:
        return (await self.task("kvm.console", name=name))["log"]

    def state(self, name: str) -> str | None:
        """The instance's state as the driver lists it; None when it is not there."""
        return next((i.state for i in self.plugin.list() if i.name == name), None)

    def metric(self, name: str, **labels: str) -> float | None:
        """A sample of the node's /metrics (the plugin's and the core's), by name and labels."""
        for family in self.hooks.metrics():
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return None


class KvmTestBed:
    """Builds started kvm plugins (with the cloudinit plugin beside them) and cleans up after."""

    def __init__(self, uri: str, root: Path, state_dir: Path):
        self.uri = uri
        self.root = root
        self.state_dir = state_dir
        self.prefix = f"kt{uuid.uuid4().hex[:6]}"
        self.nodes: list[KvmNode] = []
        self.changes = 0

    def name(self, suffix: str) -> str:
        """A domain name unique to this test."""
        return f"{self.prefix}-{suffix}"

    def settings(self, **overrides: Any) -> dict[str, Any]:
        settings = {
            "uri": self.uri,
            "instance_dir": str(self.root / "instances"),
            "acceleration": "auto",
            # Time for a TCG guest to obey the ACPI power button: 20 s was once too short on a
            # busy 2-core machine (the stop was forced). Only a guest that ignores it waits it out.
            "shutdown_timeout": 60,
        }
        settings.update(overrides)
        return settings

    async def node(self, images: ImageCache | None = None, checkpoint: dict[str, Any] | None = None,
                   **overrides: Any) -> KvmNode:
        """A configured and started kvm plugin, its driver loaded (the state dir is shared by
        every plugin of this test); ``images`` is the node's image cache (default: one under
        the test's root, without a size limit). With ``checkpoint`` (its settings) the
        checkpoint plugin runs beside it, its images under the test's root."""
        from agent.pluginmanager import Hooks, make_plugin_manager
        from agent.sdk import ImageCache, PluginContext
        from plugins.checkpoint import CheckpointPlugin
        from plugins.cloudinit import CloudInitPlugin
        from plugins.kvm import KvmPlugin

        kvm = KvmPlugin()
        plugins: dict[str, Any] = {"kvm": kvm, "cloudinit": CloudInitPlugin()}
        if checkpoint is not None:
            plugins["checkpoint"] = CheckpointPlugin()
            plugins["checkpoint"].kumo_configure(
                section={"images_dir": str(self.root / "checkpoints"), **checkpoint}, source="test: plugins.checkpoint")
        hooks = Hooks(make_plugin_manager(plugins))
        kvm.kumo_configure(section=self.settings(**overrides), source="test: plugins.kvm")

        def changed() -> None:
            self.changes += 1

        async def no_controller(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("the kvm plugin does not call the controller")

        context = PluginContext(
            name="kvm",
            state_dir=self.state_dir,
            agent_state_dir=self.state_dir.parent,
            identity=None,
            hooks=hooks,
            report_changed=changed,
            call_controller=no_controller,
            images=images or ImageCache(self.root / "images"),
        )
        await kvm.kumo_startup(context=context)
        if "checkpoint" in plugins:
            await plugins["checkpoint"].kumo_startup(context=dataclasses.replace(context, name="checkpoint"))
        hooks.load_drivers()
        node = KvmNode(kvm, hooks, plugins.get("checkpoint"))
        self.nodes.append(node)
        return node

    def cleanup(self) -> None:
        remove_domains(SYSTEM_URI, self.prefix)
        shutil.rmtree(self.root, ignore_errors=True)

    def domains(self) -> list[str]:
        """Names of this test's libvirt domains, straight from libvirtd."""
        import libvirt

        conn = libvirt.open(SYSTEM_URI)
        try:
            return sorted(d.name() for d in conn.listAllDomains() if d.name().startswith(self.prefix))
        finally:
            conn.close()


@pytest.fixture(scope="session")
def kvm_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One plugin state dir per session, so the per-boot acceleration verdict is probed once."""
    state = tmp_path_factory.mktemp("kvm-state")
    state.chmod(0o700)
    return state


@pytest.fixture
async def kvm_bed(libvirtd: str, kvm_state_dir: Path) -> AsyncIterator[KvmTestBed]:
    """A KvmTestBed on the real libvirtd; its domains and files are removed afterwards."""
    root = TEST_INSTANCE_ROOT / f"kumo-test-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, mode=0o711)
    os.chmod(root, 0o711)
    bed = KvmTestBed(libvirtd, root, kvm_state_dir)
    try:
        yield bed
    finally:
        for node in bed.nodes:
            with contextlib.suppress(Exception):
                await node.plugin.kumo_shutdown()
            if node.checkpoint is not None:
                with contextlib.suppress(Exception):
                    await node.checkpoint.kumo_shutdown()
        bed.cleanup()


async def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll ``predicate`` (sync) until it returns something truthy; fail the test after ``timeout``."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {predicate}")
        await asyncio.sleep(interval)
