#!/usr/bin/env bash
# The lxc plugin and its tests: liblxc 5 and its tools (the busybox template ships with the
# lxc package), busybox-static (what the busybox template copies into a root filesystem and
# the host-side ping of the tests), iproute2 (bridges and veths), tar and xz-utils (root
# filesystem tarballs). No lxc-net or systemd unit is needed: the plugin passes every
# container an explicit config and creates its own bridge.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install lxc busybox-static iproute2 tar xz-utils

for tool in lxc-create lxc-start lxc-stop lxc-ls lxc-info lxc-destroy lxc-attach lxc-cgroup; do
    command -v "$tool" >/dev/null || { echo "20-lxc: $tool is missing after installing lxc" >&2; exit 1; }
done
[ -f /usr/share/lxc/templates/lxc-busybox ] || {
    echo "20-lxc: /usr/share/lxc/templates/lxc-busybox is missing: reinstall the lxc package" >&2
    exit 1
}
# The veth and bridge drivers are modules on stock Debian kernels (built in elsewhere).
for module in veth bridge; do
    [ -d "/sys/module/$module" ] || modprobe "$module" 2>/dev/null || true
done
echo "20-lxc: liblxc $(lxc-ls --version) ready"
