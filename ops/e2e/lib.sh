# shellcheck shell=bash
# Helpers for the vblade-ha end-to-end test against the real Linux aoe driver (QEMU guest). Source it.
# Adapted from ../shared/linux-initiator/lib.sh; the repo carries its own copy so CI never depends on
# the shared directory.
#
# Network of one run (every name carries the runner's PID, so concurrent runs and the shared harness,
# whose namespaces are "aoelx-*", never collide):
#   ns vbha-e2e-<pid>-br : bridge br0, tap0 (QEMU runs here; guest NIC MAC $E2E_GUEST_MAC), ports p1..pN
#   ns vbha-e2e-<pid>-tI : target I: veth "aoe0", MAC 02:00:00:e2:0I:01, IPv4 10.99.200.I/24
#                          (the address is for node-to-node traffic of a cluster; AoE needs none)
# Nothing is attached to the host's own interfaces, only to what this file creates. Processes are stopped by PID.

set -o pipefail

E2E_DIR=${E2E_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)}
E2E_REPO=${E2E_REPO:-$(cd "$E2E_DIR/../.." && pwd)}
E2E_CACHE=${E2E_CACHE:-/var/cache/vblade-ha-e2e}
E2E_NS=${E2E_NS:-vbha-e2e-$$}          # namespace prefix of this run
E2E_MTU=${E2E_MTU:-1500}
E2E_GUEST_MEM=${E2E_GUEST_MEM:-384}     # MiB
E2E_GUEST_MAC=${E2E_GUEST_MAC:-52:54:00:e2:00:01}
E2E_NIC_MODEL=${E2E_NIC_MODEL:-virtio-net-pci}
E2E_ACCEL=${E2E_ACCEL:-tcg}             # KVM hangs the stock kernel on this host class (see README)

log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FATAL: $*"; exit 1; }
now_us() { local t=$EPOCHREALTIME; echo "${t/./}"; }
since_s() { local d=$(( $(now_us) - $1 )); printf '%d.%03d' $((d/1000000)) $(( (d%1000000)/1000 )); }

br_ns()      { echo "${E2E_NS}-br"; }
target_ns()  { echo "${E2E_NS}-t$1"; }
target_mac() { printf '02:00:00:e2:%02x:01' "$1"; }
target_ip()  { echo "10.99.200.$1"; }

# ---------------------------------------------------------------- network
# net_up N : bridge namespace with a tap for QEMU + N target namespaces
net_up() {
    local n=$1 i ns br; br=$(br_ns)
    ip netns add "$br" || die "ip netns add $br"
    ip -n "$br" link set lo up
    ip -n "$br" link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0
    ip -n "$br" link set br0 mtu "$E2E_MTU" up
    ip netns exec "$br" ip tuntap add dev tap0 mode tap || die "tap in $br"
    ip -n "$br" link set tap0 mtu "$E2E_MTU" master br0 up
    ip netns exec "$br" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
    for i in $(seq 1 "$n"); do
        ns=$(target_ns "$i")
        ip netns add "$ns" || die "ip netns add $ns"
        ip -n "$ns" link set lo up
        ip -n "$br" link add "p$i" mtu "$E2E_MTU" type veth peer name aoe0 netns "$ns" || die "veth p$i"
        ip -n "$br" link set "p$i" master br0 up
        # no IPv6 autoconf frames on the LAN
        ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
        ip -n "$ns" link set aoe0 address "$(target_mac "$i")" mtu "$E2E_MTU" up
        ip -n "$ns" addr add "$(target_ip "$i")/24" dev aoe0
    done
}
net_down() {
    local ns
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${E2E_NS}-(br|t[0-9]+)$"); do
        ip netns del "$ns" 2>/dev/null
    done
}
# link_down I / link_up I : cut / restore target I's cable (bridge port), for partition scenarios
link_down() { ip -n "$(br_ns)" link set "p$1" down; }
link_up()   { ip -n "$(br_ns)" link set "p$1" up; }

# ---------------------------------------------------------------- targets
# A target is any AoE target command line, a template with placeholders:
#   {shelf} {slot} {if} {file} {mac} {idx} {ns} {ip} {n} {run} {statedir}
# {statedir} is $RUN/state.{idx} (created); {n} is the number of targets; {run} the run directory.
# The command must stay in the foreground and serve on {if} (= aoe0); it runs in namespace t{idx}.
# Cluster scenarios start N nodes with one template, e.g.
#   '{bin} serve -c {run}/node{idx}.toml'   (write the per-node files in host_setup).
expand_target_cmd() {   # expand_target_cmd TEMPLATE IDX SHELF SLOT FILE
    local c=$1 i=$2
    c=${c//\{shelf\}/$3}; c=${c//\{slot\}/$4}; c=${c//\{file\}/$5}; c=${c//\{if\}/aoe0}
    c=${c//\{mac\}/$(target_mac "$i")}; c=${c//\{idx\}/$i}; c=${c//\{ns\}/$(target_ns "$i")}
    c=${c//\{ip\}/$(target_ip "$i")}; c=${c//\{n\}/$NTARGETS}; c=${c//\{run\}/$RUN}
    c=${c//\{statedir\}/$RUN/state.$i}; c=${c//\{bin\}/$E2E_BIN}
    echo "$c"
}
# target_start IDX SHELF SLOT FILE [TEMPLATE]   (default template: $TARGET_CMD) -> pid in $RUN/target.IDX.pid
target_start() {
    local i=$1 c; c=$(expand_target_cmd "${5:-$TARGET_CMD}" "$1" "$2" "$3" "$4")
    mkdir -p "$RUN/state.$i"
    ip netns exec "$(target_ns "$i")" sh -c "exec $c" >>"$RUN/target.$i.log" 2>&1 &
    echo $! >"$RUN/target.$i.pid"
    event "target $i started: pid $! ns $(target_ns "$i") mac $(target_mac "$i"): $c"
}
# targets_start N SHELF SLOT FILE [TEMPLATE] : targets 1..N, same export (a cluster's nodes)
targets_start() { local n=$1 i; shift; for i in $(seq 1 "$n"); do target_start "$i" "$@"; done; }
# target_stop IDX [SIGNAL] : default KILL (a crash); TERM for an orderly stop
target_stop() {
    local i=$1 sig=${2:-KILL} p
    [ -f "$RUN/target.$i.pid" ] || return 0
    p=$(cat "$RUN/target.$i.pid")
    kill -"$sig" "$p" 2>/dev/null && event "target $i (pid $p) sent SIG$sig"
    local k=0; while kill -0 "$p" 2>/dev/null && [ $k -lt 30 ]; do sleep 0.1; k=$((k+1)); done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
    rm -f "$RUN/target.$i.pid"
}
target_alive() { [ -f "$RUN/target.$1.pid" ] && kill -0 "$(cat "$RUN/target.$1.pid")" 2>/dev/null; }
# frames from / to target I as the bridge sees them ("from to")
target_frames() {
    ip netns exec "$(br_ns)" sh -c "echo \$(cat /sys/class/net/p$1/statistics/rx_packets) \$(cat /sys/class/net/p$1/statistics/tx_packets)"
}
start_pcap() {
    command -v tcpdump >/dev/null || return 0
    ip netns exec "$(target_ns "$1")" tcpdump -i aoe0 -s 128 -w "$RUN/target$1.pcap" -U ether proto 0x88a2 \
        >"$RUN/tcpdump.$1.log" 2>&1 &
    echo $! >"$RUN/tcpdump.$1.pid"
}

# ---------------------------------------------------------------- guest
guest_kver() { cat "$E2E_CACHE/kver"; }
# build_overlay GUEST_SCRIPT [files...] -> $RUN/initrd.img = base initramfs + per-run overlay
build_overlay() {
    local g=$1 d="$RUN/overlay" f; shift
    rm -rf "$d"; mkdir -p "$d/scenario"
    cp "$g" "$d/scenario/guest.sh"; chmod +x "$d/scenario/guest.sh"
    for f in "$@"; do cp "$f" "$d/scenario/"; done
    env | grep -E '^AOEG_' | sed "s/'/'\\\\''/g; s/=\(.*\)/='\1'/" >"$d/scenario/env" || true
    (cd "$d" && find . | cpio -o -H newc --quiet | gzip -1) >"$RUN/overlay.cpio.gz"
    cat "$E2E_CACHE/initrd-base.cpio.gz" "$RUN/overlay.cpio.gz" >"$RUN/initrd.img"
}
qemu_accel_args() {
    case "$1" in
        kvm) echo "-accel kvm -cpu host";;
        *)   echo "-accel tcg,thread=single -cpu max";;
    esac
}
# start_guest [extra kernel cmdline] -> $RUN/console.log, each line prefixed with host seconds since start
start_guest() {
    local kv; kv=$(guest_kver)
    local t0; t0=$(now_us); echo "$t0" >"$RUN/t0_us"
    # shellcheck disable=SC2046
    ip netns exec "$(br_ns)" qemu-system-x86_64 $(qemu_accel_args "$E2E_ACCEL") \
        -m "$E2E_GUEST_MEM" -smp 1 -nodefaults -no-user-config -display none \
        -serial stdio -monitor none -no-reboot \
        -kernel "$E2E_CACHE/vmlinuz-$kv" -initrd "$RUN/initrd.img" \
        -append "console=ttyS0,115200 quiet panic=-1 mitigations=off aoeguest.mtu=$E2E_MTU ${1:-}" \
        -netdev tap,id=n0,ifname=tap0,script=no,downscript=no \
        -device "$E2E_NIC_MODEL,netdev=n0,mac=$E2E_GUEST_MAC" \
        -pidfile "$RUN/qemu.pid" </dev/null 2>&1 | ts_filter "$t0" >"$RUN/console.log" &
    QEMU_PIPE_PID=$!
}
ts_filter() {
    local t0=$1 line d
    while IFS= read -r line; do
        line=${line%$'\r'}
        d=$(( ${EPOCHREALTIME/./} - t0 ))
        printf '%4d.%03d| %s\n' $((d/1000000)) $(( (d%1000000)/1000 )) "$line"
    done
}
guest_running() {
    if [ -n "$QEMU_PIPE_PID" ]; then kill -0 "$QEMU_PIPE_PID" 2>/dev/null && return 0; fi
    [ -f "$RUN/qemu.pid" ] && kill -0 "$(cat "$RUN/qemu.pid")" 2>/dev/null
}
wait_console() {   # wait_console REGEX TIMEOUT_S
    local re=$1 to=$2 start; start=$(now_us)
    while :; do
        grep -qE "$re" "$RUN/console.log" 2>/dev/null && return 0
        [ $(( $(now_us) - start )) -gt $(( to * 1000000 )) ] && return 1
        guest_running || { grep -qE "$re" "$RUN/console.log" 2>/dev/null; return; }
        sleep 0.2
    done
}
wait_guest_exit() {   # wait_guest_exit TIMEOUT_S
    local to=$1 start; start=$(now_us)
    while guest_running; do
        if [ $(( $(now_us) - start )) -gt $(( to * 1000000 )) ]; then
            log "guest did not power off within ${to}s: killing QEMU (pid $(cat "$RUN/qemu.pid"))"
            kill "$(cat "$RUN/qemu.pid")" 2>/dev/null; sleep 1
            return 1
        fi
        sleep 0.3
    done
    wait "$QEMU_PIPE_PID" 2>/dev/null
    return 0
}
cvalue() { grep -E "\| @@AOE $1( |$)" "$RUN/console.log" | tail -1 | sed -E "s/.*@@AOE $1 ?//"; }

# cleanup_run : everything this run started, by the PIDs it recorded, then its namespaces
cleanup_run() {
    local f p
    for f in "$RUN"/qemu.pid "$RUN"/target.*.pid "$RUN"/tcpdump.*.pid; do
        [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null
    done
    sleep 0.3
    for f in "$RUN"/qemu.pid "$RUN"/target.*.pid "$RUN"/tcpdump.*.pid; do
        [ -f "$f" ] || continue
        p=$(cat "$f"); kill -9 "$p" 2>/dev/null; rm -f "$f"
    done
    net_down
}

# ---------------------------------------------------------------- cluster (vblade node + vbladectl)
# Node I runs `vblade node -c $RUN/node{I}.toml` in namespace t{I}; its admin socket is $RUN/n{I}.sock and its
# raft_addr $(target_ip I):7000 (the namespace's own address on the run's bridge). E2E_CTL is vbladectl.
node_sock() { echo "$RUN/n$1.sock"; }
node_raft() { echo "$(target_ip "$1"):7000"; }
# write_node_config I IMAGE [MAC_MODE] : $RUN/node{I}.toml for node nI exporting e1.0 from IMAGE
write_node_config() {
    local i=$1 img=$2 mode=${3:-${E2E_MAC_MODE:-virtual}}
    mkdir -p "$RUN/state.$i"
    cat >"$RUN/node$i.toml" <<EOT
node_id = "n$i"
data_dir = "$RUN/state.$i/data"
raft_addr = "$(node_raft "$i")"
admin_socket = "$(node_sock "$i")"
mac_mode = "$mode"
cluster_name = "e2e-$$"
log_level = "info"
# the run's private bridge namespace is the security boundary (no TLS between nodes)
insecure = true

[[export]]
shelf = 1
slot = 0
netif = "aoe0"
path = "$img"
bufcnt = 16
EOT
}
# ctl I ARGS... : vbladectl cluster ARGS against node I, run in node I's namespace (bounded to 30 s)
ctl() {
    local i=$1 sub=$2; shift 2
    timeout 30 ip netns exec "$(target_ns "$i")" "$E2E_CTL" cluster "$sub" --socket "$(node_sock "$i")" "$@"
}
# json_get KEY : top-level string/number KEY of the JSON document on stdin
json_get() {
    if command -v jq >/dev/null; then jq -r ".$1 // empty"
    else python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"; fi
}
# node_status I : this node's own status (admin API GET /v1/status) as JSON, via curl-less HTTP over the socket
node_status() {
    python3 - "$(node_sock "$1")" <<'PY' 2>/dev/null
import json, socket, sys
s = socket.socket(socket.AF_UNIX); s.settimeout(2); s.connect(sys.argv[1])
s.sendall(b"GET /v1/status HTTP/1.0\r\nHost: vblade\r\n\r\n")
d = b""
while True:
    b = s.recv(65536)
    if not b: break
    d += b
print(d.split(b"\r\n\r\n", 1)[1].decode())
PY
}
# cluster_leader : id number (1..N) of the node that leads with its gate open, empty if none
cluster_leader() {
    local i st
    for i in $(seq 1 "$NTARGETS"); do
        target_alive "$i" || continue
        st=$(node_status "$i") || continue
        if [ "$(echo "$st" | json_get state)" = leader ] && [ "$(echo "$st" | json_get gate_open)" = true ]; then echo "$i"; return 0; fi
    done
    return 1
}
# wait_leader TIMEOUT_S [NOT_I] : echo the leader's number once there is one (other than NOT_I)
wait_leader() {
    local to=$1 not=${2:-0} start l; start=$(now_us)
    while :; do
        l=$(cluster_leader) && [ "$l" != "$not" ] && { echo "$l"; return 0; }
        [ $(( $(now_us) - start )) -gt $(( to * 1000000 )) ] && return 1
        sleep 0.1
    done
}
# wait_caught_up I TIMEOUT_S : node I applied at least the leader's commit index as of now
wait_caught_up() {
    local i=$1 to=$2 start l want got; start=$(now_us)
    l=$(wait_leader 15) || return 1
    want=$(node_status "$l" | json_get commit_index)
    while :; do
        got=$(node_status "$i" | json_get applied_index)
        [ -n "$got" ] && [ -n "$want" ] && [ "$got" -ge "$want" ] && return 0
        [ $(( $(now_us) - start )) -gt $(( to * 1000000 )) ] && { log "node $i: applied ${got:-?} < leader commit $want after ${to}s"; return 1; }
        sleep 0.2
    done
}
