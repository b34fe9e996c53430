#!/usr/bin/env bash
# `make demo`: a three-node vblade-ha cluster on a private LAN, a verifying
# workload, the leader killed mid-run, and the evidence that nothing was lost.
#
# Everything lives in objects this script creates and removes again:
#   ns $DEMO_NS-br   : bridge br0 with one port per host (p1..p3, pi)
#   ns $DEMO_NS-n1..3: the nodes; veth "aoe0", IPv4 10.99.201.I/24 for Raft
#   ns $DEMO_NS-ini  : the initiator (vbladectl bench); veth "aoe0", no IP
#   $RUN (mktemp -d) : sparse images, node configs, Raft data, logs
# AoE is unauthenticated layer-2 broadcast, so no socket is ever opened on an
# interface of the machine (eth0 & co.), and processes are stopped by the PIDs
# this script recorded, never by name.
#
# Exit status: 0 when a new leader took over and the workload saw no error
# and no mismatch and everything was torn down; 1 otherwise; 130 on Ctrl-C.
#
# Knobs (environment): DEMO_BIN (directory with vblade and vbladectl, default
# bin/), DEMO_NS (namespace prefix), DEMO_WORKLOAD_S (workload seconds),
# DEMO_KEEP_LOGS=1 (keep $RUN even on success).

set -u -o pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BIN=${DEMO_BIN:-$REPO/bin}
VBLADE=$BIN/vblade
CTL=$BIN/vbladectl
NS=${DEMO_NS:-vbdemo-$$}
WORKLOAD_S=${DEMO_WORKLOAD_S:-8}
IMG_MB=32
# The workload stays in the first SPAN_MB of the image so that reads often
# land on blocks it wrote, and verify them.
SPAN_MB=2
NODES=3
SHELF=1
SLOT=0

RUN=""
BENCH_PID=""
declare -A NODE_PID=()
FAILED=0
T0=$EPOCHREALTIME

# ---------------------------------------------------------------- output

elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%5.1fs", b - a }'; }
say()  { printf '[%s] %s\n' "$(elapsed)" "$*"; }
warn() { printf '[%s] !! %s\n' "$(elapsed)" "$*" >&2; }
# fail MSG: report and stop; the EXIT trap tears down.
fail() { warn "$*"; FAILED=1; exit 1; }

now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }

# jget KEY : top-level KEY of the JSON document on stdin ("" if absent).
jget() {
    if command -v jq >/dev/null; then
        jq -r --arg k "$1" '.[$k] // empty'
    else
        python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"
    fi
}

# ---------------------------------------------------------------- network

node_ns()  { echo "$NS-n$1"; }
node_ip()  { echo "10.99.201.$1"; }
node_sock() { echo "$RUN/n$1.sock"; }
INI_NS="$NS-ini"
BR_NS="$NS-br"

# plug NS PORT MAC [IP] : a veth from the bridge (PORT) to aoe0 in NS.
plug() {
    local ns=$1 port=$2 mac=$3 ip=${4:-}
    ip netns add "$ns" || return 1
    ip -n "$ns" link set lo up || return 1
    # No IPv6 autoconfiguration chatter on the LAN.
    ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
    ip -n "$BR_NS" link add "$port" type veth peer name aoe0 netns "$ns" || return 1
    ip -n "$BR_NS" link set "$port" master br0 up || return 1
    ip -n "$ns" link set aoe0 address "$mac" up || return 1
    if [ -n "$ip" ]; then ip -n "$ns" addr add "$ip/24" dev aoe0 || return 1; fi
}

net_up() {
    local i
    ip netns add "$BR_NS" || return 1
    ip -n "$BR_NS" link set lo up
    ip netns exec "$BR_NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 2>/dev/null
    # No STP delay and no snooping: the demo's frames pass at once.
    ip -n "$BR_NS" link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0 || return 1
    ip -n "$BR_NS" link set br0 up || return 1
    for i in $(seq 1 $NODES); do
        plug "$(node_ns "$i")" "p$i" "$(printf '02:00:00:de:%02x:01' "$i")" "$(node_ip "$i")" || return 1
    done
    plug "$INI_NS" pi 02:00:00:de:ff:01 || return 1
}

# our_namespaces : the namespaces of this run still present.
our_namespaces() { ip netns list | awk '{print $1}' | grep -E "^${NS}-(br|ini|n[0-9]+)$"; }

# ---------------------------------------------------------------- processes

# stop_pid PID : SIGTERM, up to 10 s to exit, then SIGKILL. Only PIDs this
# script started are ever passed here.
stop_pid() {
    local pid=$1 deadline
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    deadline=$(( $(now_ms) + 10000 ))
    while kill -0 "$pid" 2>/dev/null && [ "$(now_ms)" -lt "$deadline" ]; do sleep 0.05; done
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$? i pid ns left=0
    trap - INT TERM EXIT
    [ "$rc" -ne 0 ] && FAILED=1
    say "tearing down"
    [ -n "$BENCH_PID" ] && stop_pid "$BENCH_PID"
    for i in "${!NODE_PID[@]}"; do stop_pid "${NODE_PID[$i]}"; done
    for ns in $(our_namespaces); do ip netns del "$ns" 2>/dev/null; done
    # Verify instead of trusting: a leftover namespace or process is a failure.
    for i in "${!NODE_PID[@]}" ; do
        pid=${NODE_PID[$i]}
        if kill -0 "$pid" 2>/dev/null; then warn "node n$i (pid $pid) is still running"; left=1; fi
    done
    if [ -n "$(our_namespaces)" ]; then warn "namespaces left behind: $(our_namespaces | tr '\n' ' ')"; left=1; fi
    if [ -n "$RUN" ] && [ -d "$RUN" ]; then
        if [ "$FAILED" -ne 0 ] || [ "$left" -ne 0 ] || [ "${DEMO_KEEP_LOGS:-0}" = 1 ]; then
            say "logs kept in $RUN"
        else
            rm -rf "$RUN"
        fi
    fi
    if [ "$left" -ne 0 ]; then
        warn "cleanup failed"
        exit 1
    fi
    say "all clean: no namespaces, no processes left (demo took $(elapsed | tr -d " "))"
    if [ "$rc" -eq 130 ]; then say "interrupted"; exit 130; fi
    if [ "$FAILED" -ne 0 ]; then
        warn "demo FAILED (see above)"
        exit 1
    fi
    exit "$rc"
}

on_signal() { warn "interrupted: cleaning up"; exit 130; }

# ctl I SUB ARGS... : `vbladectl cluster SUB` against node I (bounded).
ctl() {
    local i=$1 sub=$2; shift 2
    timeout 60 ip netns exec "$(node_ns "$i")" "$CTL" cluster "$sub" --socket "$(node_sock "$i")" "$@"
}

write_config() {
    local i=$1
    cat >"$RUN/n$i.toml" <<EOT
# Generated by ops/demo/demo.sh for node n$i.
node_id = "n$i"
data_dir = "$RUN/n$i.data"
raft_addr = "$(node_ip "$i"):7000"
admin_socket = "$(node_sock "$i")"
cluster_name = "demo-$$"
mac_mode = "virtual"
log_level = "info"
# The node port runs without TLS here: the LAN is a private bridge between
# namespaces that lives only as long as the demo. A real cluster uses
# tls_cert, tls_key, tls_ca and join_token_file (see docs/CONFIG.md).
insecure = true

[[export]]
shelf = $SHELF
slot = $SLOT
netif = "aoe0"
path = "$RUN/n$i.img"
EOT
}

start_node() {
    local i=$1 deadline
    # `ip netns exec` execs in place: $! is vblade's own PID.
    ip netns exec "$(node_ns "$i")" "$VBLADE" node -c "$RUN/n$i.toml" >"$RUN/n$i.log" 2>&1 &
    NODE_PID[$i]=$!
    deadline=$(( $(now_ms) + 15000 ))
    until [ -S "$(node_sock "$i")" ]; do
        kill -0 "${NODE_PID[$i]}" 2>/dev/null || { tail -5 "$RUN/n$i.log" >&2; fail "node n$i exited at start"; }
        [ "$(now_ms)" -lt "$deadline" ] || fail "node n$i: admin socket did not appear within 15 s"
        sleep 0.05
    done
}

# leader_via I : the leader's id (n1..) as node I sees it, "" if none.
leader_via() { ctl "$1" status --json 2>/dev/null | jget leader; }

# wait_leader TIMEOUT_MS NOT VIA... : wait until a node other than NOT leads
# (asking the nodes VIA in turn) and print its id.
wait_leader() {
    local to=$1 not=$2 deadline l i; shift 2
    deadline=$(( $(now_ms) + to ))
    while [ "$(now_ms)" -lt "$deadline" ]; do
        for i in "$@"; do
            l=$(leader_via "$i")
            if [ -n "$l" ] && [ "$l" != "$not" ]; then echo "$l"; return 0; fi
        done
        sleep 0.05
    done
    return 1
}

commit_index() { ctl "$1" status --json 2>/dev/null | jget commit_index; }

# ---------------------------------------------------------------- main

main() {
    [ "$(id -u)" -eq 0 ] || { echo "make demo needs root: it builds network namespaces (try: sudo make demo)" >&2; exit 1; }
    command -v ip >/dev/null || { echo "make demo needs iproute2 (apt install iproute2)" >&2; exit 1; }
    command -v jq >/dev/null || command -v python3 >/dev/null || { echo "make demo needs jq or python3 (apt install jq)" >&2; exit 1; }
    [ -x "$VBLADE" ] && [ -x "$CTL" ] || { echo "no $VBLADE or $CTL: run make build first" >&2; exit 1; }
    trap on_signal INT TERM
    trap cleanup EXIT

    RUN=$(mktemp -d "${TMPDIR:-/tmp}/vblade-demo.XXXXXX") || fail "mktemp"
    say "vblade-ha demo: 3 replicated nodes, 1 initiator, 1 leader that dies"
    say "building a private LAN: bridge + 4 namespaces ($NS-*), nothing on your own interfaces"
    net_up || fail "could not build the test LAN"

    say "creating three sparse ${IMG_MB} MiB images and node configs in $RUN"
    local i
    for i in $(seq 1 $NODES); do
        truncate -s "${IMG_MB}M" "$RUN/n$i.img" || fail "truncate"
        write_config "$i"
    done

    say "starting vblade node n1, n2, n3"
    for i in $(seq 1 $NODES); do start_node "$i"; done

    say "n1: vbladectl cluster init"
    ctl 1 init >"$RUN/init.out" 2>&1 || { cat "$RUN/init.out" >&2; fail "cluster init failed"; }
    for i in $(seq 2 $NODES); do
        say "n$i: vbladectl cluster join $(node_ip 1):7000"
        ctl "$i" join --timeout 60s "$(node_ip 1):7000" >"$RUN/join$i.out" 2>&1 ||
            { cat "$RUN/join$i.out" >&2; fail "n$i could not join"; }
    done
    local leader
    leader=$(wait_leader 15000 "" 1 2 3) || fail "no leader elected within 15 s"
    say "cluster formed: leader is $leader"

    say "initiator: vbladectl bench -verify (mixed reads/writes, every read checked) for ${WORKLOAD_S}s"
    local base
    base=$(commit_index "${leader#n}")
    timeout $((WORKLOAD_S + 60)) ip netns exec "$INI_NS" "$CTL" bench -i aoe0 -t "$SHELF.$SLOT" \
        -mode mixed -verify -follow -window 8 -span $((SPAN_MB << 20)) -duration "${WORKLOAD_S}s" -json \
        >"$RUN/bench.json" 2>"$RUN/bench.err" &
    BENCH_PID=$!
    # The workload is under way once writes go through Raft.
    local deadline=$(( $(now_ms) + 10000 )) c
    while :; do
        c=$(commit_index "${leader#n}")
        [ -n "$c" ] && [ -n "$base" ] && [ "$c" -gt $((base + 50)) ] && break
        kill -0 "$BENCH_PID" 2>/dev/null || { cat "$RUN/bench.err" >&2; fail "the workload stopped before it got going"; }
        [ "$(now_ms)" -lt "$deadline" ] || fail "the workload did not reach the leader within 10 s"
        sleep 0.1
    done
    say "workload running (leader commit index $c)"
    # Let it run for a while against the healthy cluster before the crash.
    sleep 2

    local li=${leader#n} t_kill
    say "SIGKILL the leader $leader (pid ${NODE_PID[$li]}): a crash, no goodbye"
    t_kill=$(now_ms)
    kill -KILL "${NODE_PID[$li]}"
    wait "${NODE_PID[$li]}" 2>/dev/null
    local survivors=() newleader
    for i in $(seq 1 $NODES); do [ "$i" = "$li" ] || survivors+=("$i"); done
    newleader=$(wait_leader 15000 "$leader" "${survivors[@]}") || fail "no new leader within 15 s of the crash"
    say "new leader: $newleader (elected $(( $(now_ms) - t_kill )) ms after the kill)"

    say "waiting for the workload to finish"
    local bench_rc=0
    wait "$BENCH_PID" || bench_rc=$?
    BENCH_PID=""
    [ -s "$RUN/bench.json" ] || { cat "$RUN/bench.err" >&2; fail "the workload printed no result (exit $bench_rc)"; }
    local ops errors mism stall verified
    ops=$(jget ops <"$RUN/bench.json")
    errors=$(jget errors <"$RUN/bench.json")
    mism=$(jget mismatches <"$RUN/bench.json")
    verified=$(jget verified <"$RUN/bench.json")
    stall=$(jget longest_stall_ms <"$RUN/bench.json")
    say "workload: $ops ops, $verified reads verified, $errors errors, $mism mismatches"
    say "longest stall the initiator saw: $(printf '%.0f' "$stall") ms"
    echo
    say "vbladectl cluster status (asked on ${survivors[0]/#/n}):"
    ctl "${survivors[0]}" status 2>&1 | sed 's/^/    /'
    echo

    [ "$bench_rc" -eq 0 ] || FAILED=1
    [ "${errors:-1}" = 0 ] || { warn "the workload saw $errors errors: $(jget first_errors <"$RUN/bench.json")"; FAILED=1; }
    [ "${mism:-1}" = 0 ] || { warn "the workload saw $mism mismatches: $(jget first_mismatches <"$RUN/bench.json")"; FAILED=1; }
    [ "${ops:-0}" -gt 0 ] || { warn "the workload did nothing"; FAILED=1; }
    [ "$FAILED" -eq 0 ] || exit 1
    say "demo passed: the leader died, $newleader took over, no write was lost"
}

main "$@"
