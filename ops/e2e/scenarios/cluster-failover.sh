# cluster-failover: three `vblade node` processes (namespaces t1..t3, Raft on 10.99.200.1-3:7000) form a
# cluster with vbladectl and export e1.0 (64 MiB). The guest makes ext4 on e1.0, mounts it and writes files
# (one 64 KiB chunk of a random pattern per file, dd conv=fsync, 200 files overwritten in turn) while the host
# SIGKILLs the leader NKILLS times (every KILL_EVERY s), restarting the killed node each time and waiting for
# it to catch up. Then: umount, e2fsck -fn clean in the guest, every file's sha256 equal to its chunk's, zero
# I/O errors (dd/fsync and kernel log); host: `vbladectl cluster verify` equal on all nodes, e2fsck -fn of
# each node's image. The stall the guest sees per kill (gap between two fsync'd writes around the kill,
# guest uptime, 10 ms resolution) is printed, with median and max.
#   ops/e2e/run.sh cluster-failover                     # mac_mode = virtual (default)
#   ops/e2e/run.sh cluster-failover --mac-mode node     # the nodes' own MACs + re-announce
#   ops/e2e/run.sh cluster-failover NKILLS=5 KILL_EVERY=8   # (KILLS=5 is accepted as a synonym of NKILLS=5)
#   ops/e2e/run.sh cluster-failover TRANSFERS=1             # after the kills, planned `vbladectl cluster transfer`s
#                                                           # (every TRANSFER_EVERY s); their guest stall is printed too
NTARGETS=3
E2E_MAC_MODE=${E2E_MAC_MODE:-virtual}
export E2E_MAC_MODE
# KILLS=N on the command line is a synonym of NKILLS=N (KILLS is reused below for the kill record).
case "${KILLS:-}" in ''|*[!0-9]*) ;; *) NKILLS=${NKILLS:-$KILLS};; esac
NKILLS=${NKILLS:-3}
TRANSFERS=${TRANSFERS:-0}
TRANSFER_EVERY=${TRANSFER_EVERY:-6}
# One kill cycle (SIGKILL, new leader seen, restart, caught up) takes about 10 s on the host while the TCG
# guest loads it; in node mode the driver also needs its 10 s scorn timeout (+ one rto) to move frames off
# the dead MAC. A kill that comes late is made at once; one after the guest's loop ended fails the run.
if [ "$E2E_MAC_MODE" = node ]; then KILL_EVERY=${KILL_EVERY:-22}; else KILL_EVERY=${KILL_EVERY:-14}; fi
FIRST_KILL=${FIRST_KILL:-4}
export AOEG_IO_DUR=${AOEG_IO_DUR:-$((FIRST_KILL + NKILLS * KILL_EVERY + TRANSFERS * TRANSFER_EVERY + 2))}
export AOEG_NCH=${AOEG_NCH:-64}
export AOEG_NFILES=${AOEG_NFILES:-200}
export AOEG_STALL_CS=${AOEG_STALL_CS:-20}   # report gaps >= 0.20 s
export AOEG_AOE_PARAMS=${AOEG_AOE_PARAMS:-}
GUEST_TIMEOUT=$((AOEG_IO_DUR + 110))
TARGET_CMD='{bin} node -c {run}/node{idx}.toml'
KILLS=()
XFERS=()

host_setup() {
    [ -x "$E2E_CTL" ] || die "vbladectl not found (E2E_CTL); run with --target ours or set E2E_CTL"
    command -v jq >/dev/null || command -v python3 >/dev/null || die "jq or python3 is needed to read vbladectl --json"
    local i
    for i in 1 2 3; do truncate -s 64M "$RUN/disk.$i.img"; write_node_config "$i" "$RUN/disk.$i.img"; done
    head -c $((AOEG_NCH * 65536)) /dev/urandom >"$RUN/pattern.bin"
    for i in $(seq 0 $((AOEG_NCH - 1))); do
        dd if="$RUN/pattern.bin" bs=64k skip="$i" count=1 status=none | sha256sum | cut -d' ' -f1
    done >"$RUN/chunks.sha"
    GUEST_FILES=("$RUN/pattern.bin" "$RUN/chunks.sha")
    start_pcap 1; start_pcap 2; start_pcap 3
    targets_start 3 1 0 "$RUN/disk.{idx}.img"
    sleep 0.5
    ctl 1 init >>"$RUN/ctl.log" 2>&1 || { verdict_fail "cluster init on n1 failed: $(tail -3 "$RUN/ctl.log")"; return; }
    wait_leader 15 >/dev/null || { verdict_fail "no leader after init"; return; }
    for i in 2 3; do
        ctl "$i" join "$(node_raft 1)" >>"$RUN/ctl.log" 2>&1 || { verdict_fail "join n$i failed: $(tail -3 "$RUN/ctl.log")"; return; }
        wait_caught_up "$i" 60 || verdict_fail "n$i did not catch up after joining"
    done
    ctl 1 status >>"$RUN/ctl.log" 2>&1
    event "cluster formed (mac_mode $E2E_MAC_MODE): leader n$(cluster_leader)"
}

host_during() {
    wait_console '@@AOE IO-START' 120 || { verdict_fail "guest never started I/O"; return; }
    event "guest I/O started"
    local tio k l t0 next; tio=$(now_us); t0=$(cat "$RUN/t0_us")
    for k in $(seq 1 "$NKILLS"); do
        next=$(( tio + (FIRST_KILL + (k - 1) * KILL_EVERY) * 1000000 ))
        while [ "$(now_us)" -lt "$next" ]; do sleep 0.1; done
        guest_running || { verdict_fail "guest gone before kill $k"; return; }
        l=$(wait_leader 30) || { verdict_fail "kill $k: no serving leader for 30 s (see unplanned elections below)"; return; }
        KILLS+=("$(since_s "$t0") $l")
        printf '%s\n' "${KILLS[@]}" >"$RUN/kills.txt"   # kept up to date: a run cut short still reports its stalls
        target_stop "$l" KILL
        event "KILL $k: SIGKILL leader n$l"
        local nl; nl=$(wait_leader 30 "$l") && event "kill $k: new leader n$nl" || verdict_fail "kill $k: no new leader within 15 s"
        sleep 1
        target_start "$l" 1 0 "$RUN/disk.$l.img"
        if wait_caught_up "$l" 30; then event "kill $k: n$l restarted and caught up"; else verdict_fail "kill $k: n$l did not catch up"; fi
    done
    printf '%s\n' "${KILLS[@]}" >"$RUN/kills.txt"
    # planned switchovers: the leader hands over with `vbladectl cluster transfer`, nothing is killed
    local x
    for x in $(seq 1 "$TRANSFERS"); do
        next=$(( tio + (FIRST_KILL + NKILLS * KILL_EVERY + x * TRANSFER_EVERY - TRANSFER_EVERY / 2) * 1000000 ))
        while [ "$(now_us)" -lt "$next" ]; do sleep 0.1; done
        guest_running || { verdict_fail "guest gone before transfer $x"; return; }
        l=$(wait_leader 30) || { verdict_fail "transfer $x: no serving leader"; return; }
        XFERS+=("$(since_s "$t0") $l")
        printf '%s\n' "${XFERS[@]}" >"$RUN/transfers.txt"
        if ctl "$l" transfer >>"$RUN/ctl.log" 2>&1; then event "TRANSFER $x: planned transfer away from n$l"
        else verdict_fail "transfer $x: vbladectl cluster transfer on n$l failed: $(tail -2 "$RUN/ctl.log" | tr '\n' ' ')"; fi
        local nl; nl=$(wait_leader 30 "$l") && event "transfer $x: new leader n$nl" || verdict_fail "transfer $x: no new leader"
    done
}

host_verify() {
    local i out
    grep -q '@@AOE FSCK clean' "$RUN/console.log" || verdict_fail "guest e2fsck not clean"
    grep -q '@@AOE VERIFY ok' "$RUN/console.log" || verdict_fail "guest checksums: $(cvalue VERIFY)"
    [ "$(cvalue KERNEL-IO-ERRORS)" = 0 ] || verdict_fail "guest kernel I/O errors: $(cvalue KERNEL-IO-ERRORS)"
    local ie; ie=$(cvalue IO-END); case "$ie" in *" errors=0 "*) ;; *) verdict_fail "guest I/O errors: $ie";; esac
    [ "${#KILLS[@]}" = "$NKILLS" ] || verdict_fail "only ${#KILLS[@]} of $NKILLS kills happened"
    # every kill must fall inside the guest's write loop (host time of the IO-END line)
    local ioend; ioend=$(grep -m1 '@@AOE IO-END' "$RUN/console.log" | cut -d'|' -f1 | tr -d ' ')
    local kt; for kt in "${KILLS[@]}"; do
        awk -v k="${kt%% *}" -v e="${ioend:-0}" 'BEGIN { exit !(k + 2 < e) }' ||
            verdict_fail "kill at ${kt%% *} s came after (or within 2 s of) the guest's write loop end at ${ioend:-?} s: raise AOEG_IO_DUR"
    done
    # images equal on every node, as the cluster itself checks them
    if out=$(ctl "$(cluster_leader || echo 1)" verify 2>&1); then event "cluster verify: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"
    else verdict_fail "cluster verify: $(echo "$out" | tr '\n' ' ' | cut -c1-300)"; fi
    ctl 1 status >>"$RUN/ctl.log" 2>&1
    for i in 1 2 3; do
        if e2fsck -fn "$RUN/disk.$i.img" >"$RUN/host-e2fsck.$i.log" 2>&1; then event "host: e2fsck -fn of n$i's image clean"
        else verdict_fail "host: e2fsck of n$i's image (see $RUN/host-e2fsck.$i.log)"; fi
    done
    # guest stall per kill (and per planned transfer): the STALL marker (guest uptime) whose interval, placed
    # on the host clock by the console timestamp of its line (= its end), contains the event time
    stall_report "$RUN/kills.txt" kill GUEST-STALLS
    [ -s "$RUN/transfers.txt" ] && stall_report "$RUN/transfers.txt" transfer GUEST-TRANSFER-STALLS
    # leaderships won over the run, against the ones the kills forced: the rest are false elections
    # (a loaded host delaying heartbeats beyond heartbeat_timeout), each one a stall the guest pays for
    local won; won=$(cat "$RUN"/target.*.log | grep -c 'leadership gained')
    event "leaderships gained: $won (1 at formation + ${#KILLS[@]} forced by kills + ${#XFERS[@]} transfers; unplanned: $((won - 1 - ${#KILLS[@]} - ${#XFERS[@]})))"
    for i in 1 2 3; do target_alive "$i" || verdict_fail "node $i not running at the end (see $RUN/target.$i.log)"; done
}

# stall_report EVENTS_FILE WHAT SUMMARY_TAG: per event line "<host s> <node>", the guest stall around it.
stall_report() {
    awk -v th="$AOEG_STALL_CS" -v mode="$E2E_MAC_MODE" -v what="$2" -v tag="$3" '
        FNR==NR { kt[++nk]=$1; kn[nk]=$2; next }
        /@@AOE STALL / { split($1, a, "|"); e=a[1]+0; d=0; for (i=1;i<=NF;i++) if ($i ~ /^dur=/) d=substr($i,5)+0
                         ns++; se[ns]=e; sd[ns]=d }
        END {
            for (k=1;k<=nk;k++) {
                best=-1
                for (s=1;s<=ns;s++) if (kt[k] >= se[s]-sd[s]-0.3 && kt[k] <= se[s]+0.1 && sd[s] > best) best=sd[s]
                if (best < 0) { v[k]=th/100; lt="<" } else { v[k]=best; lt="" }
                printf "guest stall %s %d (n%s at %.3f s): %s%.2f s\n", what, k, kn[k], kt[k], lt, v[k]
            }
            n=nk; for (i=1;i<=n;i++) for (j=i+1;j<=n;j++) if (v[j]<v[i]) { t=v[i]; v[i]=v[j]; v[j]=t }
            if (n>0) printf "%s mode=%s %ss=%d median=%.2f s max=%.2f s\n", tag, mode, what, n, (n%2 ? v[(n+1)/2] : (v[n/2]+v[n/2+1])/2), v[n]
        }' "$1" "$RUN/console.log" 2>/dev/null | while read -r l; do event "$l"; done
}
