"""The agent's own configuration (``/etc/kumo/agent.yaml``) and the identity ``join`` leaves behind.

The YAML file is parsed strictly with :func:`agent.sdk.parse_section`: every error names
the file, the dotted key and what was expected. Plugin tables (``plugins.<name>``) are kept
raw here and handed to each plugin's ``kumo_configure``; a table for a plugin that is not
installed is an error, since it is almost always a typo or a missing package.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

from agent.sdk import (
    ConfigError,
    Identity,
    atomic_write,
    controller_url,
    load_yaml_file,
    parse_section,
)

DEFAULT_CONFIG = Path("/etc/kumo/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/kumo")

# Files ``kumo-agent join`` writes into the state directory.
NODE_KEY = "node.key"
NODE_CERT = "node.crt"
CA_CERT = "ca.crt"
JOIN_FILE = "join.json"
# A renewed certificate waits here while the new key is moved into place (see enroll.py).
NODE_CERT_NEXT = "node.crt.next"
# The key of a join whose answer has not come yet: the same join retried sends it again.
NODE_KEY_PENDING = "node.key.pending"


@dataclasses.dataclass
class MetricsSettings:
    """Where ``/metrics`` listens (``null`` turns it off) and, optionally, the CA scrapers must hold.

    Loopback by default: a node's metrics name its instances and their usage, so plain HTTP
    is not offered to the network unless asked for. The packaged agent.yaml serves every
    interface behind the fleet's own CA (scraper and admin certificates only).
    ``max_connections`` caps the connections held at once (a scraper keeps one or two):
    one over it is answered 503 and closed, so no client can take the agent's files."""

    listen: str | None = "127.0.0.1:9464"
    client_ca: Path | None = None
    max_connections: int = 64


@dataclasses.dataclass
class HeartbeatSettings:
    """How often plugin fingerprints are refreshed and re-sent with the heartbeat.

    The heartbeat interval itself comes from the controller at registration.
    """

    fingerprint_interval: float = 30.0


@dataclasses.dataclass
class TaskSettings:
    """How many tasks run at once, and how long in-flight tasks may finish at shutdown."""

    concurrency: int = 8
    shutdown_grace: float = 10.0


@dataclasses.dataclass
class ImageCacheSettings:
    """The node's one image cache, shared by every instance plugin (``context.images``).

    ``max_mib``: past this size the least recently used images no instance needs are
    removed (null keeps every image). ``ca_file``: the CA bundle for image URLs served by a
    private mirror (null trusts the system's CAs). The directory must be readable by what
    runs instances (qemu as libvirt-qemu), so it is not under the 0700 state directory.
    """

    path: Path = Path("/var/cache/kumo/images")
    max_mib: int | None = None
    ca_file: Path | None = None


@dataclasses.dataclass
class AgentSettings:
    """The whole agent config file, ``/etc/kumo/agent.yaml`` by default."""

    state_dir: Path = DEFAULT_STATE_DIR
    # One URL or a list, in the order to try them; null: the list recorded at join. Loading
    # makes it a list of normalised URLs (or None).
    controller: str | list[str] | None = None
    # Seconds without an answer after which a request to the controller has failed (a long
    # poll gets its wait on top, at most 15 s more): how soon a partition is noticed.
    controller_timeout: float = 20.0
    metrics: MetricsSettings = dataclasses.field(default_factory=MetricsSettings)
    heartbeat: HeartbeatSettings = dataclasses.field(default_factory=HeartbeatSettings)
    tasks: TaskSettings = dataclasses.field(default_factory=TaskSettings)
    image_cache: ImageCacheSettings = dataclasses.field(default_factory=ImageCacheSettings)
    vcpu_overcommit: float = 4.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    plugins: dict[str, Any] = dataclasses.field(default_factory=dict)

    # Not a field, so not a config key: the file these settings came from (None: defaults).
    source = None

    def plugin_source(self, name: str) -> str:
        """How messages name a plugin's table: ``"/etc/kumo/agent.yaml: plugins.kvm"``."""
        return f"{self.source or '<defaults>'}: plugins.{name}"


def load_settings(path: Path | None, *, required: bool = False) -> AgentSettings:
    """Read the agent config.

    With ``path`` None the default file is read when it exists (built-in defaults otherwise);
    an explicitly named file must exist (``required``).
    """
    if path is None:
        path = DEFAULT_CONFIG
        if not path.exists() and not required:
            return AgentSettings()
    data = load_yaml_file(path)
    prefix = str(path)
    try:
        settings = parse_section(AgentSettings, data, prefix)
    except ConfigError as exc:
        # parse_section joins keys with dots; the file name reads better followed by a colon.
        message = str(exc)
        if message.startswith(prefix + "."):
            message = f"{prefix}: {message[len(prefix) + 1:]}"
        raise ConfigError(message) from None
    settings.source = path
    _validate(settings, path)
    return settings


def _validate(settings: AgentSettings, path: Path) -> None:
    if settings.controller is not None:
        settings.controller = controller_list(settings.controller, f"{path}: controller")
    if settings.controller_timeout <= 0:
        raise ConfigError(f"{path}: controller_timeout: expected seconds above 0, got {settings.controller_timeout}")
    if settings.metrics.listen is not None:
        try:
            split_listen(settings.metrics.listen)
        except ValueError as exc:
            raise ConfigError(f"{path}: metrics.listen: {exc}") from None
    if settings.metrics.max_connections < 1:
        raise ConfigError(f"{path}: metrics.max_connections: expected a whole number of connections, 1 or more")
    if settings.metrics.client_ca is not None and settings.metrics.listen is None:
        raise ConfigError(f"{path}: metrics.client_ca: set, but metrics.listen is null (metrics are off)")
    if settings.image_cache.max_mib is not None and settings.image_cache.max_mib <= 0:
        raise ConfigError(f"{path}: image_cache.max_mib: expected a positive number of MiB (or null: no limit)")
    if settings.vcpu_overcommit <= 0:
        raise ConfigError(f"{path}: vcpu_overcommit: expected a number above 0, got {settings.vcpu_overcommit}")
    if settings.heartbeat.fingerprint_interval <= 0:
        raise ConfigError(f"{path}: heartbeat.fingerprint_interval: expected seconds above 0")
    if settings.tasks.concurrency < 1:
        raise ConfigError(f"{path}: tasks.concurrency: expected an integer of at least 1")
    if settings.tasks.shutdown_grace < 0:
        raise ConfigError(f"{path}: tasks.shutdown_grace: expected seconds, 0 or more")
    for name, section in settings.plugins.items():
        if section is not None and not isinstance(section, Mapping):
            raise ConfigError(f"{path}: plugins.{name}: expected a mapping of that plugin's settings")


def check_plugin_sections(settings: AgentSettings, installed: Iterable[str]) -> None:
    """Refuse a ``plugins.<name>`` table for a plugin that is not installed."""
    names = sorted(installed)
    for name in settings.plugins:
        if name not in names:
            raise ConfigError(
                f"{settings.source}: plugins.{name}: no plugin named {name!r} is installed "
                f"(installed plugins: {', '.join(names) or 'none'})"
            )


def split_listen(listen: str) -> tuple[str, int]:
    """``"0.0.0.0:9464"`` or ``"[::]:9464"`` → (host, port); ValueError says what was expected."""
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected HOST:PORT (e.g. 0.0.0.0:9464), got {listen!r}")
    return host.strip("[]"), int(port)


def controller_list(value: str | list[str], where: str) -> list[str]:
    """agent.yaml's ``controller``: one URL or a non-empty list of distinct ones, normalised."""
    urls = [value] if isinstance(value, str) else value
    if not urls:
        raise ConfigError(f"{where}: expected a URL or a list of URLs; leave it out to use the ones recorded at join")
    checked: list[str] = []
    for i, url in enumerate(urls):
        key = where if isinstance(value, str) else f"{where}[{i}]"
        try:
            url = controller_url(url)
        except ValueError as exc:
            raise ConfigError(f"{key}: {exc}") from None
        if url in checked:
            raise ConfigError(f"{key}: {url} is listed twice")
        checked.append(url)
    return checked


@dataclasses.dataclass(frozen=True)
class JoinRecord:
    """What ``join`` recorded: every controller's URL, in the order to try them, and this node's id."""

    controllers: tuple[str, ...]
    node_id: str


# What to do once the node certificate has expired (a partition outlasted it): the agent's
# log and `kumo-agent status` say the same.
REJOIN_ADVICE = ("Make a token (`kumoctl token create`), run `kumo-agent join --force --token JOIN` here and "
                 "restart the agent: the node keeps its id, its queued tasks and its instances")


class NotJoined(Exception):
    """The state directory holds no usable identity; the message says how to join."""


class JoinError(Exception):
    """Joining (or renewing) failed; the message says what was wrong and what to do.

    Defined here rather than in :mod:`agent.enroll` so that catching it does not import
    cryptography into the running agent; ``agent.enroll.JoinError`` is the same class.
    """


def identity_paths(state_dir: Path) -> tuple[Path, Path, Path]:
    """(key, certificate, CA) paths inside a state directory."""
    return state_dir / NODE_KEY, state_dir / NODE_CERT, state_dir / CA_CERT


def read_join_record(state_dir: Path) -> JoinRecord:
    """Read ``join.json``; NotJoined when it is missing or unreadable."""
    path = state_dir / JOIN_FILE
    try:
        data = json.loads(path.read_text())
        # Agents before the list of controllers recorded the one URL as "controller".
        urls = data["controllers"] if "controllers" in data else [data["controller"]]
        if not isinstance(urls, list) or not urls:
            raise ValueError("controllers: expected a list of URLs")
        return JoinRecord(controllers=tuple(map(str, urls)), node_id=str(data["node_id"]))
    except FileNotFoundError:
        raise NotJoined(f"{state_dir} holds no node identity: run `kumo-agent join --token JOIN` first") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NotJoined(f"{path}: unreadable ({exc}); re-join with `kumo-agent join --force ...`") from None


def write_join_record(state_dir: Path, record: JoinRecord) -> None:
    """Write ``join.json`` atomically: it is what marks the identity complete."""
    data = {"controllers": list(record.controllers), "node_id": record.node_id}
    atomic_write(state_dir / JOIN_FILE, json.dumps(data, indent=2).encode() + b"\n", 0o644)


def load_identity(state_dir: Path) -> Identity:
    """The node identity for plugins and the controller session; NotJoined when incomplete."""
    record = read_join_record(state_dir)
    key, cert, ca = identity_paths(state_dir)
    for path in (key, cert, ca):
        if not path.exists():
            raise NotJoined(f"{path} is missing; re-join with `kumo-agent join --force ...`")
    return Identity(node_id=record.node_id, key=key, certificate=cert, ca=ca)
