"""The node's own facts (CPUs, memory, architecture, kernel, /dev/kvm), which the scheduler
places by. The agent core reports them, so a node is placeable whatever plugins it runs."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil

KVM_DEVICE = "/dev/kvm"


def node_facts() -> dict[str, Any]:
    """Read now: free memory changes between registrations."""
    memory = psutil.virtual_memory()
    return {
        "cpus": psutil.cpu_count(logical=True) or 1,
        "memory_bytes": memory.total,
        "memory_available_bytes": memory.available,
        "arch": platform.machine(),
        "kernel": platform.release(),
        "hostname": platform.node(),
        "kvm_device": _kvm_device_opens(),
    }


def _kvm_device_opens() -> bool:
    """Whether /dev/kvm opens read-write: necessary, not sufficient, for KVM guests."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
