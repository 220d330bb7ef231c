"""A VM moves between two real agents through the controller (stop-and-copy): libvirt's save
on the source, the memory state, overlay and seed relayed sha256-checked, the restore on the
destination in its own directories with its own copy of the base image; or live, libvirt's
own migration tunnelled through the controller, as a drain moves it when both nodes can.

Each agent has a libvirtd of its own, its own instance directory and image cache. The second
libvirtd and its agents run as another host: in a mount namespace of their own, and in a
network namespace that reaches this machine only at the controller's ports, through a veth
pair (tests.harness.libvirt's ``second_host``): whatever passes between the nodes passes
through the controller, as between nodes with no route to each other. The guest prints a
counter on its serial console: on the destination it goes on from where it was saved. A
transfer damaged on its way, or a destination that cannot restore it, leaves it running on
the source.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import free_port
from tests.harness.agents import reported, running_on, wait_for
from tests.harness.guest import Guest
from tests.harness.libvirt import MIGRATION_DIR, TEST_INSTANCE_ROOT, host_of

pytestmark = pytest.mark.integration

COUNT_RE = re.compile(r"GUEST-COUNT (\d+)")


def counts(path: Path) -> list[int]:
    try:
        return [int(n) for n in COUNT_RE.findall(path.read_text(errors="replace"))]
    except FileNotFoundError:
        return []


@pytest.fixture
def controller(controller_factory, second_host):
    """The controller where agents of both "hosts" reach it: on this machine's end of the
    second host's veth pair, which lets that host in there."""
    ctl = controller_factory(host=second_host.gateway)
    second_host.allow(ctl.port, ctl.enroll_port)
    return ctl


@pytest.fixture
def vm_cluster(controller, kumo_agent, libvirtd, second_libvirtd, kvm_guest: Guest) -> Iterator[Any]:
    """(controller, make_agent(uri, agent settings, **kvm settings) -> (agent, instance dir),
    create_vm(agent, name))."""
    roots: list[Path] = []

    def make_agent(uri: str, settings: dict[str, Any] | None = None, **kvm: Any) -> tuple[Any, Path]:
        """An agent on the "host" of the libvirtd at ``uri`` (in its namespaces)."""
        root = TEST_INSTANCE_ROOT / f"kumo-vmckpt-{uuid.uuid4().hex[:8]}"
        root.mkdir(mode=0o711)
        root.chmod(0o711)
        roots.append(root)
        plugins = {"kvm": {"uri": uri, "instance_dir": str(root / "instances"), "acceleration": "tcg",
                           "shutdown_timeout": 10, **kvm}}
        # The image cache under the qemu-readable root: it holds the VMs' base images.
        agent = kumo_agent(plugins=plugins, settings={"image_cache": {"path": str(root / "images")}, **(settings or {})},
                           prefix=host_of(uri))
        return agent, root / "instances"

    def create_vm(agent: Any, name: str, boot: str = "") -> None:
        """``boot``: more of the guest's command line (``kumo.fill=MiB``: it keeps writing its memory)."""
        controller.admin("POST", "/v1/instances", {
            "name": name, "kind": "kvm", "node": agent.node_id, "vcpus": 1, "memory_mib": 128,
            "image": str(kvm_guest.disk), "image_sha256": kvm_guest.disk_sha256, "user_data": "#cloud-config\n",
            "options": {"kernel": str(kvm_guest.kernel), "initrd": str(kvm_guest.initrd),
                        "cmdline": f"{kvm_guest.cmdline} kumo.hold kumo.count {boot}".strip()},
        })
        wait_for(lambda: running_on(agent, name), f"{name} to run on {agent.node_id}", limit=120)

    yield controller, make_agent, create_vm
    for instance in controller.admin("GET", "/v1/instances")["instances"]:
        kumoctl(controller, "instances", "delete", instance["name"], "--timeout", "60s")
    for root in roots:
        subprocess.run(["rm", "-rf", str(root)], check=False)  # noqa: S603, S607


def finished(controller: Any, migration_id: str) -> dict[str, Any]:
    return wait_for(
        lambda: (m := controller.admin("GET", f"/v1/migrations/{migration_id}"))["state"] != "running" and m,
        f"migration {migration_id} to end", limit=240,
    )


def kumoctl(controller: Any, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "controller.kumoctl", "--config", str(controller.kumoctl_config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)  # noqa: S603


def counting_on_a(vm_cluster: Any, uris: tuple[str, str], prefix: str,
                  boot: str = "") -> tuple[Any, Any, Path, Any, Path, str, Path]:
    """Agent A on the first libvirtd's "host", B on the second's (its namespaces, its own
    sockets and network), and a new VM counting on A (``boot``: see create_vm): (controller, a, a_dir, b,
    b_dir, name, A's console log)."""
    controller, make_agent, create_vm = vm_cluster
    (a, a_dir), (b, b_dir) = make_agent(uris[0]), make_agent(uris[1])
    name = f"{prefix}-{uuid.uuid4().hex[:6]}"
    create_vm(a, name, boot)
    log_a = a_dir / name / "console.log"
    wait_for(lambda: len(counts(log_a)) >= 3, "the guest to count on A", limit=120)
    return controller, a, a_dir, b, b_dir, name, log_a


def test_a_vm_moves_by_stop_and_copy_and_a_drain_moves_it_back_live(vm_cluster, libvirtd, second_libvirtd, kvm_guest):
    controller, a, a_dir, b, b_dir, name, log_a = counting_on_a(vm_cluster, (libvirtd, second_libvirtd), "kumo-vmckpt-mv")
    modes = controller.admin("GET", f"/v1/instances/{name}")["migration"]
    assert modes["stop-and-copy"]["possible"] is True, modes
    seen = counts(log_a)[-1]

    moved = kumoctl(controller, "instances", "migrate", name, "--to", b.node_id, "-o", "json")
    assert moved.returncode == 0, moved.stderr
    done = json.loads(moved.stdout)
    assert done["state"] == "succeeded" and done["mode"] == "stop-and-copy", done
    assert done["images_sent"] == [kvm_guest.disk_sha256], "B's image cache lacked the base image: it travelled"
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == b.node_id
    assert running_on(b, name)
    wait_for(lambda: reported(a, name) is None, "node A to forget the VM")
    assert not (a_dir / name).exists(), "the source removed its copy"

    log_b = b_dir / name / "console.log"
    wait_for(lambda: len(counts(log_b)) >= 3, "the guest to count on B", limit=60)
    first = counts(log_b)[0]
    assert first > seen, f"counted {first} on B after {seen} on A: it must go on, not start over"
    assert "GUEST-BOOTED" not in log_b.read_text(errors="replace"), "restored, not booted again"
    # Paths are B's own: the disk in B's instance directory, backed by B's image cache.
    info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--output=json", str(b_dir / name / "disk.qcow2")],  # noqa: S603, S607
                                     capture_output=True, text=True, check=True).stdout)
    assert info["backing-filename"] == str(b_dir.parent / "images" / kvm_guest.disk_sha256)

    # Draining B moves it back live, as both nodes can, and it counts on.
    seen = counts(log_b)[-1]
    drained = kumoctl(controller, "nodes", "drain", b.node_id, "-o", "json")
    assert drained.returncode == 0, drained.stderr
    [back] = json.loads(drained.stdout)["moved"]
    assert back["state"] == "succeeded" and back["mode"] == "live" and back["destination"] == a.node_id, back
    assert name in domains(libvirtd) and name not in domains(second_libvirtd)
    wait_for(lambda: counts(log_a) and counts(log_a)[-1] > seen + 3, "the guest to count on on A again", limit=60)
    assert counts(log_a)[0] > seen and "GUEST-BOOTED" not in log_a.read_text(errors="replace")


class CorruptingProxy:
    """A TCP forwarder to the controller that changes one byte of the first connection to
    carry more than ``after`` bytes towards the agent (the image's download): a transfer
    tampered with on its way."""

    def __init__(self, controller: Any, after: int = 4 << 20):
        self.upstream = (controller.host, controller.port)
        self.after = after
        self.flipped = threading.Event()
        # Beside the controller, whose certificate names that address.
        self.listener = socket.create_server((controller.host, 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []

    @property
    def url(self) -> str:
        return f"https://{self.upstream[0]}:{self.port}"

    def start(self) -> None:
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting and cut every connection: none outlives the test, half-open."""
        self.listener.close()
        for sock in self.sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream)
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, towards_agent: bool) -> None:
        passed = 0
        try:
            while data := src.recv(65536):
                if towards_agent and not self.flipped.is_set() and passed + len(data) > self.after:
                    at = max(0, self.after - passed)
                    data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1:]
                    self.flipped.set()
                passed += len(data)
                dst.sendall(data)
        except OSError:
            pass
        for end in (src, dst):
            with contextlib.suppress(OSError):
                end.shutdown(socket.SHUT_RDWR)


def test_a_tampered_or_refused_transfer_leaves_it_running_on_the_source(vm_cluster, libvirtd, second_libvirtd,
                                                                          second_host):
    controller, make_agent, create_vm = vm_cluster
    proxy = CorruptingProxy(controller)
    proxy.start()
    second_host.allow(proxy.port)
    try:
        a, a_dir = make_agent(libvirtd)
        # B reaches the controller through the proxy, which damages the image on its way to B.
        b, b_dir = make_agent(second_libvirtd, settings={"controller": proxy.url})
        # C gives its VMs a network interface, which the saved guest did not have: its state
        # cannot be restored there, which C finds only once everything has arrived. Its
        # metrics listen on every address of its host, as a real node's do.
        c_metrics = free_port()
        c, c_dir = make_agent(second_libvirtd, settings={"metrics": {"listen": f"0.0.0.0:{c_metrics}"}},
                              network="user")
        # B's and C's host reaches this machine at the controller's (and the proxy's) ports
        # alone: not A's, neither on its loopback (its own) nor through the veth, nor a port
        # open on every address here; and nothing here reaches into it.
        assert second_host.connects("127.0.0.1", c_metrics), "the probe works: C's own metrics answer"
        assert second_host.connects(controller.host, controller.port)
        with socket.create_server(("", 0)) as everywhere:
            for host, port in (("127.0.0.1", a.metrics_port), (controller.host, a.metrics_port),
                               (controller.host, everywhere.getsockname()[1])):
                assert not second_host.connects(host, port), f"{host}:{port} reached from the second host"
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((second_host.address, c_metrics), 5)
        name = f"kumo-vmckpt-st-{uuid.uuid4().hex[:6]}"
        create_vm(a, name)
        log_a = a_dir / name / "console.log"
        wait_for(lambda: len(counts(log_a)) >= 3, "the guest to count on A", limit=120)

        for destination, code in ((b, "transfer-failed"), (c, "import-refused")):
            answer = controller.admin("POST", f"/v1/instances/{name}/migrate", {"to": destination.node_id})
            done = finished(controller, answer["migration"]["id"])
            assert done["state"] == "failed" and done["code"] == code, done
            assert f"restored on node {a.node_id}" in done["outcome"], done
            assert controller.admin("GET", f"/v1/instances/{name}")["node"] == a.node_id
            wait_for(lambda: running_on(a, name), "the VM to run on A again")
            before = counts(log_a)[-1]
            wait_for(lambda before=before: counts(log_a)[-1] > before + 3, "the guest to count on on A")
    finally:
        proxy.close()
    assert proxy.flipped.is_set(), "the proxy damaged the transfer to B"
    assert "had no network interface" in done["error"]
    assert log_a.read_text(errors="replace").count("GUEST-BOOTED") == 1, "restored, not booted again"
    for node, directory in ((b, b_dir), (c, c_dir)):
        assert reported(node, name) is None and not (directory / name).exists(), "it holds nothing of it"
        assert not list((node.state_dir / "plugins" / "checkpoint").rglob("memory.save")), "it discarded what came"


def domains(uri: str) -> dict[str, int]:
    """The domains of the libvirtd at ``uri`` and their states, straight from it."""
    import libvirt

    conn = libvirt.open(uri)
    try:
        return {dom.name(): dom.state()[0] for dom in conn.listAllDomains()}
    finally:
        conn.close()


def test_a_live_migration_moves_a_running_vm_through_the_controller(vm_cluster, libvirtd, second_libvirtd):
    import libvirt

    # It keeps rewriting 16 MiB of its memory, which no 1 ms pause can carry.
    controller, a, a_dir, b, b_dir, name, log_a = counting_on_a(vm_cluster, (libvirtd, second_libvirtd), "kumo-vmlive",
                                                                "kumo.fill=16")
    modes = controller.admin("GET", f"/v1/instances/{name}")["migration"]
    assert modes["live"]["possible"] is True, modes

    # The user chose to give up after a second when it does not converge.
    aborted = kumoctl(controller, "instances", "migrate", name, "--live", "--to", b.node_id, "--max-downtime", "1",
                      "--converge-timeout", "1", "--on-no-converge", "abort")
    assert aborted.returncode != 0 and "[not-converging]" in aborted.stderr, aborted.stderr
    assert f"runs on node {a.node_id}" in aborted.stderr and "Traceback" not in aborted.stderr, aborted.stderr
    assert running_on(a, name) and name not in domains(second_libvirtd)
    wait_for(lambda: not list(b_dir.glob(f"{name}/*")), "B to remove what it prepared")

    console_a = log_a.open("rb")  # held open: the source removes the file once the VM has moved
    moved = kumoctl(controller, "instances", "migrate", name, "--live", "--to", b.node_id, "--max-downtime", "500",
                    "-o", "json")
    assert moved.returncode == 0, moved.stderr + moved.stdout
    done = json.loads(moved.stdout)
    assert done["state"] == "succeeded" and done["mode"] == "live", done
    progress = done["progress"]
    assert progress["memory_total"] > 0 and progress["bytes_sent"] > 0, progress
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == b.node_id
    assert name not in domains(libvirtd), "the source's libvirtd no longer has it"
    assert domains(second_libvirtd).get(name) == libvirt.VIR_DOMAIN_RUNNING
    assert running_on(b, name)
    # What B starts it from next time is B's own definition, naming B's files, not A's.
    conn = libvirt.open(second_libvirtd)
    try:
        kept = conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
    finally:
        conn.close()
    files = re.findall(r"<source (?:file|path)='([^']+)'", kept)
    assert files and all(f.startswith(f"{b_dir / name}/") for f in files), files
    wait_for(lambda: reported(a, name) is None, "node A to forget the VM")
    assert not (a_dir / name).exists(), "the source removed its files"

    log_b = b_dir / name / "console.log"
    wait_for(lambda: len(counts(log_b)) >= 3, "the guest to count on B", limit=60)
    last_a = [int(n) for n in COUNT_RE.findall(console_a.read().decode(errors="replace"))][-1]
    console_a.close()
    first_b = counts(log_b)[0]
    # The guest counts five times a second of its own time: it went on where it was, losing
    # no more counts than its pause (a line cut in two by the move is lost on both sides).
    assert 0 < first_b - last_a <= 2 + progress["downtime_ms"] // 200, (last_a, first_b, progress)
    assert "GUEST-BOOTED" not in log_b.read_text(errors="replace"), "moved, not booted again"


def test_a_destination_killed_during_a_live_migration_leaves_it_running_on_the_source(
        vm_cluster, libvirtd, second_libvirtd):
    # It keeps rewriting 16 MiB, so that the copy takes seconds and, at the end, a 1 ms pause
    # limit cannot finish it (an idle guest can converge within any limit).
    controller, a, a_dir, b, b_dir, name, log_a = counting_on_a(vm_cluster, (libvirtd, second_libvirtd), "kumo-vmlive-k",
                                                                "kumo.fill=16")

    answer = controller.admin("POST", f"/v1/instances/{name}/migrate", {"live": True, "to": b.node_id})
    path = f"/v1/migrations/{answer['migration']['id']}"
    # B is ready and A copies, which takes seconds (A reports the copy's first figures): B
    # dies in the middle.
    wait_for(lambda: controller.admin("GET", path)["progress"].get("memory_total"), "the live copy to begin", limit=120)
    b.kill()
    done = finished(controller, answer["migration"]["id"])
    assert done["state"] == "failed" and f"runs on node {a.node_id}" in done["outcome"], done
    assert f"node {b.node_id} did not confirm it removed what it prepared" in done["outcome"], done
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == a.node_id
    wait_for(lambda: name not in domains(second_libvirtd), "B's libvirtd to drop the incoming VM", limit=60)
    assert running_on(a, name)
    before = counts(log_a)[-1]
    wait_for(lambda: counts(log_a)[-1] > before + 3, "the guest to count on on A")
    assert log_a.read_text(errors="replace").count("GUEST-BOOTED") == 1, "it never stopped"

    # The killed B left what it had prepared and the migration's sockets (in its "host"'s
    # /run/kumo/migrations, a bind mount); A's task ended, and removed its own.
    b_sockets = Path(second_libvirtd.partition("?socket=")[2]).parents[1] / "migrate" / answer["migration"]["id"]
    assert (b_dir / name).is_dir() and b_sockets.is_dir()
    assert not (MIGRATION_DIR / answer["migration"]["id"]).exists()
    # B back: its start removes both; a copy that does not converge within a second is
    # finished by pausing the guest, as chosen.
    b.start()
    assert not (b_dir / name).exists() and not list(b_dir.glob(".arriving-*")) and not b_sockets.exists()
    paused = kumoctl(controller, "instances", "migrate", name, "--live", "--to", b.node_id, "--max-downtime", "1",
                     "--converge-timeout", "1", "--on-no-converge", "stop-and-copy")
    assert paused.returncode == 0, paused.stderr
    assert "finished by stop-and-copy" in paused.stdout, paused.stdout
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == b.node_id
    wait_for(lambda: len(counts(b_dir / name / "console.log")) >= 3, "the guest to count on B, resumed", limit=60)


@pytest.mark.reliability("VM live migration", "source agent kill -9 during the memory copy, restarted")
def test_a_source_agent_killed_during_a_live_migration_leaves_it_running_on_the_source(
        vm_cluster, libvirtd, second_libvirtd):
    # Its agent is the libvirt client driving the move and holds the tunnels' sockets: killed,
    # every stream breaks, so libvirt fails the copy, resumes the guest on A and drops B's.
    controller, a, a_dir, b, b_dir, name, log_a = counting_on_a(vm_cluster, (libvirtd, second_libvirtd), "kumo-vmlive-s",
                                                                "kumo.fill=16")
    answer = controller.admin("POST", f"/v1/instances/{name}/migrate",
                              {"live": True, "to": b.node_id, "max_downtime_ms": 1})
    path = f"/v1/migrations/{answer['migration']['id']}"
    # Killed once A reports the copy's figures: its libvirt job runs (phase "live" alone
    # comes before A takes its task).
    wait_for(lambda: controller.admin("GET", path)["progress"].get("memory_total"), "the live copy to begin", limit=120)
    a.kill()
    a.start()
    done = finished(controller, answer["migration"]["id"])
    # Its task is answered "interrupted" by the restarted agent: where the VM runs decides.
    assert done["state"] == "failed" and done["code"] == "interrupted", done
    assert f"runs on node {a.node_id}; node {b.node_id} holds nothing of it" in done["outcome"], done
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == a.node_id
    wait_for(lambda: running_on(a, name), "the restarted A to report the VM running")
    before = counts(log_a)[-1]
    wait_for(lambda: counts(log_a)[-1] > before + 3, "the guest to count on on A")
    assert log_a.read_text(errors="replace").count("GUEST-BOOTED") == 1, "it never stopped"
    assert name not in domains(second_libvirtd) and reported(b, name) is None
    assert not (b_dir / name).exists(), "B removed what it prepared"

    # Nothing of the cut-off move is in the way of the next one.
    moved = kumoctl(controller, "instances", "migrate", name, "--live", "--to", b.node_id, "--max-downtime", "1",
                    "--converge-timeout", "1", "--on-no-converge", "stop-and-copy")
    assert moved.returncode == 0, moved.stderr
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == b.node_id
    assert name not in domains(libvirtd)


@pytest.mark.reliability("VM live migration", "controller kill -9 once the VM runs on the destination, restart")
def test_a_controller_killed_as_a_live_migration_finishes_leaves_it_running_once(
        vm_cluster, libvirtd, second_libvirtd):
    import libvirt

    controller, a, a_dir, b, b_dir, name, log_a = counting_on_a(vm_cluster, (libvirtd, second_libvirtd), "kumo-vmlive-c")
    conn = libvirt.open(second_libvirtd)
    try:
        def runs_on_b() -> bool:
            return any(dom.name() == name and dom.state()[0] == libvirt.VIR_DOMAIN_RUNNING
                       for dom in conn.listAllDomains())

        answer = controller.admin("POST", f"/v1/instances/{name}/migrate", {"live": True, "to": b.node_id})
        # libvirt's Finish resumes the guest on B: the controller dies then, before it hears
        # that the move ended, so B's agent is never told.
        wait_for(runs_on_b, "libvirt to finish the move to B", limit=120, interval=0.002)
        controller.kill()
    finally:
        conn.close()
    controller.start()
    done = finished(controller, answer["migration"]["id"])
    # B, never told that A finished, paused its copy. When Finish's answer reached A, A's copy
    # is gone and B's goes on; when it was lost, A's libvirt resumed A's copy, and B's goes.
    here, there = (b, a) if done["state"] == "succeeded" else (a, b)
    here_dir, there_dir = (b_dir, a_dir) if here is b else (a_dir, b_dir)
    there_uri = libvirtd if there is a else second_libvirtd
    if here is b:
        assert f"stopped during its live phase; another controller found it running on node {b.node_id}" in done["outcome"]
    else:
        assert f"runs on node {a.node_id}; node {b.node_id}'s copy" in done["outcome"], done
        assert done["outcome"].endswith("was paused and removed"), done
    assert controller.admin("GET", f"/v1/instances/{name}")["node"] == here.node_id
    assert running_on(here, name)
    wait_for(lambda: reported(there, name) is None, "the other node to forget the VM")
    assert name not in domains(there_uri) and not (there_dir / name).exists(), "the other node holds nothing of it"
    log = here_dir / name / "console.log"
    before = counts(log)[-1] if counts(log) else 0
    wait_for(lambda: counts(log) and counts(log)[-1] > before + 3, "the guest to count on", limit=60)
    assert log.read_text(errors="replace").count("GUEST-BOOTED") == (1 if here is a else 0), "it never booted again"
