# shellcheck shell=sh
# Drill: `deltavol verify` (scrub) on a live, mounted volume. A volume shipping to a data plane
# in the VM gets files, is verified clean (exit 0) while a writer keeps going; then one block of
# its permanent storage (the backing file) is damaged behind its back, and verify must name
# exactly that block's LBA range and exit 1; after the block is put back it is clean again.
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
NAME=scrubvol
MED=/mnt/scrubmed
MNT=/mnt/scrubvol
scratch_mount "$MED" 700m
mkdir -p "$MNT"
TOK=$MED/token
printf 'drill-secret-%s\n' "$$" >"$TOK"

dp_start "$MED/dp" "$TOK" 2 || abort dataplane-start "the data plane did not start"
pass dataplane-start
DEV=$(dv_add "$NAME" 64MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 600000 \
    --dataplane "$DP_ADDR" --auth-token-file "$TOK") || abort add "deltavol add --dataplane failed"
pass add
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"
make_tree "$MNT/a" 4 64 || fail write "could not write files"
sync

# Clean, with a writer running meanwhile (its writes go to the SSD cache during the scrub).
( i=0; while [ $i -lt 40 ]; do dd if=/dev/urandom of="$MNT/w.$i" bs=4096 count=8 conv=fsync 2>/dev/null; i=$((i + 1)); done ) &
writer=$!
if run_timeout 300 "$DV" verify "$NAME" >"$DRILL_TMP/v1.out" 2>&1; then
    pass verify-clean
else
    fail verify-clean "exit $?: $(tail -n 3 "$DRILL_TMP/v1.out" | tr '\n' ' ')"
fi
wait "$writer" && pass writer-during-verify || fail writer-during-verify "the writer failed during verify"
log "verify: $(tail -n 2 "$DRILL_TMP/v1.out" | tr '\n' ' ')"

# Damage block 16000 of the backing file (free space near the end of the 64 MiB filesystem,
# which nothing writes meanwhile; zeros in the snapshot), keeping its contents to put back.
check flush-before-damage "$DV" snapshot "$NAME"
BLK=16000
dd if="$MED/backing.img" of="$DRILL_TMP/blk.orig" bs=4096 skip=$BLK count=1 2>/dev/null
dd if=/dev/urandom of="$MED/backing.img" bs=4096 seek=$BLK count=1 conv=notrunc 2>/dev/null
if run_timeout 300 "$DV" verify "$NAME" >"$DRILL_TMP/v2.out" 2>&1; then
    fail verify-finds-damage "exit 0 after block $BLK of the backing file was overwritten"
else
    rc=$?
    [ "$rc" = 1 ] && pass verify-exit-1 || fail verify-exit-1 "exit $rc, wanted 1"
    # The report names each range as "blocks FIRST..END (N blocks, ...)".
    if grep -q "blocks $BLK\.\.$((BLK + 1)) (1 blocks" "$DRILL_TMP/v2.out"; then
        pass verify-names-the-block
    else
        fail verify-names-the-block "block $BLK not in: $(tr '\n' ' ' <"$DRILL_TMP/v2.out" | cut -c1-300)"
    fi
fi
log "verify after damage: $(tr '\n' ' ' <"$DRILL_TMP/v2.out" | cut -c1-300)"
dd if="$DRILL_TMP/blk.orig" of="$MED/backing.img" bs=4096 seek=$BLK count=1 conv=notrunc 2>/dev/null
check verify-clean-again run_timeout 300 "$DV" verify "$NAME"

check umount umount "$MNT"
check fsck e2fsck -fn "$DEV"
check del dv_del "$NAME"
kill "$DP_PID" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
