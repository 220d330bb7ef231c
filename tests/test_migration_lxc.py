"""Migration of lxc containers: the container's directory travels with its CRIU image.

First the stream itself, in process: a directory with every kind of file goes through the
sender's tar and the receiver's unpacking unchanged (owners, modes, hardlinks, symlinks,
devices, xattrs). Then the lxc plugin's checks of a migrating config, through its checkpointer. Then two real agents
on this machine, each with its own state dir and lxcpath, real liblxc and real CRIU: a busybox
container with a counter and an address on a bridge moves and keeps both; a failed restore
on the destination leaves it running on the source and nothing on the destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest

from agent.sdk import StagedDirectory, TaskError
from tests.harness import read_counter
from tests.harness.agents import reported, running_on, wait_for
from tests.harness.criu import SBIN_PATH
from tests.harness.lxc import run
from tests.test_lxc import rootfs_tarball

COUNTER_RCS = (
    "( i=0; while true; do i=$((i+1)); echo $i > /tmp/counter; sleep 0.1; done ) </dev/null >/dev/null 2>&1 &\n"
)
SHIFT = 1_000_000  # ids as an unprivileged container's rootfs has them on the host
IDMAP = f"lxc.idmap = u 0 {SHIFT} 65536\nlxc.idmap = g 0 {SHIFT} 65536\n"  # the default node's


# ---- the stream -------------------------------------------------------------------------


def make_tree(root: Path) -> None:
    """A container directory with each kind of file the stream must keep."""
    rootfs = root / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    (root / "config").write_text("lxc.rootfs.path = dir:/somewhere/c1/rootfs\n")
    tool = rootfs / "bin" / "tool"
    tool.write_bytes(b"\x7fELF" + os.urandom(70000))
    os.chown(tool, SHIFT + 5, SHIFT + 6)
    tool.chmod(0o4755)
    os.link(tool, rootfs / "bin" / "tool-again")
    os.symlink("/etc/hostname", rootfs / "absolute-link")
    os.symlink("bin/tool", rootfs / "relative-link")
    os.mknod(rootfs / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mkfifo(rootfs / "fifo", 0o620)
    os.setxattr(tool, "user.kumo", b"migrated")
    os.setxattr(tool, "trusted.kumo", b"\xff\x00not utf-8")
    sealed = rootfs / "sealed"
    sealed.mkdir(0o555)
    os.chown(sealed, SHIFT, SHIFT)
    os.utime(sealed, (1_600_000_000, 1_600_000_000))
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(rootfs / "socket"))


def describe(root: Path) -> dict[str, Any]:
    """Everything the stream must keep, by relative path (inodes as groups of hardlinks)."""
    out: dict[str, Any] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = os.lstat(path)
        entry: dict[str, Any] = {"mode": st.st_mode, "uid": st.st_uid, "gid": st.st_gid, "nlink": st.st_nlink}
        if stat.S_ISLNK(st.st_mode):
            entry["target"] = os.readlink(path)
        else:
            entry["mtime"] = int(st.st_mtime)
            entry["xattrs"] = {a: os.getxattr(path, a) for a in os.listxattr(path)}
        if stat.S_ISREG(st.st_mode):
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
        if stat.S_ISCHR(st.st_mode):
            entry["rdev"] = st.st_rdev
        out[str(path.relative_to(root))] = entry
    return out


class Body:
    """What the receiver reads the stream through (as the HTTP body reader is read)."""

    def __init__(self, data: bytes):
        self.stream, self.count, self.digest = io.BytesIO(data), 0, hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.count += len(data)
        self.digest.update(data)
        return data


async def test_a_container_directory_streams_with_owners_links_devices_and_xattrs(tmp_path):
    from plugins.checkpoint.stream import directory_members, stream_size, unpack, write_tar

    source, staged, incoming = tmp_path / "source", tmp_path / "staged", tmp_path / "incoming"
    source.mkdir()
    staged.mkdir()
    incoming.mkdir()
    make_tree(source)
    members = directory_members(source, "config")
    announced = sum(len(header) + -(-size // 512) * 512 for header, _, size in members) + 1024
    pieces: list[bytes] = []
    write_tar(members, lambda piece: pieces.append(bytes(piece)))
    data = b"".join(pieces)
    assert len(data) == announced == stream_size(members), "the size sent ahead for the progress display is exact"

    configs: list[tuple[str, bytes]] = []

    def stage(definition: str, config: bytes) -> StagedDirectory:
        configs.append((definition, config))
        return StagedDirectory(staged, None)  # a privileged container's: its files keep any owner

    body = Body(data)
    await asyncio.to_thread(unpack, body, incoming, tmp_path, stage, "c1", [])
    assert configs == [("config", b"lxc.rootfs.path = dir:/somewhere/c1/rootfs\n")], \
        "the config comes first, before the rootfs"
    assert body.count == len(data) and body.digest.hexdigest() == hashlib.sha256(data).hexdigest(), \
        "the receiver reads the whole stream, so what it counts and hashes is what was sent"

    want, got = describe(source), describe(staged)
    assert "rootfs/socket" in want and "rootfs/socket" not in got, "a socket is bound again by its owner"
    del want["rootfs/socket"]
    assert got == want
    assert os.lstat(staged / "rootfs/bin/tool").st_ino == os.lstat(staged / "rootfs/bin/tool-again").st_ino
    assert os.lstat(staged / "rootfs/bin/tool").st_mode & stat.S_ISUID, "setuid survives the chown"


async def test_a_stream_cannot_write_through_a_symlink_it_carries(tmp_path):
    import tarfile

    from plugins.checkpoint.stream import unpack

    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("instance/config", b"x\n"),):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("instance/escape")
        link.type, link.linkname = tarfile.SYMTYPE, str(tmp_path / "outside")
        tar.addfile(link)
        evil = tarfile.TarInfo("instance/escape/owned")
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"!"))
    (tmp_path / "outside").mkdir()
    staged = tmp_path / "staged"
    staged.mkdir()
    with pytest.raises(TaskError, match="unexpected instance entry 'instance/escape/owned'"):
        await asyncio.to_thread(unpack, Body(out.getvalue()), tmp_path, tmp_path,
                                lambda name, config: StagedDirectory(staged, None), "c1", [])
    assert not (tmp_path / "outside" / "owned").exists()


def hostile_stream(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    """A migration stream carrying a container directory made of ``members`` after its config."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        config = tarfile.TarInfo("instance/config")
        config.size = 2
        tar.addfile(config, io.BytesIO(b"x\n"))
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def member(name: str, kind: bytes = tarfile.REGTYPE, uid: int = SHIFT, mode: int = 0o644, **fields: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(f"instance/{name}")
    info.type, info.uid, info.gid, info.mode = kind, uid, uid, mode
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def capability(revision: int, rootid: int = 0) -> str:
    """A security.capability value (cap_net_raw permitted) as the stream carries it."""
    magic = (revision << 24).to_bytes(4, "little")
    caps = (1 << 13).to_bytes(4, "little") + bytes(12)
    return (magic + caps + (rootid.to_bytes(4, "little") if revision == 3 else b"")).decode("utf-8", "surrogateescape")


async def test_an_unprivileged_containers_files_are_held_to_its_user_namespace(tmp_path):
    # A compromised source hands an unprivileged container host-root setuid files, file
    # capabilities that hold on the host, a block device and trusted xattrs.
    from plugins.checkpoint.stream import unpack

    data = hostile_stream([
        (member("su-host", uid=0, mode=0o6755), b"host root's setuid"),
        (member("su-container", uid=SHIFT, mode=0o4755), b"the container root's own setuid"),
        (member("caps-v2", pax_headers={"SCHILY.xattr.security.capability": capability(2)}), b"v2"),
        (member("caps-v3", pax_headers={"SCHILY.xattr.security.capability": capability(3, SHIFT)}), b"v3"),
        (member("attrs", pax_headers={"SCHILY.xattr.user.kept": "yes", "SCHILY.xattr.trusted.gone": "no"}), b"x"),
        (member("disk", tarfile.BLKTYPE, devmajor=8, devminor=0), b""),
        (member("mem", tarfile.CHRTYPE, devmajor=1, devminor=1), b""),
        (member("null", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
    ])
    staged = tmp_path / "staged"
    staged.mkdir()
    await asyncio.to_thread(unpack, Body(data), tmp_path, tmp_path,
                            lambda *_: StagedDirectory(staged, range(SHIFT, SHIFT + 65536)), "c1", [])
    host = os.lstat(staged / "su-host")
    assert (host.st_uid, host.st_gid) == (SHIFT + 65534, SHIFT + 65534), "an id outside the map is its nobody"
    assert not host.st_mode & (stat.S_ISUID | stat.S_ISGID)
    assert os.lstat(staged / "su-container").st_mode & stat.S_ISUID, "setuid within the namespace is its own"
    assert os.listxattr(staged / "caps-v2") == [], "a revision 2 capability holds for anyone on the host"
    assert os.listxattr(staged / "caps-v3") == ["security.capability"]
    assert os.listxattr(staged / "attrs") == ["user.kept"]
    assert sorted(p.name for p in staged.iterdir()) == ["attrs", "caps-v2", "caps-v3", "config", "null",
                                                        "su-container", "su-host"]


async def test_a_stream_with_a_giant_header_is_refused_before_it_is_read(tmp_path):
    from plugins.checkpoint.image import CHUNK
    from plugins.checkpoint.stream import MAX_HEADER_BYTES, unpack

    data = hostile_stream([(member("big", pax_headers={"SCHILY.xattr.user.big": "x" * 4 * MAX_HEADER_BYTES}), b"")])
    body = Body(data)
    with pytest.raises(TaskError, match=r"a tar header of \d+ bytes \(at most 1048576\)"):
        await asyncio.to_thread(unpack, body, tmp_path, tmp_path, lambda *_: StagedDirectory(tmp_path, None), "c1", [])
    assert body.count <= CHUNK < len(data) / 2, "the header was refused after one read, not read whole into memory"


def test_a_stream_without_a_size_or_larger_than_the_disk_is_refused_before_a_byte_lands(tmp_path):
    from plugins.checkpoint.transfer import check_room

    with pytest.raises(TaskError, match="without declaring its size"):
        check_room(None, tmp_path)
    with pytest.raises(TaskError, match=f"{tmp_path} has \\d+ bytes free: make room") as refused:
        check_room(shutil.disk_usage(tmp_path).free + 1, tmp_path)
    assert refused.value.code == "no-space"
    check_room(1, tmp_path)


@pytest.mark.parametrize(
    ("member", "why"),
    [
        ("state/ca.crt", "unexpected entry"),  # the agent's CA: whoever replaces it owns the node
        ("state/join.json", "unexpected entry"),  # the controller URL
        ("state/plugins/process/instances/other/record.json", "unexpected entry"),  # another instance
        ("state/plugins/nosuchplugin/instances/web/x", "unexpected entry"),
        ("state/plugins/process/instances/web/../../../ca.crt", "unexpected entry"),
        ("files{root}/ca.crt", "inside the agent's state but not in the instance's own directory"),
    ],
)
async def test_a_source_cannot_write_into_the_destinations_state(tmp_path, member, why):
    # A compromised source sends a stream naming the destination agent's own files.
    import tarfile

    from plugins.checkpoint.stream import unpack

    root = tmp_path / "state"
    (root / "plugins" / "process" / "instances").mkdir(parents=True)
    (root / "ca.crt").write_bytes(b"the real CA")
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("state/plugins/process/instances/web/console.log", b"its console"),
                           (member.format(root=root), b"planted")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    placed: list[Path] = []
    with pytest.raises(TaskError, match=re.escape(why)):
        await asyncio.to_thread(unpack, Body(out.getvalue()), incoming, root, lambda *a: tmp_path, "web", placed)
    assert (root / "ca.crt").read_bytes() == b"the real CA" and not (root / "join.json").exists()
    assert not any(b"planted" in p.read_bytes() for p in root.rglob("*") if p.is_file())
    # What it did place (the instance's own console) is listed, for the receive to remove.
    assert placed == [root / "plugins/process/instances/web/console.log"]


# ---- the destination's checks -------------------------------------------------------------


def test_paths_into_the_source_container_are_rewritten_and_host_paths_kept():
    from plugins.lxc.lxcconf import rewrite_config

    config = (
        "lxc.rootfs.path = dir:/src/lxc/web/rootfs\n"
        "lxc.log.file = /src/lxc/web/lxc.log\n"
        "# lxc.log.file = /src/lxc/web/old.log\n"
        "lxc.mount.entry = /lib lib none ro,bind 0 0\n"
        "lxc.mount.entry = /src/lxc/web-data data none bind 0 0\n"
    )
    assert rewrite_config(config, Path("/src/lxc/web"), Path("/dst/kumo/web")) == (
        "lxc.rootfs.path = dir:/dst/kumo/web/rootfs\n"
        "lxc.log.file = /dst/kumo/web/lxc.log\n"
        "# lxc.log.file = /src/lxc/web/old.log\n"
        "lxc.mount.entry = /lib lib none ro,bind 0 0\n"
        "lxc.mount.entry = /src/lxc/web-data data none bind 0 0\n"
    )


def test_what_the_destination_lacks_is_named_with_what_to_do(tmp_path):
    from plugins.lxc.lxcconf import import_problems

    target = tmp_path / "web"
    config = (
        f"lxc.rootfs.path = dir:{target}/rootfs\n"
        "lxc.net.0.type = veth\nlxc.net.0.link = brnope9\n"
        "lxc.mount.entry = /lib lib none ro,bind 0 0\n"
        "lxc.mount.entry = /no/such/host/dir data none ro,bind 0 0\n"
        "lxc.mount.entry = /no/such/optional opt none ro,bind,optional 0 0\n"
        "lxc.mount.entry = /src/lxc/other/data data none bind 0 0\n"
        "lxc.include = /no/such/common.conf\n"
    )
    problems = import_problems(config, target, Path("/src/lxc"), None)
    assert len(problems) == 4, problems
    assert "plugs into bridge brnope9, which this node does not have: create it (ip link add brnope9" in problems[-1]
    assert any("binds the host path /no/such/host/dir" in p and "host paths are not carried" in p for p in problems)
    assert any("/src/lxc/other/data" in p and "not carried" in p for p in problems)
    assert any("includes /no/such/common.conf" in p for p in problems)
    outside = import_problems("lxc.rootfs.path = dir:/srv/web\n", target, Path("/src/lxc"), None)
    assert outside and "outside the container's directory" in outside[0]


BUSYBOX_CONFIG = """\
lxc.net.0.type = empty
lxc.rootfs.path = dir:{target}/rootfs
lxc.signal.halt = SIGUSR1
lxc.signal.reboot = SIGTERM
lxc.uts.name = "web"
lxc.autodev = 1
lxc.cap.drop = sys_module mac_admin mac_override sys_time
lxc.mount.auto = cgroup:mixed proc:mixed sys:ro
lxc.mount.entry = shm dev/shm tmpfs defaults,create=dir 0 0
lxc.mount.entry = mqueue dev/mqueue mqueue defaults,optional,create=dir 0 0
lxc.mount.entry = /lib lib none ro,bind 0 0
lxc.mount.entry = /usr/lib usr/lib none ro,bind 0 0
lxc.mount.entry = /sys/kernel/security sys/kernel/security none ro,bind,optional 0 0
# Kumo
lxc.uts.name = web
lxc.console.path = none
lxc.tty.max = 0
lxc.pty.max = 0
lxc.log.file = {target}/lxc.log
lxc.log.level = NOTICE
lxc.net.0.type = veth
lxc.net.0.link = br0
lxc.net.0.flags = up
lxc.net.0.name = eth0
lxc.net.0.ipv4.address = 10.0.0.5/24
lxc.cgroup.memory.limit_in_bytes = 67108864
"""


@pytest.mark.parametrize(
    "line",
    [
        "lxc.hook.pre-start = /bin/sh -c 'id > /root/owned'",  # a command run as root on this host
        "lxc.mount.entry = / host none rw,bind 0 0",  # the host's root, writable
        "lxc.mount.entry = / host none ro,bind 0 0",  # or readable (/etc/shadow)
        "lxc.mount.entry = {target}/rootfs/x data none ro,bind 0 0",  # a symlink the source chose
        "lxc.mount.entry = /lib /etc none ro,bind 0 0",  # an absolute mount point
        "lxc.mount.auto = proc:rw sys:rw",
        "lxc.apparmor.profile = unconfined",
        "lxc.cgroup.devices.allow = a",
        "lxc.cgroup2.devices.allow = a",
        "lxc.net.1.type = phys",  # a host NIC moved into the container
        "lxc.log.file = /etc/cron.d/owned",
        "lxc.include = /tmp/evil.conf",
        "lxc.rootfs.path = dir:/",
        "lxc.cap.keep = sys_admin",
        "lxc.environment = LD_PRELOAD=/x.so",
    ],
)
def test_a_migrated_config_is_accepted_only_as_this_nodes_plugin_would_write_it(tmp_path, line):
    from plugins.lxc.allowlist import foreign_lines
    from plugins.lxc.settings import LxcConfig

    target = tmp_path / "web"
    node = LxcConfig(lxcpath=tmp_path)
    good = BUSYBOX_CONFIG.format(target=target) + IDMAP
    assert foreign_lines(good, target, node) == []
    bad = good + line.format(target=target) + "\n"
    problems = foreign_lines(bad, target, node)
    assert len(problems) == 1 and "never writes" in problems[0], problems


def test_a_migrated_container_must_use_this_nodes_user_namespace(tmp_path):
    from plugins.lxc.allowlist import foreign_lines
    from plugins.lxc.settings import LxcConfig

    target = tmp_path / "web"
    config = BUSYBOX_CONFIG.format(target=target)
    node = LxcConfig(lxcpath=tmp_path, idmap_start=100000, idmap_size=65536)
    # No idmap: privileged, or an unprivileged one whose source dropped its idmap lines.
    [problem] = foreign_lines(config, target, node)
    assert "no user namespace" in problem and "allow_privileged: true" in problem
    assert foreign_lines(config, target, dataclasses.replace(node, allow_privileged=True)) == []
    mapped = config + "lxc.idmap = u 0 100000 65536\nlxc.idmap = g 0 100000 65536\n"
    assert foreign_lines(mapped, target, node) == []
    [problem] = foreign_lines(mapped.replace("u 0 100000", "u 0 0"), target, node)  # host root inside
    assert "is not this node's (u 0 100000 65536; g 0 100000 65536)" in problem
    assert foreign_lines(mapped, target, dataclasses.replace(node, idmap_start=200000))


@pytest.mark.integration
@pytest.mark.parametrize(
    ("lines", "code", "named"),
    [
        (b"lxc.net.0.type = veth\nlxc.net.0.link = brnope8\n", "no-bridge",
         "container 'web' cannot run on this node: its interface lxc.net.0 plugs into bridge brnope8"),
        (b"lxc.net.0.type = empty\nlxc.hook.pre-start = /bin/touch /tmp/kumo-owned\n", "import-refused",
         "lxc.hook.pre-start"),
    ],
    ids=["missing-bridge", "hook"],
)
async def test_the_lxc_plugin_refuses_to_stage_a_container_it_cannot_or_would_not_run(lxc_node, lines, code, named):
    node = await lxc_node()
    checkpointer = node.plugin.kumo_checkpointer()
    with pytest.raises(TaskError) as err:
        await checkpointer.stage("web", {"lxcpath": "/src/lxc"}, b"lxc.rootfs.path = dir:/src/lxc/web/rootfs\n"
                                 + IDMAP.encode() + lines, {"name": "web", "kind": "lxc"})
    assert err.value.code == code and named in str(err.value)
    assert not Path("/tmp/kumo-owned").exists()
    assert not [p for p in node.lxcpath.iterdir()], "nothing is staged when the node cannot run it"


@pytest.mark.integration
async def test_whether_a_container_is_privileged_is_the_controllers_word_not_the_sources(lxc_node):
    """On a node that allows privileged containers, a source dropping an unprivileged
    container's idmap would make its root this host's root: the controller's record decides."""
    node = await lxc_node({"allow_privileged": True})
    checkpointer = node.plugin.kumo_checkpointer()
    bare = b"lxc.rootfs.path = dir:/src/lxc/web/rootfs\nlxc.net.0.type = empty\n"

    def stage(config: bytes, privileged: bool) -> Any:
        instance = {"name": "web", "kind": "lxc", "options": {"privileged": privileged}}
        return checkpointer.stage("web", {"lxcpath": "/src/lxc"}, config, instance)

    for config, recorded, sent in ((bare, False, "no user namespace"), (bare + IDMAP.encode(), True, "a user namespace")):
        with pytest.raises(TaskError) as err:
            await stage(config, recorded)
        assert err.value.code == "import-refused", err.value
        assert (f"container 'web' is refused on this node: the controller records it as "
                f"{'privileged' if recorded else 'unprivileged'}, but the config its source sent gives it {sent}"
                in str(err.value)), err.value
    assert list(node.lxcpath.iterdir()) == [], "nothing is staged for a refused container"
    staged = await stage(bare, True)
    assert staged.ids is None and staged.path.parent == node.lxcpath
    staged = await stage(bare + IDMAP.encode(), False)
    assert staged.ids == range(SHIFT, SHIFT + 65536)


# ---- two real agents ----------------------------------------------------------------------


def counter(lxcpath: Path, name: str) -> int:
    return read_counter(lxcpath / name / "rootfs/tmp/counter")


def kumoctl(controller: Any, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "controller.kumoctl", "--config", str(controller.kumoctl_config), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=180, check=False)  # noqa: S603


@pytest.fixture
def lxc_cluster(criu_required, lxc_required, controller, kumo_agent, lxcpath_factory, lxc_bridge):
    """``node(lxc_settings, **checkpoint_settings)`` → (agent, its lxcpath); ``container(agent,
    lxcpath, name, host, privileged)`` makes a busybox container with a counter and the bridge
    address ``.host`` on it (no interface but loopback when host is None: CRIU cannot restore a
    veth inside a user namespace, "netlink: Operation not permitted")."""

    def node(lxc: dict[str, Any] | None = None, **checkpoint: Any) -> tuple[Any, Path]:
        path = lxcpath_factory()
        settings = {"lxcpath": str(path), "poll_interval": 0.5, **(lxc or {})}
        agent = kumo_agent(plugins={"lxc": settings, "checkpoint": checkpoint})
        return agent, path

    def container(agent: Any, path: Path, name: str, host: int | None, privileged: bool = False) -> str | None:
        address = None if host is None else lxc_bridge.address(host)
        network = {"mode": "empty"} if address is None else {
            "mode": "veth", "bridge": lxc_bridge.name, "address": f"{address}/24", "gateway": lxc_bridge.gateway}
        source: dict[str, Any] = {"options": {"template": "busybox", "privileged": privileged, "network": network}}
        if not privileged:
            # CRIU cannot restore the busybox template's binds of the host's /lib in a user
            # namespace ("Can't bind-mount ... Invalid argument"): a self-contained rootfs.
            image = path / f".{name}.tar.gz"
            source = {"image": str(image), "image_sha256": rootfs_tarball(image),
                      "options": {"privileged": False, "network": network}}
        controller.admin("POST", "/v1/instances", {
            "name": name, "kind": "lxc", "node": agent.node_id, "vcpus": 1, "memory_mib": 64, **source})
        wait_for(lambda: running_on(agent, name), f"{name} to run")
        # The counter starts with init, so that CRIU finds it in the container's own session.
        controller.admin("POST", f"/v1/instances/{name}/stop", {})
        wait_for(lambda: (reported(agent, name) or {}).get("state") == "stopped", f"{name} to stop")
        with (path / name / "rootfs/etc/init.d/rcS").open("a") as rcs:
            rcs.write(COUNTER_RCS)
        controller.admin("POST", f"/v1/instances/{name}/start", {})
        wait_for(lambda: running_on(agent, name), f"{name} to run again")
        wait_for(lambda: counter(path, name) >= 5, f"{name} to count")
        return address

    yield controller, node, container
    for row in controller.admin("GET", "/v1/instances")["instances"]:
        with contextlib.suppress(AssertionError):
            controller.admin("DELETE", f"/v1/instances/{row['name']}")


def images(agent: Any, name: str) -> Path:
    return agent.state_dir / "plugins" / "checkpoint" / "images" / "lxc" / name


@pytest.mark.integration
@pytest.mark.parametrize("privileged", [False, True], ids=["unprivileged", "privileged"])
def test_a_container_migrates_keeping_its_counter_address_and_files(lxc_cluster, privileged):
    controller, node, container = lxc_cluster
    allowing = {"allow_privileged": True} if privileged else None
    (a, path_a), (b, path_b) = node(allowing), node(allowing)
    address = container(a, path_a, "mover", 21 if privileged else None, privileged)
    # Container root is host root only when asked for: the rcS the plugin wrote belongs to it.
    assert (path_a / "mover/rootfs/etc/init.d/rcS").stat().st_uid == (0 if privileged else SHIFT)
    rootfs_a = path_a / "mover/rootfs"
    extra = rootfs_a / "root"
    (extra / "shared").write_text("one inode, two names")
    os.link(extra / "shared", extra / "shared-too")
    os.chown(extra / "shared", SHIFT + 7, SHIFT + 8)
    os.setxattr(extra / "shared", "user.kumo", b"kept")
    os.mknod(extra / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    os.symlink("/etc/hostname", extra / "hostname-link")

    seen_on_a = counter(path_a, "mover")
    moved = kumoctl(controller, "instances", "migrate", "mover", "--to", b.node_id, "-o", "json")
    assert moved.returncode == 0, moved.stderr
    done = json.loads(moved.stdout)
    assert done["state"] == "succeeded" and done["kind"] == "lxc", done
    assert done["progress"]["bytes_received"] == done["progress"]["bytes_total"] > 0
    assert len(done["sha256"]) == 64

    assert running_on(b, "mover")
    # B was told by the controller, not by A, whether the container is privileged.
    [receive] = controller.sql("SELECT payload FROM tasks WHERE kind = 'checkpoint.receive'")
    assert json.loads(receive["payload"])["instance"]["options"]["privileged"] is privileged
    shown = kumoctl(controller, "instances", "show", "mover")
    assert f"privileged: {'yes' if privileged else 'no'}\n" in shown.stdout, shown.stdout + shown.stderr
    uid_map = run("lxc-attach", "-P", str(path_b), "-n", "mover", "--", "/bin/cat", "/proc/self/uid_map")
    assert uid_map.stdout.split() == (["0", "0", "4294967295"] if privileged else ["0", str(SHIFT), "65536"])
    listed = json.loads(kumoctl(controller, "instances", "list", "-o", "json").stdout)
    assert [(i["name"], i["node"], i["state"]) for i in listed] == [("mover", b.node_id, "running")]
    fingerprint = b.node()["plugins"]["lxc"]["attributes"]
    assert fingerprint["instances"] == 1 and fingerprint["lxcpath"] == str(path_b)

    wait_for(lambda: reported(a, "mover") is None, "node A to forget the container")
    assert not (path_a / "mover").exists(), "the source's container directory is gone"
    assert not images(a, "mover").exists(), "and so are its checkpoints there"
    assert run("lxc-ls", "-P", str(path_a), "-1").stdout.strip() == ""
    assert [p.name for p in path_b.iterdir()] == ["mover"], "no staging directory is left"
    config_b = (path_b / "mover/config").read_text()
    assert str(path_a) not in config_b and f"dir:{path_b}/mover/rootfs" in config_b

    before = counter(path_b, "mover")
    assert before >= seen_on_a, "it went on from where it stopped on A, it did not start over"
    wait_for(lambda: counter(path_b, "mover") > before + 3, "the counter to go on in B's rootfs")
    if address is not None:
        ping = run("busybox", "ping", "-c", "1", "-W", "2", address)
        assert ping.returncode == 0, ping.stdout + ping.stderr
        inside = run("lxc-attach", "-P", str(path_b), "-n", "mover", "--", "/bin/ip", "-4", "addr", "show", "eth0")
        assert f"inet {address}/24" in inside.stdout, inside.stdout + inside.stderr

    files = path_b / "mover/rootfs/root"
    assert os.lstat(files / "shared").st_ino == os.lstat(files / "shared-too").st_ino
    assert (os.lstat(files / "shared").st_uid, os.lstat(files / "shared").st_gid) == (SHIFT + 7, SHIFT + 8)
    assert os.getxattr(files / "shared", "user.kumo") == b"kept"
    assert os.lstat(files / "zero").st_rdev == os.makedev(1, 5)
    assert os.readlink(files / "hostname-link") == "/etc/hostname"
    if privileged:
        assert not any((path_b / "mover/rootfs/lib").iterdir()), "the host's /lib is bound, not copied"


@pytest.mark.reliability("lxc migration", "restore fails on the destination")
@pytest.mark.integration
def test_a_failed_restore_on_the_destination_leaves_the_container_running_on_the_source(lxc_cluster, tmp_path):
    controller, node, container = lxc_cluster
    # lxc-checkpoint runs "criu" from PATH, which the plugin starts with its criu's directory.
    wrapper = tmp_path / "broken" / "criu"
    wrapper.parent.mkdir()
    wrapper.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = restore ]; then echo "Error (test): injected restore failure" >&2; exit 1; fi\n'
        f'exec {shutil.which("criu", path=SBIN_PATH)} "$@"\n'
    )
    wrapper.chmod(0o755)
    allowing = {"allow_privileged": True}  # the container pings: its veth needs privileged (see lxc_cluster)
    (a, path_a), (b, path_b) = node(allowing), node(allowing, criu=str(wrapper))
    address = container(a, path_a, "stayer", 22, privileged=True)

    failed = kumoctl(controller, "instances", "migrate", "stayer", "--to", b.node_id)
    assert failed.returncode != 0
    assert "migrating stayer failed" in failed.stderr and "injected restore failure" in failed.stderr, failed.stderr
    assert f"restored on node {a.node_id} from its checkpoint and runs there" in failed.stderr, failed.stderr
    assert controller.admin("GET", "/v1/instances/stayer")["node"] == a.node_id

    wait_for(lambda: running_on(a, "stayer"), "the container to run on A again")
    before = counter(path_a, "stayer")
    wait_for(lambda: counter(path_a, "stayer") > before + 3, "the counter to go on on A")
    assert run("busybox", "ping", "-c", "1", "-W", "2", address).returncode == 0
    assert reported(b, "stayer") is None
    assert list(path_b.iterdir()) == [], "the destination keeps no copy, staged or imported"
    assert not images(b, "stayer").exists(), "the destination keeps the checkpoint it received"
