# shellcheck shell=sh
# Inside the test VM: foreground 4k random-write IOPS (iodepth 32) and fio's completion
# latency (p50, p99) on deltavol devices while flush and shipping run at their busiest (a 1 s
# flush interval, data plane on 127.0.0.1), against the same device with no flush during the
# run and no data plane. Configurations, each its own volume, runs interleaved, medians:
#   quiet   no flush during the run, no data plane
#   busy    a cut every second, each flushed at full speed and shipped (--flush-pacing off)
#   paced   the same, each flush spread over the interval (--flush-pacing on)
#   main    as busy, with the binary `deltavol-main` (an older build: put it in the bin dir)
#           when it is there
#   noship  a cut every second, flushed at full speed to the backing file only (no data plane)
#   keep    as busy, with the binary `deltavol-keep` and DELTAVOL_EXPERIMENT_KEEP_MIRROR=1 in
#           its environment (an experiment's build that does not punch the flushed mirror; not
#           in the committed code: see bench/results/snapshot-work-2026-12-05.md)
# Run it with:
#
#   kernel-setup/vm-run --kernel 7 --bin-dir build/vm-bin bench/vm-fio-shipping.sh
#
# Knobs (environment): FIO_RUNTIME_S (default 15), FIO_REPEATS (3), FIO_SIZE (128m),
# FIO_RATE_IOPS (unset: as fast as it goes; N: fio's --rate_iops=N, so that the latencies of
# the configurations are compared at the same load rather than at their own throughput),
# SHIP_CONFIGS (default "quiet,busy,paced", plus main when deltavol-main is there),
# BENCH_DP_NICE (10, as bench/vm-bench.sh: the data plane stands in for a remote machine;
# empty: not reniced), SCRATCH_SIZE (1500m: the data plane keeps every snapshot shipped,
# give it room for all the busy runs, e.g. with vm-run --mem 6144 and 3500m).
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
RUNTIME=${FIO_RUNTIME_S:-15}
REPEATS=${FIO_REPEATS:-3}
SIZE=${FIO_SIZE:-128m}
# Commas or spaces (vm-run --env passes no spaces).
CONFIGS=$(echo "${SHIP_CONFIGS:-quiet busy paced}" | tr ',' ' ')
if [ -z "${SHIP_CONFIGS:-}" ] && command -v deltavol-main >/dev/null 2>&1; then
    CONFIGS="$CONFIGS main"
fi
MED=/mnt/shipmed
scratch_mount "$MED" "${SCRATCH_SIZE:-1500m}"
TOK=$MED/token
echo "bench-secret" >"$TOK"

DP_NICE=${BENCH_DP_NICE-10} dp_start "$MED/dp" "$TOK" 1 || abort dataplane-start "the data plane did not start"
ADDR=$DP_ADDR

# as CONFIG CMD...: CMD with DV set to the configuration's deltavol binary.
as() {
    _as_keep=$DV
    case $1 in
    main) DV=deltavol-main ;;
    keep) DV=deltavol-keep ;;
    *) DV=deltavol ;;
    esac
    [ "$1" = keep ] && export DELTAVOL_EXPERIMENT_KEEP_MIRROR=1
    shift
    "$@"
    _as_rc=$?
    unset DELTAVOL_EXPERIMENT_KEEP_MIRROR
    DV=$_as_keep
    return $_as_rc
}

for c in $CONFIGS; do
    case $c in
    quiet) set -- --flush-interval-ms 600000 ;;
    busy) set -- --flush-interval-ms 1000 --flush-pacing off --dataplane "$ADDR" --auth-token-file "$TOK" ;;
    paced) set -- --flush-interval-ms 1000 --flush-pacing on --dataplane "$ADDR" --auth-token-file "$TOK" ;;
    main | keep) set -- --flush-interval-ms 1000 --dataplane "$ADDR" --auth-token-file "$TOK" ;;
    noship) set -- --flush-interval-ms 1000 ;;
    *) abort configs "unknown configuration $c" ;;
    esac
    dev=$(as "$c" dv_add "sh$c" 256MiB "$MED/$c-cache" "$MED/$c-backing.img" "$@") ||
        abort "add-$c" "add failed"
    eval "DEV_$c=\$dev"
    : >"$DRILL_TMP/$c"
done
pass add

# fio_run DEV: "IOPS clat_p50_us clat_p99_us" of one run (fio's terse output: write IOPS in
# field 49, the write completion-latency percentiles in fields 59-78 as "P%=usec").
fio_run() {
    fio --name=b --filename="$1" --rw=randwrite --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --size="$SIZE" --runtime="$RUNTIME" --ramp_time=2 --time_based \
        --norandommap --randrepeat=0 ${FIO_RATE_IOPS:+--rate_iops=$FIO_RATE_IOPS} --minimal 2>/dev/null |
        awk -F';' 'NF > 80 {
            p50 = p99 = 0
            for (i = 59; i <= 78; i++) {
                split($i, a, "=")
                if (a[1] == "50.000000%") p50 = a[2]
                if (a[1] == "99.000000%") p99 = a[2]
            }
            print $49, p50, p99
            ok = 1
        } END { exit !ok }'
}
median() {
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) print 0; else print a[int((NR + 1) / 2)]}'
}
# col FILE N: the median of column N.
col() {
    awk -v n="$2" '{print $n}' "$1" | median
}

e0=$(dv_field shbusy epoch 2>/dev/null || echo 0)
i=0
while [ "$i" -lt "$REPEATS" ]; do
    for c in $CONFIGS; do
        eval "dev=\$DEV_$c"
        r=$(fio_run "$dev") || fail "fio-$c" "fio failed (run $i)"
        echo "$r" >>"$DRILL_TMP/$c"
        log "run $i $c: IOPS p50_us p99_us = $r"
    done
    i=$((i + 1))
done
e1=$(dv_field shbusy epoch 2>/dev/null || echo 0)
q=$(col "$DRILL_TMP/quiet" 1)
for c in $CONFIGS; do
    iops=$(col "$DRILL_TMP/$c" 1)
    ratio=$(awk -v a="$iops" -v b="$q" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}')
    log "RESULT $c: fio 4k randwrite iodepth=32 runtime=${RUNTIME}s x$REPEATS kernel=$(uname -r) dp_nice=${BENCH_DP_NICE-10} rate_iops=${FIO_RATE_IOPS:-max}: IOPS=$iops (/quiet $ratio) clat p50=$(col "$DRILL_TMP/$c" 2) us p99=$(col "$DRILL_TMP/$c" 3) us; runs: $(awk '{printf "%s/%s/%s ", $1, $2, $3}' "$DRILL_TMP/$c")"
    [ "$iops" != 0 ] && pass "measured-$c"
done
for c in $CONFIGS; do
    [ "$c" = quiet ] && continue
    log "$c last flush: $(as "$c" dv_status "sh$c" | tr -d '\n ' | grep -o '"duration_ms":[0-9]*,"extents":[0-9]*\|"extents":[0-9]*\|"duration_ms":[0-9]*' | tr '\n' ' ')"
done
case " $CONFIGS " in
*" busy "*) [ "$((e1 - e0))" -ge 2 ] && pass flushes-ran || fail flushes-ran "the busy volume's epoch went $e0 -> $e1" ;;
esac
for c in $CONFIGS; do
    [ "$c" = quiet ] || [ "$c" = noship ] || check "snapshots-shipped-$c" "$DV" snapshots "sh$c" --dataplane "$ADDR" --auth-token-file "$TOK"
    as "$c" check "del-$c" dv_del "sh$c"
done
kill "$DP_PID" 2>/dev/null
drill_finish
