# shellcheck shell=sh
# Drill: point in time by the clock (issue 18). A mounted ext4 volume with files and SQLite is
# snapshotted at two known moments a few seconds apart; the machine is lost; on another node
# `deltavol recover NAME --at TIME`, TIME between the two cuts, gives exactly the earlier
# snapshot: it says which, every file of that moment verifies, SQLite's integrity check passes,
# e2fsck is clean, the way back (the blocks that differ from the chain head) was committed
# before the device went live, and the newest snapshot equals the device byte for byte.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane sqlite3 mkfs.ext4 e2fsck sha256sum cmp date
NAME=atvol
MED=/mnt/atmed
MNT=/mnt/atvol

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    is_mounted "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    DELTAVOL_RUN_DIR=/run/dv-at2 dv_del_quiet "$NAME"
    DELTAVOL_RUN_DIR=/run/dv-at1 dv_del_quiet "$NAME"
    [ -n "${DP_PID:-}" ] && kill "$DP_PID" 2>/dev/null
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$MED" 1400m
mkdir -p "$MNT"
dp_with_token "$MED" recover-at-drill-secret || abort dataplane-start "the data plane did not start"

# --- machine 1: two snapshots at known moments ---
export DELTAVOL_RUN_DIR=/run/dv-at1
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 256MiB "$MED/m1/cache" "$MED/m1/backing.img" --flush-interval-ms 600000 $DPARGS) ||
    abort add "deltavol add failed"
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"
make_tree "$MNT/first" 6 128 || fail write-1 "could not write files"
sqlite_kv_create "$MNT/app.db"
(cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.first"
sync
check freeze-1 fsfreeze --freeze "$MNT"
S1=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-1 "snapshot failed"
fsfreeze --unfreeze "$MNT"
sleep 2
# A moment between the two cuts, in the 'YYYY-MM-DD HH:MM:SS' (UTC) form a person types.
AT=$(date -u '+%Y-%m-%d %H:%M:%S')
sleep 2
make_tree "$MNT/second" 6 128 || fail write-2 "could not write files"
sqlite_kv_more "$MNT/app.db"
sync
check freeze-2 fsfreeze --freeze "$MNT"
S2=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-2 "snapshot failed"
fsfreeze --unfreeze "$MNT"
log "snapshots $S1 and $S2; recovering as of $AT"
# shellcheck disable=SC2086
"$DV" snapshots "$NAME" $DPARGS | sed 's/^/# /'

# --- machine 1 is lost ---
PID1=$(dv_pid "$NAME")
kill -9 "$PID1"
wait_pid_gone "$PID1" 30 || fail kill "daemon $PID1 survived SIGKILL"
umount -l "$MNT" 2>/dev/null
run_timeout 60 "$DV" del "$NAME" >/dev/null 2>&1
rm -rf "$MED/m1"

# --- machine 2: recover as of AT ---
export DELTAVOL_RUN_DIR=/run/dv-at2
# shellcheck disable=SC2086
if run_timeout 300 "$DV" recover "$NAME" --at "$AT" --cache-dir "$MED/m2/cache" --backing "$MED/m2/backing.img" \
    --flush-interval-ms 600000 $DPARGS >"$DRILL_TMP/recover.out" 2>"$DRILL_TMP/recover.err"; then
    pass recover-at
else
    sed 's/^/# recover: /' "$DRILL_TMP/recover.err"
    abort recover-at "deltavol recover --at failed"
fi
sed 's/^/# recover: /' "$DRILL_TMP/recover.err"
if grep -q "as of .*: snapshot $S1," "$DRILL_TMP/recover.err"; then
    pass resolved-to-earlier-snapshot
else
    fail resolved-to-earlier-snapshot "recover did not say snapshot $S1"
fi
DEV=$(grep -o '/dev/ublkb[0-9][0-9]*' "$DRILL_TMP/recover.out" | tail -n 1)
wait_for_block "$DEV" || abort recover-device "no device"
check mount-recovered mount -t ext4 "$DEV" "$MNT" || abort mount-recovered "cannot mount the recovered volume"
(cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.got"
if cmp -s "$DRILL_TMP/sums.first" "$DRILL_TMP/sums.got"; then
    pass files-of-that-moment
else
    fail files-of-that-moment "the volume does not hold exactly the files of snapshot $S1"
    diff "$DRILL_TMP/sums.first" "$DRILL_TMP/sums.got" | head -n 10 | sed 's/^/# /'
fi
ok=$(sqlite3 "$MNT/app.db" "pragma integrity_check;" 2>&1)
[ "$ok" = ok ] && pass sqlite-integrity || fail sqlite-integrity "$ok"
rows=$(sqlite3 "$MNT/app.db" "select count(*) from kv;" 2>&1)
[ "$rows" = 2000 ] && pass sqlite-rows-of-that-moment || fail sqlite-rows-of-that-moment "expected 2000 rows, got $rows"
check umount-recovered umount "$MNT"
check fsck-recovered e2fsck -fn "$DEV"
# The way back was shipped as the chain's next snapshot before the device went live; the
# chain goes on from it, and a snapshot taken now equals the device byte for byte.
if grep -q "rolled back to snapshot $S1: .* committed as snapshot" "$DRILL_TMP/recover.err"; then
    pass way-back-committed
else
    fail way-back-committed "recover did not report the way back to $S1 as committed"
fi
S3=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-after "snapshot failed"
[ -n "$S3" ] && [ "$S3" -gt "$S2" ] && pass chain-goes-on || fail chain-goes-on "snapshot after the recovery is '$S3', last was $S2"
# shellcheck disable=SC2086
check export-newest run_timeout 300 "$DV" export "$NAME@$S3" $DPARGS --output "$MED/head.img"
if cmp -s "$MED/head.img" "$DEV"; then
    pass newest-snapshot-equals-device
else
    fail newest-snapshot-equals-device "export of $NAME@$S3 differs from $DEV"
fi
rm -f "$MED/head.img"
check del dv_del "$NAME"
check_no_ublk_devices no-devices-left
drill_finish
