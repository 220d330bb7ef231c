#!/usr/bin/env bash
# Install and prepare everything Kumo and its tests drive on this machine (Debian 12, root).
# Each scripts/deps/NN-component.sh is idempotent; they run in name order.
set -euo pipefail
if [ "$(id -u)" != 0 ]; then
    echo "install-deps: run as root (it installs Debian packages)" >&2
    exit 1
fi
for script in "$(dirname "$0")"/deps/[0-9]*.sh; do
    echo "== $(basename "$script")"
    bash "$script"
done
