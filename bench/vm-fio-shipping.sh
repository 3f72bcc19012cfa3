# shellcheck shell=sh
# Inside the test VM: foreground 4k random-write IOPS (iodepth 32) on the deltavol device
# while flush and shipping run at their busiest (a 1 s flush interval, data plane on
# 127.0.0.1), against the same device with no flush during the run and no data plane. Runs
# interleaved, medians reported. Run it with:
#
#   kernel-setup/vm-run --kernel 7 --bin-dir build/vm-bin bench/vm-fio-shipping.sh
#
# Knobs (environment): FIO_RUNTIME_S (default 15), FIO_REPEATS (default 3), FIO_SIZE (128m).
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
RUNTIME=${FIO_RUNTIME_S:-15}
REPEATS=${FIO_REPEATS:-3}
SIZE=${FIO_SIZE:-128m}
MED=/mnt/shipmed
scratch_mount "$MED" 1500m
TOK=$MED/token
echo "bench-secret" >"$TOK"

dp_start "$MED/dp" "$TOK" 1 || abort dataplane-start "the data plane did not start"
ADDR=$DP_ADDR

# quiet: no flush during the run, no data plane. busy: a cut every second, each shipped.
QUIET=$(dv_add quiet 256MiB "$MED/q-cache" "$MED/q-backing.img" --flush-interval-ms 600000) || abort add-quiet "add failed"
BUSY=$(dv_add busy 256MiB "$MED/b-cache" "$MED/b-backing.img" --flush-interval-ms 1000 \
    --dataplane "$ADDR" --auth-token-file "$TOK") || abort add-busy "add failed"
pass add

fio_iops() {
    fio --name=b --filename="$1" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --size="$SIZE" --runtime="$RUNTIME" --ramp_time=2 --time_based \
        --norandommap --randrepeat=0 --minimal 2>/dev/null | cut -d';' -f49
}
median() {
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) print 0; else print a[int((NR + 1) / 2)]}'
}

: >"$DRILL_TMP/quiet"
: >"$DRILL_TMP/busy"
e0=$(dv_field busy epoch)
i=0
while [ "$i" -lt "$REPEATS" ]; do
    fio_iops "$QUIET" >>"$DRILL_TMP/quiet" || fail fio-quiet "fio failed"
    fio_iops "$BUSY" >>"$DRILL_TMP/busy" || fail fio-busy "fio failed"
    i=$((i + 1))
done
e1=$(dv_field busy epoch)
q=$(median <"$DRILL_TMP/quiet")
b=$(median <"$DRILL_TMP/busy")
dv_status busy | tr -d '\n ' | grep -o '"shipping":{[^}]*}' | sed 's/^/# busy /'
log "RESULT fio 4k randwrite iodepth=32 runtime=${RUNTIME}s x$REPEATS kernel=$(uname -r): no-flush IOPS=$q flushing+shipping IOPS=$b ratio=$(awk -v a="$b" -v b="$q" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}') (busy volume epochs $e0 -> $e1)"
log "runs no-flush: $(tr '\n' ' ' <"$DRILL_TMP/quiet")| flushing+shipping: $(tr '\n' ' ' <"$DRILL_TMP/busy")"
[ "$q" != 0 ] && [ "$b" != 0 ] && pass measured
[ "$((e1 - e0))" -ge 2 ] && pass flushes-ran || fail flushes-ran "the busy volume's epoch went $e0 -> $e1"
check snapshots-shipped "$DV" snapshots busy --dataplane "$ADDR" --auth-token-file "$TOK"
check del-quiet dv_del quiet
check del-busy dv_del busy
kill "$DP_PID" 2>/dev/null
drill_finish
