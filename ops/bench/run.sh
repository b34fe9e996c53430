#!/usr/bin/env bash
# make bench: our bin/vblade against Debian's /usr/sbin/vblade and a
# no-storage echo target (the wire limit), side by side on one private LAN.
#
# The LAN is two network namespaces joined by a veth pair that this script
# creates and removes; no existing interface ever carries AoE. Every load
# point is bounded by time (-duration) and the whole run by the matrix below.
#
# Environment:
#   QUICK=1      a ~1 minute smoke run (MTU 1500, window 16 and one window=bufcnt point),
#                plus ~2 minutes for the cluster part
#   DUR=3s       length of each point (QUICK: 1s)
#   MTUS, WINDOWS, MODES   override the matrix (space separated)
#   BUFCNT=64    -b given to every target
#   KEEP=1       keep the raw results directory
#   VBLADE_BIN=path   use this build of our target instead of building bin/vblade
#   CLUSTER=0    skip the cluster part (ops/bench/cluster.sh: three nodes, durable
#                writes, reads, failover stall, join), which runs after this table
#                and honours QUICK=1 too; its own knobs are described in that file
#
# Must run as root (namespaces, raw sockets, tmpfs mount).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

QUICK=${QUICK:-0}
BUFCNT=${BUFCNT:-64}
if [[ $QUICK == 1 ]]; then
	DUR=${DUR:-1s}
	MTUS=${MTUS:-1500}
	WINDOWS=${WINDOWS:-16}
	MODES=${MODES:-randread randwrite seqread seqwrite}
	DISK_MODES=${DISK_MODES:-randread randwrite}
	DISK_WINDOWS=${DISK_WINDOWS:-16}
	DISK_MTUS=${DISK_MTUS:-1500}
else
	DUR=${DUR:-3s}
	MTUS=${MTUS:-1500 9000}
	WINDOWS=${WINDOWS:-1 16 64}
	MODES=${MODES:-randread randwrite seqread seqwrite}
	DISK_MODES=${DISK_MODES:-randread randwrite seqread seqwrite}
	DISK_WINDOWS=${DISK_WINDOWS:-1 16}
	DISK_MTUS=${DISK_MTUS:-1500}
fi
SYNC_MODES=${SYNC_MODES:-randwrite seqwrite}
# Floor of the client's retransmit timeout. Load generator and targets share
# the CPUs here, so a scheduling hiccup must not pass for a lost frame: the
# retransmit count is meant to count losses (late_responses in the raw JSON
# shows spurious ones).
MIN_RTO=${MIN_RTO:-50ms}
IMG_MIB=1024
SHELF=1
SLOT=0

die() { echo "bench: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }

[[ $(id -u) == 0 ]] || die "must run as root (network namespaces, raw sockets, tmpfs)"
command -v ip >/dev/null || die "iproute2 'ip' is missing"

# Tools the run needs, installed from Debian's archive when missing.
need=()
[[ -x /usr/sbin/vblade ]] || need+=(vblade)
command -v jq >/dev/null || need+=(jq)
if ((${#need[@]})); then
	log "installing ${need[*]}"
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}") >&2 ||
		die "cannot install ${need[*]}"
fi

# ---- state torn down by cleanup (PIDs we started, namespaces, mounts) ----
ID=$$
NS_T=vbb-t-$ID
NS_I=vbb-i-$ID
IF_T=vbbt$ID
IF_I=vbbi$ID
WORK=$(mktemp -d /var/tmp/vblade-bench.XXXXXX)
RAMDIR=$WORK/ram
TPID=
cleanup() {
	set +e
	if [[ -n $TPID ]]; then
		kill "$TPID" 2>/dev/null
		wait "$TPID" 2>/dev/null
	fi
	ip netns del "$NS_T" 2>/dev/null
	ip netns del "$NS_I" 2>/dev/null
	mountpoint -q "$RAMDIR" && umount "$RAMDIR"
	if [[ ${KEEP:-0} == 1 ]]; then
		log "results kept in $WORK"
	else
		rm -rf "$WORK"
	fi
}
trap cleanup EXIT
trap 'log interrupted; exit 130' INT TERM

# ---- build ----
mkdir -p bin
go build -o bin/vbladectl ./cmd/vbladectl || die "cannot build vbladectl"
OURS=1
VBLADE_BIN=${VBLADE_BIN:-}
if [[ -z $VBLADE_BIN ]]; then
	VBLADE_BIN=$ROOT/bin/vblade
	if ! go build -o bin/vblade ./cmd/vblade; then
		log "WARNING: bin/vblade does not build: our target is left out of this run"
		OURS=0
	fi
fi
[[ -x $VBLADE_BIN ]] || OURS=0
ECHO=0
if ((OURS)) && [[ $("$VBLADE_BIN" echo 2>&1 || true) == *"usage: vblade echo"* ]]; then
	ECHO=1
else
	log "WARNING: 'bin/vblade echo' is not available: no wire-limit column"
fi

# ---- images: 1 GiB on tmpfs and 1 GiB on the disk holding /var/tmp ----
mkdir -p "$RAMDIR"
mount -t tmpfs -o size=$((IMG_MIB + 64))m vblade-bench "$RAMDIR"
RAMIMG=$RAMDIR/disk.img
DISKIMG=$WORK/disk.img
fallocate -l ${IMG_MIB}M "$RAMIMG"
log "writing a ${IMG_MIB} MiB image to $DISKIMG"
# Real blocks, not a sparse file: reads of holes would never touch the disk.
dd if=/dev/zero of="$DISKIMG" bs=4M count=$((IMG_MIB / 4)) conv=fsync status=none

# ---- LAN ----
ip netns add "$NS_T"
ip netns add "$NS_I"
ip link add "$IF_T" netns "$NS_T" type veth peer name "$IF_I" netns "$NS_I"
for ns in "$NS_T" "$NS_I"; do
	ip -n "$ns" link set lo up
	ip netns exec "$ns" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 || true
done
ip -n "$NS_T" link set "$IF_T" up
ip -n "$NS_I" link set "$IF_I" up

set_mtu() {
	ip -n "$NS_T" link set "$IF_T" mtu "$1"
	ip -n "$NS_I" link set "$IF_I" mtu "$1"
}

RESULTS=$WORK/results.tsv
MEMS=$WORK/mem.tsv
: >"$RESULTS"
: >"$MEMS"

# start_target IMPL STORE: IMPL is ours|vblade|echo, STORE ram|disk|direct|sync.
start_target() {
	local impl=$1 store=$2 img=$RAMIMG flags=()
	case $store in
	ram) ;;
	disk) img=$DISKIMG ;;
	direct) img=$DISKIMG flags=(-d) ;;
	sync) img=$DISKIMG flags=(-s) ;;
	esac
	local cmd
	case $impl in
	ours) cmd=("$VBLADE_BIN" -b "$BUFCNT" "${flags[@]}" $SHELF $SLOT "$IF_T" "$img") ;;
	vblade) cmd=(/usr/sbin/vblade -b "$BUFCNT" "${flags[@]}" $SHELF $SLOT "$IF_T" "$img") ;;
	echo) cmd=("$VBLADE_BIN" echo -b "$BUFCNT" $SHELF $SLOT "$IF_T" $IMG_MIB) ;;
	esac
	# ip netns exec execs the command: $! is the target's own PID.
	ip netns exec "$NS_T" "${cmd[@]}" >>"$WORK/target-$impl.log" 2>&1 &
	TPID=$!
	local i
	for i in $(seq 50); do
		if ! kill -0 "$TPID" 2>/dev/null; then
			log "$impl ($store) exited at start: $(tail -3 "$WORK/target-$impl.log")"
			TPID=
			return 1
		fi
		if [[ $(ip netns exec "$NS_I" "$ROOT/bin/vbladectl" discover -i "$IF_I" --wait 200ms --json 2>/dev/null | jq length) -ge 1 ]]; then
			return 0
		fi
	done
	log "$impl ($store) never answered discovery"
	stop_target
	return 1
}

stop_target() {
	if [[ -n $TPID ]]; then
		kill "$TPID" 2>/dev/null || true
		wait "$TPID" 2>/dev/null || true
		TPID=
	fi
}

# point MTU IMPL STORE MODE WINDOW: one bounded load run, one result line.
point() {
	local mtu=$1 impl=$2 store=$3 mode=$4 win=$5 out
	out=$(ip netns exec "$NS_I" "$ROOT/bin/vbladectl" bench -i "$IF_I" -t $SHELF.$SLOT -mode "$mode" \
		-window "$win" -duration "$DUR" --min-rto "$MIN_RTO" --wait 300ms --json 2>>"$WORK/bench.err") || true
	if [[ -z $out ]]; then
		log "no result: mtu $mtu $impl $store $mode w$win"
		printf '%s\t%s\t%s\t%s\t%s\t0\t0\t0\t0\t1\t0\n' "$mtu" "$store" "$mode" "$win" "$impl" >>"$RESULTS"
		return
	fi
	jq -r --arg mtu "$mtu" --arg store "$store" --arg impl "$impl" \
		'[$mtu, $store, .mode, (.window|tostring), $impl, (.iops|floor|tostring), (.mb_per_s*10|round/10|tostring),
		  (.lat_p99_us|round|tostring), (.retransmits|tostring), (.errors|tostring), (.late_responses|tostring)] | join("\t")' \
		<<<"$out" >>"$RESULTS"
	printf '  %-5s %-6s %-6s %-9s w%-3s %9s IOPS\n' "$mtu" "$impl" "$store" "$mode" "$win" \
		"$(jq '.iops|floor' <<<"$out")" >&2
}

record_mem() {
	local impl=$1 store=$2 mtu=$3 hwm
	hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$TPID/status" 2>/dev/null || echo 0)
	printf '%s\t%s\t%s\t%s\n' "$impl" "$store" "$mtu" "$hwm" >>"$MEMS"
}

impls=()
((ECHO)) && impls+=(echo)
((OURS)) && impls+=(ours)
impls+=(vblade)

start_time=$SECONDS
for mtu in $MTUS; do
	set_mtu "$mtu"
	for impl in "${impls[@]}"; do
		start_target "$impl" ram || continue
		for mode in $MODES; do
			for win in $WINDOWS; do
				point "$mtu" "$impl" ram "$mode" "$win"
			done
		done
		# window = bufcnt: must not lose a frame (zero retransmits).
		if [[ " $WINDOWS " != *" $BUFCNT "* ]]; then
			point "$mtu" "$impl" ram randread "$BUFCNT"
			point "$mtu" "$impl" ram randwrite "$BUFCNT"
		fi
		record_mem "$impl" ram "$mtu"
		stop_target
	done
done
for mtu in $DISK_MTUS; do
	set_mtu "$mtu"
	for store in disk direct sync; do
		modes=$DISK_MODES
		[[ $store == sync ]] && modes=$SYNC_MODES
		for impl in "${impls[@]}"; do
			[[ $impl == echo ]] && continue
			start_target "$impl" "$store" || continue
			for mode in $modes; do
				for win in $DISK_WINDOWS; do
					point "$mtu" "$impl" "$store" "$mode" "$win"
				done
			done
			record_mem "$impl" "$store" "$mtu"
			stop_target
		done
	done
done
log "load points took $((SECONDS - start_time))s"

# ---- report ----
echo
echo "AoE benchmark: $(nproc) CPUs, $(uname -r), bufcnt $BUFCNT, ${DUR} per point, 1 GiB image"
echo "ram = tmpfs image; disk = file in /var/tmp; direct = -d (O_DIRECT); sync = -s (O_SYNC)"
echo
awk -F'\t' '
function r(a, b) { return (b > 0 && a > 0) ? sprintf("%.2f", a / b) : "-" }
{
	k = $1 SUBSEP $2 SUBSEP $3 SUBSEP $4
	if (!(k in seen)) { seen[k] = 1; order[++n] = k }
	iops[k, $5] = $6; mbps[k, $5] = $7; p99[k, $5] = $8; rtx[k, $5] = $9; err[k, $5] = $10
	if ($5 == "echo") echoi[$1 SUBSEP $3 SUBSEP $4] = $6
}
END {
	printf "%-5s %-6s %-9s %4s | %8s | %8s %7s %6s %4s | %8s %7s %6s %4s | %7s %7s\n",
		"MTU", "store", "mode", "win", "echo", "ours", "MB/s", "p99us", "rtx", "vblade", "MB/s", "p99us", "rtx", "o/vblade", "o/echo"
	for (i = 1; i <= n; i++) {
		k = order[i]; split(k, f, SUBSEP)
		e = echoi[f[1] SUBSEP f[3] SUBSEP f[4]]
		printf "%-5s %-6s %-9s %4s | %8s | %8s %7s %6s %4s | %8s %7s %6s %4s | %7s %7s\n",
			f[1], f[2], f[3], f[4], (e == "" ? "-" : e),
			(k SUBSEP "ours") in iops ? iops[k, "ours"] : "-", mbps[k, "ours"], p99[k, "ours"], rtx[k, "ours"],
			(k SUBSEP "vblade") in iops ? iops[k, "vblade"] : "-", mbps[k, "vblade"], p99[k, "vblade"], rtx[k, "vblade"],
			r(iops[k, "ours"], iops[k, "vblade"]), r(iops[k, "ours"], e)
	}
}' "$RESULTS"
echo
echo "Resident memory (VmHWM) after the load, 1 GiB image:"
awk -F'\t' '{ printf "  %-6s %-6s mtu %-5s %8.1f MiB\n", $1, $2, $3, $4 / 1024 }' "$MEMS"

# ---- targets from the issue (window 16 unless said) ----
echo
echo "Targets:"
awk -F'\t' -v bufcnt="$BUFCNT" '
{ iops[$1, $2, $3, $4, $5] = $6; rtx[$1, $2, $3, $4, $5] = $9; keys[$1 SUBSEP $2 SUBSEP $3 SUBSEP $4] = 1 }
function verdict(ok) { return ok ? "ok  " : "MISS" }
END {
	for (k in keys) {
		split(k, f, SUBSEP); mtu = f[1]; st = f[2]; mode = f[3]; w = f[4]
		o = iops[mtu, st, mode, w, "ours"]; v = iops[mtu, st, mode, w, "vblade"]; e = iops[mtu, "ram", mode, w, "echo"]
		if (o == "") continue
		if (w == 16 && st == "ram" && e > 0)
			printf "  %s ram %-9s mtu %-5s ours/echo   %.2f (want >= 0.95)\n", verdict(o >= 0.95 * e), mode, mtu, o / e
		if (w == 16 && st == "direct" && v > 0)
			printf "  %s direct %-9s mtu %-5s ours/vblade %.2f (want >= 4)\n", verdict(o >= 4 * v), mode, mtu, o / v
		if (w == 16 && st == "sync" && v > 0 && mode ~ /write/)
			printf "  %s sync %-9s mtu %-5s ours/vblade %.2f (want >= 4)\n", verdict(o >= 4 * v), mode, mtu, o / v
		if (w == bufcnt)
			printf "  %s %s %-9s mtu %-5s window=bufcnt retransmits %d (want 0)\n", verdict(rtx[mtu, st, mode, w, "ours"] == 0), st, mode, mtu, rtx[mtu, st, mode, w, "ours"]
	}
}' "$RESULTS" | sort -k2
awk -F'\t' '$1 == "ours" && $2 == "ram" { printf "  %s resident memory %.1f MiB (want < 50)\n", ($4 < 50 * 1024 ? "ok  " : "MISS"), $4 / 1024 }' "$MEMS"
if awk -F'\t' '$10 > 0 { bad = 1 } END { exit !bad }' "$RESULTS"; then
	echo
	echo "Some points had I/O errors (last column of $RESULTS); first messages:"
	head -5 "$WORK/bench.err" || true
fi

# ---- cluster part (ops/bench/cluster.sh): three nodes on their own LAN ----
if [[ ${CLUSTER:-1} != 0 ]]; then
	if ((!OURS)); then
		log "WARNING: no working bin/vblade: the cluster part is skipped"
		exit 1
	fi
	# The standalone table is printed; its LAN and images go before the cluster part starts.
	trap - EXIT
	cleanup
	echo
	cluster_rc=0
	QUICK=$QUICK BUFCNT=$BUFCNT MIN_RTO=$MIN_RTO VBLADE_BIN=$VBLADE_BIN VBLADECTL_BIN=$ROOT/bin/vbladectl \
		bash "$ROOT/ops/bench/cluster.sh" || cluster_rc=$?
	((cluster_rc == 0)) || log "cluster part failed (exit $cluster_rc)"
	exit "$cluster_rc"
fi
