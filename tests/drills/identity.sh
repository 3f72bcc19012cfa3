# shellcheck shell=sh
# Drill: a volume is its id, not its name (issue 11), on the real ublk driver.
#
# 1. Lost SSD, backing kept: a mounted ext4 volume with files and SQLite ships snapshots; the
#    daemon is killed and its cache dir deleted; `deltavol add` with the same name and backing
#    and a new cache dir resumes it at once under its own id (no restore: status says
#    "continued"), every file of the last snapshot verifies, SQLite is intact, e2fsck is
#    clean, the chain goes on, and the newest snapshot exported from the data plane is
#    byte-equal to the device.
# 2. A reused name: the volume is deleted locally (del, dirs removed) and a new one added under
#    the same name: the data plane refuses its snapshots (status names the old volume), never
#    chains them onto the old volume; `deltavol volume delete NAME --id OLD` frees the name and
#    the new volume's snapshot, exported, equals its device.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane sqlite3 mkfs.ext4 e2fsck sha256sum cmp
NAME=idvol
MED=/mnt/idmed
MNT=/mnt/idvol

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    is_mounted "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    dv_del_quiet "$NAME"
    [ -n "${DP_PID:-}" ] && kill "$DP_PID" 2>/dev/null
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$MED" 1400m
mkdir -p "$MNT"
dp_with_token "$MED" identity-drill-secret || abort dataplane-start "the data plane did not start"
BACKING=$MED/hdd/backing.img
mkdir -p "$MED/hdd"

# --- 1. lost SSD, backing kept ---
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 256MiB "$MED/ssd1" "$BACKING" --flush-interval-ms 600000 $DPARGS) ||
    abort add "deltavol add failed"
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"
make_tree "$MNT/first" 6 128 || fail write-1 "could not write files"
sqlite_kv_create "$MNT/app.db"
sync
check freeze-1 fsfreeze --freeze "$MNT"
S1=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-1 "snapshot failed"
fsfreeze --unfreeze "$MNT"
make_tree "$MNT/second" 6 128 || fail write-2 "could not write files"
sqlite_kv_more "$MNT/app.db"
(cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.last"
sync
check freeze-2 fsfreeze --freeze "$MNT"
S2=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-2 "snapshot failed"
log "snapshots $S1 and $S2"
OLD_ID=$(dv_field "$NAME" volume_id)

# The SSD dies with the daemon (the filesystem still frozen at snapshot S2).
PID1=$(dv_pid "$NAME")
kill -9 "$PID1"
wait_pid_gone "$PID1" 30 || fail kill "daemon $PID1 survived SIGKILL"
fsfreeze --unfreeze "$MNT" 2>/dev/null
umount -l "$MNT" 2>/dev/null
run_timeout 60 "$DV" del "$NAME" >/dev/null 2>&1 # clears what the dead daemon left
rm -rf "$MED/ssd1"
[ ! -e "$MED/ssd1" ] && pass ssd-lost

t0=$(now_s)
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 256MiB "$MED/ssd2" "$BACKING" --flush-interval-ms 600000 $DPARGS) ||
    abort resume "deltavol add over the kept backing failed"
log "resumed as $DEV in $(elapsed_s "$t0")s"
RESUMED=$(dv_field "$NAME" resumed)
log "status: resumed: $RESUMED"
case "$RESUMED" in
    *"continued from epoch"*) pass resumed-without-restore ;;
    *) fail resumed-without-restore "status says: $(echo "$RESUMED" | cut -c1-200)" ;;
esac
[ "$(dv_field "$NAME" hydration)" = null ] && pass no-hydration || fail no-hydration "the resumed volume hydrates: a full restore"
[ "$(dv_field "$NAME" volume_id)" = "$OLD_ID" ] && pass same-identity || fail same-identity "volume id changed"
check mount-resumed mount -t ext4 "$DEV" "$MNT" || abort mount-resumed "cannot mount the resumed volume"
(cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.got"
if cmp -s "$DRILL_TMP/sums.last" "$DRILL_TMP/sums.got"; then
    pass files-of-last-snapshot
else
    fail files-of-last-snapshot "the resumed volume does not hold exactly the files of snapshot $S2"
fi
ok=$(sqlite3 "$MNT/app.db" "pragma integrity_check;" 2>&1)
[ "$ok" = ok ] && pass sqlite-integrity || fail sqlite-integrity "$ok"
check write-after-resume dd if=/dev/urandom of="$MNT/after-resume" bs=1024 count=256 conv=fsync
check umount-resumed umount "$MNT"
check fsck-resumed e2fsck -fn "$DEV"
S3=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-3 "snapshot failed"
[ -n "$S3" ] && [ "$S3" -gt "$S2" ] && pass chain-continues || fail chain-continues "snapshot after the resume is '$S3', last was $S2"
# shellcheck disable=SC2086
check export-newest run_timeout 300 "$DV" export "$NAME@$S3" $DPARGS --output "$MED/s3.img"
if cmp -s "$MED/s3.img" "$DEV"; then
    pass newest-snapshot-equals-device
else
    fail newest-snapshot-equals-device "export of $NAME@$S3 differs from $DEV: $(cmp "$MED/s3.img" "$DEV" 2>&1 | head -n 1)"
fi
rm -f "$MED/s3.img"
check del-resumed dv_del "$NAME"
# shellcheck disable=SC2086
run_timeout 60 "$DV" snapshots "$NAME" $DPARGS --json >"$DRILL_TMP/list.json" 2>&1
n_before=$(grep -c '"id"' "$DRILL_TMP/list.json")

# --- 2. the same name for a new volume ---
rm -rf "$MED/ssd2" "$MED/hdd"
mkdir -p "$MED/hdd"
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 64MiB "$MED/ssd3" "$MED/hdd/new.img" --flush-interval-ms 600000 $DPARGS) ||
    abort add-new "deltavol add of a new volume under the old name failed"
check write-new dd if=/dev/urandom of="$DEV" bs=1M count=8 conv=fsync
if run_timeout 60 "$DV" snapshot "$NAME" --timeout-ms 3000 >"$DRILL_TMP/reuse.out" 2>"$DRILL_TMP/reuse.err"; then
    fail reuse-refused "a snapshot of the new volume was committed onto the old volume's name"
else
    pass reuse-refused
fi
ERR=$(dv_status "$NAME" | tr -d '\n ' | grep -o '"last_error":"[^"]*"')
case "$ERR" in
    *"anothervolumenamed$NAME"*"$OLD_ID"*) pass refusal-names-old-volume ;;
    *) fail refusal-names-old-volume "status: $(echo "$ERR" | cut -c1-300)" ;;
esac
# shellcheck disable=SC2086
run_timeout 60 "$DV" snapshots "$NAME" $DPARGS --json >"$DRILL_TMP/list.json" 2>&1
n_after=$(grep -c '"id"' "$DRILL_TMP/list.json")
[ "$n_after" -eq "$n_before" ] && [ "$n_before" -ge 3 ] && pass old-chain-untouched ||
    fail old-chain-untouched "the old volume listed $n_before snapshots, then $n_after"
# shellcheck disable=SC2086
check delete-old-volume run_timeout 60 "$DV" volume delete "$NAME" --id "$OLD_ID" $DPARGS
S4=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-new "snapshot of the new volume failed after the name was freed"
# shellcheck disable=SC2086
check export-new run_timeout 300 "$DV" export "$NAME@$S4" $DPARGS --output "$MED/s4.img"
if cmp -s "$MED/s4.img" "$DEV"; then
    pass new-snapshot-equals-device
else
    fail new-snapshot-equals-device "export of $NAME@$S4 differs from $DEV"
fi
check del-new dv_del "$NAME"
check_no_ublk_devices no-devices-left
drill_finish
