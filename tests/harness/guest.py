"""A tiny real guest for the kvm plugin's tests: Debian's kernel and a busybox initramfs.

The initramfs's /init finds the NoCloud seed by its label (``findfs LABEL=cidata``), prints
the instance-id and the first line of user-data on the serial console, then powers off.
With ``kumo.hold`` on the kernel command line it stays up instead, until an ACPI power
button press (what ``virDomainShutdown`` sends), so stop and adoption can be tested; with
``kumo.count`` as well it prints ``GUEST-COUNT n`` (n = 1, 2, ...) five times a second, so a
checkpoint and restore can be seen to continue the count; with ``kumo.fill=MiB`` it fills
that much memory and keeps writing to it (``GUEST-FILLED`` once full).

Built once per recipe under ``CACHE_DIR/guest/<hash>`` from the kernel package that
``scripts/deps/10-libvirt.sh`` downloads (nothing is installed into /boot or /lib/modules).
The kernel is booted as the uncompressed PVH ELF: in-guest XZ decompression under TCG
costs seconds per boot.

The real Debian 12 image with cloud-init (both forms) is the project's own, built by
``scripts/build-image.sh`` once per recipe under ``CACHE_DIR/images``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from scripts import build_image
from scripts.build_image import BUSYBOX, build_initramfs, extract_vmlinux
from tests.harness import CACHE_DIR, REPO

DEBS = CACHE_DIR / "debs"
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
  # With kumo.fill=MiB it fills that much of its memory (its root is RAM) and keeps
  # rewriting 16 MiB of it: the memory-writing workload of the VM migration benchmark.
  fill=$(sed -En 's/.*kumo[.]fill=([0-9]+).*/\\1/p' /proc/cmdline)
  if [ -n "$fill" ]; then
    yes kumo | head -c $((fill * 1048576)) > /fill
    echo GUEST-FILLED
    ( while true; do head -c 16777216 /fill > /dirty; done ) &
  fi
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
        extract_vmlinux(vmlinuz, guest.kernel)
        build_initramfs(root / "lib" / "modules" / release, guest.initrd, Path(tmp) / "initramfs", MODULES, INIT)
    subprocess.run(  # noqa: S603 - an argv list, never a shell
        ["qemu-img", "create", "-q", "-f", "qcow2", str(guest.disk), "16M"], check=True
    )
    for path in (out, guest.kernel, guest.initrd, guest.disk):
        # qemu runs as libvirt-qemu: it must read these.
        path.chmod(0o755 if path.is_dir() else 0o644)
    (out / "done").touch()
    return guest


@pytest.fixture(scope="session")
def kvm_guest() -> Guest:
    """The busybox test guest; requires the kernel package from ``make deps``."""
    from tests.harness import require

    deb = kernel_package()
    require(deb is not None, f"a Debian kernel package in {DEBS} (scripts/deps/10-libvirt.sh)")
    require(BUSYBOX.exists(), "busybox-static (scripts/deps/10-libvirt.sh)")
    require(shutil.which("qemu-img") is not None, "qemu-img (qemu-utils)")
    return build_guest(deb)


# ---- the real Debian image with cloud-init (for the slow tests) --------------------------


@dataclasses.dataclass(frozen=True)
class DebianImage:
    """The two forms of ``scripts/build-image.sh``'s image: a rootfs tarball and a bootable disk."""

    rootfs: Path
    rootfs_sha256: str
    vm: Guest


_background_build: subprocess.Popen[bytes] | None = None


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the Debian image now, at the lowest CPU priority, when a collected test
    needs it: the first build is a CPU-minute and a half of debootstrap, which would
    otherwise hold up the first such test. ``debian_image`` (and the demo's own
    build-image.sh) wait on the build's lock and find it done; if this build fails, the
    fixture's own attempt reports why."""
    global _background_build
    if session.config.option.collectonly:
        return
    deb = kernel_package()
    if deb is None or os.geteuid() != 0 or shutil.which("debootstrap") is None:
        return  # the fixture says what is missing
    if any("debian_image" in getattr(item, "fixturenames", ()) for item in session.items):
        _background_build = subprocess.Popen(  # noqa: S603 - fixed argument list
            ["nice", "-n", "19", str(REPO / "scripts" / "build-image.sh"),  # noqa: S607
             "--cache", str(CACHE_DIR / "images"), "--kernel-deb", str(deb)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )


def pytest_sessionfinish() -> None:
    # Never leave the build running after the run; ^C reaches it too (one process group), so
    # an interrupted run does not wait for it.
    if _background_build is not None:
        _background_build.wait()


@pytest.fixture(scope="session")
def debian_image() -> DebianImage:
    """Kumo's Debian 12 image; built on first use (a minute or two: debootstrap), then cached."""
    from tests.harness import require

    deb = kernel_package()
    require(deb is not None, f"a Debian kernel package in {DEBS} (scripts/deps/10-libvirt.sh)")
    for tool in ("debootstrap", "mkfs.ext4", "qemu-img", "chroot"):
        require(shutil.which(tool) is not None, f"{tool} (scripts/deps/10-libvirt.sh)")
    manifest = build_image.build(CACHE_DIR / "images", deb)
    vm = Guest(Path(manifest["kernel"]["path"]), Path(manifest["initrd"]["path"]), Path(manifest["disk"]["path"]),
               cmdline=manifest["cmdline"])
    return DebianImage(Path(manifest["rootfs"]["path"]), manifest["rootfs"]["sha256"], vm)


@dataclasses.dataclass(frozen=True)
class DebianSeed:
    """One cloud-config for both forms of the Debian image: a hostname unlike the instance's
    name, a user with an ssh key, and a runcmd that reports what the guest looks like to
    ``REPORT`` (and to the serial console, where there is one) once the user exists."""

    hostname: str
    user: str = "kumo-user"
    key: str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKumoKumoKumoKumoKumoKumoKumoKumoKumoKumoKu kumo@test"
    REPORT = "var/tmp/kumo-runcmd"

    def user_data(self) -> str:
        report = (f"echo KUMO-SEED host=$(hostname) user=$(getent passwd {self.user} | cut -d: -f1,6)"
                  f" key=$(cat /home/{self.user}/.ssh/authorized_keys) > /{self.REPORT};"
                  f" if [ -c /dev/ttyS0 ]; then cat /{self.REPORT} > /dev/ttyS0; fi")
        return (
            "#cloud-config\n"
            f"hostname: {self.hostname}\n"
            "users:\n"
            f"  - name: {self.user}\n"
            "    shell: /bin/bash\n"
            f"    ssh_authorized_keys: ['{self.key}']\n"
            "runcmd:\n"
            f"  - [sh, -c, '{report}']\n"
        )

    def report(self) -> str:
        """The line the runcmd writes when cloud-init applied the whole seed."""
        return f"KUMO-SEED host={self.hostname} user={self.user}:/home/{self.user} key={self.key}"
