"""Checkpoint/restore of a real busybox LXC container through lxc-checkpoint and criu.

The container is made with the lxc tools under the lxc plugin's lxcpath (every container
there is one of its instances); the checkpoint plugin finds it, dumps and restores it only
through the lxc plugin's checkpointer, as it does for any kind.
"""

from __future__ import annotations

import asyncio
import secrets
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness import read_counter, require
from tests.harness.criu import CriuNode

pytestmark = pytest.mark.integration

CONFIG = """\
lxc.net.0.type = veth
lxc.net.0.link = {bridge}
lxc.net.0.flags = up
lxc.net.0.name = eth0
lxc.net.0.ipv4.address = {address}/24
lxc.net.0.ipv4.gateway = {gateway}
lxc.console.path = none
lxc.tty.max = 0
lxc.pty.max = 0
"""
# No getty or console (CRIU cannot take a tty along) and no udhcpc (it would flush the
# static address): a counter in the background and busybox init.
RCS = "#!/bin/sh\n/bin/mount -a\n( i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done ) </dev/null >/dev/null 2>&1 &\n"


def run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)  # noqa: S603


@pytest.fixture
async def busybox_container(tmp_path, lxcpath):
    require(shutil.which("lxc-checkpoint") is not None and Path("/usr/share/lxc/templates/lxc-busybox").exists(),
            "lxc (lxc-checkpoint and the busybox template)")
    require(shutil.which("busybox") is not None, "busybox-static")
    suffix = secrets.token_hex(3)
    # The harness's lxcpath: the lxc plugin needs one its unprivileged containers can search.
    bridge, name = f"brk{suffix}", f"kck-{suffix}"
    octet = 100 + secrets.randbelow(100)
    gateway, address = f"10.231.{octet}.1", f"10.231.{octet}.12"
    conf = tmp_path / "ckpt.conf"
    conf.write_text(CONFIG.format(bridge=bridge, address=address, gateway=gateway))
    assert run("ip", "link", "add", bridge, "type", "bridge").returncode == 0
    try:
        run("ip", "addr", "add", f"{gateway}/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        created = run("lxc-create", "-P", str(lxcpath), "-n", name, "-t", "busybox", "-f", str(conf))
        assert created.returncode == 0, created.stderr
        root = lxcpath / name
        config = (root / "config").read_text()
        config = config.replace("lxc.tty.max = 5", "lxc.tty.max = 0").replace("lxc.pty.max = 1", "lxc.pty.max = 0")
        (root / "config").write_text(config)
        (root / "rootfs/etc/init.d/rcS").write_text(RCS)
        (root / "rootfs/etc/inittab").write_text("::sysinit:/etc/init.d/rcS\n")
        started = run("lxc-start", "-P", str(lxcpath), "-n", name)
        assert started.returncode == 0, started.stderr
        yield name, lxcpath, address
    finally:
        run("lxc-stop", "-P", str(lxcpath), "-n", name, "-k")
        run("lxc-destroy", "-P", str(lxcpath), "-n", name)
        run("ip", "link", "del", bridge)


def counter(lxcpath: Path, name: str) -> int:
    return read_counter(lxcpath / name / "rootfs/tmp/counter")


async def wait_for(predicate, what: str, limit: float = 15.0):
    for _ in range(int(limit / 0.05)):
        if value := predicate():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_busybox_container_checkpoint_restore_keeps_counting_and_its_address(
    criu_required, busybox_container, tmp_path
):
    from plugins.lxc import LxcPlugin

    name, lxcpath, address = busybox_container
    lxc = LxcPlugin()
    lxc.kumo_configure(section={"lxcpath": str(lxcpath), "poll_interval": 0.5}, source="test: plugins.lxc")
    node = CriuNode(tmp_path / "state", others={"lxc": lxc})
    node.root.mkdir()
    await node.start()
    try:
        fingerprint = await node.checkpoint.kumo_fingerprint()
        assert fingerprint.attributes["instance_kinds"] == ["lxc", "process"]
        await wait_for(lambda: counter(lxcpath, name) >= 5, "the container's counter")
        preflight = await node.task("checkpoint.preflight", {"name": name, "kind": "lxc"})
        assert preflight == {"ok": True, "blockers": []}

        dumped = await node.task("checkpoint.dump", {"name": name, "kind": "lxc", "leave_running": False})
        assert dumped["manifest"] and Path(dumped["image"], "kumo-manifest.json").exists()
        assert run("lxc-info", "-P", str(lxcpath), "-n", name, "-sH").stdout.strip() == "STOPPED"
        assert [s.state for s in lxc.list() if s.name == name] == ["stopped"], "the lxc plugin saw the dump stop it"
        frozen = counter(lxcpath, name)

        restored = await node.task("checkpoint.restore", {"name": name, "kind": "lxc"})
        assert restored["pid"] > 0
        assert run("lxc-info", "-P", str(lxcpath), "-n", name, "-sH").stdout.strip() == "RUNNING"
        assert [(s.state, s.details.get("pid")) for s in lxc.list() if s.name == name] == [("running", restored["pid"])]
        resumed = await wait_for(lambda: counter(lxcpath, name) != frozen and counter(lxcpath, name), "counting")
        assert frozen < resumed <= frozen + 10, f"resumed at {resumed} after {frozen}"
        inside = run("lxc-attach", "-P", str(lxcpath), "-n", name, "--", "/bin/ip", "-4", "addr", "show", "eth0")
        assert f"{address}/24" in inside.stdout, inside.stdout + inside.stderr
        ping = run("busybox", "ping", "-c", "1", "-W", "2", address)
        assert ping.returncode == 0, ping.stdout
    finally:
        await node.stop()
