#!/usr/bin/env bash
# PostgreSQL 15, for controllers that share one database, and Debian's asyncpg (the driver
# the kumo-controller .deb depends on). Installing the server starts nothing where PID 1 is
# not systemd; the tests run private clusters of their own (tests/harness/postgres.py).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install postgresql-15 python3-asyncpg
echo "70-postgresql: $(/usr/lib/postgresql/15/bin/postgres --version)"
