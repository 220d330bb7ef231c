#!/usr/bin/env bash
# The kvm and cloudinit plugins and their tests: libvirtd (monolithic, started by hand: no
# systemd here), QEMU (TCG works where KVM faults), qemu-img for overlays, genisoimage for
# NoCloud seeds, and what the test guests are built from (a Debian kernel package and
# busybox-static for the initramfs; debootstrap for scripts/build-image.sh's Debian image).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install qemu-system-x86 qemu-utils busybox-static genisoimage cpio kmod \
    libvirt-daemon-system libvirt-clients python3-libvirt debootstrap

# The test guest boots Debian's own kernel. Only the package file is fetched (no install:
# nothing lands in /boot or /lib/modules); tests/harness/guest.py unpacks it.
CACHE=${KUMO_TEST_CACHE:-/var/cache/kumo-test}
mkdir -p "$CACHE/debs"
pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
if [ -z "$pkg" ]; then
    apt_retry apt-get update -q
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
fi
if ! ls "$CACHE/debs/${pkg}_"*.deb >/dev/null 2>&1; then
    (cd "$CACHE/debs" && apt_retry apt-get download "$pkg")
fi

# udev is not running here, so /dev/kvm keeps the kernel's 0600 root:root instead of udev's
# kvm group 0660. libvirt then sees KVM "vanish" for the qemu user after every capability
# probe and re-probes QEMU on each API call (5-7 s each); give it udev's permissions.
if [ -c /dev/kvm ] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi

# libvirtd needs virtlogd for the qemu driver's logs; neither has an init here.
pgrep -x virtlogd >/dev/null || virtlogd -d
pgrep -x libvirtd >/dev/null || libvirtd -d
