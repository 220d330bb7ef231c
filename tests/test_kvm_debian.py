"""A real Debian guest (systemd + cloud-init) applies the user's cloud-config.

Slow: the image is debootstrapped once (cached under CACHE_DIR) and the guest boots under
TCG, where systemd and cloud-init's Python stages take a minute or more.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.harness.guest import Guest
from tests.harness.libvirt import KvmTestBed


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(1500)
async def test_real_cloud_init_runs_runcmd(kvm_bed: KvmTestBed, debian_guest: Guest) -> None:
    plugin = await kvm_bed.plugin()
    name = kvm_bed.name("debian")
    marker = f"KUMO-RUNCMD-{name}"
    user_data = (
        "#cloud-config\n"
        f"runcmd:\n  - [sh, -c, 'echo {marker} $(hostname) > /dev/ttyS0']\n"
    )
    result = await plugin.kumo_handle_task(
        kind="kvm.create",
        payload={
            "name": name,
            "kind": "kvm",
            "image": str(debian_guest.disk),
            "vcpus": 1,
            "memory_mib": 512,
            "user_data": user_data,
            "options": {
                "kernel": str(debian_guest.kernel),
                "initrd": str(debian_guest.initrd),
                "cmdline": debian_guest.cmdline,
            },
        },
        task_id="debian",
    )
    assert result["state"] == "running"
    log = ""
    for _ in range(600):
        log = (await plugin.kumo_handle_task(kind="kvm.console", payload={"name": name}, task_id="c"))["log"]
        if marker in log:
            break
        await asyncio.sleep(1)
    # cloud-init found the seed (hostname from meta-data) and ran the user's runcmd.
    assert f"{marker} {name}" in log, log[-3000:]
    await plugin.kumo_handle_task(kind="kvm.delete", payload={"name": name}, task_id="d")
