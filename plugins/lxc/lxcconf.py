"""A container's lxc config as text: the lines Kumo writes, reading them back, and a migrated
container's config rewritten for this node and checked against it.

- Containers stay checkpointable: CRIU cannot take a terminal along, so there is no console,
  no ttys and no ptys (``lxc.console.path = none``, ``lxc.tty.max = 0``,
  ``lxc.pty.max = 0``), and the template's AppArmor lines are dropped.
- Limits use cgroup2 keys (``lxc.cgroup2.memory.max``, ``lxc.cgroup2.cpu.max``) where the
  controller sits on the unified hierarchy, and the cgroup v1 equivalents where it does
  not: on hybrid hosts the memory and cpu controllers are v1 and a cgroup2 key would stop
  the container from starting.
- A migrated config names the source's container directory; only that directory travels,
  so its paths are rewritten to ours and everything else it needs (bridges, host paths it
  binds, files it includes) must already be on this node.
"""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

from agent.sdk import TaskError

from .settings import LxcConfig
from .spec import CreateSpec, NetworkSpec

LXC_CONFIG_DIR = Path("/usr/share/lxc/config")
LXC_LOG = "lxc.log"  # liblxc's log of the container, in its directory
CPU_PERIOD_US = 100_000
# Config keys the plugin decides whatever a template wrote: the template's values are
# dropped and ours appended (later lines win for single-valued keys, but list keys such
# as lxc.net.0.ipv4.address would accumulate).
OWNED_KEYS = ("lxc.uts.name", "lxc.tty.max", "lxc.pty.max", "lxc.console.", "lxc.log.", "lxc.net.",
              "lxc.cgroup.memory.", "lxc.cgroup.cpu.", "lxc.cgroup2.memory.", "lxc.cgroup2.cpu.",
              "lxc.apparmor.")


def line(key: str, value: str) -> str:
    """One ``key = value`` config line; values come from validated input, this is the last guard."""
    if any(c in value for c in "\n\r\0"):
        raise TaskError(f"{key}: value {value!r} cannot be written into an lxc config", code="bad-request")
    return f"{key} = {value}\n"


def config_items(config: str) -> list[tuple[str, str]]:
    """The ``key = value`` lines of an lxc config, in order (comments and blanks left out)."""
    items = []
    for text in config.splitlines():
        key, sep, value = text.partition("=")
        if sep and not text.lstrip().startswith("#"):
            items.append((key.strip(), value.strip()))
    return items


# ---- writing a new container's config -------------------------------------------------


def idmap_lines(config: LxcConfig) -> list[str]:
    """An unprivileged container's user namespace: container ids 0.. are host ids idmap_start.."""
    start, size = config.idmap_start, config.idmap_size
    return [line("lxc.idmap", f"u 0 {start} {size}"), line("lxc.idmap", f"g 0 {start} {size}")]


def image_base(config: LxcConfig, rootfs: Path, privileged: bool) -> str:
    """The config of a container made from a tarball, before Kumo's block: what a template
    would have written (the root filesystem, liblxc's common settings, the idmap)."""
    lines = [line("lxc.rootfs.path", f"dir:{rootfs}"), line("lxc.include", str(LXC_CONFIG_DIR / "common.conf"))]
    if privileged:
        return "".join(lines)
    lines.append(line("lxc.include", str(LXC_CONFIG_DIR / "userns.conf")))
    return "".join(lines + idmap_lines(config))


def with_kumo_block(config: str, block: list[str]) -> str:
    """``config`` with every owned key dropped and ``block`` appended under a marker."""
    kept = [text for text in config.splitlines(keepends=True)
            if not text.split("=", 1)[0].strip().startswith(OWNED_KEYS)]
    return "".join(kept) + "\n# Kumo\n" + "".join(block)


def kumo_block(name: str, spec: CreateSpec, directory: Path, cgroups: dict[str, str | None]) -> list[str]:
    """The lines Kumo owns in a container's config (:data:`OWNED_KEYS`)."""
    lines = [
        line("lxc.uts.name", spec.hostname or name),
        line("lxc.console.path", "none"),
        line("lxc.tty.max", "0"),
        line("lxc.pty.max", "0"),
        line("lxc.log.file", str(directory / LXC_LOG)),
        line("lxc.log.level", "NOTICE"),
    ]
    lines += network_lines(spec.network)
    if spec.memory_mib is not None:
        limit = spec.memory_mib * 1024 * 1024
        if cgroups.get("memory") == "v2":
            lines.append(line("lxc.cgroup2.memory.max", str(limit)))
        else:
            lines.append(line("lxc.cgroup.memory.limit_in_bytes", str(limit)))
    if spec.vcpus is not None:
        quota = spec.vcpus * CPU_PERIOD_US
        if cgroups.get("cpu") == "v2":
            lines.append(line("lxc.cgroup2.cpu.max", f"{quota} {CPU_PERIOD_US}"))
        else:
            lines.append(line("lxc.cgroup.cpu.cfs_period_us", str(CPU_PERIOD_US)))
            lines.append(line("lxc.cgroup.cpu.cfs_quota_us", str(quota)))
    return lines


def network_lines(network: NetworkSpec) -> list[str]:
    if network.mode != "veth":
        return [line("lxc.net.0.type", network.mode)]
    lines = [
        line("lxc.net.0.type", "veth"),
        line("lxc.net.0.link", network.bridge or ""),
        line("lxc.net.0.flags", "up"),
        line("lxc.net.0.name", "eth0"),
    ]
    if network.address:
        family = "ipv6" if ipaddress.ip_interface(network.address).version == 6 else "ipv4"
        lines.append(line(f"lxc.net.0.{family}.address", network.address))
        if network.gateway:
            lines.append(line(f"lxc.net.0.{family}.gateway", network.gateway))
    return lines


# ---- a migrated container's config ----------------------------------------------------


def rewrite_config(config: str, source: Path, target: Path) -> str:
    """``config`` with every path into the container directory ``source`` pointing into ``target``."""
    pattern = re.compile(re.escape(str(source)) + r"(?=/|\s|$)")
    out = []
    for text in config.splitlines(keepends=True):
        key, sep, value = text.partition("=")
        if sep and not text.lstrip().startswith("#"):
            text = key + sep + pattern.sub(lambda _m: str(target), value)
        out.append(text)
    return "".join(out)


def import_problems(config: str, target: Path, source_lxcpath: Path, arrived: Path | None) -> list[str]:
    """What this node lacks for a container whose (rewritten) config is ``config``; one sentence each.

    Only the container's own directory travels: a path still inside the source's lxcpath
    (another container's files) or a host path missing here is a problem, as is a bridge or
    interface this node does not have. ``arrived`` is the directory standing in for ``target``
    until the import renames it; None (nothing has arrived yet) skips the rootfs check.
    """
    problems = []
    links: dict[str, dict[str, str]] = {}
    for key, value in config_items(config):
        if re.search(re.escape(str(source_lxcpath)) + r"/", value) and str(target) not in value:
            problems.append(f"{key} = {value} points into the source's lxcpath outside the container's own "
                            "directory, which is not carried: make it a path inside the container's directory")
            continue
        match = re.fullmatch(r"lxc\.net\.(\d+)\.(type|link)", key)
        if match:
            links.setdefault(match.group(1), {})[match.group(2)] = value
        elif key == "lxc.rootfs.path":
            problems += _rootfs_problems(value, target, arrived)
        elif key == "lxc.include" and not Path(value).is_relative_to(target) and not Path(value).exists():
            problems.append(f"it includes {value} (lxc.include), which this node does not have: install the "
                            "package that provides it (lxc)")
        elif key == "lxc.mount.entry":
            problems += _bind_problems(value, target)
    for index, net in sorted(links.items()):
        problems += _link_problems(index, net)
    return problems


def _rootfs_problems(value: str, target: Path, arrived: Path | None) -> list[str]:
    path = Path(value.partition(":")[2] if ":" in value else value)
    if not path.is_relative_to(target):
        return [f"its root filesystem is {value} (lxc.rootfs.path), outside the container's "
                "directory, and was not carried: only a directory rootfs under lxcpath migrates"]
    arrived_root = None if arrived is None else arrived / path.relative_to(target)
    if arrived_root is not None and (arrived_root.is_symlink() or not arrived_root.is_dir()):
        return [f"its root filesystem {path} did not arrive as a directory"]
    return []


def _bind_problems(value: str, target: Path) -> list[str]:
    fields = value.split()
    options = fields[3].split(",") if len(fields) > 3 else []
    if ("bind" in options or "rbind" in options) and fields[0].startswith("/") \
            and "optional" not in options and not Path(fields[0]).is_relative_to(target) \
            and not Path(fields[0]).exists():
        return [f"it binds the host path {fields[0]} (lxc.mount.entry), which this node does not "
                "have: create it (host paths are not carried)"]
    return []


def _link_problems(index: str, net: dict[str, str]) -> list[str]:
    link = net.get("link")
    if not link:
        return []
    if net.get("type") == "veth" and not Path("/sys/class/net", link, "bridge").is_dir():
        return [f"its interface lxc.net.{index} plugs into bridge {link}, which this node does not "
                f"have: create it (ip link add {link} type bridge; ip link set {link} up) or set "
                "plugins.lxc.bridge so the plugin does"]
    if net.get("type") != "veth" and not Path("/sys/class/net", link).exists():
        return [f"its interface lxc.net.{index} uses the host interface {link}, which this node "
                "does not have"]
    return []
