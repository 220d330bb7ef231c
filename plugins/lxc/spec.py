"""The ``lxc.create`` payload: what a container is built from, checked against the node's settings.

The payload is the controller's instance spec plus ``name`` and ``kind``. kumoctl sends
the kind-specific fields as options (``--option network='{...}'``); the API also takes them
at the top level, which wins.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
from collections.abc import Mapping
from typing import Any, Literal, NoReturn

from agent.sdk import TaskError, parse_payload, valid_sha256

from .settings import IFNAME_RE, LxcConfig

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\Z")
TEMPLATE_RE = re.compile(r"^[a-z0-9_-]{1,64}\Z")
MIN_MEMORY_MIB = 16

NetworkMode = Literal["none", "empty", "veth"]


@dataclasses.dataclass(frozen=True)
class NetworkPayload:
    mode: NetworkMode | None = None
    bridge: str | None = None
    address: str | None = None
    gateway: str | None = None
    dhcp: bool | None = None


@dataclasses.dataclass(frozen=True)
class OptionsPayload:
    template: str | None = None
    hostname: str | None = None
    network: NetworkPayload | None = None
    privileged: bool | None = None


@dataclasses.dataclass(frozen=True)
class CreatePayload:
    name: str
    kind: str = "lxc"
    vcpus: int | None = None
    memory_mib: int | None = None
    template: str | None = None
    image: str | None = None
    image_sha256: str | None = None
    hostname: str | None = None
    network: NetworkPayload | None = None
    privileged: bool | None = None
    options: OptionsPayload | None = None
    # The first-boot seed's fields: the plugin that builds the seed checks them.
    user_data: Any = None
    network_config: Any = None
    vendor_data: Any = None
    instance_id: Any = None


@dataclasses.dataclass(frozen=True)
class NetworkSpec:
    """A container's network: none (the host's), empty (loopback only) or veth on a bridge."""

    mode: NetworkMode
    bridge: str | None = None
    address: str | None = None
    gateway: str | None = None
    dhcp: bool = False


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    """The parts of an ``lxc.create`` payload a container is built from."""

    template: str | None
    image: str | None
    image_sha256: str | None
    vcpus: int | None
    memory_mib: int | None
    network: NetworkSpec
    hostname: str | None
    privileged: bool = False


def parse_create(payload: Mapping[str, Any], config: LxcConfig) -> CreateSpec:
    """Validate an ``lxc.create`` payload against the node's settings; TaskError names the field."""
    raw = parse_payload(CreatePayload, payload)
    options = raw.options or OptionsPayload()
    image = raw.image
    template = raw.template if raw.template is not None else options.template
    hostname = raw.hostname if raw.hostname is not None else options.hostname
    privileged = asks_privileged(raw)
    if privileged and not config.allow_privileged:
        raise TaskError("this node runs no privileged container (its root would be the host's root): leave out "
                        "privileged, or set plugins.lxc.allow_privileged: true on a node meant for them",
                        code="privileged-refused")
    if image is not None and template is not None:
        _bad("give either template or image (a root filesystem tarball), not both")
    if image is not None and not image:
        _bad("image must be a path on the node or an https URL of a root filesystem tarball")
    if image is None:
        template = "busybox" if template is None else template
        if not TEMPLATE_RE.match(template):
            raise TaskError(f"unknown template {template!r}: templates are lxc template names such as 'busybox'",
                            code="unknown-template")
    sha = valid_sha256(raw.image_sha256) if raw.image_sha256 is not None else None
    if sha is not None and image is None:
        _bad("image_sha256 is for an image; a template has none")
    if raw.vcpus is not None and raw.vcpus < 1:
        _bad(f"vcpus must be a positive integer, got {raw.vcpus!r}")
    if raw.memory_mib is not None and raw.memory_mib < MIN_MEMORY_MIB:
        _bad(f"memory_mib must be an integer of at least {MIN_MEMORY_MIB}, got {raw.memory_mib!r}")
    if hostname is not None and (not HOSTNAME_RE.match(hostname) or len(hostname) > 253):
        _bad(f"hostname must be a DNS name, got {hostname!r}")
    return CreateSpec(
        template=template if image is None else None,
        image=image,
        image_sha256=sha,
        vcpus=raw.vcpus,
        memory_mib=raw.memory_mib,
        network=parse_network(raw.network or options.network or NetworkPayload(), config),
        hostname=hostname,
        privileged=privileged,
    )


def asks_privileged(raw: CreatePayload) -> bool:
    """Whether a create payload asks for a privileged container (the top level wins over options)."""
    options = raw.options or OptionsPayload()
    return bool(raw.privileged if raw.privileged is not None else options.privileged)


def parse_network(value: NetworkPayload, config: LxcConfig) -> NetworkSpec:
    """The network of a new container: the payload's, completed by the node's defaults."""
    defaults = config.network
    mode = value.mode or defaults.mode
    address, gateway = value.address, value.gateway
    dhcp = value.dhcp if value.dhcp is not None else (defaults.dhcp if not address else False)
    if mode != "veth":
        if address or gateway or value.dhcp or value.bridge:
            _bad(f"network mode {mode!r} has no interface: address, gateway, bridge and dhcp need mode 'veth'")
        return NetworkSpec(mode)
    bridge = value.bridge or defaults.bridge or (config.bridge.name if config.bridge else None)
    if bridge is None or not IFNAME_RE.match(bridge):
        _bad(f"network.bridge must name a host bridge (1-15 characters), got {bridge!r}: "
             "give one or configure plugins.lxc.bridge")
    if address is not None:
        if dhcp:
            _bad("network.address and network.dhcp exclude each other: choose one")
        address = _interface(address)
    if gateway is not None:
        if address is None:
            _bad("network.gateway needs network.address (with dhcp the server gives the gateway)")
        gateway = _gateway(gateway, address)
    return NetworkSpec("veth", bridge, address, gateway, dhcp)


def _interface(address: str) -> str:
    try:
        parsed = ipaddress.ip_interface(address)
    except ValueError:
        _bad(f"network.address must be an address with prefix (10.40.0.5/24), got {address!r}")
    if "/" not in address:
        _bad(f"network.address needs a prefix length (10.40.0.5/24), got {address!r}")
    return parsed.with_prefixlen


def _gateway(gateway: str, address: str) -> str:
    try:
        parsed = ipaddress.ip_address(gateway)
    except ValueError:
        _bad(f"network.gateway must be an address, got {gateway!r}")
    if parsed.version != ipaddress.ip_interface(address).version:
        _bad("network.gateway and network.address must be the same IP version")
    return str(parsed)


def _bad(message: str) -> NoReturn:
    raise TaskError(message, code="bad-request")
