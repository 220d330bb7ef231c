"""A VM's migration through Kumo against raw libvirt: stop-and-copy against ``virsh save`` + copy +
``virsh restore``, live against ``virsh migrate --live``.

Two libvirtds on this machine behave as two hosts (the second in a mount namespace of its
own, with its own state and sockets), TCG guests (the tests' busybox guest) of ``--memory``
MiB that fill ``--fill`` MiB of their memory and keep rewriting 16 MiB of it.

- Kumo: a real controller and two real agents, one per libvirtd; the VM is created on the
  first and moved with ``POST /v1/instances/NAME/migrate``: libvirt's save on the source, the
  memory state, overlay and seed relayed through the controller over mutual TLS, sha256
  checked at both ends, restored on the destination in its own directories.
- Raw: a guest defined from the same domain XML on the first libvirtd, then ``virsh save``,
  a plain copy of the state file, overlay and seed into the second host's directory and
  ``virsh restore --xml`` there with the paths rewritten: the least any stop-and-copy does.

Live (``--modes live``): Kumo's ``migrate`` with ``live: true`` (libvirt's native migration,
its memory, disk and control streams tunnelled through the controller over mutual TLS)
against ``virsh migrate --live --copy-storage-inc`` straight from one libvirtd to the other
over loopback TCP (what two hosts with a route between them would do), with the same
downtime limit (``--max-downtime``) and the same destination overlay made beforehand. The
second agent runs in the second libvirtd's mount namespace, as the tests' does: the
migration's unix sockets have one path on both "hosts". Unlike the tests' (which run it in a
network namespace of its own), that "host" shares this machine's network: the raw baseline
migrates over loopback TCP.

Downtime is the time from the guest leaving the running state on the source to running on
the destination, seen by polling both libvirtds every 5 ms in every case (for live, qemu's
own figure is printed too); total is from the request (or the first virsh command) to the
migration's end. Prints medians and the ratio Kumo/raw (target <= 1.1x each).

    .venv/bin/python bench/bench_vm_migration.py [--memory 1024] [--fill 512] [--rounds 3] \
        [--modes stop-and-copy,live] [--max-downtime 300]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.harness.agents import running_on, start_agent, wait_for  # noqa: E402
from tests.harness.cluster import ControllerProcess  # noqa: E402
from tests.harness.guest import Guest, build_guest, kernel_package  # noqa: E402
from tests.harness.libvirt import (  # noqa: E402
    SYSTEM_URI,
    TEST_INSTANCE_ROOT,
    another_libvirtd,
    ensure_libvirtd,
    host_of,
    relocated_xml,
    remove_domains,
)

TARGET = 1.1
POLL = 0.005
# This run's domain names: the system libvirtd is shared, and a run removes only its own.
RUN = f"kb{uuid.uuid4().hex[:6]}"


class Downtime:
    """Polls two libvirtds: when a domain stops running on the first and when it runs on the second."""

    def __init__(self, source_uri: str, source_name: str, destination_uri: str, destination_name: str):
        import libvirt

        self._libvirt = libvirt
        libvirt.registerErrorHandler(lambda *_: None, None)  # "no such domain" is what it polls for
        self._source = libvirt.open(source_uri)
        self._destination = libvirt.open(destination_uri)
        self._names = source_name, destination_name
        self.stopped: float | None = None
        self.running: float | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _active(self, conn: Any, name: str) -> bool:
        try:
            state = conn.lookupByName(name).state()[0]
        except self._libvirt.libvirtError:
            return False
        return state == self._libvirt.VIR_DOMAIN_RUNNING

    def _poll(self) -> None:
        while not self._done.is_set() and self.running is None:
            now = time.perf_counter()
            if self.stopped is None and not self._active(self._source, self._names[0]):
                self.stopped = now
            if self.stopped is not None and self._active(self._destination, self._names[1]):
                self.running = now
            time.sleep(POLL)

    def seconds(self) -> float:
        self._thread.join(60)
        self._done.set()
        self._source.close()
        self._destination.close()
        if self.stopped is None or self.running is None:
            sys.exit("bench_vm_migration: the guest was never seen stopping on the source and running on the destination")
        return self.running - self.stopped


def virsh(uri: str, *args: str) -> str:
    done = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, check=False)  # noqa: S603, S607
    if done.returncode != 0:
        sys.exit(f"bench_vm_migration: virsh {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def filled(console: Path) -> bool:
    return console.exists() and "GUEST-FILLED" in console.read_text(errors="replace")


def kumo_round(ctl: ControllerProcess, nodes: list[tuple[Any, Path, str]], guest: Guest, name: str,
               memory: int, fill: int, raw_dir: Path, live: dict[str, Any] | None = None) -> tuple[float, float]:
    """(downtime, total seconds) of one migration (live with ``live``: its options); before
    it, :func:`copy_for_raw` into ``raw_dir``."""
    (source, source_dir, source_uri), (destination, _, destination_uri) = nodes
    ctl.admin("POST", "/v1/instances", {
        "name": name, "kind": "kvm", "node": source.node_id, "vcpus": 1, "memory_mib": memory,
        "image": str(guest.disk), "image_sha256": guest.disk_sha256, "user_data": "#cloud-config\n",
        "options": {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                    "cmdline": f"{guest.cmdline} kumo.hold kumo.fill={fill}"},
    })
    wait_for(lambda: running_on(source, name), f"{name} to run on {source.node_id}", limit=120)
    wait_for(lambda: filled(source_dir / name / "console.log"), f"{name} to fill {fill} MiB", limit=300)
    copy_for_raw(virsh(source_uri, "dumpxml", "--inactive", name), raw_dir)
    watch = Downtime(source_uri, name, destination_uri, name)
    started = time.perf_counter()
    body = {"to": destination.node_id, **({"live": True, **live} if live is not None else {})}
    migration = ctl.admin("POST", f"/v1/instances/{name}/migrate", body)["migration"]
    watch_api = ctl.watcher()
    doc = wait_for(lambda: (m := watch_api(f"/v1/migrations/{migration['id']}"))["state"] != "running" and m,
                   f"the migration of {name}", limit=600, interval=0.05)
    total = time.perf_counter() - started
    if doc["state"] != "succeeded":
        sys.exit(f"bench_vm_migration: the migration of {name} failed: {doc['error']}")
    downtime = watch.seconds()
    if live is not None:
        print(f"      Kumo live: qemu's downtime {doc['progress'].get('downtime_ms')} ms, "
              f"{doc['progress'].get('bytes_sent', 0) / 2**20:.0f} MiB through the controller", flush=True)
    ctl.admin("DELETE", f"/v1/instances/{name}")
    wait_for(lambda: name not in {i["name"] for i in ctl.admin("GET", "/v1/instances")["instances"]},
             f"{name} to be deleted", limit=120)
    return downtime, total


def copy_for_raw(xml: str, directory: Path) -> None:
    """The baseline's guest in ``directory``: a Kumo domain's XML, a new overlay on the same
    base image and a copy of its seed (the source deletes its own once the VM has moved)."""
    directory.mkdir(mode=0o711)
    (directory / "template.xml").write_text(xml)
    for source in ET.fromstring(xml).iter("source"):
        path = Path(source.get("file") or "")
        if path.suffix == ".qcow2":
            backing = json.loads(subprocess.run(  # noqa: S603
                ["qemu-img", "info", "-U", "--output", "json", str(path)], check=True, capture_output=True, text=True,
            ).stdout)["full-backing-filename"]
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", backing,  # noqa: S603, S607
                            str(directory / path.name)], check=True)
        elif path.suffix == ".iso":
            shutil.copy(path, directory / path.name)


def start_raw(here: Path, source_uri: str, name: str, fill: int) -> Path:
    """Define and start on the source the guest :func:`copy_for_raw` left in ``here``, wait
    until it has filled ``fill`` MiB; the new directory of its destination's copy."""
    there = here.with_name(f"{here.name}-destination")
    there.mkdir(mode=0o711)
    template = (here / "template.xml").read_text()
    (here / "domain.xml").write_text(relocated_xml(template, here, name))
    virsh(source_uri, "define", str(here / "domain.xml"))
    virsh(source_uri, "start", name)
    console = next(Path(s.get("path")) for s in ET.fromstring(relocated_xml(template, here)).iter("source")
                   if s.get("path", "").endswith(".log"))
    wait_for(lambda: filled(console), f"{name} to fill {fill} MiB", limit=300)
    return there


def raw_round(here: Path, uris: tuple[str, str], name: str, fill: int) -> tuple[float, float]:
    """(downtime, total seconds) of ``virsh save``, a copy and ``virsh restore`` of the guest
    :func:`copy_for_raw` left in ``here``."""
    source_uri, destination_uri = uris
    there = start_raw(here, source_uri, name, fill)

    watch = Downtime(source_uri, name, destination_uri, name)
    started = time.perf_counter()
    virsh(source_uri, "save", name, str(here / "memory.save"))
    for path in here.iterdir():
        if path.suffix in (".save", ".qcow2", ".iso"):
            shutil.copy(path, there / path.name)
    saved = virsh(destination_uri, "save-image-dumpxml", str(there / "memory.save"))
    (there / "domain.xml").write_text(relocated_xml(saved, there))
    virsh(destination_uri, "restore", str(there / "memory.save"), "--xml", str(there / "domain.xml"))
    total = time.perf_counter() - started
    downtime = watch.seconds()
    virsh(destination_uri, "destroy", name)
    virsh(source_uri, "undefine", name)
    shutil.rmtree(here)
    shutil.rmtree(there)
    return downtime, total


def raw_live_round(here: Path, uris: tuple[str, str], name: str, fill: int, max_downtime: int) -> tuple[float, float]:
    """(downtime, total seconds) of ``virsh migrate --live --copy-storage-inc`` of the guest
    :func:`copy_for_raw` left in ``here``, over loopback TCP, to an overlay made beforehand."""
    source_uri, destination_uri = uris
    there = start_raw(here, source_uri, name, fill)
    copy_for_raw(virsh(source_uri, "dumpxml", "--inactive", name), there / "disks")
    for path in (there / "disks").iterdir():
        path.rename(there / path.name)
    (there / "domain.xml").write_text(relocated_xml(virsh(source_uri, "dumpxml", "--migratable", name), there))
    virsh(source_uri, "migrate-setmaxdowntime", name, str(max_downtime))

    watch = Downtime(source_uri, name, destination_uri, name)
    started = time.perf_counter()
    virsh(source_uri, "migrate", "--live", "--copy-storage-inc", "--persistent", "--undefinesource",
          "--timeout", "120", "--timeout-suspend",
          "--migrate-disks", "vda", "--xml", str(there / "domain.xml"), "--migrateuri", "tcp://127.0.0.1:49352",
          "--disks-uri", "tcp://127.0.0.1:49353", name, destination_uri)
    total = time.perf_counter() - started
    downtime = watch.seconds()
    virsh(destination_uri, "destroy", name)
    virsh(destination_uri, "undefine", name)
    shutil.rmtree(here)
    shutil.rmtree(there)
    return downtime, total


@contextlib.contextmanager
def fleet(work: Path, second_uri: str) -> Iterator[tuple[ControllerProcess, list[tuple[Any, Path, str]]]]:
    """A controller and an agent per libvirtd: (controller, [(agent, instance dir, libvirt URI)])."""
    ctl = ControllerProcess(work / "controller", {"log_level": "info"})
    ctl.start()
    agents: list[Any] = []
    nodes: list[tuple[Any, Path, str]] = []
    try:
        for label, uri in (("a", SYSTEM_URI), ("b", second_uri)):
            root = TEST_INSTANCE_ROOT / f"kumo-bench-{label}-{uuid.uuid4().hex[:8]}"
            root.mkdir(mode=0o711)
            (work / label).mkdir()
            agent = start_agent(ctl, work / label, plugins={"kvm": {
                "uri": uri, "instance_dir": str(root / "instances"), "acceleration": "tcg", "shutdown_timeout": 10,
            }}, settings={"log_level": "info", "image_cache": {"path": str(root / "images")}}, start=False)
            agent.prefix = host_of(uri)  # on the "host" of its libvirtd
            agent.start()
            agents.append(agent)
            nodes.append((agent, root / "instances", uri))
        yield ctl, nodes
    finally:
        for agent in agents:
            agent.stop()
        ctl.stop()
        remove_domains(SYSTEM_URI, RUN)
        for _, directory, _ in nodes:
            shutil.rmtree(directory.parent, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memory", type=int, default=1024, help="the guest's memory, MiB")
    parser.add_argument("--fill", type=int, default=512, help="MiB of it the guest fills and keeps writing to")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="stop-and-copy,live", help="stop-and-copy, live or both (comma-separated)")
    parser.add_argument("--max-downtime", type=int, default=300, help="live: the downtime limit, ms, for both")
    args = parser.parse_args()
    modes = args.modes.split(",")
    if not modes or set(modes) - {"stop-and-copy", "live"}:
        sys.exit(f"bench_vm_migration: --modes takes stop-and-copy, live or both, got {args.modes!r}")
    deb = kernel_package()
    if deb is None or ensure_libvirtd() is None:
        sys.exit("bench_vm_migration: needs the guest kernel package and a running libvirtd: run `make deps` first")
    guest = build_guest(deb)
    with tempfile.TemporaryDirectory(prefix="kumo-bench-vm-") as tmp:
        work = Path(tmp)
        raw_work = TEST_INSTANCE_ROOT / f"kumo-bench-raw-{uuid.uuid4().hex[:8]}"
        raw_work.mkdir(mode=0o711)
        try:
            with another_libvirtd(work / "libvirtd2") as second_uri, fleet(work, second_uri) as (ctl, nodes):
                kumo: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
                raw: dict[str, list[tuple[float, float]]] = {mode: [] for mode in modes}
                print(f"{'round':>5} {'mode':>13} {'Kumo down s':>12} {'Kumo total s':>13} {'raw down s':>11} "
                      f"{'raw total s':>12}")
                for n in range(args.rounds):
                    for mode in modes:
                        raw_dir = raw_work / f"bench-raw-{mode}-{n}"
                        # Both pause a guest that has not converged after 120 s, so both finish.
                        live = ({"max_downtime_ms": args.max_downtime, "converge_timeout": 120,
                                 "on_no_converge": "stop-and-copy"} if mode == "live" else None)
                        kumo[mode].append(kumo_round(ctl, nodes, guest, f"{RUN}-vm-{mode}-{n}", args.memory,
                                                     args.fill, raw_dir, live))
                        uris = (SYSTEM_URI, second_uri)
                        raw[mode].append(raw_live_round(raw_dir, uris, f"{RUN}-raw-{n}", args.fill, args.max_downtime)
                                         if live else raw_round(raw_dir, uris, f"{RUN}-raw-{n}", args.fill))
                        print(f"{n:>5} {mode:>13} {kumo[mode][-1][0]:>12.2f} {kumo[mode][-1][1]:>13.2f} "
                              f"{raw[mode][-1][0]:>11.2f} {raw[mode][-1][1]:>12.2f}", flush=True)
        finally:
            shutil.rmtree(raw_work, ignore_errors=True)
    print(f"guest: {args.memory} MiB, {args.fill} MiB filled and written to; median of {args.rounds} rounds")
    baseline = {"stop-and-copy": "raw virsh save + copy + restore", "live": "raw virsh migrate --live"}
    for mode in modes:
        for label, index in (("downtime", 0), ("total", 1)):
            k, r = statistics.median(x[index] for x in kumo[mode]), statistics.median(x[index] for x in raw[mode])
            print(f"{mode:>13} {label:>8}: Kumo {k:6.2f} s, {baseline[mode]} {r:6.2f} s: "
                  f"{k / r:.2f}x (target <= {TARGET}x) {'OK' if k / r <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    main()
