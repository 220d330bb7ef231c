"""Settings under ``plugins.lxc``, checked once at start-up so a bad one stops the agent."""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from agent.sdk import ConfigError, parse_section

# The kernel's limit on an interface name (IFNAMSIZ less the terminating NUL).
IFNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,15}\Z")
TEMPLATE_NAME_RE = re.compile(r"^[a-z0-9_-]+\Z")


@dataclasses.dataclass(frozen=True)
class BridgeConfig:
    """A host bridge the plugin creates at start-up when it is missing.

    ``address`` (CIDR, e.g. ``10.40.0.1/24``) is put on the bridge: the containers' gateway.
    """

    name: str
    address: str | None = None


@dataclasses.dataclass(frozen=True)
class NetworkDefaults:
    """The network of a container whose create payload names none."""

    mode: Literal["none", "empty", "veth"] = "empty"
    bridge: str | None = None
    dhcp: bool = False


@dataclasses.dataclass(frozen=True)
class LxcConfig:
    """Settings under ``plugins.lxc``.

    ``lxcpath`` holds every Kumo container; the plugin owns it. It is outside the agent's
    0700 state directory because an unprivileged container's root must traverse to it.
    ``templates`` are the lxc templates a create may name (busybox works offline).
    ``lxc_checkpoint`` is the tool that checkpoints and restores a container (it runs criu).
    Containers are unprivileged: their root is host uid ``idmap_start`` and up.
    ``allow_privileged`` lets a create ask for a privileged one (``privileged: true``), and
    lets a privileged container migrate here (when the controller records it privileged).
    It is off by default: a privileged container's root is the host's root.
    """

    lxcpath: Path = Path("/var/lib/kumo-lxc")
    bridge: BridgeConfig | None = None
    network: NetworkDefaults = dataclasses.field(default_factory=NetworkDefaults)
    allow_privileged: bool = False
    idmap_start: int = 1_000_000
    idmap_size: int = 65536
    templates: list[str] = dataclasses.field(default_factory=lambda: ["busybox"])
    stop_timeout: float = 30.0
    poll_interval: float = 2.0
    lxc_checkpoint: str = "lxc-checkpoint"


def parse_settings(section: Mapping[str, Any], source: str) -> LxcConfig:
    """``plugins.lxc`` as an :class:`LxcConfig`; ConfigError names the key and what it needs."""
    config = parse_section(LxcConfig, section, source)
    if "\n" in str(config.lxcpath) or not config.lxcpath.is_absolute():
        raise ConfigError(f"{source}.lxcpath: expected an absolute path, got {str(config.lxcpath)!r}")
    if config.bridge is not None:
        _check_bridge(config.bridge, source)
    bridge = config.network.bridge
    if bridge is not None and not IFNAME_RE.match(bridge):
        raise ConfigError(f"{source}.network.bridge: expected an interface name, got {bridge!r}")
    if config.network.mode == "veth" and bridge is None and config.bridge is None:
        raise ConfigError(f"{source}.network: mode 'veth' needs network.bridge or a bridge table")
    for template in config.templates:
        if not TEMPLATE_NAME_RE.match(template):
            raise ConfigError(f"{source}.templates: {template!r} is not a template name")
    if config.idmap_start < 1 or config.idmap_size < 65536:
        raise ConfigError(f"{source}.idmap_start/idmap_size: expected a host range of at least 65536 ids "
                          "starting above 0")
    if config.stop_timeout < 0 or config.poll_interval <= 0:
        raise ConfigError(f"{source}.stop_timeout/poll_interval: expected positive seconds")
    if not config.lxc_checkpoint:
        raise ConfigError(f"{source}.lxc_checkpoint: expected the lxc-checkpoint command (a name or a path)")
    return config


def _check_bridge(bridge: BridgeConfig, source: str) -> None:
    if not IFNAME_RE.match(bridge.name):
        raise ConfigError(f"{source}.bridge.name: expected an interface name of 1-15 letters, "
                          f"digits, '_', '.' or '-', got {bridge.name!r}")
    if bridge.address is not None:
        try:
            ipaddress.ip_interface(bridge.address)
        except ValueError:
            raise ConfigError(f"{source}.bridge.address: expected an address with prefix "
                              f"(10.40.0.1/24), got {bridge.address!r}") from None
