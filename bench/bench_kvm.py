"""Benchmark: the kvm plugin's ``kvm.create`` against ``virsh define`` + ``virsh start``.

Both start the same guest on the real libvirtd (TCG here) from the same domain XML: Kumo's
time covers everything its create does as the agent routes it (payload checks, resources,
cidata seed ISO, image cache, qcow2 overlay, XML, define, start) until the domain runs; the baseline is the two virsh commands on a copy of
the XML Kumo produced, with its overlay and seed made beforehand. Runs alternate and the
medians are compared. Target: Kumo ≤ 1.1× the baseline.

Run: ``.venv/bin/python bench/bench_kvm.py [--runs N]`` (root, libvirtd running: ``make deps``).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.harness.guest import build_guest, kernel_package  # noqa: E402
from tests.harness.libvirt import TEST_INSTANCE_ROOT, KvmTestBed, relocated_xml  # noqa: E402

TARGET = 1.1
URI = "qemu:///system"


def virsh(*args: str) -> None:
    subprocess.run(["virsh", "-q", "-c", URI, *args], check=True, capture_output=True)  # noqa: S603


async def main(runs: int) -> None:
    import libvirt

    deb = kernel_package()
    if deb is None:
        sys.exit("bench_kvm: no kernel package in the test cache: run `make deps` first")
    guest = build_guest(deb)
    root = TEST_INSTANCE_ROOT / f"kumo-bench-{uuid.uuid4().hex[:8]}"
    root.mkdir(parents=True, mode=0o711)
    state = Path(tempfile.mkdtemp(prefix="kumo-bench-state-"))
    bed = KvmTestBed(URI, root, state)
    node = await bed.node()
    conn = libvirt.open(URI)
    sha = guest.disk_sha256

    def payload(name: str) -> dict:
        return {
            "name": name, "kind": "kvm", "image": str(guest.disk), "image_sha256": sha,
            "vcpus": 1, "memory_mib": 192, "user_data": "#cloud-config\nruncmd: [echo hi]\n",
            "options": {"kernel": str(guest.kernel), "initrd": str(guest.initrd),
                        "cmdline": guest.cmdline + " kumo.hold"},
        }

    kumo: list[float] = []
    base: list[float] = []
    try:
        # Warm-up (not measured): image cache, acceleration verdict, QEMU binary in page cache.
        warm = bed.name("warm")
        await node.task("kvm.create", **payload(warm))
        template = conn.lookupByName(warm).XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)
        seed = root / "seed-template.iso"
        shutil.copy(root / "instances" / warm / "cidata.iso", seed)
        await node.task("kvm.delete", name=warm)
        for i in range(runs):
            name = bed.name(f"k{i}")
            start = time.perf_counter()
            result = await node.task("kvm.create", **payload(name))
            kumo.append(time.perf_counter() - start)
            assert result["state"] == "running", result
            await node.task("kvm.delete", name=name)

            bname = bed.name(f"b{i}")
            bdir = root / "baseline" / bname
            bdir.mkdir(parents=True, mode=0o711)
            subprocess.run(  # noqa: S603
                ["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b", str(guest.disk),
                 str(bdir / "disk.qcow2")], check=True,
            )
            shutil.copy(seed, bdir / "cidata.iso")
            xml_file = bdir / "domain.xml"
            xml_file.write_text(relocated_xml(template, bdir, bname))
            start = time.perf_counter()
            virsh("define", str(xml_file))
            virsh("start", bname)
            base.append(time.perf_counter() - start)
            assert conn.lookupByName(bname).isActive()
            virsh("destroy", bname)
            virsh("undefine", bname)
    finally:
        await node.plugin.kumo_shutdown()
        conn.close()
        bed.cleanup()
        shutil.rmtree(state, ignore_errors=True)
    k, b = statistics.median(kumo), statistics.median(base)
    print(f"kvm.create -> running (Kumo):       median {k * 1000:7.1f} ms over {runs} runs")
    print(f"virsh define + virsh start (base):  median {b * 1000:7.1f} ms over {runs} runs")
    print(f"ratio {k / b:.2f}x (target <= {TARGET}x) {'OK' if k / b <= TARGET else 'MISSED'}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=11)
    asyncio.run(main(parser.parse_args().runs))
