#!/usr/bin/env bash
# make bench, cluster part: three `vblade node` processes on this one machine
# (one network namespace each, on one bridge) against Debian's vblade -s and
# our standalone target, side by side in one run.
#
# The LAN is built here from namespaces, one bridge and veth pairs, all
# created and removed by this script (names vbc-<pid>-*); no existing
# interface ever carries AoE, and Raft only uses 10.99.210.N inside those
# namespaces. Every load point is bounded by time, every wait by a deadline,
# and only processes this script started are stopped (by PID).
#
# Parts (PARTS, space separated; default "perf failover join"):
#   perf      for each MTU and store: durable replicated writes (randwrite,
#             seqwrite) against Debian `vblade -s` on one node, and reads
#             (randread, seqread) against our standalone target serving the
#             leader's image file; points interleaved, REPS times each, medians.
#   failover  longest stall seen by `vbladectl bench --follow` per SIGKILL of
#             the leader (KILLS times, the killed node restarted and caught up
#             between kills), for mac_mode virtual and node; then TRANSFERS
#             planned `vbladectl cluster transfer`s.
#   join      `vbladectl cluster join` of a fourth node with a JOIN_MIB image
#             (start to caught up), against `dd ... conv=fsync` of the same
#             file to the same filesystem.
#   soak      (not by default) issue 6's false-election check: a saturating
#             workload (SOAK_MODE, window SOAK_WINDOW, --follow) for SOAK_DUR at
#             the default Raft timers, no fault injected; counts leadership
#             changes and names the timer that fired.
#
# Environment:
#   QUICK=1        smoke run (MTU 1500, disk store, 1 rep, 1 s points, 2 kills,
#                  virtual MAC only, 256 MiB images)
#   DUR=3s REPS=3  length and repetitions of each perf point
#   MTUS="1500 9000" STORES="disk ram" WINDOW=16 BUFCNT=64 IMG_MIB=1024
#   KILLS=5 TRANSFERS=3 MAC_MODES="virtual node" FO_DUR=10s
#   JOIN_MIB=1024  SOAK_DUR=15m SOAK_WINDOW=64 SOAK_MODE=randwrite
#   NODE_EXTRA='heartbeat_timeout = "1s"'   extra top-level TOML for every node
#   KEEP=1         keep the work directory (logs, raw results)
#   PROFILE=DIR    CPU profiles of every node during each cluster write point
#                  (go tool pprof DIR/<mtu>-<store>-<mode>-n<i>.pprof)
#   VBLADE_BIN, VBLADECTL_BIN   prebuilt binaries (default: go build into bin/)
#
# Stores: disk = images and Raft data in a directory under /var/tmp;
# ram = both on a tmpfs. Debian's vblade -s gets its own image on the same store.
# Must run as root.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
	DUR=${DUR:-1s}
	REPS=${REPS:-1}
	MTUS=${MTUS:-1500}
	STORES=${STORES:-disk}
	KILLS=${KILLS:-2}
	TRANSFERS=${TRANSFERS:-1}
	MAC_MODES=${MAC_MODES:-virtual}
	IMG_MIB=${IMG_MIB:-256}
	JOIN_MIB=${JOIN_MIB:-256}
else
	DUR=${DUR:-3s}
	REPS=${REPS:-3}
	MTUS=${MTUS:-1500 9000}
	STORES=${STORES:-disk ram}
	KILLS=${KILLS:-5}
	TRANSFERS=${TRANSFERS:-3}
	MAC_MODES=${MAC_MODES:-virtual node}
	IMG_MIB=${IMG_MIB:-1024}
	JOIN_MIB=${JOIN_MIB:-1024}
fi
PARTS=${PARTS:-perf failover join}
WINDOW=${WINDOW:-16}
BUFCNT=${BUFCNT:-64}
FO_DUR=${FO_DUR:-10s}
FO_MTU=${FO_MTU:-1500}
SOAK_DUR=${SOAK_DUR:-15m}
SOAK_WINDOW=${SOAK_WINDOW:-64}
SOAK_MODE=${SOAK_MODE:-randwrite}
MIN_RTO=${MIN_RTO:-50ms}
NODE_EXTRA=${NODE_EXTRA:-}
SUBNET=10.99.210

die() { echo "cluster-bench: $*" >&2; exit 1; }
log() { echo "cluster-bench: [$(date +%T)] $*" >&2; }

[[ $(id -u) == 0 ]] || die "must run as root (network namespaces, raw sockets, tmpfs)"
command -v ip >/dev/null || die "iproute2 'ip' is missing"
need=()
[[ -x /usr/sbin/vblade ]] || need+=(vblade)
command -v jq >/dev/null || need+=(jq)
command -v curl >/dev/null || need+=(curl)
if ((${#need[@]})); then
	log "installing ${need[*]}"
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >&2 ||
		die "cannot install ${need[*]}"
fi

# ---- build ----
mkdir -p bin
if [[ -z ${VBLADECTL_BIN:-} ]]; then
	go build -o bin/vbladectl ./cmd/vbladectl || die "cannot build vbladectl"
	VBLADECTL_BIN=$ROOT/bin/vbladectl
fi
if [[ -z ${VBLADE_BIN:-} ]]; then
	go build -o bin/vblade ./cmd/vblade || die "cannot build vblade"
	VBLADE_BIN=$ROOT/bin/vblade
fi
CTL=$VBLADECTL_BIN
VB=$VBLADE_BIN

# ---- state torn down by cleanup ----
ID=$$
P=vbc-$ID
NS_BR=$P-br
NS_I=$P-i   # initiator (vbladectl bench)
NS_S=$P-s   # our standalone target (shelf 2)
NS_V=$P-v   # Debian vblade -s (shelf 3)
WORK=$(mktemp -d /var/tmp/vblade-cluster-bench.XXXXXX)
RAM=$WORK/ram
RESULTS=$WORK/results.tsv
: >"$RESULTS"
declare -A NPID=() # node index -> PID
SPIDS=()           # standalone target PIDs
BGPIDS=()          # background bench PIDs

cleanup() {
	set +e
	local p
	for p in "${BGPIDS[@]}" "${SPIDS[@]}" "${NPID[@]}"; do
		[[ -n $p ]] && kill -9 "$p" 2>/dev/null
	done
	for p in "${BGPIDS[@]}" "${SPIDS[@]}" "${NPID[@]}"; do
		[[ -n $p ]] && wait "$p" 2>/dev/null
	done
	for ns in $(ip netns list | awk -v p="$P-" 'index($1, p) == 1 {print $1}'); do ip netns del "$ns"; done
	mountpoint -q "$RAM" && umount "$RAM"
	if [[ ${KEEP:-0} == 1 ]]; then log "work directory kept: $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

# Private copies of the binaries: a node restarted late in the run must run the same build as the
# others even if bin/ is rebuilt meanwhile (a newer build may write log entries an older one refuses).
cp "$VB" "$WORK/vblade" && cp "$CTL" "$WORK/vbladectl" || die "cannot copy the binaries to $WORK"
VB=$WORK/vblade
CTL=$WORK/vbladectl
# The log floor (BenchmarkLogRound in node/): the disk work of one round alone.
LOGROUND=
if [[ " $PARTS " == *" perf "* && " $STORES " == *" disk "* ]]; then
	if go test -c -o "$WORK/node.test" ./node >"$WORK/loground-build.log" 2>&1; then
		LOGROUND=$WORK/node.test
	else
		log "cannot build the log-floor benchmark (node.test), skipped: $(tail -1 "$WORK/loground-build.log")"
	fi
fi

# ---- LAN: bridge namespace, n1..n4, initiator, standalone ----
node_ns() { echo "$P-n$1"; }
add_host() { # add_host NS PORT [IP]
	local ns=$1 port=$2 ipaddr=${3:-}
	ip netns add "$ns"
	ip -n "$ns" link set lo up
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 || true
	ip -n "$NS_BR" link add "$port" type veth peer name aoe0 netns "$ns"
	ip -n "$NS_BR" link set "$port" master br0 up
	ip -n "$ns" link set aoe0 up
	[[ -z $ipaddr ]] || ip -n "$ns" addr add "$ipaddr/24" dev aoe0
}
ip netns add "$NS_BR"
ip -n "$NS_BR" link set lo up
ip netns exec "$NS_BR" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 || true
ip -n "$NS_BR" link add br0 type bridge forward_delay 0 stp_state 0 mcast_snooping 0
ip -n "$NS_BR" link set br0 up
for i in 1 2 3 4; do add_host "$(node_ns $i)" "p$i" "$SUBNET.$i"; done
add_host "$NS_I" pi
add_host "$NS_S" ps
add_host "$NS_V" pv

set_mtu() {
	local m=$1 i
	for i in 1 2 3 4; do
		ip -n "$NS_BR" link set "p$i" mtu "$m"
		ip -n "$(node_ns $i)" link set aoe0 mtu "$m"
	done
	ip -n "$NS_BR" link set pi mtu "$m"
	ip -n "$NS_BR" link set ps mtu "$m"
	ip -n "$NS_BR" link set pv mtu "$m"
	ip -n "$NS_V" link set aoe0 mtu "$m"
	ip -n "$NS_I" link set aoe0 mtu "$m"
	ip -n "$NS_S" link set aoe0 mtu "$m"
	ip -n "$NS_BR" link set br0 mtu "$m"
}

mkdir -p "$RAM"
mount -t tmpfs -o size=$((5 * IMG_MIB + 2048))m vblade-cluster-bench "$RAM"
store_dir() { if [[ $1 == ram ]]; then echo "$RAM"; else echo "$WORK/disk"; fi; }

# ---- nodes ----
# write_node CFG I STORE MODE IMG
write_node() {
	local i=$1 store=$2 mode=$3 img=$4 d
	d=$(store_dir "$store")
	mkdir -p "$d/n$i"
	cat >"$WORK/n$i.toml" <<EOF
node_id = "n$i"
data_dir = "$d/n$i/data"
raft_addr = "$SUBNET.$i:7000"
admin_socket = "$WORK/n$i.sock"
mac_mode = "$mode"
cluster_name = "vbc-$ID"
log_level = "info"
# The bench LAN (namespaces on a private bridge) is the security boundary.
insecure = true
$NODE_EXTRA

[[export]]
shelf = 1
slot = 0
netif = "aoe0"
path = "$img"
bufcnt = $BUFCNT
EOF
}

node_start() {
	local i=$1 k
	ip netns exec "$(node_ns "$i")" "$VB" node -c "$WORK/n$i.toml" >>"$WORK/n$i.log" 2>&1 &
	NPID[$i]=$!
	for k in $(seq 100); do
		if ! kill -0 "${NPID[$i]}" 2>/dev/null; then
			log "n$i exited at start: $(tail -3 "$WORK/n$i.log")"
			NPID[$i]=
			return 1
		fi
		st "$i" >/dev/null && return 0
		sleep 0.1
	done
	log "n$i: admin socket never answered"
	return 1
}

node_stop() { # node_stop I [SIG]
	local i=$1 sig=${2:-TERM} p=${NPID[$1]:-} k
	[[ -n $p ]] || return 0
	kill -"$sig" "$p" 2>/dev/null || true
	for k in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
	kill -9 "$p" 2>/dev/null || true
	wait "$p" 2>/dev/null || true
	NPID[$i]=
}

st() { curl -s --max-time 2 --unix-socket "$WORK/n$1.sock" http://vblade/v1/status; }
ctl() { local i=$1 sub=$2; shift 2; timeout "${CTL_TIMEOUT:-120}" "$CTL" cluster "$sub" --socket "$WORK/n$i.sock" "$@"; }

# leader: index of the running node that leads with its gate open.
leader() {
	local i s
	for i in "${!NPID[@]}"; do
		[[ -n ${NPID[$i]} ]] || continue
		s=$(st "$i" 2>/dev/null) || continue
		[[ $(jq -r '"\(.state) \(.gate_open)"' <<<"$s" 2>/dev/null) == "leader true" ]] && { echo "$i"; return 0; }
	done
	return 1
}
wait_leader() { # wait_leader TIMEOUT_S [NOT]
	local end=$((SECONDS + $1)) l
	while ((SECONDS < end)); do
		l=$(leader) && [[ $l != "${2:-0}" ]] && { echo "$l"; return 0; }
		sleep 0.05
	done
	return 1
}
wait_caught_up() { # wait_caught_up I TIMEOUT_S
	local i=$1 end=$((SECONDS + $2)) l want got
	l=$(wait_leader 15) || return 1
	want=$(st "$l" | jq -r '.commit_index // 0' 2>/dev/null || echo 0)
	while ((SECONDS < end)); do
		got=$(st "$i" | jq -r '.applied_index // 0' 2>/dev/null || echo 0)
		((got >= want)) && return 0
		sleep 0.2
	done
	log "n$i did not catch up in $2 s (applied $got < $want)"
	return 1
}

# make_img PATH MIB real|random|sparse
# Written in 32 KiB blocks, as the node writes images (storage.maxPiece): the
# page cache keeps each write as one folio, and every 1 KiB write into a 2 MiB
# folio (dd bs=4M) costs 28 us instead of 4, for vblade -s as for us.
make_img() {
	if [[ $3 == real ]]; then
		dd if=/dev/zero of="$1" bs=32k count=$(($2 * 32)) conv=fsync status=none
	elif [[ $3 == random ]]; then
		dd if=/dev/urandom of="$1" bs=32k count=$(($2 * 32)) conv=fsync status=none
	else
		truncate -s "$2"M "$1"
	fi
}

# cluster_up STORE MODE: n1 inits with a real image, n2 and n3 join (image streamed).
cluster_up() {
	local store=$1 mode=$2 d i
	d=$(store_dir "$store")
	mkdir -p "$d"
	make_img "$d/n1.img" "$IMG_MIB" "${IMG_FILL:-real}"
	for i in 1 2 3; do
		[[ $i == 1 ]] || make_img "$d/n$i.img" "$IMG_MIB" sparse
		write_node "$i" "$store" "$mode" "$d/n$i.img"
		node_start "$i" || return 1
	done
	ctl 1 init >>"$WORK/ctl.log" 2>&1 || { log "cluster init failed: $(tail -2 "$WORK/ctl.log")"; return 1; }
	wait_leader 20 >/dev/null || { log "no leader after init"; return 1; }
	for i in 2 3; do
		ctl "$i" join "$SUBNET.1:7000" >>"$WORK/ctl.log" 2>&1 || { log "join n$i failed: $(tail -2 "$WORK/ctl.log")"; return 1; }
	done
	wait_caught_up 2 60 && wait_caught_up 3 60
}

cluster_down() {
	local i store=$1 d
	for i in "${!NPID[@]}"; do node_stop "$i" TERM; done
	d=$(store_dir "$store")
	rm -rf "$d"/n[1-4] "$d"/n[1-4].img
}

# standalone targets on the initiator's LAN: ours (2.0) on IMG, Debian -s (3.0) on its own image.
standalone_up() {
	local img=$1 vimg=$2
	ip netns exec "$NS_S" "$VB" -b "$BUFCNT" 2 0 aoe0 "$img" >>"$WORK/standalone.log" 2>&1 &
	SPIDS+=($!)
	ip netns exec "$NS_V" /usr/sbin/vblade -b "$BUFCNT" -s 3 0 aoe0 "$vimg" >>"$WORK/vblade.log" 2>&1 &
	SPIDS+=($!)
	local k
	for k in $(seq 50); do
		[[ $(ip netns exec "$NS_I" "$CTL" discover -i aoe0 --wait 200ms --json 2>/dev/null | jq length) -ge 3 ]] && return 0
	done
	log "standalone targets never answered discovery"
	return 1
}
standalone_down() {
	local p
	for p in "${SPIDS[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done
	SPIDS=()
}

# bench TARGET ARGS...: one bounded vbladectl bench run from the initiator namespace, JSON on stdout.
# Only ever called in a subshell ($(...) or &): exec makes $! the PID of vbladectl itself, so that
# cleanup stops the load generator and not just the subshell around it.
bench() {
	local t=$1
	shift
	exec ip netns exec "$NS_I" "$CTL" bench -i aoe0 -t "$t" --min-rto "$MIN_RTO" --wait 1s --json "$@" 2>>"$WORK/bench.err"
}
# cpu_ticks PID...: user+system clock ticks the processes used so far.
cpu_ticks() {
	local p t=0 f
	for p in "$@"; do
		[[ -n $p && -r /proc/$p/stat ]] || continue
		f=$(sed 's/^.*) //' "/proc/$p/stat")
		t=$((t + $(awk '{print $12 + $13}' <<<"$f")))
	done
	echo "$t"
}
HZ=$(getconf CLK_TCK)
# jf FIELD JSON: one field of a bench result, "-" when there is none.
jf() { jq -r ".$1 // \"-\" | if type == \"number\" then (. * 10 | round / 10) else . end" <<<"${2:-null}" 2>/dev/null || echo -; }
# record PART MTU STORE MODE IMPL REP JSON
record() {
	local j=$7
	[[ -n $j ]] || j='{"iops":0,"mb_per_s":0,"lat_p99_us":0,"retransmits":0,"errors":1,"longest_stall_ms":0,"mismatches":0}'
	jq -r --arg cpu "${8:--}" --arg part "$1" --arg mtu "$2" --arg store "$3" --arg mode "$4" --arg impl "$5" --arg rep "$6" \
		'[$part, $mtu, $store, $mode, $impl, $rep, (.iops|floor|tostring), (.mb_per_s*10|round/10|tostring),
		  (.lat_p99_us|round|tostring), (.retransmits|tostring), (.errors|tostring),
		  (.longest_stall_ms*10|round/10|tostring), ((.mismatches // 0)|tostring), $cpu] | join("\t")' <<<"$j" >>"$RESULTS"
}

# ---- perf ----
# profile_nodes NAME: with PROFILE=DIR, CPU-profile every running node (through
# its admin socket's /debug/pprof) for the first repetition of each cluster
# write point; wait_profiles waits for those captures to end.
PROF_PIDS=()
profile_nodes() {
	local i secs=${DUR%s}
	mkdir -p "$PROFILE"
	for i in "${!NPID[@]}"; do
		[[ -n ${NPID[$i]} ]] || continue
		curl -s --max-time $((secs + 10)) --unix-socket "$WORK/n$i.sock" \
			"http://vblade/debug/pprof/profile?seconds=$secs" -o "$PROFILE/$1-n$i.pprof" &
		PROF_PIDS+=($!)
	done
}
wait_profiles() {
	local p
	for p in "${PROF_PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
	PROF_PIDS=()
}
# pidsof IMPL: PIDS = the target processes serving IMPL (all three nodes for the cluster).
pidsof() {
	case $1 in
	cluster) PIDS=("${NPID[@]}") ;;
	ours) PIDS=("${SPIDS[0]}") ;;
	vblade) PIDS=("${SPIDS[1]}") ;;
	esac
}
declare -A TGT=([cluster]=1.0 [ours]=2.0 [vblade]=3.0)
# perf_point MTU STORE MODE IMPL REP: one bounded bench run against IMPL,
# recorded with the CPU its target processes used per command (profiled with
# PROFILE for the first repetition of each cluster write point).
perf_point() {
	local mtu=$1 store=$2 mode=$3 impl=$4 rep=$5 out c0 c1 cpu
	pidsof "$impl"
	c0=$(cpu_ticks "${PIDS[@]}")
	[[ $impl != cluster || $rep != 1 || $mode != *write || -z ${PROFILE:-} ]] || profile_nodes "$mtu-$store-$mode"
	out=$(bench "${TGT[$impl]}" -mode "$mode" -window "$WINDOW" -duration "$DUR") || true
	c1=$(cpu_ticks "${PIDS[@]}")
	wait_profiles
	cpu=$(jq -r --arg d "$((c1 - c0))" --arg hz "$HZ" 'if .ops > 0 then ($d|tonumber) * 1e6 / ($hz|tonumber) / .ops | round | tostring else "-" end' <<<"${out:-null}" 2>/dev/null || echo -)
	record perf "$mtu" "$store" "$mode" "$impl" "$rep" "$out" "$cpu"
	log "  $mtu $store $mode $impl #$rep: $(jf iops "$out") IOPS"
}
# log_floor MTU DIR: BenchmarkLogRound on DIR's disk, the cluster idle, between the write points.
log_floor() {
	local out
	out=$(LOGROUND_DIR=$2 LOGROUND_MTU=$1 "$LOGROUND" -test.run '^$' -test.bench '^BenchmarkLogRound$' -test.benchtime "$DUR" 2>&1 | grep '^BenchmarkLogRound')
	[[ -n $out ]] || { log "log floor: no result"; return; }
	echo -e "$1\t$(awk '{for (i = 1; i < NF; i++) if ($(i+1) == "ms/quorum") q = $i; else if ($(i+1) == "ceiling-IOPS") c = $i; print q "\t" c}' <<<"$out")" >>"$WORK/floor.tsv"
	log "  log floor: $out"
}
perf_part() {
	local mtu store d mode rep impl
	for mtu in $MTUS; do
		set_mtu "$mtu"
		for store in $STORES; do
			log "perf: mtu $mtu store $store: forming the cluster (${IMG_MIB} MiB images)"
			d=$(store_dir "$store")
			mkdir -p "$d"
			cluster_up "$store" virtual || { log "perf: cluster did not form (mtu $mtu $store)"; cluster_down "$store"; continue; }
			make_img "$d/vblade.img" "$IMG_MIB" real
			# ours standalone serves the very file the leader (n1 after init) serves.
			standalone_up "$d/n$(leader)".img "$d/vblade.img" || { standalone_down; cluster_down "$store"; continue; }
			echo "mtu $mtu store $store: $(uptime)" >>"$WORK/load.txt"
			# All writes before any read: readahead fills the cluster's
			# image (not vblade's) with large folios that make later
			# small writes slower (see make_img).
			for rep in $(seq "$REPS"); do
				for mode in randwrite seqwrite; do
					for impl in cluster vblade; do perf_point "$mtu" "$store" "$mode" "$impl" "$rep"; done
				done
			done
			[[ $store != disk || -z $LOGROUND ]] || log_floor "$mtu" "$d"
			# The write points leave dirty pages in all four images; their
			# writeback (30 s later) would land on whichever read point
			# runs then.
			sync
			for rep in $(seq "$REPS"); do
				for mode in randread seqread; do
					for impl in cluster ours; do perf_point "$mtu" "$store" "$mode" "$impl" "$rep"; done
				done
			done
			standalone_down
			cluster_down "$store"
			rm -f "$d/vblade.img"
		done
	done
}

# ---- failover ----
# fo_event WHAT MODE N: a bench --follow run with one kill (or transfer) at 2.5 s.
fo_event() {
	local what=$1 mode=$2 n=$3 l nl bp out t0 tnew
	l=$(wait_leader 30) || { log "failover: no leader before $what $n"; return 1; }
	bench 1.0 -mode mixed -verify --span $((64 << 20)) -window "$WINDOW" -duration "$FO_DUR" --follow \
		--request-timeout 60s >"$WORK/fo.json" &
	bp=$!
	BGPIDS+=($bp)
	sleep 2.5
	t0=$EPOCHREALTIME
	if [[ $what == kill ]]; then
		node_stop "$l" KILL
	else
		ctl "$l" transfer >>"$WORK/ctl.log" 2>&1 || log "transfer $n: vbladectl cluster transfer failed: $(tail -1 "$WORK/ctl.log")"
	fi
	nl=$(wait_leader 30 "$l") || log "$what $n: no new leader within 30 s"
	tnew=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", (b - a) * 1000 }')
	if [[ $what == kill ]]; then
		node_start "$l" || log "$what $n: n$l did not restart"
	fi
	wait "$bp" 2>/dev/null || true
	BGPIDS=()
	out=$(cat "$WORK/fo.json")
	record "$what" "$FO_MTU" ram "$mode" "n$l>n${nl:-?}" "$n" "$out"
	echo "$what $mode $n n$l>n${nl:-?} new_leader_after_ms=$tnew" >>"$WORK/failover.txt"
	log "  $what $n ($mode): n$l -> n${nl:-?}, new leader seen after ${tnew} ms; bench longest stall $(jf longest_stall_ms "$out") ms, errors $(jf errors "$out"), mismatches $(jf mismatches "$out")"
	[[ $what == kill ]] && { wait_caught_up "$l" 60 || true; }
	return 0
}
failover_part() {
	local mode k
	set_mtu "$FO_MTU"
	for mode in $MAC_MODES; do
		log "failover: mac_mode $mode: forming the cluster (ram store)"
		IMG_MIB_SAVE=$IMG_MIB
		IMG_MIB=256
		cluster_up ram "$mode" || { log "failover: cluster did not form ($mode)"; cluster_down ram; IMG_MIB=$IMG_MIB_SAVE; continue; }
		IMG_MIB=$IMG_MIB_SAVE
		echo "failover $mode: $(uptime)" >>"$WORK/load.txt"
		for k in $(seq "$KILLS"); do fo_event kill "$mode" "$k"; done
		for k in $(seq "$TRANSFERS"); do fo_event transfer "$mode" "$k"; done
		cluster_down ram
	done
}

# ---- join ----
join_part() {
	local d t0 t1 out jt ct l
	set_mtu 1500
	d=$(store_dir disk)
	mkdir -p "$d"
	IMG_MIB_SAVE=$IMG_MIB
	IMG_MIB=$JOIN_MIB
	log "join: forming a cluster with ${JOIN_MIB} MiB images on disk"
	# Random content, so that nothing along the way can skip zeros.
	IMG_FILL=random cluster_up disk virtual || { log "join: cluster did not form"; cluster_down disk; IMG_MIB=$IMG_MIB_SAVE; return; }
	l=$(leader)
	echo "join: $(uptime)" >>"$WORK/load.txt"
	sync
	# plain copy of the leader's image file on the same filesystem
	t0=$EPOCHREALTIME
	dd if="$d/n$l.img" of="$d/copy.img" bs=4M conv=fsync status=none
	t1=$EPOCHREALTIME
	ct=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
	rm -f "$d/copy.img"
	make_img "$d/n4.img" "$JOIN_MIB" sparse
	write_node 4 disk virtual "$d/n4.img"
	node_start 4 || { cluster_down disk; IMG_MIB=$IMG_MIB_SAVE; return; }
	t0=$EPOCHREALTIME
	out=$(ctl 4 join "$SUBNET.$l:7000" 2>&1) || log "join n4 failed: $(tail -2 <<<"$out")"
	t1=$EPOCHREALTIME
	echo "$out" >>"$WORK/ctl.log"
	jt=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
	printf 'join\t%s\t%s\t%s\n' "$JOIN_MIB" "$jt" "$ct" >"$WORK/join.tsv"
	log "  join of ${JOIN_MIB} MiB: ${jt} s; dd conv=fsync copy: ${ct} s"
	cluster_down disk
	IMG_MIB=$IMG_MIB_SAVE
}

# ---- soak (issue 6: false elections at the defaults) ----
soak_part() {
	local end i s bp t
	set_mtu 1500
	log "soak: forming the cluster (disk store, ${IMG_MIB} MiB), then $SOAK_MODE window $SOAK_WINDOW --follow for $SOAK_DUR"
	cluster_up disk virtual || { log "soak: cluster did not form"; return 1; }
	for i in 1 2 3; do printf 'start n%s %s\n' "$i" "$(st "$i" | jq -c '{state, term}')"; done >"$WORK/soak-terms.txt"
	: >"$WORK/soak-timeline.tsv"
	bench 1.0 -mode "$SOAK_MODE" -window "$SOAK_WINDOW" -duration "$SOAK_DUR" --follow --request-timeout 60s >"$WORK/soak.json" &
	bp=$!
	BGPIDS+=($bp)
	t=$SECONDS
	while kill -0 "$bp" 2>/dev/null; do
		for i in 1 2 3; do
			s=$(st "$i" 2>/dev/null | jq -r '"\(.state)\t\(.term)\t\(.commit_index)"' 2>/dev/null || echo "down")
			printf '%s\t%s\tn%s\t%s\t%s\n' "$(date +%T)" "$((SECONDS - t))" "$i" "$s" "$(cut -d' ' -f1-3 /proc/loadavg)"
		done >>"$WORK/soak-timeline.tsv"
		sleep 5
	done
	wait "$bp" 2>/dev/null || true
	BGPIDS=()
	for i in 1 2 3; do printf 'end n%s %s\n' "$i" "$(st "$i" | jq -c '{state, term}')"; done >>"$WORK/soak-terms.txt"
	{
		echo
		echo "Soak (issue 6): $SOAK_MODE window $SOAK_WINDOW --follow for $SOAK_DUR at the default timers${NODE_EXTRA:+ plus: $NODE_EXTRA}, no fault injected"
		jq -r '"  workload: \(.iops|floor) IOPS, p99 \(.lat_p99_us|round) us, longest stall \(.longest_stall_ms) ms, errors \(.errors), retransmits \(.retransmits)"' "$WORK/soak.json" 2>/dev/null || echo "  workload: no result"
		sed 's/^/  /' "$WORK/soak-terms.txt"
		local won
		won=$(cat "$WORK"/n[123].log | grep -c 'leadership gained' || true)
		echo "  leadership gained (all nodes' logs, 1 expected at formation): $won -> unplanned elections: $((won - 1))"
		echo "  timer lines: $(cat "$WORK"/n[123].log | grep -ciE 'heartbeat timeout reached|failed to contact quorum|election timeout reached' || true)"
		grep -HiE 'heartbeat timeout reached|failed to contact quorum|election timeout reached|leadership (gained|lost)|entering (leader|candidate|follower) state' "$WORK"/n[123].log | sed "s|$WORK/||; s/^/    /" | head -40
		echo "  load average over the soak (1-min): $(awk -F'\t' '{print $NF}' "$WORK/soak-timeline.tsv" | awk '{print $1}' | sort -n | awk '{a[NR]=$1} END {if (NR) printf "min %s median %s max %s", a[1], a[int((NR+1)/2)], a[NR]}')"
	} | tee "$WORK/soak-report.txt"
	cluster_down disk
}

# ---- run ----
# From here on a failed step is logged and the run goes on to the report.
set +e
start_time=$SECONDS
echo "start: $(uptime)" >"$WORK/load.txt"
for part in $PARTS; do
	case $part in
	perf) perf_part ;;
	failover) failover_part ;;
	join) join_part ;;
	soak) soak_part ;;
	*) die "unknown part $part" ;;
	esac
done
echo "end: $(uptime)" >>"$WORK/load.txt"
log "cluster parts took $((SECONDS - start_time))s"

# ---- report ----
med() { sort -n | awk '{a[NR]=$1} END { if (!NR) print 0; else if (NR % 2) print a[(NR+1)/2]; else print (a[NR/2]+a[NR/2+1])/2 }'; }
if [[ " $PARTS " == *" perf "* ]]; then
	echo
	echo "Cluster benchmark: 3 nodes on $(nproc) CPUs, $(uname -r), window $WINDOW, bufcnt $BUFCNT, ${DUR} per point, median of $REPS, ${IMG_MIB} MiB images"
	echo "disk = images and Raft data under /var/tmp; ram = on tmpfs. writes: cluster (acked after Raft commit on 2 of 3"
	echo "fsynced logs) vs Debian vblade -s on one node; reads: cluster leader vs our standalone target on the same file."
	echo "cpu/op: CPU time (user+system, us) the target processes used per command (all three nodes for the cluster)"
	echo
	printf '%-5s %-5s %-9s | %9s %7s %6s %4s %6s | %9s %7s %6s %4s %6s | %6s %s\n' MTU store mode cluster MB/s p99us rtx cpu/op other MB/s p99us rtx cpu/op ratio "vs"
	for mtu in $MTUS; do for store in $STORES; do for mode in randwrite seqwrite randread seqread; do
		if [[ $mode == *write ]]; then other=vblade; else other=ours; fi
		line=()
		for impl in cluster $other; do
			sel() { awk -F'\t' -v m="$mtu" -v s="$store" -v o="$mode" -v i="$impl" -v c="$1" '$1=="perf" && $2==m && $3==s && $4==o && $5==i {print $c}' "$RESULTS"; }
			line+=("$(sel 7 | med)" "$(sel 8 | med)" "$(sel 9 | med)" "$(sel 10 | med)" "$(sel 14 | grep -v -- - | med)")
		done
		ratio=$(awk -v a="${line[0]}" -v b="${line[5]}" 'BEGIN { print (a > 0 && b > 0) ? sprintf("%.2f", a / b) : "-" }')
		printf '%-5s %-5s %-9s | %9.0f %7s %6.0f %4.0f %6.0f | %9.0f %7s %6.0f %4.0f %6.0f | %6s %s\n' "$mtu" "$store" "$mode" \
			"${line[0]}" "${line[1]}" "${line[2]}" "${line[3]}" "${line[4]}" "${line[5]}" "${line[6]}" "${line[7]}" "${line[8]}" "${line[9]}" "$ratio" "$other"
		echo -e "$mtu\t$store\t$mode\t$other\t$ratio" >>"$WORK/ratios.tsv"
	done; done; done
	if [[ -s $WORK/floor.tsv ]]; then
		echo
		echo "Log floor (disk): the leader's bolt commit of a round of 16 one-frame writes (Batch entries of <= 32 KiB), then the first"
		echo "of the two followers' (BenchmarkLogRound: no network, no apply, no AoE), measured between the write points; 16 writes per"
		echo "such round bound any implementation on this log at window 16:"
		while IFS=$'\t' read -r mtu q c; do
			v=$(awk -F'\t' -v m="$mtu" '$1=="perf" && $2==m && $3=="disk" && $4=="randwrite" && $5=="vblade" {print $7}' "$RESULTS" | med)
			awk -v m="$mtu" -v q="$q" -v c="$c" -v v="$v" 'BEGIN { printf "  mtu %-5s %s ms per quorum -> at most %.0f IOPS at window 16 = %s x vblade -s randwrite (%.0f)\n", m, q, c, (v > 0) ? sprintf("%.2f", c / v) : "-", v }'
		done <"$WORK/floor.tsv"
	fi
	echo
	echo "Targets (window $WINDOW):"
	awk -F'\t' '{
		if ($4 == "vblade") printf "  %s %-4s %-9s mtu %-5s cluster/vblade-s %s (want >= 2)\n", ($5 != "-" && $5 >= 2) ? "ok  " : "MISS", $2, $3, $1, $5
		else printf "  %s %-4s %-9s mtu %-5s cluster/standalone %s (want >= 0.90)\n", ($5 != "-" && $5 >= 0.9) ? "ok  " : "MISS", $2, $3, $1, $5
	}' "$WORK/ratios.tsv"
fi
if [[ " $PARTS " == *" failover "* ]]; then
	echo
	echo "Failover (3 nodes, ram store, MTU $FO_MTU, window $WINDOW, bench -mode mixed -verify --follow, event at 2.5 s of $FO_DUR):"
	echo "longest stall seen by vbladectl bench (last completion before the event to first after), ms"
	# An event counts only if a new serving leader appeared and the bench gave a result; the others are
	# listed as invalid (their "stall" would measure nothing).
	valid() { awk -F'\t' -v w="$1" -v m="$2" '$1==w && $4==m && $5 !~ /n\?$/ && $11 == 0 {print $12}' "$RESULTS"; }
	for what in kill transfer; do for mode in $MAC_MODES; do
		v=$(valid "$what" "$mode")
		bad=$(awk -F'\t' -v w="$what" -v m="$mode" '$1==w && $4==m && ($5 ~ /n\?$/ || $11 != 0) {n++} END {print n+0}' "$RESULTS")
		[[ -n $v || $bad != 0 ]] || continue
		n=0
		[[ -z $v ]] || n=$(wc -l <<<"$v")
		printf '  %-8s mac_mode %-7s n=%d  median %7s ms  max %7s ms  all: %s  invalid (no new leader, or bench errors) %s  mismatches %s\n' "$what" "$mode" "$n" \
			"$(med <<<"$v")" "$(sort -n <<<"$v" | tail -1)" "$(tr '\n' ' ' <<<"$v")" "$bad" \
			"$(awk -F'\t' -v w="$what" -v m="$mode" '$1==w && $4==m {s+=$13} END {print s+0}' "$RESULTS")"
	done; done
	for mode in $MAC_MODES; do
		v=$(valid kill "$mode")
		bad=$(awk -F'\t' -v m="$mode" '$1=="kill" && $4==m && ($5 ~ /n\?$/ || $11 != 0) {n++} END {print n+0}' "$RESULTS")
		m=$(med <<<"$v")
		printf '  %s kill mac_mode %-7s median stall %s ms over %s valid kills (want < 2000, and every kill valid)\n' \
			"$(awk -v m="$m" -v b="$bad" 'BEGIN { print (m > 0 && m < 2000 && b == 0) ? "ok  " : "MISS" }')" "$mode" "$m" "$(grep -c . <<<"$v")"
	done
	echo "  time from the event to a new serving leader seen on the admin API:"
	sed 's/^/    /' "$WORK/failover.txt"
fi
if [[ " $PARTS " == *" join "* && -s $WORK/join.tsv ]]; then
	echo
	IFS=$'\t' read -r _ mib jt ct <"$WORK/join.tsv"
	echo "Join of a ${mib} MiB image (disk store, MTU 1500; 'vbladectl cluster join' start to caught up) vs dd conv=fsync copy of the file:"
	awk -v mib="$mib" -v jt="$jt" -v ct="$ct" 'BEGIN {
		printf "  join %7.2f s %7.1f MB/s | copy %7.2f s %7.1f MB/s | join/copy throughput %.2f\n",
			jt, mib * 1.048576 / jt, ct, mib * 1.048576 / ct, ct / jt }'
fi
echo
echo "Load average:"
sed 's/^/  /' "$WORK/load.txt"
if awk -F'\t' '$11 > 0 { bad = 1 } END { exit !bad }' "$RESULTS"; then
	echo
	echo "Some points had I/O errors (column 11 of $RESULTS); first messages:"
	head -5 "$WORK/bench.err" || true
fi
