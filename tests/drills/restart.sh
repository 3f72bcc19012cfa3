# shellcheck shell=sh
# Drill "restart": kill -9 of the daemon while the filesystem is mounted and being written.
# With `--user-recovery` (the kernel's UBLK_F_USER_RECOVERY_REISSUE) the device stays, its I/O
# waits; `deltavol add` on the same volume takes the device over and the mounted filesystem
# carries on without an I/O error. Every file the writer completed verifies; e2fsck is clean.
. "${DRILL_LIB:-/drills/lib.sh}"

NAME=rstvol
MED=/mnt/rstmed
MNT=/mnt/rstvol
scratch_mount "$MED" 900m
mkdir -p "$MNT"
DEV=$(dv_add "$NAME" 256MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 2000 --user-recovery) || abort add "add failed"
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"
# Kernel messages from here on only (earlier drills in this boot may have logged errors).
DMESG_START=$(dmesg | wc -l)

STOP=$DRILL_TMP/stop
ERRS=$DRILL_TMP/writer.err
SUMS=$DRILL_TMP/sums
: >"$ERRS"
: >"$SUMS"
(
    i=0
    while [ ! -e "$STOP" ]; do
        if dd if=/dev/urandom of="$MNT/w$i" bs=4096 count=8 conv=fsync 2>/dev/null; then
            (cd "$MNT" && sha256sum "w$i") >>"$SUMS"
        else
            echo "write of w$i failed" >>"$ERRS"
        fi
        i=$((i + 1))
    done
) &
WRITER=$!
sleep 3
PID=$(dv_pid "$NAME")
kill -9 "$PID"
wait_pid_gone "$PID" 30 || fail kill "daemon survived SIGKILL"
sleep 1
if [ -b "$DEV" ]; then pass device-kept; else fail device-kept "$DEV vanished: no user recovery?"; fi
t0=$(now_s)
DEV2=$(dv_add "$NAME" 256MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 2000) || abort takeover "add (take over) failed"
log "taken over as $DEV2 after $(elapsed_s "$t0")s"
if [ "$DEV2" = "$DEV" ]; then pass same-device; else fail same-device "got $DEV2, had $DEV"; fi
sleep 3
touch "$STOP"
wait_pid_gone "$WRITER" 60 || fail writer-stops "the writer is stuck"
n=$(wc -l <"$SUMS")
log "writer completed $n files across the crash"
if [ -s "$ERRS" ]; then fail no-io-errors "$(head -n 3 "$ERRS" | tr '\n' ' ')"; else pass no-io-errors; fi
dmesg | tail -n +"$((DMESG_START + 1))" >"$DRILL_TMP/dmesg"
grep -iE "I/O error|EXT4-fs error" "$DRILL_TMP/dmesg" | head -n 3 | sed 's/^/# dmesg: /'
if grep -qiE "EXT4-fs error|I/O error" "$DRILL_TMP/dmesg"; then
    fail no-fs-errors "the kernel logged I/O or filesystem errors during the drill"
else
    pass no-fs-errors
fi
check verify-files sh -c "cd '$MNT' && sha256sum -c -s '$SUMS'"
check umount umount "$MNT"
check fsck e2fsck -fn "$DEV2"
check del dv_del "$NAME"
check_no_ublk_devices no-devices-left
drill_finish
