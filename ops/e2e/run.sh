#!/bin/bash
# vblade-ha end-to-end test against the real Linux aoe driver (Debian kernel in a QEMU/TCG guest).
#
#   ops/e2e/run.sh SCENARIO [--target ours|debian] [--target-cmd TEMPLATE] [--mtu N] [--mac-mode virtual|node] [KEY=VALUE...]
#
# SCENARIO is scenarios/SCENARIO.sh (host side) + scenarios/SCENARIO.guest.sh (guest side): basic,
# cluster-failover.
# --target ours    (default) builds ./cmd/vblade and ./cmd/vbladectl with `go build` into the run directory
#                  and runs '{bin} {shelf} {slot} {if} {file}' (cluster scenarios set their own template);
#                  set E2E_BIN (and E2E_CTL for vbladectl) to use prebuilt binaries instead.
# --mac-mode M     mac_mode of the cluster nodes (cluster scenarios; default virtual): E2E_MAC_MODE.
# --target debian  runs Debian's /usr/sbin/vblade (the reference; installed by prepare.sh).
# --target-cmd T   any target command line with placeholders (see lib.sh: expand_target_cmd).
# KEY=VALUE        exported before the scenario runs (e.g. AOEG_AOE_PARAMS=aoe_deadsecs=10, E2E_MTU=9000).
# Output: $E2E_OUT/<scenario>-<target>-<timestamp>/ (default E2E_OUT=/tmp/vblade-ha-e2e) with summary.txt,
# console.log, events.log, target.N.log, target1.pcap; latest-<scenario> links to the newest.
# Exit status 0 only when every check passed. Wall time is printed at the end.
#
# No "set -e": kill/wait of already-dead processes must not abort the run or its cleanup.
HERE=$(cd "$(dirname "$0")" && pwd)
. "$HERE/lib.sh"
T_START=$(now_us)
[ "$(id -u)" = 0 ] || die "run as root (network namespaces, tap device, apt-get)"

SCEN=${1:?usage: $0 SCENARIO [--target ours|debian] [--target-cmd TEMPLATE] [--mtu N] [KEY=VALUE...]  (scenarios: $(cd "$HERE/scenarios" && ls *.sh | grep -v '\.guest\.sh$' | grep -v '^_' | sed 's/\.sh$//' | tr '\n' ' '))}
shift
TARGET=ours TARGET_CMD=
while [ $# -gt 0 ]; do
    case "$1" in
        --target) TARGET=$2; shift 2;;
        --target=*) TARGET=${1#*=}; shift;;
        --target-cmd) TARGET=custom TARGET_CMD=$2; shift 2;;
        --target-cmd=*) TARGET=custom TARGET_CMD=${1#*=}; shift;;
        --mtu) export E2E_MTU=$2; shift 2;;
        --mac-mode) export E2E_MAC_MODE=$2; shift 2;;
        --mac-mode=*) export E2E_MAC_MODE=${1#*=}; shift;;
        *=*) export "${1?}"; shift;;
        *) die "unknown argument: $1";;
    esac
done
SFILE=$HERE/scenarios/$SCEN.sh
[ -f "$SFILE" ] || die "no such scenario: $SFILE"

"$HERE/prepare.sh" || die "prepare.sh failed"

OUT=${E2E_OUT:-/tmp/vblade-ha-e2e}
RUN=$OUT/$SCEN-$TARGET${E2E_MAC_MODE:+-$E2E_MAC_MODE}-$(date +%Y%m%d-%H%M%S)-$$
mkdir -p "$RUN"; export RUN
ln -sfn "$RUN" "$OUT/latest-$SCEN"

case "$TARGET" in
    ours)
        if [ -z "$E2E_BIN" ]; then
            command -v go >/dev/null || die "go not found: cannot build ./cmd/vblade (or set E2E_BIN)"
            log "building ./cmd/vblade ./cmd/vbladectl"
            (cd "$E2E_REPO" && go build -o "$RUN/" ./cmd/vblade ./cmd/vbladectl) || die "go build ./cmd/vblade ./cmd/vbladectl failed"
            E2E_BIN=$RUN/vblade
            E2E_CTL=${E2E_CTL:-$RUN/vbladectl}
        fi
        if [ -z "$E2E_CTL" ] && [ -x "$(dirname "$E2E_BIN")/vbladectl" ]; then E2E_CTL=$(dirname "$E2E_BIN")/vbladectl; fi
        TARGET_CMD='{bin} {shelf} {slot} {if} {file}';;
    debian)
        E2E_BIN=/usr/sbin/vblade
        [ -x "$E2E_BIN" ] || die "$E2E_BIN missing (apt-get install vblade)"
        TARGET_CMD='{bin} {shelf} {slot} {if} {file}';;
    custom) ;;
    *) die "--target must be ours or debian (or use --target-cmd)";;
esac
export E2E_BIN E2E_CTL TARGET_CMD

# defaults a scenario may override
NTARGETS=1
GUEST_SCRIPT=$HERE/scenarios/$SCEN.guest.sh
GUEST_FILES=()
GUEST_TIMEOUT=170
host_setup()  { :; }
host_during() { :; }
host_verify() { :; }
VERDICT=PASS
verdict_fail() { VERDICT=FAIL; log "CHECK FAILED: $*"; echo "CHECK FAILED: $*" >>"$RUN/events.log"; }
event() { local t0; t0=$(cat "$RUN/t0_us" 2>/dev/null || echo "$T_START"); echo "$(since_s "$t0")| $*" >>"$RUN/events.log"; log "event: $*"; }

# shellcheck disable=SC1090
. "$SFILE"

finish() {
    local rc=$?
    set +e
    cleanup_run
    ip netns list | grep -q "^${E2E_NS}-" && log "WARNING: namespaces ${E2E_NS}-* left behind"
    log "wall time: $(since_s "$T_START") s  (scenario $SCEN, target $TARGET, result ${VERDICT})"
    exit $rc
}
trap finish EXIT
trap 'exit 130' INT TERM

net_up "$NTARGETS"
host_setup
export AOEG_TIMEOUT=${AOEG_TIMEOUT:-$((GUEST_TIMEOUT - 10))}
build_overlay "$GUEST_SCRIPT" "${GUEST_FILES[@]}"
log "scenario $SCEN: target=$TARGET accel=$E2E_ACCEL ntargets=$NTARGETS mtu=$E2E_MTU out=$RUN"
T_BOOT=$(now_us)
start_guest
echo "0.000| guest start (accel $E2E_ACCEL)" >>"$RUN/events.log"
if ! wait_console '@@AOE BOOT' 90; then
    verdict_fail "guest did not boot"; tail -20 "$RUN/console.log" >&2; exit 1
fi
event "guest booted after $(since_s "$T_BOOT") s: $(grep -m1 '@@AOE BOOT' "$RUN/console.log" | sed 's/.*@@AOE //')"
host_during
wait_guest_exit "$GUEST_TIMEOUT" || verdict_fail "guest timed out"
event "guest exited ($(since_s "$T_BOOT") s after QEMU start)"

grep -q '@@AOE GUEST-DONE rc=0' "$RUN/console.log" || verdict_fail "guest script rc!=0: $(cvalue GUEST-DONE)"
grep -q '@@AOE FAIL' "$RUN/console.log" && verdict_fail "guest reported: $(grep '@@AOE FAIL' "$RUN/console.log" | head -3)"
host_verify

{
    echo "scenario: $SCEN   target: $TARGET ($(expand_target_cmd "$TARGET_CMD" 1 1 0 disk.img))   accel: $E2E_ACCEL   out: $RUN"
    echo "--- events (host seconds since QEMU start)"; cat "$RUN/events.log"
    echo "--- guest markers"
    grep -E '\| @@AOE ' "$RUN/console.log" | grep -vE '@@AOE (PROGRESS|DEBUGFS|DMESG-)' | sed 's/@@AOE //'
    echo "--- aoe kernel messages"
    grep -E '\| \[ *[0-9.]+\] aoe' "$RUN/console.log" | sort -u -t'|' -k2 | head -40
    echo "wall time so far: $(since_s "$T_START") s"
    echo "RESULT: $VERDICT"
} >"$RUN/summary.txt"
cat "$RUN/summary.txt"
[ "$VERDICT" = PASS ]
