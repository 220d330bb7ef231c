"""What the host gives containers: cgroup controllers, bridges, templates, CPUs, memory and a
searchable lxcpath; and preparing it (lxcpath, the configured bridge) at start-up.

Containers are unprivileged unless created with ``privileged: true``: they map container
root to ``idmap_start`` and up on the host. Root runs liblxc, so no newuidmap is needed, but the mapped root must be
able to traverse every directory above its root filesystem.

Every function here blocks: call them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from agent.sdk import TaskError, run_command_sync

from .settings import BridgeConfig, LxcConfig

if TYPE_CHECKING:
    from .spec import CreateSpec

TEMPLATE_DIR = Path("/usr/share/lxc/templates")
CgroupLayout = dict[str, str | None]


def prepare(config: LxcConfig) -> str:
    """Create lxcpath and the configured bridge; the reason the plugin cannot work, or ''."""
    lxcpath = config.lxcpath
    try:
        lxcpath.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"cannot create lxcpath {lxcpath}: {exc.strerror}"
    blocked = untraversable(lxcpath)
    if blocked is not None:
        return (f"unprivileged containers need every directory above their root filesystem to be "
                f"searchable by the mapped root user, and {blocked} is not (chmod o+x it, or set "
                "plugins.lxc.lxcpath elsewhere)")
    if config.bridge is not None:
        return ensure_bridge(config.bridge)
    return ""


def check_can_give(spec: CreateSpec, config: LxcConfig, cgroups: CgroupLayout) -> None:
    """Refuse, with the reason, a container this node cannot run as asked."""
    if spec.vcpus is not None:
        cpus = psutil.cpu_count(logical=True) or 1
        if spec.vcpus > cpus:
            raise TaskError(f"vcpus {spec.vcpus} is more than the {cpus} CPUs of this node: ask for at most {cpus}",
                            code="insufficient-cpu")
        if cgroups.get("cpu") is None:
            raise TaskError("this node has no cpu cgroup controller, so vcpus cannot be enforced: "
                            "leave vcpus out or use another node", code="limits-unsupported")
    if spec.memory_mib is not None:
        available = psutil.virtual_memory().available // (1024 * 1024)
        if spec.memory_mib > available:
            raise TaskError(f"memory_mib {spec.memory_mib} is more than the {available} MiB available on this node",
                            code="insufficient-memory")
        if cgroups.get("memory") is None:
            raise TaskError("this node has no memory cgroup controller, so memory_mib cannot be enforced: "
                            "leave memory_mib out or use another node", code="limits-unsupported")
    if spec.network.mode == "veth" and not is_bridge(spec.network.bridge or ""):
        raise TaskError(f"bridge {spec.network.bridge!r} does not exist on this node: create it (or configure "
                        "plugins.lxc.bridge so the plugin does) or name another bridge", code="no-bridge")
    if spec.template is not None:
        if spec.template not in config.templates:
            known = ", ".join(config.templates) or "none"
            raise TaskError(f"unknown template {spec.template!r}: this node allows {known} "
                            "(plugins.lxc.templates), or give an image tarball", code="unknown-template")
        if not template_installed(spec.template):
            raise TaskError(f"the lxc template {spec.template!r} is not installed on this node "
                            f"({TEMPLATE_DIR}/lxc-{spec.template} is missing)", code="unknown-template")


def template_installed(template: str) -> bool:
    return (TEMPLATE_DIR / f"lxc-{template}").is_file()


def is_bridge(name: str) -> bool:
    return bool(name) and Path("/sys/class/net", name, "bridge").is_dir()


def cgroup_layout() -> CgroupLayout:
    """For the memory and cpu controllers: 'v2', 'v1' or None (not available), from mountinfo."""
    layout: CgroupLayout = {"memory": None, "cpu": None}
    try:
        mounts = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return layout
    for entry in mounts:
        left, _, right = entry.partition(" - ")
        fstype, _source, options = (right.split() + ["", "", ""])[:3]
        mountpoint = left.split()[4]
        if fstype == "cgroup2":
            try:
                controllers = Path(mountpoint, "cgroup.controllers").read_text().split()
            except OSError:
                continue
            for name in layout:
                if name in controllers:
                    layout[name] = "v2"
        elif fstype == "cgroup":
            for name in layout:
                if name in options.split(",") and layout[name] is None:
                    layout[name] = "v1"
    return layout


def untraversable(path: Path) -> Path | None:
    """The first directory from ``path`` up that others cannot search (o+x), or None."""
    for directory in [path, *path.parents]:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return directory
    return None


def ensure_bridge(bridge: BridgeConfig) -> str:
    """Create the bridge (and its address) when missing; '' or why it cannot be used."""
    sysfs = Path("/sys/class/net", bridge.name)
    if sysfs.exists() and not (sysfs / "bridge").is_dir():
        return f"plugins.lxc.bridge: {bridge.name} exists but is not a bridge: choose another name"
    steps = [] if sysfs.exists() else [["ip", "link", "add", bridge.name, "type", "bridge"]]
    if bridge.address is not None:
        shown = run_command_sync("ip", "-o", "addr", "show", "dev", bridge.name).stdout if sysfs.exists() else ""
        if f" {ipaddress.ip_interface(bridge.address).with_prefixlen} " not in shown:
            steps.append(["ip", "addr", "add", bridge.address, "dev", bridge.name])
    steps.append(["ip", "link", "set", bridge.name, "up"])
    for argv in steps:
        result = run_command_sync(*argv)
        if result.returncode != 0:
            return f"could not set up bridge {bridge.name} ({' '.join(argv)}): {result.error}"
    return ""
