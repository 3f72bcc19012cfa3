# shellcheck shell=sh
# Drill: data integrity under parallel random writes on the raw device, across flushes.
#
# fio writes with --verify=crc32c and reads everything back (4k and 128k blocks, iodepth 32,
# two jobs per block size on non-overlapping ranges), while the volume cuts an epoch every
# second; the epoch must advance by >= 2 during the run. Then, after the flush has moved the
# data to the backing file, the same workloads are verified again (--verify_only), and once more
# after del + reattach.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol fio

NAME=fioverify
SIZE=256MiB
SSD=/mnt/ssd
HDD=/mnt/hdd
CACHE_DIR=$SSD/$NAME
BACKING=$HDD/$NAME.img
FLUSH_INTERVAL_MS=1000
# Per job: 4k jobs on [0,24M) and [24M,48M); 128k jobs on [64M,96M) and [96M,128M).
# (Under TCG the 4k pass takes ~10-15 s, several flush intervals.)
JOB_4K_SIZE=24M
JOB_128K_SIZE=32M

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    dv_del_quiet "$NAME"
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$SSD" 700m
scratch_mount "$HDD" 400m

DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms "$FLUSH_INTERVAL_MS") ||
    abort add "deltavol add failed"
pass add

# io_uring when this kernel and fio allow it, else libaio.
ENGINE=io_uring
if ! fio --name=probe --filename="$DEV" --ioengine=io_uring --direct=1 --rw=read --bs=4k \
    --size=4k >"$DRILL_TMP/probe.out" 2>&1; then
    ENGINE=libaio
    sed 's/^/#   /' "$DRILL_TMP/probe.out" | tail -n 5
fi
log "fio engine: $ENGINE"

epoch() {
    dv_field "$NAME" epoch 2>/dev/null
}
is_number() {
    case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}
# epoch_delta E0: current epoch minus E0, or -1 when either is not a number.
epoch_delta() {
    _ed=$(epoch)
    if is_number "$_ed" && is_number "$1"; then echo $((_ed - $1)); else echo -1; fi
}

# job_file BS SIZE OFFSET0 OFFSET1 > file: two jobs on non-overlapping ranges
job_file() {
    cat <<EOF
[global]
filename=$DEV
direct=1
ioengine=$ENGINE
iodepth=32
rw=randwrite
bs=$1
size=$2
verify=crc32c
verify_fatal=1
verify_dump=0
do_verify=1
randrepeat=1
group_reporting=0

[w$1-a]
offset=$3

[w$1-b]
offset=$4
EOF
}
job_file 4k "$JOB_4K_SIZE" 0 24M >"$DRILL_TMP/4k.fio"
job_file 128k "$JOB_128K_SIZE" 64M 96M >"$DRILL_TMP/128k.fio"

# run_fio NAME JOBFILE [EXTRA...]: one check; shows fio's summary lines as commentary.
run_fio() {
    _rf_name=$1 _rf_job=$2
    shift 2
    _rf_out=$DRILL_TMP/$_rf_name.out
    _rf_t0=$(now_s)
    if run_timeout 600 fio "$@" "$_rf_job" >"$_rf_out" 2>&1; then
        pass "$_rf_name"
        grep -E '^ *(write|read): IOPS=' "$_rf_out" | sed 's/^ */#   /'
        log "$_rf_name took $(elapsed_s "$_rf_t0")s"
    else
        _rf_rc=$?
        sed 's/^/#   /' "$_rf_out" | grep -iE 'verify|bad|err|crc|fail|fio:' | head -n 20
        fail "$_rf_name" "fio exit $_rf_rc: $(grep -iE 'verify|bad|error' "$_rf_out" | head -n 2 | tr '\n' '|' | cut -c1-250)"
    fi
}

e0=$(epoch)
is_number "$e0" || fail epoch-field "status --json has no numeric epoch (got '$e0')"
t0=$(now_s)
run_fio write-verify-4k "$DRILL_TMP/4k.fio"
run_fio write-verify-128k "$DRILL_TMP/128k.fio"
# The run must span two cuts at least; pad with a read-only verify pass if fio was very fast.
i=0
while is_number "$e0" && [ "$(epoch_delta "$e0")" -lt 2 ] && [ "$i" -lt 5 ]; do
    run_fio "reverify-pad-$i" "$DRILL_TMP/4k.fio" --verify_only
    i=$((i + 1))
done
e1=$(epoch)
log "epoch $e0 -> $e1 over $(elapsed_s "$t0")s (flush interval ${FLUSH_INTERVAL_MS}ms)"
if is_number "$e0" && is_number "$e1" && [ "$((e1 - e0))" -ge 2 ]; then
    pass epoch-advanced
else
    fail epoch-advanced "epoch went from '$e0' to '$e1': expected +2 or more"
fi

# Wait until what fio wrote is on the backing file: no dirty bytes left (or, should the status
# not report them, flushed_epoch catching up with the epoch fio ended in), so that the next reads
# come from the backing file / read cache.
flushed=0
i=0
while [ "$i" -lt 60 ]; do
    st=$(dv_status "$NAME" 2>/dev/null)
    db=$(echo "$st" | json_get dirty_bytes)
    fe=$(echo "$st" | json_get flushed_epoch)
    if is_number "$db"; then
        [ "$db" -eq 0 ] && flushed=1 && break
    elif is_number "$fe" && [ "$fe" -ge "$e1" ]; then
        flushed=1 && break
    fi
    sleep 0.5
    i=$((i + 1))
done
log "after the flush wait: dirty_bytes=${db:-?} epoch=$(echo "$st" | json_get epoch) flushed_epoch=${fe:-?}"
if [ "$flushed" = 1 ]; then
    pass flushed
else
    fail flushed "still dirty_bytes='${db:-}' (flushed_epoch '${fe:-}', epoch at fio end $e1) after 30s"
    echo "$st" | sed 's/^/#   /'
fi

run_fio verify-after-flush-4k "$DRILL_TMP/4k.fio" --verify_only
run_fio verify-after-flush-128k "$DRILL_TMP/128k.fio" --verify_only

# Everything must still be there after del + reattach.
check del dv_del "$NAME"
wait_gone "$DEV" 30 || fail device-gone "$DEV still exists 30s after del"
DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms "$FLUSH_INTERVAL_MS") ||
    abort re-add "deltavol add (reattach) failed"
pass re-add
job_file 4k "$JOB_4K_SIZE" 0 24M >"$DRILL_TMP/4k.fio"
job_file 128k "$JOB_128K_SIZE" 64M 96M >"$DRILL_TMP/128k.fio"
run_fio verify-after-reattach-4k "$DRILL_TMP/4k.fio" --verify_only
run_fio verify-after-reattach-128k "$DRILL_TMP/128k.fio" --verify_only
check del-2 dv_del "$NAME"
wait_gone "$DEV" 30
check_no_ublk_devices no-devices-left
drill_finish
