#!/usr/bin/env bash
# The rsyslog plugin and its tests: rsyslogd with RELP (omrelp/imrelp) and GnuTLS (gtls, used
# by both omfwd/imtcp and librelp), and util-linux's logger. The tests start private rsyslogd
# processes on 127.0.0.1; the system's own rsyslog is neither needed nor touched (installing
# the package starts nothing where PID 1 is not systemd).
set -euo pipefail
. "$(dirname "$0")/lib.sh"
apt_install rsyslog rsyslog-relp rsyslog-gnutls bsdutils
modules=$(dirname "$(dpkg -L rsyslog | grep '/impstats\.so$')")
for module in omrelp imrelp lmnsd_gtls impstats; do
    [ -e "$modules/$module.so" ] || { echo "40-rsyslog: $modules/$module.so is missing after installing rsyslog" >&2; exit 1; }
done
echo "40-rsyslog: $(rsyslogd -v | head -1)"
