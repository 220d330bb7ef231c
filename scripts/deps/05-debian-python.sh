#!/usr/bin/env bash
# Debian 12's own Python libraries: the .debs depend on them, and `make test-debian` runs the
# suite against them (pluggy 1.0, aiohttp 3.8.4, cryptography 38, psutil 5.9.4,
# prometheus-client 0.16, pyyaml 6.0, libvirt-python 9.0, jsonschema 4.10), and the test tools (hypothesis fuzzes the API, selenium drives Chromium for the web interface).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install python3-aiohttp python3-pluggy python3-libvirt python3-psutil \
    python3-prometheus-client python3-yaml python3-cryptography python3-jsonschema python3-wheel \
    python3-pytest python3-pytest-aiohttp python3-pytest-asyncio python3-pytest-timeout \
    python3-hypothesis python3-selenium
