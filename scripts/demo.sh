#!/usr/bin/env bash
# `make demo`: a Kumo controller and two enrolled agents (nodes "agent" and "agent2", each
# with its own state) on this machine, state in ./demo-state/. The second node is there so
# that the README's migration and drain run on one machine; it has a libvirtd of its own, as
# another host would (a VM keeps its name when it moves, and one libvirtd holds a name once).
# `scripts/demo.sh stop` (`make demo-stop`) stops them all. The state is kept, so running the
# demo again restarts the same controller (same CA, same kumoctl credentials) and the same nodes.
#
# KUMO_DEMO_STATE, KUMO_DEMO_LISTEN, KUMO_DEMO_UI_LISTEN (the web interface), KUMO_DEMO_METRICS (the first agent's; the second uses the
# next port), KUMO_DEMO_LXCPATH, KUMO_DEMO_VMDIR (where the nodes keep their VMs and image caches)
# and KUMO_DEMO_BIN move it, e.g. for tests/test_demo.py.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
STATE=${KUMO_DEMO_STATE:-$ROOT/demo-state}
BIN=${KUMO_DEMO_BIN:-$ROOT/.venv/bin}
CTL_DIR=$STATE/controller
LISTEN=${KUMO_DEMO_LISTEN:-127.0.0.1:8443}
UI_LISTEN=${KUMO_DEMO_UI_LISTEN:-127.0.0.1:8445}
METRICS_LISTEN=${KUMO_DEMO_METRICS:-127.0.0.1:9464}
LXCPATH=${KUMO_DEMO_LXCPATH:-/var/lib/kumo-lxc}
VMDIR=${KUMO_DEMO_VMDIR:-/var/lib/libvirt/images}
AGENTS=(agent agent2)
# The second node's libvirtd: its state, config, logs and sockets under here.
LIBVIRTD2=$STATE/libvirtd2
LIBVIRTD2_URI="qemu+unix:///system?socket=$LIBVIRTD2/run/libvirt-sock"
export KUMOCTL_CONFIG=$CTL_DIR/kumoctl.yaml

say() { printf '\n== %s\n' "$*"; }
die() { printf 'demo: %s\n' "$*" >&2; exit 1; }

# pid_alive PID: running and not a zombie (PID 1 here may reap late).
pid_alive() {
    [ -d "/proc/$1" ] && ! grep -q '^State:.*Z' "/proc/$1/status" 2>/dev/null
}

daemon_alive() {
    pid_alive "$(cat "$STATE/$1.pid")"
}

# The program a daemon of the demo runs: agent2 is a second kumo-agent.
program() {
    case $1 in controller) echo kumo-controller ;; *) echo kumo-agent ;; esac
}

# What the command line of daemon NAME contains: stop_daemon signals only a process that has it.
signature() {
    case $1 in libvirtd2) echo "libvirtd --pid-file $LIBVIRTD2/" ;; *) echo "$(program "$1") run" ;; esac
}

# stop_daemon NAME: stop the process recorded in demo-state/NAME.pid, if it is still ours.
stop_daemon() {
    local name=$1 pidfile=$STATE/$1.pid pid i
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    # The pid may have been reused since: only signal a process running our command.
    if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' <"/proc/$pid/cmdline" | grep -qF "$(signature "$name")"; then
        kill -TERM "$pid"
        for i in $(seq 1 50); do
            pid_alive "$pid" || break
            sleep 0.2
        done
        if pid_alive "$pid"; then
            echo "demo: $name ($pid) ignored SIGTERM for 10 s; killing it" >&2
            kill -KILL "$pid"
        fi
        echo "stopped $name ($pid)"
    fi
    rm -f "$pidfile"
}

# start_daemon NAME ARG...: run NAME's program in its own session, output to demo-state/NAME.log.
start_daemon() {
    local name=$1
    shift
    setsid "$BIN/$(program "$name")" "$@" </dev/null >>"$STATE/$name.log" 2>&1 &
    echo $! >"$STATE/$name.pid"
    echo "started $name ($!), log: $STATE/$name.log"
}

start_controller() {
    say "controller on https://$LISTEN"
    if [ ! -f "$CTL_DIR/controller.yaml" ]; then
        "$BIN/kumo-controller" init --dir "$CTL_DIR" --listen "$LISTEN" --san 127.0.0.1 --san localhost
        # Both demo nodes are this one machine: one busy measurement would be both nodes'
        # and refuse every placement, so measured CPU only ranks them here.
        echo "placement_cpu_busy_max: 1.0" >>"$CTL_DIR/controller.yaml"
        # The README's rebalancing tour: a node is busy after 30 s over 30% (its instances'
        # share of its CPUs), and a move leaves its destination below 25%.
        echo "rebalance: {interval: 5, window: 30, cpu_high: 0.3, margin: 0.05}" >>"$CTL_DIR/controller.yaml"
    fi
    # The web interface, on this machine only (a demo from before it had none gets it too).
    grep -q '^ui_listen:' "$CTL_DIR/controller.yaml" || echo "ui_listen: $UI_LISTEN" >>"$CTL_DIR/controller.yaml"
    start_daemon controller run --config "$CTL_DIR/controller.yaml"
    local i
    for i in $(seq 1 100); do
        "$BIN/kumoctl" nodes list >/dev/null 2>&1 && return 0
        daemon_alive controller || die "the controller exited; see $STATE/controller.log"
        sleep 0.2
    done
    die "the controller did not answer within 20 s; see $STATE/controller.log"
}

# node_id AGENT: the node id it joined as, or nothing before the first join.
node_id() {
    [ -f "$STATE/$1/join.json" ] || return 0
    "$BIN/python" -c 'import json, sys; print(json.load(open(sys.argv[1]))["node_id"])' "$STATE/$1/join.json"
}

node_field() {
    "$BIN/kumoctl" nodes show "$1" --output json 2>/dev/null |
        "$BIN/python" -c 'import json, sys; print(json.load(sys.stdin).get(sys.argv[1], ""))' "$2" || true
}

# enroll_agent AGENT: join it unless it is still a node of this controller.
enroll_agent() {
    local agent=$1 node join
    say "$agent"
    node=$(node_id "$agent")
    # A node removed with `kumoctl nodes remove` (or a fresh controller) needs a new join.
    if [ -n "$node" ] && [ "$(node_field "$node" state)" != "" ] && [ "$(node_field "$node" state)" != removed ]; then
        echo "reusing node $node (identity in $STATE/$agent)"
        return 0
    fi
    join=$("$BIN/kumoctl" token create --ttl 10m 2>/dev/null)
    "$BIN/kumo-agent" join --controller "https://$LISTEN" --token "$join" --state-dir "$STATE/$agent" --force
}

# write_agent_config AGENT INDEX: the first agent owns this machine's lxcpath, libvirtd and
# rsyslog; the second keeps its own of the first two, and an rsyslog.d of its own that rsyslog
# does not read (two nodes must not both rewrite one rsyslog). Each keeps its VMs and its image
# cache (the VMs' base images among the catalogue images it pulls) in directories of its own
# under $VMDIR, where qemu can read them (it could not inside demo-state/, which is 0700).
write_agent_config() {
    local host=${METRICS_LISTEN%:*} port=${METRICS_LISTEN##*:}
    # Written through PyYAML so the paths are quoted whatever directory the checkout is in.
    "$BIN/python" - "$STATE/$1" "https://$LISTEN" "$host:$((port + $2))" "$LXCPATH" "$2" "$LIBVIRTD2_URI" "$VMDIR" <<'PY'
import sys, yaml
state_dir, controller, metrics, lxcpath, index, libvirt_uri, vmdir = sys.argv[1:]
vms = f"{vmdir}/kumo" if index == "0" else f"{vmdir}/kumo-{int(index) + 1}"
# Containers get a bridge of their own with a static address each. The tour migrates the
# busybox container with its address, which CRIU restores only for a privileged container
# here: the demo's nodes allow one, asked for by name (containers are unprivileged otherwise).
plugins = {"lxc": {"lxcpath": lxcpath, "bridge": {"name": "kumodemo0", "address": "10.77.0.1/24"},
                   "network": {"mode": "veth", "bridge": "kumodemo0"}, "allow_privileged": True},
           "kvm": {"instance_dir": vms}}
if index != "0":
    plugins["lxc"]["lxcpath"] = f"{lxcpath}-{int(index) + 1}"
    plugins["kvm"]["uri"] = libvirt_uri
    plugins["rsyslog"] = {"config_dir": f"{state_dir}-rsyslog.d"}
config = {
    "state_dir": state_dir,
    "controller": controller,
    "metrics": {"listen": metrics},
    "image_cache": {"path": f"{vms}-images"},
    "log_level": "info",
    "plugins": plugins,
}
with open(f"{state_dir}.yaml", "w") as f:
    f.write("# Written by scripts/demo.sh; rewritten at every `make demo`.\n")
    yaml.safe_dump(config, f, sort_keys=False)
PY
}

wait_until_ready() {
    local agent=$1 node i
    node=$(node_id "$agent")
    for i in $(seq 1 150); do
        [ "$(node_field "$node" state)" = ready ] && { echo "node $node ($agent) is ready"; return 0; }
        daemon_alive "$agent" || die "$agent exited; see $STATE/$agent.log"
        sleep 0.2
    done
    die "node $node did not become ready within 30 s; see $STATE/$agent.log"
}

# What the node can run, and two real instances: a host process (the process plugin) that
# prints the time, and a busybox container (the lxc plugin) on the demo bridge. Neither needs
# an image download.
show_workloads() {
    say "what the node can run"
    "$BIN/kumoctl" nodes show "$(node_id agent)" | sed -n '/^plugins:/,/^$/p'
    if "$BIN/kumoctl" instances show demo-clock >/dev/null 2>&1; then
        echo "instance demo-clock exists (from an earlier demo)"
    else
        say "a first instance: a process"
        "$BIN/kumoctl" instances create demo-clock --kind process --vcpus 1 --memory 32 --node "$(node_id agent)" \
            --option 'command=["/bin/sh", "-c", "i=0; while :; do i=$((i+1)); echo \"$i $(date +%T)\"; sleep 2; done"]'
    fi
    if "$BIN/kumoctl" instances show demo-box >/dev/null 2>&1; then
        echo "instance demo-box exists (from an earlier demo)"
    else
        say "a container beside it"
        "$BIN/kumoctl" instances create demo-box --kind lxc --vcpus 1 --memory 64 --node "$(node_id agent)" \
            --option template=busybox --option 'network={"mode": "veth", "address": "10.77.0.10/24"}' \
            --option privileged=true
    fi
    "$BIN/kumoctl" instances list
    echo
    echo "the process's console (kumoctl instances console demo-clock):"
    "$BIN/kumoctl" instances console demo-clock | tail -n 3
    echo "the container's own view of its network (lxc-attach):"
    lxc-attach -P "$LXCPATH" -n demo-box -- ip -4 -o addr show eth0 | awk '{print "  " $2, $4}'
}

# manifest FIELD: a path of the Debian image's manifest (see show_image).
manifest() {
    python3 -c 'import json, sys; print(json.load(sys.stdin)[sys.argv[1]]["path"])' "$1" <<<"$MANIFEST"
}

# Kumo's Debian 12 image (scripts/build-image.sh, built once and cached: later runs print the
# same manifest at once), imported into the controller's catalogue in both forms under one name.
show_image() {
    MANIFEST=$("$ROOT/scripts/build-image.sh") || die "building the Debian image failed (see above)"
    if ! "$BIN/kumoctl" images show debian-12 >/dev/null 2>&1; then
        say "the Debian 12 image into the catalogue"
        "$BIN/kumoctl" images import "$(manifest rootfs)" --name debian-12 --kind lxc \
            --description "Debian 12 with systemd and cloud-init (rootfs)"
        "$BIN/kumoctl" images import "$(manifest disk)" --name debian-12 --kind kvm \
            --description "Debian 12 with systemd and cloud-init (disk; boots with the image's kernel)"
    fi
    "$BIN/kumoctl" images list
}

# The demo's VM: a small guest, Debian's kernel (the image's) and a busybox initramfs whose
# init counts on the serial console, booting in seconds under TCG, with an empty disk of 16
# MiB as its base image (the image's full systemd and cloud-init take over a minute to boot
# under TCG; the README shows that VM). Built once into $VMDIR/kumo-guest, where qemu reads it.
build_guest() {
    GUEST=$VMDIR/kumo-guest
    [ -f "$GUEST/disk.qcow2" ] && return 0
    mkdir -p "$GUEST"
    chmod 0755 "$GUEST"
    (cd "$ROOT" && "$BIN/python" - "$GUEST/initramfs.cpio.gz") <<'PY'
import sys, tempfile
from pathlib import Path
from scripts.build_image import build_initramfs
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t devtmpfs dev /dev
hostname demo-vm
i=0; while :; do i=$((i+1)); echo "demo-vm count $i"; sleep 2; done
"""
with tempfile.TemporaryDirectory() as tmp:  # no kernel modules: the serial console is built in
    build_initramfs(Path(tmp), Path(sys.argv[1]), Path(tmp) / "root", [], INIT)
PY
    qemu-img create -q -f qcow2 "$GUEST/disk.tmp" 16M
    chmod 0644 "$GUEST/initramfs.cpio.gz" "$GUEST/disk.tmp"
    mv "$GUEST/disk.tmp" "$GUEST/disk.qcow2"
}

start_vm() {
    if "$BIN/kumoctl" instances show demo-vm >/dev/null 2>&1; then
        echo "instance demo-vm exists (from an earlier demo)"
        return 0
    fi
    say "a VM: Debian's kernel and a busybox initramfs that counts on its serial console"
    build_guest
    "$BIN/kumoctl" instances create demo-vm --kind kvm --vcpus 1 --memory 128 --node "$(node_id agent)" \
        --image "$GUEST/disk.qcow2" --image-sha256 "$(sha256sum <"$GUEST/disk.qcow2" | cut -d' ' -f1)" \
        --option "kernel=$(manifest kernel)" --option "initrd=$GUEST/initramfs.cpio.gz" \
        --option "cmdline=console=ttyS0 panic=-1 quiet"
}

# The VM's console, once it counts there.
show_vm() {
    say "the VM's serial console (kumoctl instances console demo-vm)"
    local i console
    for i in $(seq 1 60); do
        console=$("$BIN/kumoctl" instances console demo-vm 2>/dev/null) || true
        grep -q '^demo-vm count' <<<"$console" && break
        sleep 1
    done
    tail -n 3 <<<"$console"
}

# A real distribution in a container, made by name from the catalogue's Debian image: its own
# systemd boots and the real cloud-init inside applies the seed: the hostname, a runcmd, the
# network-config's static address.
show_debian() {
    if "$BIN/kumoctl" instances show demo-debian >/dev/null 2>&1; then
        echo "instance demo-debian exists (from an earlier demo)"
        return 0
    fi
    say "a Debian container from the catalogue, set up by cloud-init"
    printf '%s\n' '#cloud-config' 'hostname: demo-debian' 'runcmd:' \
        "  - [sh, -c, 'echo cloud-init ran on \$(hostname) > /run/kumo-demo']" >"$STATE/demo-debian.user-data"
    printf '%s\n' 'version: 2' 'ethernets:' '  eth0:' '    addresses: [10.77.0.20/24]' \
        '    gateway4: 10.77.0.1' >"$STATE/demo-debian.network-config"
    "$BIN/kumoctl" instances create demo-debian --kind lxc --image debian-12 --vcpus 1 --memory 256 \
        --node "$(node_id agent)" --user-data "$STATE/demo-debian.user-data" \
        --network-config "$STATE/demo-debian.network-config" --option 'network={"mode": "veth"}'
    # cloud-init's last stage runs the runcmd, after the hostname and the network.
    local i
    for i in $(seq 1 120); do
        lxc-attach -P "$LXCPATH" -n demo-debian -- cat /run/kumo-demo 2>/dev/null && break
        sleep 1
    done
    echo "inside demo-debian (lxc-attach): init $(lxc-attach -P "$LXCPATH" -n demo-debian -- cat /proc/1/comm)," \
        "hostname $(lxc-attach -P "$LXCPATH" -n demo-debian -- hostname)"
    lxc-attach -P "$LXCPATH" -n demo-debian -- ip -4 -o addr show eth0 | awk '{print "  " $2, $4}'
}

show_usage() {
    say "nodes"
    "$BIN/kumoctl" nodes list
    cat <<EOF

Kumo is running: controller log $STATE/controller.log, agent logs $STATE/agent.log and
$STATE/agent2.log, agent metrics on http://$METRICS_LISTEN/metrics.

Use kumoctl against it:
    export KUMOCTL_CONFIG=$KUMOCTL_CONFIG
    export PATH=$BIN:\$PATH
    kumoctl nodes list
    kumoctl nodes show $(node_id agent)
    kumoctl nodes drain $(node_id agent)       # moves its VM, containers and process to $(node_id agent2)
    kumoctl instances console demo-vm
    kumoctl token create --ttl 30m      # to join another node
    kumoctl instances console demo-clock
    kumoctl instances show demo-box
    kumoctl instances stop demo-clock
    kumoctl instances create --help
    kumoctl ui                          # another sign-in link to the web interface

The web interface: open this single-use link (for 5 minutes) in a browser on this machine:
    $("$BIN/kumoctl" ui --no-open 2>/dev/null)

Stop it:  make demo-stop   (state stays in $STATE; remove that directory to start afresh)
EOF
}

stop_all() {
    local agent
    for agent in "${AGENTS[@]}"; do
        stop_daemon "$agent"
    done
    stop_daemon controller
}

# `make demo-stop`: the demo's instances run outside the agent (instances outlive agent
# restarts), so delete them while the agent is still there to do it, then stop both daemons.
teardown() {
    local name
    if [ -f "$STATE/agent.pid" ] && daemon_alive agent && [ -f "$STATE/agent2.pid" ] && daemon_alive agent2; then
        for name in demo-vm demo-clock demo-box demo-debian; do
            "$BIN/kumoctl" instances show "$name" >/dev/null 2>&1 || continue
            "$BIN/kumoctl" instances delete "$name" --timeout 60s ||
                echo "demo: could not delete $name; stopping anyway" >&2
        done
    fi
    stop_all
    stop_second_libvirtd
}

# These machines have no init system to start libvirtd and virtlogd: start them, so the kvm
# plugin is available.
start_libvirtd() {
    command -v libvirtd >/dev/null || return 0
    pgrep -x virtlogd >/dev/null || virtlogd -d
    pgrep -x libvirtd >/dev/null || libvirtd -d
}

# The second node's libvirtd, as another host's: in a mount namespace of its own where
# libvirt's run, config, state, cache and log directories are those under $LIBVIRTD2, so its
# domains and sockets are its own (the instance images stay in the shared /var/lib/libvirt/
# images, under the second agent's directory). It writes qemu's output to files itself, with
# no virtlogd. Like the first, it keeps running across `make demo`s, and its VMs with it.
start_second_libvirtd() {
    command -v libvirtd >/dev/null || return 0
    virsh -c "$LIBVIRTD2_URI" version >/dev/null 2>&1 && return 0
    local sub conf i
    for sub in run etc/qemu lib cache log/qemu; do
        mkdir -p "$LIBVIRTD2/$sub"
    done
    for conf in /etc/libvirt/*.conf; do
        cp "$conf" "$LIBVIRTD2/etc/"
    done
    printf '\nstdio_handler = "file"\n' >>"$LIBVIRTD2/etc/qemu.conf"
    # What QEMU can do, as the machine's libvirtd found out: probing it again takes seconds.
    if [ -d /var/cache/libvirt/qemu ] && [ ! -d "$LIBVIRTD2/cache/qemu" ]; then
        cp -a /var/cache/libvirt/qemu "$LIBVIRTD2/cache/"
    fi
    chown libvirt-qemu:libvirt-qemu "$LIBVIRTD2/lib"
    chmod 0750 "$LIBVIRTD2/lib"
    # unshare and sh exec: the pid recorded is libvirtd's.
    setsid unshare --mount --propagation private -- sh -c '
        for pair in /run/libvirt:run /etc/libvirt:etc /var/lib/libvirt/qemu:lib /var/cache/libvirt:cache \
                /var/log/libvirt:log; do
            mount --bind "$1/${pair#*:}" "${pair%%:*}" || exit 1
        done
        exec libvirtd --pid-file "$1/run/libvirtd.pid"' sh "$LIBVIRTD2" \
        </dev/null >>"$STATE/libvirtd2.log" 2>&1 &
    echo $! >"$STATE/libvirtd2.pid"
    for i in $(seq 1 100); do
        virsh -c "$LIBVIRTD2_URI" version >/dev/null 2>&1 && { echo "started the second node's libvirtd ($!)"; return 0; }
        daemon_alive libvirtd2 || die "the second node's libvirtd exited; see $STATE/libvirtd2.log"
        sleep 0.2
    done
    die "the second node's libvirtd did not answer within 20 s; see $STATE/libvirtd2.log"
}

# Stop the second node's libvirtd, with whatever VMs it still runs (the demo's, none once
# they are deleted): a libvirtd that stops leaves its guests running.
stop_second_libvirtd() {
    [ -f "$STATE/libvirtd2.pid" ] || return 0
    if daemon_alive libvirtd2; then
        local dom
        for dom in $(virsh -c "$LIBVIRTD2_URI" list --all --name 2>/dev/null); do
            virsh -c "$LIBVIRTD2_URI" destroy "$dom" >/dev/null 2>&1 || true
            virsh -c "$LIBVIRTD2_URI" undefine "$dom" --managed-save --nvram >/dev/null 2>&1 || true
        done
    fi
    stop_daemon libvirtd2
}

main() {
    [ -x "$BIN/kumoctl" ] || die "no virtualenv at $ROOT/.venv: run make venv (or make demo)"
    start_libvirtd
    mkdir -p "$STATE"
    chmod 0700 "$STATE"
    start_second_libvirtd
    stop_all
    start_controller
    local index=0 agent
    for agent in "${AGENTS[@]}"; do
        enroll_agent "$agent"
        write_agent_config "$agent" "$index"
        start_daemon "$agent" run --config "$STATE/$agent.yaml"
        index=$((index + 1))
    done
    for agent in "${AGENTS[@]}"; do
        wait_until_ready "$agent"
    done
    show_image
    start_vm
    show_workloads
    show_debian
    show_vm
    show_usage
}

case "${1:-start}" in
    start) main ;;
    stop) teardown ;;
    *) die "usage: $0 [start|stop]" ;;
esac
