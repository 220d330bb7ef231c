#!/usr/bin/env bash
# The monitoring tests: Debian's Prometheus server (the tests start private instances on
# 127.0.0.1 with their own config and storage) and node_exporter, the baseline of
# bench/bench_monitoring.py. Neither packaged daemon is wanted: on a machine whose init
# would start them, a policy-rc.d refuses it for the length of the install.
set -euo pipefail
. "$(dirname "$0")/lib.sh"

policy=/usr/sbin/policy-rc.d
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\n# 50-prometheus.sh: no service starts while it installs\nexit 101\n' > "$policy"
    chmod 755 "$policy"
    trap 'rm -f "$policy"' EXIT
fi
apt_install prometheus prometheus-node-exporter

for tool in prometheus promtool prometheus-node-exporter; do
    command -v "$tool" >/dev/null || { echo "50-prometheus: $tool is missing after installing it" >&2; exit 1; }
done
echo "50-prometheus: $(prometheus --version 2>&1 | head -1); $(prometheus-node-exporter --version 2>&1 | head -1)"
