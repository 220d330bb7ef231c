"""The ``host`` plugin: the node's basic facts (CPUs, memory, architecture, kernel, /dev/kvm).

The scheduler places by these facts, so they are fresh at every fingerprint.
"""

from __future__ import annotations

import os
import platform

import psutil

from agent.plugin import Fingerprint, hookimpl

KVM_DEVICE = "/dev/kvm"


class HostPlugin:
    @hookimpl
    def kumo_fingerprint(self) -> Fingerprint:
        memory = psutil.virtual_memory()
        return Fingerprint(
            available=True,
            attributes={
                "cpus": psutil.cpu_count(logical=True) or 1,
                "memory_bytes": memory.total,
                "memory_available_bytes": memory.available,
                "arch": platform.machine(),
                "kernel": platform.release(),
                "hostname": platform.node(),
                "kvm_device": _kvm_device_opens(),
            },
        )


def _kvm_device_opens() -> bool:
    """Whether /dev/kvm opens read-write: necessary, not sufficient, for KVM guests."""
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True
