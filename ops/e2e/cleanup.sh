#!/bin/bash
# Remove leftovers of e2e runs that were killed hard (kill -9 of run.sh, so its EXIT trap never ran):
# processes recorded in the run directories' pid files whose runner is gone (killed by PID), and
# vbha-e2e-<pid>-* namespaces whose runner PID no longer exists. A live run is never touched.
. "$(dirname "$0")/lib.sh"
OUT=${E2E_OUT:-/tmp/vblade-ha-e2e}
for d in "$OUT"/*-*-*-[0-9]*; do
    [ -d "$d" ] || continue
    owner=${d##*-}
    kill -0 "$owner" 2>/dev/null && continue          # its runner is still alive
    for f in "$d"/*.pid; do
        [ -f "$f" ] || continue
        p=$(cat "$f"); kill -0 "$p" 2>/dev/null && { log "killing pid $p ($f)"; kill -9 "$p"; }
        rm -f "$f"
    done
done
for ns in $(ip netns list | awk '{print $1}' | grep -E '^vbha-e2e-[0-9]+-(br|t[0-9]+)$'); do
    owner=$(echo "$ns" | sed -E 's/^vbha-e2e-([0-9]+)-.*/\1/')
    kill -0 "$owner" 2>/dev/null && continue
    log "deleting namespace $ns (runner pid $owner is gone)"; ip netns del "$ns"
done
ip netns list | grep -E '^vbha-e2e-' || log "no vbha-e2e-* namespaces left"
