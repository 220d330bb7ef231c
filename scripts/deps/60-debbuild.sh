#!/usr/bin/env bash
# What `make deb` (and the packaging test) needs to build Kumo's .debs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
    python3-build python3-installer fakeroot dpkg-dev
# The packaging test installs the .debs with apt: their python3-* dependencies come from
# 05-debian-python.sh, and systemd here (sysusers creates kumo-controller; systemd-analyze
# checks the units), so that install needs no mirror that may be failing at that moment.
apt_install systemd
