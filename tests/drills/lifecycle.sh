# shellcheck shell=sh
# Drill: a volume's whole life. add → mkfs.ext4 → mount → write a tree of files with known
# sha256 (and a small sqlite database) → sync → the daemon's /metrics counted the writes →
# umount → del → add again on the same cache dir
# and backing file → every file verifies → e2fsck -fn clean → del.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol mkfs.ext4 e2fsck sha256sum sqlite3

NAME=lifecycle
SIZE=256MiB
SSD=/mnt/ssd
HDD=/mnt/hdd
CACHE_DIR=$SSD/$NAME
BACKING=$HDD/$NAME.img
MNT=/mnt/$NAME
SRC=$DRILL_TMP/src
SUMS=$DRILL_TMP/sums

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    is_mounted "$MNT" && { umount "$MNT" 2>/dev/null || umount -l "$MNT"; }
    dv_del_quiet "$NAME"
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$SSD" 700m
scratch_mount "$HDD" 400m
mkdir -p "$MNT"

# --- first life ---
t0=$(now_s)
METRICS=127.0.0.1:9100
DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms 1000 \
    --metrics-listen "$METRICS") ||
    abort add "deltavol add failed"
pass add
log "$DEV is live after $(elapsed_s "$t0")s"

status=$(dv_status "$NAME" 2>&1)
if [ "$(echo "$status" | json_get device)" = "$DEV" ]; then
    pass status-device
else
    fail status-device "status --json device is not $DEV: $(echo "$status" | head -c 300)"
fi
if "$DV" list 2>&1 | grep -q "$NAME"; then
    pass list
else
    fail list "deltavol list does not show $NAME"
fi

check mkfs mkfs.ext4 -q -F "$DEV" || abort mkfs "cannot go on without a filesystem"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot go on without a mount"

# A few MiB of random data in a small tree, plus small files and a database.
mkdir -p "$SRC"
check make-tree make_tree "$SRC" 18 256
i=0
while [ "$i" -lt 50 ]; do
    echo "small file $i $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' ')" >"$SRC/c/small$i"
    i=$((i + 1))
done
check sqlite-create sqlite3 "$SRC/db.sqlite" \
    "CREATE TABLE t(id INTEGER PRIMARY KEY, v TEXT);
     WITH RECURSIVE n(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM n WHERE x < 2000)
     INSERT INTO t(v) SELECT hex(randomblob(32)) FROM n;"
sums_of "$SRC" >"$SUMS"
log "$(wc -l <"$SUMS") files, $(du -sk "$SRC" | cut -f1) KiB"

check copy-tree cp -a "$SRC/." "$MNT/"
check verify-before-umount sh -c "cd '$MNT' && sha256sum -c -s '$SUMS'"
check sync sync

# The daemon's Prometheus endpoint saw the writes and the FLUSHes of the sync.
metrics=$(wget -qO- "http://$METRICS/metrics" 2>&1)
sample() { echo "$metrics" | grep -F "$1{volume=\"$NAME\"$2} " | awk '{print $2}'; }
writes=$(sample deltavol_io_requests_total ',op="write"')
flushes=$(sample deltavol_io_latency_seconds_count ',op="flush"')
if [ "${writes:-0}" -gt 0 ] 2>/dev/null && [ "${flushes:-0}" -gt 0 ] 2>/dev/null; then
    pass metrics
    log "metrics: $writes writes, $flushes flushes timed"
else
    fail metrics "GET http://$METRICS/metrics: writes=${writes:-none} flushes=${flushes:-none}: $(echo "$metrics" | head -c 400)"
fi
# `status` names the endpoint.
if "$DV" status "$NAME" 2>&1 | grep -qx "metrics: *http://$METRICS/metrics"; then pass status-metrics-url; else
    fail status-metrics-url "$("$DV" status "$NAME" 2>&1 | head -c 300)"; fi
# ... and the daemon's resident memory, with the part that is not the read cache.
# Both from one status: resident memory moves between two calls.
st=$(dv_status "$NAME" 2>&1)
rss=$(echo "$st" | json_get rss_bytes)
beyond=$(echo "$st" | json_get rss_beyond_read_cache_bytes)
if [ "${rss:-0}" -gt 0 ] 2>/dev/null && [ "${beyond:-x}" -le "$rss" ] 2>/dev/null &&
    "$DV" status "$NAME" 2>&1 | grep -q "^memory: .* resident (peak .*), of it .* read cache and .* beyond it$"; then
    pass status-memory
    log "daemon resident memory: $rss bytes, $beyond beyond the read cache"
else
    fail status-memory "rss=${rss:-none} beyond=${beyond:-none}: $("$DV" status "$NAME" 2>&1 | head -c 600)"
fi

check umount umount "$MNT"

t0=$(now_s)
check del dv_del "$NAME"
log "del took $(elapsed_s "$t0")s"
if wait_gone "$DEV" 30; then
    pass device-gone
else
    fail device-gone "$DEV still exists 30s after del"
fi
if [ -e "$CACHE_DIR" ] && [ -e "$BACKING" ]; then
    pass files-kept
else
    fail files-kept "cache dir or backing file missing after del: $(find "$SSD" "$HDD" -maxdepth 1 2>&1 | tr '\n' ' ')"
fi

# --- second life: reattach the same cache dir and backing file ---
t0=$(now_s)
DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms 1000) ||
    abort re-add "deltavol add (reattach) failed"
pass re-add
log "reattached as $DEV after $(elapsed_s "$t0")s"

check remount mount -t ext4 "$DEV" "$MNT" || abort remount "cannot verify without a mount"
check verify sh -c "cd '$MNT' && sha256sum -c -s '$SUMS'" || {
    (cd "$MNT" && sha256sum -c "$SUMS" 2>&1 | grep -v ': OK$' | head -n 10 | sed 's/^/#   /')
}
check sqlite-integrity sh -c "[ \"\$(sqlite3 '$MNT/db.sqlite' 'PRAGMA integrity_check; SELECT count(*) FROM t;' | tr '\n' ' ')\" = 'ok 2000 ' ]"
check umount-2 umount "$MNT"
check fsck e2fsck -fn "$DEV"

check del-2 dv_del "$NAME"
if wait_gone "$DEV" 30; then
    pass device-gone-2
else
    fail device-gone-2 "$DEV still exists 30s after del"
fi
check_no_ublk_devices no-devices-left
drill_finish
