"""What a ``kvm.create`` payload asks for, checked before anything is made."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import psutil

from agent.sdk import TaskError, parse_payload, valid_sha256

MIN_MEMORY_MIB = 32


@dataclasses.dataclass(frozen=True)
class BootOptions:
    """``options``: boot a kernel directly instead of the disk's boot loader."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None


@dataclasses.dataclass(frozen=True)
class CreateSpec:
    """The create payload: the instance's name and kind, what the domain is built from, and
    the first-boot seed's fields."""

    name: str
    image: str  # an absolute path on the node or an https:// URL
    memory_mib: int
    kind: str = "kvm"
    image_sha256: str | None = None
    vcpus: int = 1
    options: BootOptions = dataclasses.field(default_factory=BootOptions)
    # Read by the plugin that builds the seed (cloudinit), which checks them with its own
    # messages and code; the domain is not built from them.
    user_data: Any = None
    network_config: Any = None
    vendor_data: Any = None
    instance_id: Any = None
    hostname: Any = None


def parse_create(payload: Mapping[str, Any]) -> CreateSpec:
    """The payload as a :class:`CreateSpec`; ``bad-request`` naming the key otherwise."""
    spec = parse_payload(CreateSpec, payload)
    if spec.vcpus < 1:
        raise TaskError(f"payload.vcpus must be at least 1, got {spec.vcpus}", code="bad-request")
    if spec.memory_mib < MIN_MEMORY_MIB:
        raise TaskError(f"payload.memory_mib must be at least {MIN_MEMORY_MIB}, got {spec.memory_mib}",
                        code="bad-request")
    if spec.image_sha256 is not None:
        valid_sha256(spec.image_sha256)
    options = spec.options
    for key, value in (("kernel", options.kernel), ("initrd", options.initrd)):
        if value is not None and not value.startswith("/"):
            raise TaskError(f"payload.options.{key} must be an absolute path on the node", code="bad-request")
    if options.kernel is None and (options.initrd or options.cmdline):
        raise TaskError("payload.options.initrd and options.cmdline need options.kernel", code="bad-request")
    return spec


def check_resources(spec: CreateSpec) -> None:
    """Refuse what this node cannot hold now. Blocking (reads /proc and stats files)."""
    cpus = psutil.cpu_count(logical=True) or 1
    if spec.vcpus > cpus:
        raise TaskError(
            f"vcpus {spec.vcpus} is more than the {cpus} CPUs of this node: ask for at most {cpus}",
            code="insufficient-cpu",
        )
    available = psutil.virtual_memory().available // (1024 * 1024)
    if spec.memory_mib > available:
        raise TaskError(
            f"memory_mib {spec.memory_mib} is more than the {available} MiB available on this node",
            code="insufficient-memory",
        )
    for path in (spec.options.kernel, spec.options.initrd):
        if path is not None and not os.path.isfile(path):
            raise TaskError(f"{path} does not exist on this node (direct kernel boot)", code="image-missing")
