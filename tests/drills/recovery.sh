# shellcheck shell=sh
# Drill "compute lost": a mounted ext4 volume with files and an SQLite database, snapshots
# shipped to a data plane on 127.0.0.1; the daemon is killed and its cache dir and backing file
# deleted; `deltavol recover` on new dirs brings the volume back at once: the filesystem is
# mounted and read while hydration is still running, every file of the last snapshot verifies,
# SQLite's integrity_check is ok, e2fsck is clean. Then fencing: a second recovery elsewhere
# turns the first into a stale machine, which is refused by the data plane and ships nothing
# to the volume: its device turns read-only and its unshipped snapshot is kept as a branch
# volume (exportable).
# Three "machines" are separated by their run dirs (DELTAVOL_RUN_DIR).
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane sqlite3
NAME=recvol
MED=/mnt/recmed
MNT=/mnt/recvol
scratch_mount "$MED" 1400m
mkdir -p "$MNT"
dp_with_token "$MED" recovery-drill-secret || abort dataplane-start "the data plane did not start"

# --- machine 1 ---
export DELTAVOL_RUN_DIR=/run/dv-m1
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 256MiB "$MED/m1/cache" "$MED/m1/backing.img" --flush-interval-ms 600000 $DPARGS) ||
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
fsfreeze --unfreeze "$MNT"
log "snapshots $S1 and $S2"
# Written after the last snapshot: lost with the machine (the recovery point is S2).
dd if=/dev/urandom of="$MNT/after-last-snapshot" bs=1024 count=256 2>/dev/null

# --- the machine is lost ---
PID1=$(dv_pid "$NAME")
kill -9 "$PID1"
wait_pid_gone "$PID1" 30 || fail kill "daemon $PID1 survived SIGKILL"
umount -l "$MNT" 2>/dev/null
run_timeout 60 "$DV" del "$NAME" >/dev/null 2>&1   # clears what the dead daemon left
rm -rf "$MED/m1"
[ ! -e "$MED/m1" ] && pass machine-1-lost

# --- machine 2: recover ---
export DELTAVOL_RUN_DIR=/run/dv-m2
t0=$(now_s)
# shellcheck disable=SC2086
if run_timeout 120 "$DV" recover "$NAME" --cache-dir "$MED/m2/cache" --backing "$MED/m2/backing.img" \
    --hydrate-rate 512KiB --flush-interval-ms 2000 $DPARGS >"$DRILL_TMP/recover.out" 2>"$DRILL_TMP/recover.err"; then
    pass recover
else
    sed 's/^/# recover: /' "$DRILL_TMP/recover.err"
    abort recover "deltavol recover failed"
fi
DEV=$(grep -o '/dev/ublkb[0-9][0-9]*' "$DRILL_TMP/recover.out" | tail -n 1)
wait_for_block "$DEV" || abort recover-device "no device"
log "recovered as $DEV in $(elapsed_s "$t0")s ($(grep 'device live' "$DRILL_TMP/recover.err"))"
pct=$(dv_status "$NAME" | tr -d '\n ' | grep -o '"percent":[0-9.]*' | cut -d: -f2)
log "hydration at mount: ${pct}%"
awk -v p="$pct" 'BEGIN {exit !(p + 0 < 100)}' && pass hydrating-at-mount || fail hydrating-at-mount "hydration was already ${pct}%"
check mount-recovered mount -t ext4 "$DEV" "$MNT" || abort mount-recovered "cannot mount the recovered volume"
(cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.got"
if cmp -s "$DRILL_TMP/sums.last" "$DRILL_TMP/sums.got"; then
    pass files-of-last-snapshot
else
    fail files-of-last-snapshot "the recovered volume does not hold exactly the files of snapshot $S2"
    diff "$DRILL_TMP/sums.last" "$DRILL_TMP/sums.got" | head -n 10 | sed 's/^/# /'
fi
ok=$(sqlite3 "$MNT/app.db" "pragma integrity_check;" 2>&1)
[ "$ok" = ok ] && pass sqlite-integrity || fail sqlite-integrity "$ok"
rows=$(sqlite3 "$MNT/app.db" "select count(*) from kv;" 2>&1)
[ "$rows" = 2500 ] && pass sqlite-rows || fail sqlite-rows "expected 2500 rows, got $rows"
check write-after-recovery dd if=/dev/urandom of="$MNT/after-recovery" bs=1024 count=256 conv=fsync
check umount-recovered umount "$MNT"
check fsck-recovered e2fsck -fn "$DEV"
S3=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot-after-recovery "snapshot failed"
[ -n "$S3" ] && [ "$S3" -gt "$S2" ] && pass chain-continues || fail chain-continues "snapshot after recovery is '$S3', last was $S2"
dv_status "$NAME" | tr -d '\n ' | grep -o '"hydration":{[^}]*}' | sed 's/^/# /'

# --- machine 3 recovers too: machine 2 is now stale and must be fenced ---
export DELTAVOL_RUN_DIR=/run/dv-m3
# shellcheck disable=SC2086
run_timeout 120 "$DV" recover "$NAME" --cache-dir "$MED/m3/cache" --backing "$MED/m3/backing.img" $DPARGS \
    >"$DRILL_TMP/recover3.out" 2>"$DRILL_TMP/recover3.err" && pass recover-again || fail recover-again "$(tail -n 1 "$DRILL_TMP/recover3.err")"
export DELTAVOL_RUN_DIR=/run/dv-m2
if run_timeout 60 "$DV" snapshot "$NAME" --timeout-ms 3000 >"$DRILL_TMP/stale.out" 2>"$DRILL_TMP/stale.err"; then
    fail stale-refused "the stale machine's snapshot was committed"
elif grep -q fenced "$DRILL_TMP/stale.err"; then
    pass stale-refused
    log "stale machine told: $(tail -n 1 "$DRILL_TMP/stale.err" | cut -c1-200)"
else
    fail stale-refused "no fencing message: $(tr '\n' ' ' <"$DRILL_TMP/stale.err" | cut -c1-200)"
fi
dv_status "$NAME" | tr -d '\n ' | grep -q '"fenced":true' && pass status-says-fenced || fail status-says-fenced "status does not say fenced"
STALE=$(sed -n 's/.*snapshot \([0-9][0-9]*\) is durable in the outbox.*/\1/p' "$DRILL_TMP/stale.err")
"$DV" snapshots "$NAME" $DPARGS --json >"$DRILL_TMP/list.json" 2>&1
if [ -n "$STALE" ] && grep -q "\"id\": *$STALE," "$DRILL_TMP/list.json"; then
    fail stale-shipped-nothing "the stale snapshot $STALE reached the data plane"
else
    pass stale-shipped-nothing
fi

# The fenced machine's device is read-only (writes fail; the kernel marks it read-only), and
# the snapshot it could not ship is kept as a branch volume on the data plane.
DEV2=$(dv_device "$NAME")
if dd if=/dev/zero of="$DEV2" bs=4096 count=1 seek=100 conv=fsync 2>/dev/null; then
    fail fenced-write-refused "a write to the fenced device $DEV2 succeeded"
else
    pass fenced-write-refused
fi
sleep 1
ro=$(blockdev --getro "$DEV2" 2>&1)
[ "$ro" = 1 ] && pass fenced-kernel-read-only || fail fenced-kernel-read-only "blockdev --getro $DEV2: $ro"
BRANCH=
i=0
while [ -z "$BRANCH" ] && [ "$i" -lt 150 ]; do
    BRANCH=$(dv_status "$NAME" | tr -d '\n ' | grep -o '"fenced_branch":"[^"]*"' | cut -d'"' -f4)
    [ -n "$BRANCH" ] || sleep 0.2
    i=$((i + 1))
done
log "branch of the fenced machine: $BRANCH"
# shellcheck disable=SC2086
"$DV" snapshots "$BRANCH" $DPARGS --json >"$DRILL_TMP/branch.json" 2>&1
if [ -n "$BRANCH" ] && [ -n "$STALE" ] && grep -q "\"id\": *$STALE," "$DRILL_TMP/branch.json"; then
    pass stale-kept-as-branch
else
    fail stale-kept-as-branch "branch '$BRANCH' does not list snapshot '$STALE': $(tr '\n' ' ' <"$DRILL_TMP/branch.json" | cut -c1-200)"
fi
# shellcheck disable=SC2086
check branch-exportable run_timeout 300 "$DV" export "$BRANCH@$STALE" $DPARGS --output "$MED/branch.img"
rm -f "$MED/branch.img"

check del-m2 dv_del "$NAME"
export DELTAVOL_RUN_DIR=/run/dv-m3
check del-m3 dv_del "$NAME"
kill "$DP_PID" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
