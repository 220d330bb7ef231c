#!/usr/bin/env bash
# What every part of Kumo needs to build and run: Debian's Python with venv and headers,
# and libvirt's headers so the libvirt-python binding builds from PyPI.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install python3 python3-venv python3-dev gcc pkg-config libvirt-dev openssl iproute2 procps curl
