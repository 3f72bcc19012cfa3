# shellcheck shell=sh
# Drill: kill -9 of the daemon in the middle of a write stream loses nothing that was synced.
#
# ext4 on the volume; a writer adds batches of files, each file written with fsync
# (dd conv=fsync) and the batch closed with syncfs (sync -f); a batch is recorded as synced (on
# a different tmpfs, never on the device) only when all of that succeeded. The daemon is killed
# with SIGKILL mid-stream. Then: lazy unmount, `deltavol del` (tolerating a device the kernel
# already removed), `deltavol add` on the same cache dir and backing file, mount once to replay
# the journal, umount, e2fsck -fn clean, mount, and every batch synced before the kill verifies.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol mkfs.ext4 e2fsck sha256sum

NAME=crash
SIZE=256MiB
SSD=/mnt/ssd
HDD=/mnt/hdd
STATE=/mnt/state            # the writer's records: a tmpfs of its own, not on the device
CACHE_DIR=$SSD/$NAME
BACKING=$HDD/$NAME.img
MNT=/mnt/$NAME
FILES_PER_BATCH=4
FILE_KIB=64
BATCHES_BEFORE_KILL=${CRASH_BATCHES_BEFORE_KILL:-4}
WRITER_PID=

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    [ -n "$WRITER_PID" ] && kill -9 "$WRITER_PID" 2>/dev/null
    is_mounted "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    dv_del_quiet "$NAME"
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$SSD" 700m
scratch_mount "$HDD" 400m
scratch_mount "$STATE" 64m
mkdir -p "$MNT"

DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms 1000) ||
    abort add "deltavol add failed"
pass add
check mkfs mkfs.ext4 -q -F "$DEV" || abort mkfs "cannot go on without a filesystem"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot go on without a mount"

# writer: batch after batch until killed or the fs fails. Records go to $STATE:
#   batch<i>.sums  sha256 of the batch's files (paths relative to $MNT)
#   synced         one batch number per line, appended only after fsync + syncfs succeeded
writer() {
    b=1
    while :; do
        d=$MNT/batch$b
        mkdir -p "$d" || exit 1
        f=0
        while [ "$f" -lt "$FILES_PER_BATCH" ]; do
            dd if=/dev/urandom of="$d/f$f" bs=1024 count="$FILE_KIB" conv=fsync 2>/dev/null || exit 1
            f=$((f + 1))
        done
        (cd "$MNT" && sha256sum "batch$b"/*) >"$STATE/batch$b.sums" || exit 1
        sync -f "$d" || exit 1
        echo "$b" >>"$STATE/synced"
        b=$((b + 1))
    done
}
: >"$STATE/synced"
writer >"$STATE/writer.log" 2>&1 &
WRITER_PID=$!

# Let some batches land, then kill the daemon in the middle of the next one.
i=0
while [ "$(wc -l <"$STATE/synced")" -lt "$BATCHES_BEFORE_KILL" ] && [ "$i" -lt 600 ]; do
    pid_alive "$WRITER_PID" || break
    sleep 0.2
    i=$((i + 1))
done
n_before=$(wc -l <"$STATE/synced")
if [ "$n_before" -ge "$BATCHES_BEFORE_KILL" ]; then
    pass batches-synced
else
    fail batches-synced "only $n_before batches synced before the kill (writer: $(tail -n 2 "$STATE/writer.log" | tr '\n' ' '))"
fi

DPID=$(dv_pid "$NAME") || abort daemon-pid "cannot find the daemon's pid (status --json pid)"
pid_alive "$DPID" || abort daemon-pid "daemon pid $DPID is not running"
pass daemon-pid
sleep 0.3   # mid-batch
kill -9 "$DPID"
synced_at_kill=$(wc -l <"$STATE/synced")
log "killed daemon $DPID with $synced_at_kill batches synced"
if wait_pid_gone "$DPID" 30; then
    pass daemon-killed
else
    fail daemon-killed "daemon $DPID still alive 30s after SIGKILL"
fi

# The writer either fails with EIO (device aborted/removed) or blocks (device waiting for a
# recovering daemon). Stop it either way; the list of synced batches is now final.
kill -9 "$WRITER_PID" 2>/dev/null
if wait_pid_gone "$WRITER_PID" 20; then
    log "writer stopped: $(tail -n 1 "$STATE/writer.log")"
else
    log "writer $WRITER_PID stuck (uninterruptible I/O on the dead device)"
fi
WRITER_PID=
n_synced=$(wc -l <"$STATE/synced")
[ "$n_synced" -ge "$synced_at_kill" ] || n_synced=$synced_at_kill
log "$n_synced batches recorded as synced"

if wait_gone "$DEV" 10; then
    log "the kernel removed $DEV when the daemon died"
else
    log "$DEV is still present after the daemon died (waiting for recovery or del)"
fi
umount -l "$MNT" 2>/dev/null
if is_mounted "$MNT"; then
    fail lazy-umount "$MNT still mounted after umount -l"
else
    pass lazy-umount
fi
# del must cope with a dead daemon; a volume that is already gone is fine too.
run_timeout "$DV_CMD_TIMEOUT_S" "$DV" del "$NAME" >"$DRILL_TMP/del.out" 2>&1 ||
    log "del after the crash: exit $? ($(tr '\n' ' ' <"$DRILL_TMP/del.out" | cut -c1-200))"
if wait_gone "$DEV" 30; then
    pass device-gone
else
    fail device-gone "$DEV still exists 30s after the crash and del"
fi

# --- reattach and check ---
t0=$(now_s)
DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms 1000) ||
    abort re-add "deltavol add (reattach after crash) failed"
pass re-add
log "reattached as $DEV after $(elapsed_s "$t0")s"

# ext4's journal needs replay after a crash: mount once, then fsck the clean image.
check replay-mount mount -t ext4 "$DEV" "$MNT" || abort replay-mount "cannot mount after the crash"
check replay-umount umount "$MNT"
check fsck e2fsck -fn "$DEV"
check mount-after-fsck mount -t ext4 "$DEV" "$MNT" || abort mount-after-fsck "cannot verify without a mount"

missing=0
bad=0
b=1
while [ "$b" -le "$n_synced" ]; do
    if ! (cd "$MNT" && sha256sum -c -s "$STATE/batch$b.sums") 2>/dev/null; then
        if [ -d "$MNT/batch$b" ]; then bad=$((bad + 1)); else missing=$((missing + 1)); fi
        log "batch $b does not verify"
    fi
    b=$((b + 1))
done
if [ "$n_synced" -gt 0 ] && [ "$missing" -eq 0 ] && [ "$bad" -eq 0 ]; then
    pass synced-batches-verify
else
    fail synced-batches-verify "of $n_synced synced batches: $missing missing, $bad corrupt"
fi

# The filesystem is usable again.
check write-after-crash dd if=/dev/urandom of="$MNT/after-crash" bs=1024 count=256 conv=fsync
check umount umount "$MNT"
check fsck-final e2fsck -fn "$DEV"
check del dv_del "$NAME"
wait_gone "$DEV" 30
# The dead daemon's kernel device must not be leaked either (del after a crash deletes it).
check_no_ublk_devices no-devices-left
drill_finish
