#!/usr/bin/env bash
# The monitoring tests: Debian's Prometheus server (the tests start private instances on
# 127.0.0.1; the packaged daemon is not started, there is no systemd here) and
# node_exporter, the baseline of bench/bench_monitoring.py.
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install prometheus prometheus-node-exporter
command -v prometheus >/dev/null || { echo "50-prometheus: prometheus is missing after installing it" >&2; exit 1; }
echo "50-prometheus: $(prometheus --version 2>&1 | head -1)"
