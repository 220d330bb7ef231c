#!/usr/bin/env bash
# What `make deb` (and the packaging test) needs to build Kumo's .debs.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install debhelper dh-python python3-all python3-setuptools pybuild-plugin-pyproject \
    python3-build python3-installer fakeroot dpkg-dev
