#!/usr/bin/env bash
# The web interface's browser tests: Debian's Chromium and its WebDriver, driven headless by
# selenium (python3-selenium, installed by 05-debian-python.sh; selenium from PyPI in .venv).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install chromium chromium-driver

for tool in chromium chromedriver; do
    command -v "$tool" >/dev/null || { echo "80-chromium: $tool is missing after installing it" >&2; exit 1; }
done
echo "80-chromium: $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
