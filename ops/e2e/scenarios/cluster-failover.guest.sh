# guest side of cluster-failover (busybox ash, aoelib.sh sourced)
# env: AOEG_IO_DUR, AOEG_NCH (64 KiB chunks in pattern.bin), AOEG_NFILES, AOEG_STALL_CS, AOEG_AOE_PARAMS
D=/dev/etherd/e1.0
aoe_load $AOEG_AOE_PARAMS
aoe_wait_dev e1.0 30 || fail "e1.0 never appeared"
aoe_info e1.0
/sbin/mke2fs -q -t ext4 -F $D >/tmp/mkfs.log 2>&1 || { cat /tmp/mkfs.log; fail "mke2fs -t ext4"; }
mark MKFS ok
modprobe crc32c_generic; modprobe ext4 || fail "modprobe ext4"
mount -t ext4 $D /mnt || fail "mount ext4"
mkdir -p /mnt/d || fail mkdir
(while read -r l; do mark ERRDEV "$l"; done < /dev/etherd/err) & E=$!
tgt_watch e1.0 2 & W=$!
NCH=${AOEG_NCH:-64}; NF=${AOEG_NFILES:-200}; DUR=${AOEG_IO_DUR:-40}; TH=${AOEG_STALL_CS:-20}
: >/tmp/manifest
upcs; start=$UPCS; last=$UPCS; prog=$UPCS
k=0 errs=0 maxgap=0 stalls=0
mark IO-START files=$NF chunks=$NCH dur=${DUR}s t=$(fmtcs $start)
while :; do
    f=$((k % NF)); j=$((k % NCH))
    dd if=/scenario/pattern.bin of=/mnt/d/f$f bs=64k count=1 skip=$j conv=fsync 2>/tmp/dd.err
    rc=$?
    upcs; t=$UPCS; gap=$((t-last))
    if [ $rc -ne 0 ]; then
        errs=$((errs+1)); mark IO-ERROR t=$(fmtcs $t) op=$k file=f$f "$(grep -v records /tmp/dd.err | tail -1)"
        [ $errs -ge 5 ] && { mark IO-ABORT after $errs errors; break; }
    else
        echo "$f $j" >>/tmp/manifest
    fi
    [ $gap -ge $TH ] && { stalls=$((stalls+1)); mark STALL from=$(fmtcs $last) to=$(fmtcs $t) dur=$(fmtcs $gap) op=$k rc=$rc; }
    [ $gap -gt $maxgap ] && maxgap=$gap
    last=$t; k=$((k+1))
    [ $((t-prog)) -ge 300 ] && { mark PROGRESS t=$(fmtcs $t) ops=$k errors=$errs; prog=$t; }
    [ $((t-start)) -ge $((DUR*100)) ] && break
done
mark IO-END ops=$k errors=$errs stalls=$stalls maxgap=$(fmtcs $maxgap) elapsed=$(fmtcs $((t-start)))
kill $W $E 2>/dev/null
aoe_info e1.0
mark TGTS-END $(tgt_line e1.0)
sync
umount /mnt || fail umount
mark UMOUNT ok
/sbin/e2fsck -fn $D >/tmp/fsck.log 2>&1 && mark FSCK clean || { sed 's/^/@@AOE FSCK-LOG /' /tmp/fsck.log | head -30; mark FSCK bad; }
mount -t ext4 -o ro $D /mnt || fail "mount ro"
awk '{last[$1]=$2} END {for (f in last) print f, last[f]}' /tmp/manifest >/tmp/final
n=0 bad=0
while read -r f j; do
    want=$(sed -n "$((j+1))p" /scenario/chunks.sha)
    got=$(sha256sum </mnt/d/f$f | cut -d' ' -f1)
    n=$((n+1))
    [ "$got" = "$want" ] || { bad=$((bad+1)); mark BAD-FILE f$f chunk=$j got=$got; }
done </tmp/final
umount /mnt
if [ $bad = 0 ] && [ $n -gt 0 ]; then mark VERIFY ok files=$n; else mark VERIFY bad files=$n bad=$bad; fi
kerr=$(dmesg | grep -ciE 'I/O error|EXT4-fs error|Buffer I/O|journal.*abort')
mark KERNEL-IO-ERRORS $kerr
[ "$kerr" = 0 ] || dmesg | grep -iE 'I/O error|EXT4-fs error|Buffer I/O|journal' | head -10 | sed 's/^/@@AOE KERNEL /'
[ $errs = 0 ] || fail "$errs I/O errors during the write loop"
