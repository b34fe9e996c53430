# basic: one target exports e1.0 from a 64 MiB sparse file.
# Guest (scenarios/basic.guest.sh): modprobe aoe, discover, check the size, O_DIRECT pattern write and
# readback at 48 MiB, mke2fs on the first 32 MiB, mount, write, umount, e2fsck, read back through the fs.
# Host: the pattern is in the backing file at 48 MiB; e2fsck -fn of the image is clean; debugfs reads the
# guest's file.
NTARGETS=1
GUEST_TIMEOUT=150
host_setup() {
    truncate -s 64M "$RUN/disk.img"
    head -c 4M /dev/urandom >"$RUN/pattern.bin"
    GUEST_FILES=("$RUN/pattern.bin")
    export AOEG_PATTERN_SHA; AOEG_PATTERN_SHA=$(sha256sum <"$RUN/pattern.bin" | cut -d' ' -f1)
    export AOEG_AOE_PARAMS=${AOEG_AOE_PARAMS:-}
    start_pcap 1
    targets_start "$NTARGETS" 1 0 "$RUN/disk.img"
}
host_verify() {
    local got
    got=$(dd if="$RUN/disk.img" bs=1M skip=48 count=4 status=none | sha256sum | cut -d' ' -f1)
    if [ "$got" = "$AOEG_PATTERN_SHA" ]; then event "host: pattern found at 48 MiB of the backing file"
    else verdict_fail "host: pattern mismatch in the backing file ($got)"; fi
    if e2fsck -fn "$RUN/disk.img" >"$RUN/host-e2fsck.log" 2>&1; then event "host: e2fsck -fn clean"
    else verdict_fail "host: e2fsck reports problems (see $RUN/host-e2fsck.log)"; fi
    got=$(debugfs -R 'cat /hello.txt' "$RUN/disk.img" 2>/dev/null)
    if [ "$got" = "hello from the linux aoe initiator" ]; then event "host: debugfs cat /hello.txt ok"
    else verdict_fail "host: /hello.txt holds '$got'"; fi
    target_alive 1 || verdict_fail "target 1 died during the run (see $RUN/target.1.log)"
}
