"""controller.yaml: where the controller listens, keeps its keys and store, and its timings."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from agent.sdk import ConfigError, controller_url, load_yaml_file, parse_section
from controller.store import is_database_url


@dataclasses.dataclass
class RebalanceSettings:
    """``rebalance`` in controller.yaml: when the controller moves instances off busy nodes
    (controller.rebalancer says how it decides)."""

    mode: Literal["off", "auto"] = "off"  # auto: a round every interval; off: only kumoctl rebalance apply
    interval: float = 30.0  # seconds between samples of the nodes' usage (and rounds, in auto mode)
    window: float = 300.0  # a node is moved from only after staying over cpu_high this long
    cpu_high: float = 0.8  # share of a node's CPUs its instances use
    margin: float = 0.1  # a move must leave its destination below cpu_high - margin
    max_in_flight: int = 2  # migrations at once, fleet-wide (any migration counts)
    cooldown: float = 1800.0  # seconds an instance the rebalancer moved stays where it went
    retry_after: float = 3600.0  # seconds before an instance whose move failed or was refused is tried again
    exclude: list[str] = dataclasses.field(default_factory=list)  # instance name patterns never moved (fnmatch)


@dataclasses.dataclass
class ControllerSettings:
    pki_dir: Path
    database: str  # a SQLite file (one controller), or postgresql://USER@HOST/DB (any number of them)
    listen: str = "0.0.0.0:8443"  # the mTLS API
    enroll_listen: str = "0.0.0.0:8444"  # enrollment only: no client certificate yet
    # The web interface (controller/ui), off unless set; signed into with `kumoctl ui`.
    ui_listen: str | None = None
    ui_session_ttl: float = 8 * 3600.0  # seconds a browser session lasts
    # How agents and kumoctl reach this controller's API; join strings carry it. Default:
    # https://<listen's host, or this host's FQDN when listening on every address>:<listen's port>.
    url: str = ""
    heartbeat_interval: float = 10.0
    poll_timeout: float = 30.0
    node_cert_ttl: float = 86400.0  # seconds; agents renew at two thirds of it
    max_body_bytes: int = 1024 * 1024
    # Per listener: connections held at once, in all and from one client (a certificate on the
    # API listener, an address on the others); one over either cap gets a 503.
    max_connections: int = 16384
    max_connections_per_client: int = 64
    keepalive_timeout: float = 30.0  # seconds an idle kept-alive connection stays open
    # Task long-polls one node may hold open at once on this controller (an agent holds one;
    # more get a 429): a node cannot tie up the controller's connections with polls.
    max_polls_per_node: int = 4
    alertmanager_url: str | None = None  # e.g. http://alertmanager:9093: alerts are forwarded there
    retention_days: float = 14.0  # finished tasks, migrations and resolved alerts are kept this long
    placement_cpu_busy_max: float = 0.9  # a node whose measured CPU is busier takes no new instance
    rebalance: RebalanceSettings = dataclasses.field(default_factory=RebalanceSettings)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    images_dir: Path = Path("images")  # the image catalogue's files (relative: to this file's directory)
    images_quota_bytes: int | None = 64 << 30  # the catalogue's total size; null: no limit


def split_address(value: str, key: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected HOST:PORT with a port from 1 to 65535, got {value!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def _check_database_url(url: str, where: str) -> None:
    parts = urlsplit(url)
    if not parts.hostname and "host=" not in parts.query:
        raise ConfigError(f"{where}: expected postgresql://USER[:PASSWORD]@HOST[:PORT]/DATABASE, got no host")
    if not parts.path.strip("/"):
        raise ConfigError(f"{where}: name the database at the end of the URL (postgresql://USER@HOST/DATABASE)")


def check_url(url: str, key: str) -> str:
    """This controller's API URL as agents and kumoctl reach it (``https://HOST:PORT``)."""
    try:
        return controller_url(url)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None


def default_url(listen: str) -> str:
    """The API's URL when controller.yaml names none: listen's host unless it is a wildcard."""
    host, port = split_address(listen, "listen")
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"


def _check_rebalance(rebalance: RebalanceSettings, where: str) -> None:
    for key in ("interval", "window", "cooldown", "retry_after"):
        if getattr(rebalance, key) <= 0:
            raise ConfigError(f"{where}.{key}: expected a positive number of seconds")
    if rebalance.window < rebalance.interval:
        raise ConfigError(f"{where}.window: expected at least one interval ({rebalance.interval:g} s): a node is "
                          "judged on the samples taken over the window")
    if not 0 < rebalance.cpu_high <= 1:
        raise ConfigError(f"{where}.cpu_high: expected a fraction above 0 and at most 1 (0.8 is 80% of a node's CPUs)")
    if not 0 <= rebalance.margin < rebalance.cpu_high:
        raise ConfigError(f"{where}.margin: expected a fraction from 0 to below cpu_high ({rebalance.cpu_high:g}); "
                          "a move must leave its destination below cpu_high - margin")
    if rebalance.max_in_flight < 1:
        raise ConfigError(f"{where}.max_in_flight: expected a whole number of migrations, 1 or more")


def load_settings(path: Path) -> ControllerSettings:
    data = load_yaml_file(path)
    rebalance = data.get("rebalance")
    if isinstance(rebalance, dict) and rebalance.get("mode") is False:
        rebalance["mode"] = "off"  # YAML 1.1 reads a bare off as false
    settings = parse_section(ControllerSettings, data, str(path))
    for key in ("listen", "enroll_listen", "ui_listen"):
        if getattr(settings, key) is not None:
            split_address(getattr(settings, key), f"{path}: {key}")
    settings.url = check_url(settings.url, f"{path}: url") if settings.url else default_url(settings.listen)
    for key in ("heartbeat_interval", "poll_timeout", "node_cert_ttl", "ui_session_ttl", "keepalive_timeout"):
        if getattr(settings, key) <= 0:
            raise ConfigError(f"{path}: {key}: expected a positive number of seconds")
    for key in ("max_connections", "max_connections_per_client"):
        if getattr(settings, key) < 1:
            raise ConfigError(f"{path}: {key}: expected a whole number of connections, 1 or more")
    if settings.max_polls_per_node < 1:
        raise ConfigError(f"{path}: max_polls_per_node: expected a whole number of long polls, 1 or more")
    if settings.max_connections_per_client > settings.max_connections:
        raise ConfigError(f"{path}: max_connections_per_client: expected at most max_connections "
                          f"({settings.max_connections})")
    if settings.retention_days <= 0:
        raise ConfigError(f"{path}: retention_days: expected a positive number of days")
    if not 0 < settings.placement_cpu_busy_max <= 1:
        raise ConfigError(f"{path}: placement_cpu_busy_max: expected a fraction above 0 and at most 1 (0.9 is 90%)")
    if settings.images_quota_bytes is not None and settings.images_quota_bytes <= 0:
        raise ConfigError(f"{path}: images_quota_bytes: expected a positive number of bytes (or null: no limit)")
    _check_rebalance(settings.rebalance, f"{path}: rebalance")
    # Relative paths are relative to the config file, so a controller directory can move.
    settings.pki_dir = path.parent / settings.pki_dir
    settings.images_dir = path.parent / settings.images_dir
    if is_database_url(settings.database):
        _check_database_url(settings.database, f"{path}: database")
    else:
        settings.database = str(path.parent / settings.database)
    return settings
