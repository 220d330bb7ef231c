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

# axe-core (MPL-2.0), the accessibility engine the browser tests run on every page. A test
# tool from the npm registry, installed with the machine's npm into the test cache; it is
# never part of the pages or the packages.
AXE_VERSION=4.14.1
AXE_DIR=${KUMO_TEST_CACHE:-/var/cache/kumo-test}/axe-core-$AXE_VERSION
if [ ! -f "$AXE_DIR/node_modules/axe-core/axe.min.js" ]; then
    command -v npm >/dev/null || apt_install npm
    apt_retry npm install --silent --no-audit --no-fund --prefix "$AXE_DIR" "axe-core@$AXE_VERSION"
fi
echo "80-chromium: axe-core $AXE_VERSION in $AXE_DIR"
