#!/bin/sh
# Kumo's Debian 12 image with cloud-init (rootfs tarball for lxc, disk for kvm): see
# scripts/build_image.py, or run with --help.
exec /usr/bin/python3 "$(dirname "$0")/build_image.py" "$@"
