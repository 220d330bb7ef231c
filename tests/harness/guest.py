"""A tiny real guest for the kvm plugin's tests: Debian's kernel and a busybox initramfs.

The initramfs's /init finds the NoCloud seed by its label (``findfs LABEL=cidata``), prints
the instance-id and the first line of user-data on the serial console, then powers off.
With ``kumo.hold`` on the kernel command line it stays up instead, until an ACPI power
button press (what ``virDomainShutdown`` sends), so stop and adoption can be tested; with
``kumo.count`` as well it prints ``GUEST-COUNT n`` (n = 1, 2, ...) five times a second, so a
checkpoint and restore can be seen to continue the count.

Built once per recipe under ``CACHE_DIR/guest/<hash>`` from the kernel package that
``scripts/deps/10-libvirt.sh`` downloads (nothing is installed into /boot or /lib/modules).
The kernel is booted as the uncompressed PVH ELF: in-guest XZ decompression under TCG
costs seconds per boot.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import lzma
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.harness import CACHE_DIR

DEBS = CACHE_DIR / "debs"
BUSYBOX = Path("/bin/busybox")
# Insert order is dependency order: the kernel's modules are plain .ko files (no
# compression), so insmod in this order needs neither depmod nor modprobe.
MODULES = (
    "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk "
    "cdrom isofs scsi_common scsi_mod sr_mod libata ata_piix evdev button"
).split()
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
echo "GUEST-BOOTED kernel=$(uname -r)"
for m in {modules}; do insmod /lib/modules/$m.ko 2>/dev/null; done
dev=""
for i in $(seq 1 50); do dev=$(findfs LABEL=cidata 2>/dev/null) && break; dev=""; sleep 0.1; done
if [ -n "$dev" ] && mount -t iso9660 -o ro "$dev" /mnt; then
  echo "CIDATA-DEV: $dev"
  echo "CIDATA-META: $(grep instance-id /mnt/meta-data)"
  echo "CIDATA-USERDATA-FIRSTLINE: $(head -n 1 /mnt/user-data)"
  umount /mnt
else
  echo "CIDATA-NOT-FOUND"
fi
if grep -q kumo.hold /proc/cmdline; then
  for e in /dev/input/event*; do
    ( dd if=$e bs=24 count=1 >/dev/null 2>&1; echo GUEST-POWER-BUTTON; poweroff -f ) &
  done
  echo GUEST-HOLDING
  # With kumo.count it counts on the console: a checkpoint restored must go on from where it
  # was, not from 1.
  if grep -q kumo.count /proc/cmdline; then
    i=0; while true; do i=$((i+1)); echo "GUEST-COUNT $i"; sleep 0.2; done
  fi
  while true; do sleep 60; done
fi
echo GUEST-DONE
poweroff -f
""".format(modules=" ".join(MODULES))


@dataclasses.dataclass(frozen=True)
class Guest:
    """Files for direct kernel boot, plus a tiny qcow2 base disk to stand in for the image."""

    kernel: Path
    initrd: Path
    disk: Path
    cmdline: str = "console=ttyS0 panic=-1 quiet"

    @property
    def disk_sha256(self) -> str:
        return hashlib.sha256(self.disk.read_bytes()).hexdigest()


def kernel_package() -> Path | None:
    """The newest Debian kernel package file the deps script downloaded, if any."""
    debs = sorted(DEBS.glob("linux-image-*-amd64_*.deb"))
    return debs[-1] if debs else None


def build_guest(deb: Path, cache: Path = CACHE_DIR / "guest") -> Guest:
    """Build (or reuse) the guest for ``deb``; the cache key covers every input of the recipe."""
    recipe = hashlib.sha256(
        "\n".join([deb.name, INIT, " ".join(MODULES), str(BUSYBOX.stat().st_size)]).encode()
    ).hexdigest()[:16]
    out = cache / recipe
    guest = Guest(out / "vmlinux", out / "initramfs.cpio.gz", out / "disk.qcow2")
    if (out / "done").exists():
        return guest
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        root = Path(tmp) / "kroot"
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            ["dpkg-deb", "-x", str(deb), str(root)], check=True)
        vmlinuz = next((root / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        _extract_vmlinux(vmlinuz, guest.kernel)
        _build_initramfs(root / "lib" / "modules" / release, guest.initrd, Path(tmp) / "initramfs")
    subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["qemu-img", "create", "-q", "-f", "qcow2", str(guest.disk), "16M"], check=True
    )
    for path in (out, guest.kernel, guest.initrd, guest.disk):
        # qemu runs as libvirt-qemu: it must read these.
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / "done").touch()
    return guest


def _extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    data = vmlinuz.read_bytes()
    offset = data.find(b"\xfd7zXZ\x00")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[offset:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError(f"{vmlinuz}: no XZ-compressed ELF kernel inside")
    dest.write_bytes(elf)


def _build_initramfs(
    moddir: Path, dest: Path, root: Path, modules: list[str] = MODULES, init: str = INIT
) -> None:
    """A gzip'd newc cpio: static busybox, the named modules as plain .ko files, ``init``."""
    for sub in ("bin", "proc", "sys", "dev", "mnt", "newroot", "lib/modules"):
        (root / sub).mkdir(parents=True)
    shutil.copy(BUSYBOX, root / "bin" / "busybox")
    by_name = {p.name.removesuffix(".ko"): p for p in moddir.rglob("*.ko")}
    for module in modules:
        shutil.copy(by_name[module], root / "lib" / "modules" / f"{module}.ko")
    (root / "init").write_text(init)
    os.chmod(root / "init", 0o755)
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    archive = subprocess.run(
        ["cpio", "-o", "-H", "newc", "--quiet"],  # noqa: S603 - an argv list, never a shell
        input="\n".join(names).encode(),
        cwd=root,
        capture_output=True,
        check=True,
    ).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))


@pytest.fixture(scope="session")
def kvm_guest() -> Guest:
    """The busybox test guest; requires the kernel package from ``make deps``."""
    from tests.harness import require

    deb = kernel_package()
    require(deb is not None, f"a Debian kernel package in {DEBS} (scripts/deps/10-libvirt.sh)")
    require(BUSYBOX.exists(), "busybox-static (scripts/deps/10-libvirt.sh)")
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    return build_guest(deb)


# ---- a real Debian guest with cloud-init (for the slow test) ---------------------------

DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
# python3-cffi-backend: debootstrap does not resolve the virtual package
# python3-cryptography needs (python3-cffi-backend-api-*), so name its provider.
DEBIAN_PACKAGES = "systemd-sysv,udev,kmod,cloud-init,python3-cffi-backend"
ROOT_MODULES = (
    "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk "
    "crc16 mbcache jbd2 crc32c_generic ext4"
).split()
# The initramfs only mounts the root disk and hands over to systemd; the rootfs carries the
# kernel's full module tree, so udev loads the cdrom drivers cloud-init needs.
ROOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko 2>/dev/null; done
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || {{ echo "ROOT-MOUNT-FAILED"; poweroff -f; }}
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
""".format(modules=" ".join(ROOT_MODULES))
CLOUD_CFG = """# Kumo test guest: NoCloud only, so boot does not wait probing clouds that are not there.
datasource_list: [NoCloud, None]
"""


def build_debian_guest(deb: Path, cache: Path = CACHE_DIR / "debian-guest") -> Guest:
    """A debootstrapped Debian (systemd + cloud-init) booted by Debian's kernel directly.

    Built once (a few minutes: debootstrap dominates) and cached by recipe.
    """
    recipe = hashlib.sha256(
        "\n".join([deb.name, DEBIAN_SUITE, DEBIAN_PACKAGES, ROOT_INIT, CLOUD_CFG]).encode()
    ).hexdigest()[:16]
    out = cache / recipe
    guest = Guest(out / "vmlinux", out / "initramfs.cpio.gz", out / "root.qcow2",
                  cmdline="console=ttyS0 panic=-1")
    if (out / "done").exists():
        return guest
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        kroot = Path(tmp) / "kroot"
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(["dpkg-deb", "-x", str(deb), str(kroot)], check=True)  # noqa: S603
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        _extract_vmlinux(vmlinuz, guest.kernel)
        boot = subprocess.run(  # noqa: S603 - an argv list, never a shell
            ["debootstrap", "--variant=minbase", f"--include={DEBIAN_PACKAGES}",
             DEBIAN_SUITE, str(rootfs), DEBIAN_MIRROR],
            capture_output=True, text=True, check=False,
        )
        if boot.returncode != 0:
            details = rootfs / "debootstrap" / "debootstrap.log"
            tail = details.read_text()[-3000:] if details.exists() else boot.stdout[-3000:]
            raise RuntimeError(f"debootstrap failed: {boot.stderr[-1000:]}\n{tail}")
        shutil.copytree(kroot / "lib" / "modules" / release, rootfs / "lib" / "modules" / release)
        subprocess.run(["depmod", "-b", str(rootfs), release], check=True)  # noqa: S603
        (rootfs / "etc" / "cloud" / "cloud.cfg.d" / "99-kumo-test.cfg").write_text(CLOUD_CFG)
        (rootfs / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
        for leftover in ("etc/machine-id", "etc/hostname"):
            (rootfs / leftover).write_text("")
        initramfs = Path(tmp) / "initramfs"
        _build_initramfs(
            kroot / "lib" / "modules" / release, guest.initrd, initramfs, ROOT_MODULES, ROOT_INIT
        )
        raw = Path(tmp) / "root.raw"
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            ["mkfs.ext4", "-q", "-L", "kumoroot", "-d", str(rootfs), str(raw), "2G"], check=True
        )
        subprocess.run(  # noqa: S603 - an argv list, never a shell
            ["qemu-img", "convert", "-O", "qcow2", str(raw), str(guest.disk)], check=True
        )
    for path in (out, guest.kernel, guest.initrd, guest.disk):
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / "done").touch()
    return guest


@pytest.fixture(scope="session")
def debian_guest() -> Guest:
    """The debootstrapped Debian guest with cloud-init; built on first use, then cached."""
    from tests.harness import require

    deb = kernel_package()
    require(deb is not None, f"a Debian kernel package in {DEBS} (scripts/deps/10-libvirt.sh)")
    require(shutil.which("debootstrap") is not None, "debootstrap (scripts/deps/10-libvirt.sh)")
    require(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 (e2fsprogs)")
    return build_debian_guest(deb)
