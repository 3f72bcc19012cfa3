# shellcheck shell=sh
# Drill "clone": clone the first snapshot of a live, mounted volume; the clone holds exactly
# the files of that moment, and writes to each volume leave the other unchanged.
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
MED=/mnt/clmed
A=/mnt/orig
B=/mnt/clone
scratch_mount "$MED" 1200m
mkdir -p "$A" "$B"
dp_with_token "$MED" clone-drill-secret || abort dataplane-start "the data plane did not start"

# shellcheck disable=SC2086
DEV=$(dv_add orig 128MiB "$MED/o/cache" "$MED/o/backing.img" --flush-interval-ms 600000 $DPARGS) || abort add "add failed"
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$A" || abort mount "cannot mount"
make_tree "$A/first" 6 64 || fail write-1 "could not write"
sums() { (cd "$1" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum); }
sums "$A" >"$DRILL_TMP/sums.s1"
sync
check freeze fsfreeze --freeze "$A"
S1=$(run_timeout 120 "$DV" snapshot orig) || fail snapshot "snapshot failed"
fsfreeze --unfreeze "$A"
make_tree "$A/second" 6 64 || fail write-2 "could not write"
sync
log "first snapshot $S1"

# shellcheck disable=SC2086
if run_timeout 120 "$DV" clone "orig@$S1" --name copy --cache-dir "$MED/c/cache" --backing "$MED/c/backing.img" \
    --flush-interval-ms 600000 $DPARGS >"$DRILL_TMP/clone.out" 2>"$DRILL_TMP/clone.err"; then
    pass clone
else
    sed 's/^/# clone: /' "$DRILL_TMP/clone.err"
    abort clone "deltavol clone failed"
fi
CDEV=$(grep -o '/dev/ublkb[0-9][0-9]*' "$DRILL_TMP/clone.out" | tail -n 1)
wait_for_block "$CDEV" || abort clone-device "no clone device"
check mount-clone mount -t ext4 "$CDEV" "$B" || abort mount-clone "cannot mount the clone"
sums "$B" >"$DRILL_TMP/sums.clone"
cmp -s "$DRILL_TMP/sums.s1" "$DRILL_TMP/sums.clone" && pass clone-holds-its-moment ||
    fail clone-holds-its-moment "the clone differs from snapshot $S1"

# Writes to each leave the other unchanged.
check write-clone dd if=/dev/urandom of="$B/only-in-clone" bs=1024 count=128 conv=fsync
check write-orig dd if=/dev/urandom of="$A/only-in-orig" bs=1024 count=128 conv=fsync
[ ! -e "$A/only-in-clone" ] && [ -d "$A/second" ] && pass orig-unchanged-by-clone || fail orig-unchanged-by-clone "the original sees the clone's writes"
[ ! -e "$B/only-in-orig" ] && [ ! -e "$B/second" ] && pass clone-unchanged-by-orig || fail clone-unchanged-by-orig "the clone sees the original's writes"
S2=$(run_timeout 120 "$DV" snapshot copy) || fail clone-snapshot "the clone's own snapshot failed"
log "the clone's first own snapshot: $S2"
check umount-both sh -c "umount '$A' && umount '$B'"
check fsck-orig e2fsck -fn "$DEV"
check fsck-clone e2fsck -fn "$CDEV"
check del-clone dv_del copy
check del-orig dv_del orig
kill "$DP_PID" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
