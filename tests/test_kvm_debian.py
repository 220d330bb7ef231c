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
    node = await kvm_bed.node()
    name = kvm_bed.name("debian")
    marker = f"KUMO-RUNCMD-{name}"
    user_data = (
        "#cloud-config\n"
        f"runcmd:\n  - [sh, -c, 'echo {marker} $(hostname) > /dev/ttyS0']\n"
    )
    result = await node.task(
        "kvm.create",
        name=name,
        kind="kvm",
        image=str(debian_guest.disk),
        vcpus=1,
        memory_mib=512,
        user_data=user_data,
        options={
            "kernel": str(debian_guest.kernel),
            "initrd": str(debian_guest.initrd),
            "cmdline": debian_guest.cmdline,
        },
    )
    assert result["state"] == "running"
    log = ""
    for _ in range(600):
        log = await node.console(name)
        if marker in log:
            break
        await asyncio.sleep(1)
    # cloud-init found the seed (hostname from meta-data) and ran the user's runcmd.
    assert f"{marker} {name}" in log, log[-3000:]
    await node.task("kvm.delete", name=name)
