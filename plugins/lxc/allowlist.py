"""Which lines of a migrated container's config this node accepts: only lines its own lxc
plugin could have written here.

The config arrives from the source node, which may be compromised, and liblxc runs as
root: ``lxc.hook.*`` runs any command on this host, a bind of ``/`` or a writable
``sys``/``proc`` hands the host to the container, ``lxc.cgroup.devices.allow = a`` opens
every device, a missing ``lxc.idmap`` turns an unprivileged container into a privileged
one (so a config without one is accepted only where ``allow_privileged`` is set, and the
migration checks it against the controller's record), ``lxc.log.file`` writes wherever it
names. So the check is an allow-list of what the plugin writes (its own block, a template's
lines, the image base; see lxcconf.py) with the values it writes, never a deny-list of what
is known to be dangerous.
"""

from __future__ import annotations

import re
from pathlib import Path

from .lxcconf import LXC_CONFIG_DIR, LXC_LOG, config_items, idmap_lines
from .settings import LxcConfig

# Keys whose value cannot reach outside the container (names, limits, signals, dropped capabilities).
ANY_VALUE = frozenset({
    "lxc.uts.name", "lxc.arch", "lxc.autodev", "lxc.signal.halt", "lxc.signal.reboot", "lxc.signal.stop",
    "lxc.cap.drop", "lxc.log.level", "lxc.tty.max", "lxc.pty.max", "lxc.console.path",
    "lxc.cgroup.memory.limit_in_bytes", "lxc.cgroup.cpu.cfs_period_us", "lxc.cgroup.cpu.cfs_quota_us",
    "lxc.cgroup2.memory.max", "lxc.cgroup2.cpu.max",
})
NET_KEY = re.compile(r"lxc\.net\.\d+\.(type|link|flags|name|hwaddr|mtu|ipv4\.address|ipv4\.gateway|"
                     r"ipv6\.address|ipv6\.gateway)\Z")
NET_TYPES = frozenset({"veth", "empty", "none"})
MOUNT_AUTO = frozenset({"cgroup:mixed", "cgroup:ro", "proc:mixed", "sys:ro", "sys:mixed"})
# What the busybox template binds from the host, read-only.
HOST_BINDS = frozenset({"/lib", "/usr/lib", "/lib64", "/usr/lib64", "/sys/kernel/security"})
PSEUDO_FILESYSTEMS = frozenset({"tmpfs", "mqueue", "devpts"})


def foreign_lines(config: str, target: Path, node: LxcConfig) -> list[str]:
    """The lines of ``config`` (already rewritten to ``target``) this node's plugin would not
    have written, one sentence each; empty when the config is acceptable."""
    refused = []
    idmaps = []
    for key, value in config_items(config):
        if key == "lxc.idmap":
            idmaps.append(value)
        elif not _allowed(key, value, target):
            refused.append(f"{key} = {value}")
    problems = [f"its config sets {line}, which this node's lxc plugin never writes" for line in refused]
    wanted = [text.partition("=")[2].strip() for text in idmap_lines(node)]
    if not idmaps and not node.allow_privileged:
        problems.append("it has no user namespace (a privileged container: its root is the host's root) and "
                        "this node runs none: migrate it to a node with plugins.lxc.allow_privileged: true")
    elif idmaps and sorted(idmaps) != sorted(wanted):
        problems.append(f"its user namespace ({'; '.join(idmaps)}) is not this node's ({'; '.join(wanted)}): "
                        "migrate it to a node with the same idmap_start and idmap_size")
    return problems


def _allowed(key: str, value: str, target: Path) -> bool:
    if key in ANY_VALUE:
        return True
    match = NET_KEY.match(key)
    if match:
        return match.group(1) != "type" or value in NET_TYPES
    if key == "lxc.rootfs.path":
        return value == f"dir:{target / 'rootfs'}"
    if key == "lxc.log.file":
        return value == str(target / LXC_LOG)
    if key == "lxc.include":
        return _inside(value, LXC_CONFIG_DIR)
    if key == "lxc.mount.auto":
        return set(value.split()) <= MOUNT_AUTO
    if key == "lxc.mount.entry":
        return _mount_allowed(value.split())
    return False


def _mount_allowed(fields: list[str]) -> bool:
    if len(fields) < 4 or fields[1].startswith("/") or ".." in fields[1].split("/"):
        return False  # the mount point must be inside the container's root
    options = fields[3].split(",")
    if "bind" in options or "rbind" in options:
        # Never a path inside the arrived tree: the source chose what is there, a symlink to / included.
        return fields[0] in HOST_BINDS and "ro" in options and "rw" not in options
    return fields[2] in PSEUDO_FILESYSTEMS


def _inside(path: str, directory: Path) -> bool:
    return path.startswith("/") and ".." not in path.split("/") and Path(path).is_relative_to(directory)
