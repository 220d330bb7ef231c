#!/usr/bin/python3
"""Build Kumo's Debian 12 image with cloud-init, in both forms, once per recipe.

From Debian's own archive (debootstrap, minbase plus systemd, cloud-init, ifupdown and
openssh-server), one root filesystem becomes:

- ``rootfs.tar.gz``: the lxc form, a root filesystem tarball the lxc plugin unpacks;
- ``disk.qcow2``: the kvm form, an ext4 filesystem (no partition table, no boot loader)
  booted directly by Debian's kernel: ``vmlinux`` (the uncompressed PVH ELF, because
  in-guest XZ decompression under TCG costs seconds per boot) and ``initramfs.cpio.gz`` (a
  static busybox that mounts /dev/vda and hands over to systemd), with the kernel's modules
  inside the disk so udev loads what cloud-init needs (the cidata cdrom).

cloud-init reads only NoCloud (the seed the cloudinit plugin writes), so boot does not wait
probing clouds that are not there. The files land in ``CACHE/debian-12/<recipe>/`` with
``image.json`` (paths, sizes, sha256s, the kernel command line); the recipe is the sha256 of
everything below that shapes the image (the constants, ``STEPS``, the kernel package's name,
the mirror), so a changed recipe builds a new image and an unchanged one is never built
twice (concurrent builders wait on a lock). Runs as root (debootstrap, ownership in the tarball). Only the standard library: it
runs before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import gzip
import hashlib
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

NAME = "debian-12"
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
DEFAULT_CACHE = Path(os.environ.get("KUMO_IMAGE_CACHE", "/var/cache/kumo-images"))
BUSYBOX = Path("/bin/busybox")
# ifupdown: Debian 12's network stack, which cloud-init renders network-config for (ENI);
# isc-dhcp-client for its DHCP fallback; locales for cloud-init's locale module (without it
# that module fails and cloud-config.service with it). python3-cffi-backend: debootstrap does not resolve
# the virtual package python3-cryptography needs (python3-cffi-backend-api-*), so name its
# provider.
PACKAGES = ("systemd-sysv,udev,kmod,cloud-init,python3-cffi-backend,ifupdown,isc-dhcp-client,"
            "iproute2,openssh-server,locales")
LOCALE = "en_US.UTF-8"  # cloud-init's default for Debian: generated here, not at every first boot
CLOUD_CFG = """# Kumo: instances are seeded by Kumo's cloudinit plugin (NoCloud: a cidata disk for a VM,
# /var/lib/cloud/seed/nocloud in a container); probing for other clouds only delays boot.
datasource_list: [NoCloud, None]
"""
# Insert order is dependency order: Debian's modules are plain .ko files (no compression),
# so insmod in this order needs neither depmod nor modprobe.
ROOT_MODULES = (
    "virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk "
    "crc16 mbcache jbd2 crc32c_generic ext4"
).split()
ROOT_INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /lib/modules/$m.ko 2>/dev/null; done
for i in $(seq 1 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || {{ echo "ROOT-MOUNT-FAILED"; poweroff -f; }}
umount /proc /sys; mount --move /dev /newroot/dev
exec switch_root /newroot /sbin/init
""".format(modules=" ".join(ROOT_MODULES))
CMDLINE = "console=ttyS0 panic=-1"
DISK_SIZE = "2G"
STEPS = 2  # bump when _build or _customise change what they make


def recipe(kernel_deb: Path, mirror: str) -> str:
    parts = [SUITE, PACKAGES, LOCALE, CLOUD_CFG, ROOT_INIT, CMDLINE, DISK_SIZE, str(STEPS), kernel_deb.name, mirror]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def build(cache: Path, kernel_deb: Path, mirror: str = MIRROR) -> dict:
    """The image's manifest, building it first unless this recipe is already in ``cache``."""
    out = cache / NAME / recipe(kernel_deb, mirror)
    with _locked(cache / NAME / ".lock"):
        if not (out / "image.json").exists():
            _build(out, kernel_deb, mirror)
    return json.loads((out / "image.json").read_text())


def _build(out: Path, kernel_deb: Path, mirror: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        kroot, rootfs = work / "kroot", work / "rootfs"
        _run("dpkg-deb", "-x", str(kernel_deb), str(kroot))
        vmlinuz = next((kroot / "boot").glob("vmlinuz-*"))
        release = vmlinuz.name.removeprefix("vmlinuz-")
        extract_vmlinux(vmlinuz, work / "vmlinux")
        build_initramfs(kroot / "lib" / "modules" / release, work / "initramfs.cpio.gz",
                        work / "initramfs", ROOT_MODULES, ROOT_INIT)
        _debootstrap(rootfs, mirror)
        _customise(rootfs)
        # The container shares the host's kernel: its form carries no modules and no fstab,
        # and no device nodes (LXC makes a container's /dev; a catalogue refuses them).
        _run("tar", "--create", "--gzip", "--numeric-owner", "--xattrs", "--one-file-system",
             "--exclude=./dev/*", "--file", str(work / "rootfs.tar.gz"), "--directory", str(rootfs), ".")
        shutil.copytree(kroot / "lib" / "modules" / release, rootfs / "lib" / "modules" / release)
        _run("depmod", "-b", str(rootfs), release)
        (rootfs / "etc" / "fstab").write_text("/dev/vda / ext4 defaults 0 1\n")
        raw = work / "disk.raw"
        _run("mkfs.ext4", "-q", "-L", "kumoroot", "-d", str(rootfs), str(raw), DISK_SIZE)
        _run("qemu-img", "convert", "-O", "qcow2", str(raw), str(work / "disk.qcow2"))
        files = {"rootfs": "rootfs.tar.gz", "disk": "disk.qcow2", "kernel": "vmlinux",
                 "initrd": "initramfs.cpio.gz"}
        manifest = {
            "name": NAME, "suite": SUITE, "kernel_release": release, "cmdline": CMDLINE,
            **{key: {"path": str(out / name), "size": (work / name).stat().st_size,
                     "sha256": _sha256(work / name)} for key, name in files.items()},
        }
        for name in files.values():
            # qemu runs as libvirt-qemu: it must read these.
            (work / name).chmod(0o644)
        for entry in work.iterdir():
            if entry.name in files.values():
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        (work / "image.json").write_text(json.dumps(manifest, indent=2) + "\n")
        work.chmod(0o755)
        work.rename(out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _debootstrap(rootfs: Path, mirror: str) -> None:
    result = subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["debootstrap", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(rootfs), mirror],
        capture_output=True, text=True, check=False,
    )
    if result.returncode != 0:
        details = rootfs / "debootstrap" / "debootstrap.log"
        tail = details.read_text()[-3000:] if details.exists() else result.stdout[-3000:]
        raise BuildError(f"debootstrap failed: {result.stderr[-1000:]}\n{tail}")


def _customise(rootfs: Path) -> None:
    """What makes one build many first boots: no identity, no host keys, no package caches."""
    (rootfs / "etc" / "cloud" / "cloud.cfg.d" / "90-kumo.cfg").write_text(CLOUD_CFG)
    # Empty, not absent: systemd makes a fresh machine-id at first boot; cloud-init writes
    # the hostname from the seed.
    for leftover in ("etc/machine-id", "etc/hostname"):
        (rootfs / leftover).write_text("")
    (rootfs / "etc" / "fstab").write_text("")
    (rootfs / "etc" / "locale.gen").write_text(f"{LOCALE} UTF-8\n")
    _run("chroot", str(rootfs), "locale-gen")
    (rootfs / "etc" / "default" / "locale").write_text(f"LANG={LOCALE}\n")
    for key in (rootfs / "etc" / "ssh").glob("ssh_host_*"):
        key.unlink()  # cloud-init makes each instance its own
    for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for entry in (rootfs / cache).glob("*"):
            if entry.is_file():
                entry.unlink()
    for entry in (rootfs / "var" / "cache" / "apt").glob("*.bin"):
        entry.unlink()


def extract_vmlinux(vmlinuz: Path, dest: Path) -> None:
    """The uncompressed ELF inside Debian's XZ bzImage (PVH direct boot needs no decompression)."""
    data = vmlinuz.read_bytes()
    offset = data.find(b"\xfd7zXZ\x00")
    elf = lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data[offset:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError(f"{vmlinuz}: no XZ-compressed ELF kernel inside")
    dest.write_bytes(elf)


def build_initramfs(moddir: Path, dest: Path, root: Path, modules: Sequence[str], init: str) -> None:
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
        input="\n".join(names).encode(), cwd=root, capture_output=True, check=True,
    ).stdout
    dest.write_bytes(gzip.compress(archive, compresslevel=1))


def kernel_package(debs: Path) -> Path:
    """The newest Debian kernel package file in ``debs``, downloaded there when there is none."""
    found = sorted(debs.glob("linux-image-*-amd64_*.deb"))
    if found:
        return found[-1]
    depends = [line.split() for line in _run("apt-cache", "depends", "linux-image-amd64").stdout.splitlines()]
    package = next((words[1] for words in depends if words[:1] == ["Depends:"] and len(words) == 2), None)
    if package is None:
        raise BuildError("apt knows no linux-image-amd64: run apt-get update")
    debs.mkdir(parents=True, exist_ok=True)
    _run("apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package, cwd=debs)
    return sorted(debs.glob("linux-image-*-amd64_*.deb"))[-1]


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


class BuildError(Exception):
    """A step of the build failed; the message says which and why."""


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        raise BuildError(f"{' '.join(argv)} failed (exit {result.returncode}): {result.stderr.strip()[-1500:]}")
    return result


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="build-image.sh",
        description="Build (or find in the cache) Kumo's Debian 12 image with cloud-init: a rootfs "
                    "tarball for lxc and a disk with its kernel and initramfs for kvm. Prints the "
                    "image's manifest (JSON) on stdout.")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="where images are built and kept (default: %(default)s, or $KUMO_IMAGE_CACHE)")
    parser.add_argument("--kernel-deb", type=Path,
                        help="the Debian kernel package the VM boots (default: the newest in CACHE/debs, "
                             "downloaded with apt-get when there is none)")
    parser.add_argument("--mirror", default=MIRROR, help="the Debian mirror (default: %(default)s)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        parser.error("run as root: debootstrap and the tarball's owners need it")
    missing = [tool for tool in ("debootstrap", "dpkg-deb", "mkfs.ext4", "qemu-img", "cpio", "depmod")
               if shutil.which(tool) is None]
    if missing or not BUSYBOX.exists():
        parser.error(f"missing {', '.join(missing) or BUSYBOX}: run `make deps` (scripts/deps/10-libvirt.sh)")
    if args.kernel_deb is not None and not args.kernel_deb.is_file():
        parser.error(f"--kernel-deb {args.kernel_deb}: no such file")
    try:
        manifest = build(args.cache, args.kernel_deb or kernel_package(args.cache / "debs"), args.mirror)
    except BuildError as exc:
        print(f"build-image: {exc}", file=sys.stderr)
        return 1
    json.dump(manifest, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
