"""A real Debian VM (systemd + cloud-init) from the project's image applies Kumo's seed.

Slow: the image is ``scripts/build-image.sh``'s disk form (built once per recipe, cached
under CACHE_DIR), booted by Debian's kernel directly under TCG, where systemd and
cloud-init's Python stages take a minute or more. The same seed as the container test's
(hostname, a user with an ssh key, runcmd) is checked on the serial console.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.harness.guest import DebianImage, DebianSeed
from tests.harness.libvirt import KvmTestBed


@pytest.mark.integration
@pytest.mark.slow
# one_leg: what only this test proves is that the image's own cloud-init applies the seed; the
# plugin's side (the seed it writes, the calls that attach it) runs on both legs in
# test_kvm.py's seeded busybox VM.
@pytest.mark.one_leg
@pytest.mark.timeout(1500)
async def test_real_cloud_init_applies_the_seed_in_a_vm(kvm_bed: KvmTestBed, debian_image: DebianImage) -> None:
    node = await kvm_bed.node()
    name = kvm_bed.name("debian")
    seed = DebianSeed(hostname="kumo-debian-vm")
    vm = debian_image.vm
    result = await node.task(
        "kvm.create",
        name=name,
        kind="kvm",
        image=str(vm.disk),
        vcpus=1,
        memory_mib=512,
        user_data=seed.user_data(),
        options={"kernel": str(vm.kernel), "initrd": str(vm.initrd), "cmdline": vm.cmdline},
    )
    assert result["state"] == "running"
    log = ""
    for _ in range(600):
        log = await node.console(name)
        if "\n" in log.partition("KUMO-SEED")[2]:  # the runcmd's whole line is out
            break
        await asyncio.sleep(1)
    # cloud-init found the cidata seed, set the hostname, made the user with its key, then
    # ran the runcmd that reports all three.
    assert seed.report() in log, log[-3000:]
    await node.task("kvm.delete", name=name)
