"""A real Debian container (systemd + cloud-init) from the project's image applies Kumo's seed.

The image is ``scripts/build-image.sh``'s rootfs tarball (built once per recipe, cached under
CACHE_DIR); the container is created through the agent's task path as every lxc test is.
Everything is checked from outside the container (lxc-attach, its root filesystem, a ping
from the host), not by trusting cloud-init's log.
"""

from __future__ import annotations

import pytest

from tests.harness.guest import DebianImage, DebianSeed
from tests.harness.lxc import Bridge, run


@pytest.mark.integration
@pytest.mark.slow
# one_leg: what only this test proves is that the image's own cloud-init applies the seed; the
# plugin's side (the seed it writes, the calls that attach it) runs on both legs in
# test_lxc.py's seeded container.
@pytest.mark.one_leg
@pytest.mark.timeout(900)  # the first test of a run may build the image (debootstrap)
async def test_real_cloud_init_in_a_debian_container(lxc_node, lxc_bridge: Bridge, debian_image: DebianImage) -> None:
    node = await lxc_node()
    seed = DebianSeed(hostname="kumo-debian-ct")
    address = lxc_bridge.address(40)
    network_config = {"version": 2, "ethernets": {"eth0": {
        "addresses": [f"{address}/24"], "gateway4": lxc_bridge.gateway}}}
    result = await node.task("lxc.create", {
        "name": "deb", "image": str(debian_image.rootfs), "image_sha256": debian_image.rootfs_sha256,
        "user_data": seed.user_data(), "network_config": network_config,
        # A veth on the bridge and no address: the address is cloud-init's to set.
        "network": {"mode": "veth", "bridge": lxc_bridge.name},
    })
    assert result["state"] == "running"
    assert "ipv4.address" not in (node.lxcpath / "deb/config").read_text()
    rootfs = node.lxcpath / "deb/rootfs"
    report = rootfs / DebianSeed.REPORT
    # runcmd runs in cloud-init's last stage, after the hostname, the user and the network.
    await node.wait_for(lambda: report.exists() and report.read_text().strip(), "cloud-init's runcmd", limit=240)

    assert node.attach("deb", "cat", "/proc/1/comm").stdout.strip() == "systemd"
    assert report.read_text().strip() == seed.report()
    assert node.attach("deb", "hostname").stdout.strip() == seed.hostname
    assert (rootfs / "etc/hostname").read_text().strip() == seed.hostname
    passwd = [line.split(":") for line in (rootfs / "etc/passwd").read_text().splitlines()]
    user = next(entry for entry in passwd if entry[0] == seed.user)
    assert (user[5], user[6]) == (f"/home/{seed.user}", "/bin/bash")
    keys = rootfs / f"home/{seed.user}/.ssh/authorized_keys"
    assert keys.read_text().strip() == seed.key
    # An unprivileged container: its uid 1000 is the host's idmap_start + 1000.
    assert keys.stat().st_uid == node.plugin.config.idmap_start + int(user[2])

    addresses = node.attach("deb", "ip", "-4", "-o", "addr", "show", "eth0")
    assert f"inet {address}/24" in addresses.stdout, addresses.stdout + addresses.stderr
    ping = run("busybox", "ping", "-c", "1", "-W", "5", address)
    assert ping.returncode == 0, ping.stdout + ping.stderr
    # systemd halts on liblxc's stop signal: no kill needed.
    assert (await node.task("lxc.stop", {"name": "deb", "timeout": 60}))["forced"] is False
    await node.task("lxc.delete", {"name": "deb"})
