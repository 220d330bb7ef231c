#!/usr/bin/env bash
# Room in the pid space for CRIU's restores, as a Debian host with systemd has.
#
# CRIU restores a process instance under the pids it had, so they must still be free when
# it runs. The kernel's default pid_max on a small machine is 32768, and a busy node (the
# test suite on two cores) goes round that in minutes: now and then a new process took a
# dumped instance's pid in the second between its dump and its restore elsewhere ("Can't
# fork for N: File exists"). systemd raises pid_max to 4194304 at boot; these machines do
# not boot systemd, so this does what it would.
set -euo pipefail

WANTED=4194304
if [ "$(cat /proc/sys/kernel/pid_max)" -lt "$WANTED" ]; then
    echo "$WANTED" >/proc/sys/kernel/pid_max
fi
