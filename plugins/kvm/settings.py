"""The kvm plugin's settings: ``plugins.kvm`` in agent.yaml."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from agent.sdk import ConfigError, parse_section


@dataclasses.dataclass(frozen=True)
class KvmConfig:
    """Settings under ``plugins.kvm``.

    ``network``: ``none`` (no NIC), ``user`` (QEMU user-mode NAT, needs no bridge),
    ``network:NAME`` (a libvirt network) or ``bridge:NAME`` (an existing host bridge).
    """

    uri: str = "qemu:///system"
    # Under libvirt's own image directory: qemu (user libvirt-qemu) must be able to reach
    # the overlays, which it could not inside the agent's 0700 state directory.
    instance_dir: Path = Path("/var/lib/libvirt/images/kumo")
    acceleration: Literal["auto", "kvm", "tcg"] = "auto"
    shutdown_timeout: float = 60.0
    network: str = "none"


def parse_config(section: Mapping[str, Any], source: str) -> KvmConfig:
    """``plugins.kvm`` checked: types by :func:`parse_section`, then what types cannot say."""
    config = parse_section(KvmConfig, section, source)
    kind, _, target = config.network.partition(":")
    if not (config.network in ("none", "user") or (kind in ("network", "bridge") and target)):
        raise ConfigError(
            f"{source}.network: expected 'none', 'user', 'network:NAME' or 'bridge:NAME', "
            f"got {config.network!r}"
        )
    if config.shutdown_timeout <= 0:
        raise ConfigError(f"{source}.shutdown_timeout: expected a positive number of seconds")
    return config
