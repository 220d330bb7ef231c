"""The pre-flight scan: what in a process tree would make a CRIU dump fail, read from /proc.

One pass over the tree gives what the dump needs too (its pids, the namespaces it shares
with the agent, the regular files it holds open), so a dump reads /proc once. Which
blockers apply depends on those namespaces, never on the instance's kind (see
:mod:`agent.sdk.checkpointing`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import socket
import stat
import struct
from collections.abc import Mapping
from pathlib import Path

from agent.sdk import stat_fields

log = logging.getLogger(__name__)

NAMESPACES = ("mnt", "net", "pid")
# CRIU dumps nested mount and network namespaces, no other kind: a process of the tree in one
# of these that is not its root's fails the dump ("Can't dump nested uts namespace"). systemd
# makes them for its services (ProtectHostname=, PrivateIPC=, PrivateUsers=...).
UNNESTABLE = ("uts", "ipc", "pid", "user", "cgroup", "time")
# Character devices CRIU restores by path on any Linux host: null, zero, full, random, urandom.
SAFE_CHAR_DEVICES = {(1, 3), (1, 5), (1, 7), (1, 8), (1, 9)}
TTY_MAJORS = {4, 5, 136}
UNSUPPORTED_ANON = ("[io_uring]", "[userfaultfd]", "[perf_event]", "bpf-map", "bpf-prog")
UNSUPPORTED_FS = {"fuse", "fuseblk", "nfs", "nfs4", "cifs", "smb3", "9p", "ceph", "glusterfs", "virtiofs"}
TCP_LISTEN = "0A"
TCP_STATES = {
    "01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1", "05": "FIN_WAIT2",
    "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT", "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING",
}

Blocker = dict[str, str]  # {"code": an ErrorCode, "message": what blocks and what to do}


@dataclasses.dataclass(frozen=True)
class Scan:
    """A process tree as the dump sees it."""

    pids: list[int]  # the root first
    shared: frozenset[str]  # which of NAMESPACES the root shares with the agent
    blockers: list[Blocker]
    open_files: list[str]  # regular files held open, when the tree shares the agent's mount namespace


def scan(root: int) -> Scan:
    """Scan the tree under ``root``. Each blocker's code is one of ``traced``, ``tty``,
    ``char-device``, ``unsupported-fd``, ``file-lock``, ``tcp-established``,
    ``tcp-connection``, ``unix-external``, ``unsupported-mount``, ``nested-namespace``."""
    pids = tree(root)
    theirs, ours = {ns: _ns(root, ns) for ns in NAMESPACES}, {ns: _ns(os.getpid(), ns) for ns in NAMESPACES}
    shared = frozenset(ns for ns in NAMESPACES if theirs[ns] is not None and theirs[ns] == ours[ns])
    blockers: list[Blocker] = []
    sockets: dict[int, int] = {}  # socket inode -> pid holding it
    files: set[str] = set()
    lockers: list[int] = []  # pids holding a file lock, looked for only where locks block
    blockers += _nested_blockers(pids)
    for pid in pids:
        blockers += _tracer_blockers(pid)
        blockers += _fd_blockers(pid, sockets, files, lockers if "mnt" in shared else None)
    if "mnt" in shared:
        blockers += _lock_blockers(lockers)
    else:
        blockers += _mount_blockers(root)
    if "net" in shared and sockets:  # the socket tables are slow to read: only when it has sockets
        blockers += _tcp_blockers(root, sockets)
        blockers += _unix_blockers(sockets)
    return Scan(pids, shared, blockers, sorted(files) if "mnt" in shared else [])


def tree(root: int) -> list[int]:
    """``root`` and its descendants, root first."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            fields = stat_fields(int(entry.name))
            if fields:
                children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "gone"


def _tracer_blockers(pid: int) -> list[Blocker]:
    tracer = _status_field(pid, "TracerPid")
    if not tracer or tracer == "0":
        return []
    return [{"code": "traced", "message": f"pid {pid} ({comm(pid)}) is traced by pid {tracer} ({comm(int(tracer))}); "
             "CRIU must be its only tracer: detach the debugger or strace first"}]


def _fd_blockers(pid: int, sockets: dict[int, int], files: set[str], lockers: list[int] | None) -> list[Blocker]:
    """Blockers among ``pid``'s descriptors; notes its sockets, its regular files and (into
    ``lockers``, when given) whether it holds a file lock on the way."""
    blockers = []
    for fd, target in _fds(pid):
        if lockers is not None and target.startswith("/") and pid not in lockers and _holds_lock(pid, fd):
            lockers.append(pid)
        if target.startswith("socket:["):
            sockets[int(target[8:-1])] = pid
        elif target.startswith("anon_inode:"):
            if any(a in target for a in UNSUPPORTED_ANON):
                blockers.append({"code": "unsupported-fd",
                                 "message": f"pid {pid} has fd {fd} {target} open, which CRIU cannot checkpoint"})
        elif target.startswith("/"):
            try:
                st = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and not target.endswith(" (deleted)"):
                files.add(target)
            elif stat.S_ISCHR(st.st_mode):
                blockers += _device_blockers(pid, fd, target, (os.major(st.st_rdev), os.minor(st.st_rdev)))
    return blockers


def _device_blockers(pid: int, fd: int, target: str, dev: tuple[int, int]) -> list[Blocker]:
    if dev in SAFE_CHAR_DEVICES:
        return []
    if dev[0] in TTY_MAJORS:
        return [{"code": "tty", "message": f"pid {pid} ({comm(pid)}) has the terminal {target} open as fd {fd}: "
                 "run it without a terminal (stdin from /dev/null, output to a file)"}]
    return [{"code": "char-device", "message": f"pid {pid} ({comm(pid)}) has the device {target} ({dev[0]}:{dev[1]}) "
             f"open as fd {fd}; CRIU cannot restore device state: close it first"}]


def _holds_lock(pid: int, fd: int) -> bool:
    # fdinfo lists the locks held through a descriptor; /proc/locks lists them all, but its
    # first read in a process waits for an RCU grace period (10 ms and more).
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}", "rb") as f:
            return b"\nlock:" in f.read()
    except OSError:
        return False


def _lock_blockers(lockers: list[int]) -> list[Blocker]:
    # CRIU takes file locks along only with --file-locks, which is meant for containers: on
    # a shared host, the locked file's other users would see the lock vanish and come back.
    return [{"code": "file-lock", "message": f"pid {pid} ({comm(pid)}) holds a file lock (see /proc/{pid}/fdinfo); "
             "CRIU takes locks along only for containers: release it first"} for pid in sorted(lockers)]


def _fds(pid: int) -> list[tuple[int, str]]:
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return []
    out = []
    for name in names:
        with contextlib.suppress(OSError):
            out.append((int(name), os.readlink(f"/proc/{pid}/fd/{name}")))
    return sorted(out)


def _tcp_blockers(root: int, sockets: Mapping[int, int]) -> list[Blocker]:
    # A tree in the agent's network namespace shares the host's addresses: CRIU cannot take
    # a connection along (a tree with its own namespace keeps its address and connections).
    blockers = []
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{root}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10 or int(cols[9]) not in sockets or cols[3] == TCP_LISTEN:
                continue
            pid, state = sockets[int(cols[9])], TCP_STATES.get(cols[3], cols[3])
            where = f"{_addr(cols[1])} -> {_addr(cols[2])}"
            if state == "ESTABLISHED":
                blockers.append({"code": "tcp-established", "message": f"pid {pid} ({comm(pid)}) has an established TCP "
                                 f"connection {where}; a process sharing the host's network cannot take it along: close "
                                 "it (or run the workload in a container)"})
            else:
                blockers.append({"code": "tcp-connection", "message": f"pid {pid} ({comm(pid)}) has a TCP socket in state "
                                 f"{state} {where}, which CRIU cannot checkpoint: retry when it has settled"})
    return blockers


def _addr(hexaddr: str) -> str:
    host, port = hexaddr.split(":")
    if len(host) == 8:
        return f"{socket.inet_ntop(socket.AF_INET, bytes.fromhex(host)[::-1])}:{int(port, 16)}"
    raw = b"".join(bytes.fromhex(host[i : i + 8])[::-1] for i in range(0, 32, 8))
    return f"[{socket.inet_ntop(socket.AF_INET6, raw)}]:{int(port, 16)}"


def _unix_blockers(sockets: Mapping[int, int]) -> list[Blocker]:
    try:
        table = _unix_sockets()
    except OSError as exc:
        log.warning("checkpoint: unix socket diagnostics unavailable: %s", exc)
        return []
    blockers = []
    for inode, pid in sockets.items():
        peer = table.get(inode, (0, ""))[0]
        if peer and peer not in sockets:
            name = table.get(peer, (0, ""))[1] or table.get(inode, (0, ""))[1] or "an unnamed socket"
            blockers.append({"code": "unix-external", "message": f"pid {pid} ({comm(pid)}) has a unix socket connected "
                             f"to {name} outside the instance; CRIU cannot restore the other end: close it first"})
    return blockers


def _unix_sockets() -> dict[int, tuple[int, str]]:
    """inode -> (peer inode or 0, bound name) for the unix sockets of our network namespace.

    /proc/net/unix does not show peers; NETLINK_SOCK_DIAG does (as ``ss -x`` uses it).
    """
    netlink_sock_diag, sock_diag_by_family, nlmsg_done, nlmsg_error = 4, 20, 3, 2
    udiag_show_name, udiag_show_peer = 0x1, 0x4
    req = struct.pack("=BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, 0, udiag_show_name | udiag_show_peer,
                      0xFFFFFFFF, 0xFFFFFFFF)
    header = struct.pack("=IHHII", 16 + len(req), sock_diag_by_family, 0x1 | 0x300, 1, 0)
    out: dict[int, tuple[int, str]] = {}
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, netlink_sock_diag) as nl:
        nl.sendto(header + req, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, mtype, _, _, _ = struct.unpack_from("=IHHII", data, offset)
                if mtype == nlmsg_done:
                    return out
                if mtype == nlmsg_error:
                    raise OSError("sock_diag answered with an error")
                _, _, _, _, inode, _, _ = struct.unpack_from("=BBBBIII", data, offset + 16)
                out[inode] = _unix_attributes(data, offset + 32, offset + length)
                offset += (length + 3) & ~3


def _unix_attributes(data: bytes, pos: int, end: int) -> tuple[int, str]:
    """(peer inode or 0, bound name) from one sock_diag answer's attributes."""
    unix_diag_name, unix_diag_peer = 0, 2
    peer, name = 0, ""
    while pos + 4 <= end:
        alen, atype = struct.unpack_from("=HH", data, pos)
        if alen < 4:
            break
        value = data[pos + 4 : pos + alen]
        if atype == unix_diag_peer:
            peer = struct.unpack("=I", value[:4])[0]
        elif atype == unix_diag_name:
            # An abstract name starts with NUL; shown as '@', as ss shows it.
            name = (b"@" + value[1:] if value[:1] == b"\0" else value).decode(errors="replace")
        pos += (alen + 3) & ~3
    return peer, name


def _mount_blockers(root: int) -> list[Blocker]:
    blockers = []
    try:
        lines = Path(f"/proc/{root}/mountinfo").read_text().splitlines()
    except OSError:
        return blockers
    for line in lines:
        post = line.split(" - ", 1)
        if len(post) != 2:
            continue
        fstype, mountpoint = post[1].split()[0], line.split()[4]
        if fstype in UNSUPPORTED_FS or fstype.startswith("fuse."):
            blockers.append({"code": "unsupported-mount", "message": f"{mountpoint} is a {fstype} mount, which CRIU "
                             "cannot checkpoint inside a container: unmount it or make it a bind mount from the host"})
    return blockers


def _nested_blockers(pids: list[int]) -> list[Blocker]:
    """One blocker per kind of namespace that processes of the tree (root first) have of their own."""
    root = {ns: _ns(pids[0], ns) for ns in UNNESTABLE}
    nested: dict[str, list[int]] = {}
    for pid in pids[1:]:
        for ns in UNNESTABLE:
            own = _ns(pid, ns)
            if own is not None and root[ns] is not None and own != root[ns]:
                nested.setdefault(ns, []).append(pid)
    return [{"code": "nested-namespace",
             "message": f"processes in a {ns} namespace of their own: "
                        f"{', '.join(f'pid {pid} ({comm(pid)})' for pid in found[:3])}"
                        f"{f' and {len(found) - 3} more' if len(found) > 3 else ''}; CRIU checkpoints only the "
                        f"instance's own {ns} namespace (nested ones only of mounts and networks); stop them or run "
                        "them without one (systemd: ProtectHostname=, PrivateIPC=, PrivateUsers=)"}
            for ns, found in nested.items()]


def _ns(pid: int, name: str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/{name}")
    except OSError:
        return None


def _status_field(pid: int, key: str) -> str | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
