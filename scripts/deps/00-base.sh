#!/usr/bin/env bash
# What every part of Kumo needs to build and run: Debian's Python with venv and headers,
# and libvirt's headers so the libvirt-python binding builds from PyPI. iptables: the tests
# cut an agent off from its controller with it (tests/harness/partition.py), and fence the VM
# migration tests' second host in its network namespace (tests/harness/libvirt.py).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install python3 python3-venv python3-dev gcc pkg-config libvirt-dev openssl iproute2 iptables procps curl
