"""controller.yaml: where the controller listens, keeps its keys and store, and its timings."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from agent.sdk import ConfigError, load_yaml_file, parse_section


@dataclasses.dataclass
class ControllerSettings:
    pki_dir: Path
    database: Path
    listen: str = "0.0.0.0:8443"  # the mTLS API
    enroll_listen: str = "0.0.0.0:8444"  # enrollment only: no client certificate yet
    heartbeat_interval: float = 10.0
    poll_timeout: float = 30.0
    node_cert_ttl: float = 86400.0  # seconds; agents renew at two thirds of it
    max_body_bytes: int = 1024 * 1024
    alertmanager_url: str | None = None  # e.g. http://alertmanager:9093: alerts are forwarded there
    log_level: Literal["debug", "info", "warning", "error"] = "info"


def split_address(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def load_settings(path: Path) -> ControllerSettings:
    settings = parse_section(ControllerSettings, load_yaml_file(path), str(path))
    for key in ("listen", "enroll_listen"):
        split_address(getattr(settings, key), f"{path}: {key}")
    for key in ("heartbeat_interval", "poll_timeout", "node_cert_ttl"):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{path}: {key}: expected a positive number of seconds")
    # Relative paths are relative to the config file, so a controller directory can move.
    settings.pki_dir = path.parent / settings.pki_dir
    settings.database = path.parent / settings.database
    return settings
