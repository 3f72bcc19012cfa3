# shellcheck shell=sh
# Inside the test VM: 4k random write and read IOPS at iodepth 32 on the deltavol device and on
# the kernel loop device, both over the same medium (a tmpfs file) in the same boot, runs
# interleaved. Prints `# RESULT ...` lines and the ratio. Run it with:
#
#   kernel-setup/vm-run --kernel 7 --bin-dir build/vm-bin bench/vm-fio-compare.sh
#
# Knobs (environment): FIO_RUNTIME_S (default 15), FIO_REPEATS (default 3), FIO_SIZE (128m).
. "${DRILL_LIB:-/drills/lib.sh}"

RUNTIME=${FIO_RUNTIME_S:-15}
REPEATS=${FIO_REPEATS:-3}
SIZE=${FIO_SIZE:-128m}
MED=/mnt/medium
scratch_mount "$MED" 1200m

# fio_iops DEV RW: IOPS of one run (terse output: read IOPS is field 8, write IOPS field 49).
fio_iops() {
    _f=$(fio --name=b --filename="$1" --rw="$2" --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --size="$SIZE" --runtime="$RUNTIME" --ramp_time=2 --time_based \
        --norandommap --randrepeat=0 --invalidate=0 --minimal 2>/dev/null) || return 1
    case $2 in
        randread) echo "$_f" | cut -d';' -f8 ;;
        *) echo "$_f" | cut -d';' -f49 ;;
    esac
}

# median of the numbers on stdin
median() {
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) print 0; else print a[int((NR + 1) / 2)]}'
}

# The loop baseline: a file on the medium.
dd if=/dev/zero of="$MED/loop.img" bs=1M count=0 seek=256 2>/dev/null
LOOPDEV=$(loop_attach "$MED/loop.img") || abort "no loop device"
check loop-fill fio --name=fill --filename="$LOOPDEV" --rw=write --bs=1M --size="$SIZE" --ioengine=io_uring --direct=1 --minimal

# deltavol: cache dir and backing file on the same medium; a flush interval longer than the
# run, so it measures the write path (flush costs are the performance issue's subject).
DEV=$(dv_add bench 256MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 600000 --queues 1 --depth 64) \
    || abort "deltavol add failed"
check dv-fill fio --name=fill --filename="$DEV" --rw=write --bs=1M --size="$SIZE" --ioengine=io_uring --direct=1 --minimal

for rw in randwrite randread; do
    : >"$DRILL_TMP/loop.$rw"
    : >"$DRILL_TMP/dv.$rw"
    i=0
    while [ "$i" -lt "$REPEATS" ]; do
        fio_iops "$LOOPDEV" "$rw" >>"$DRILL_TMP/loop.$rw" || fail "fio-loop-$rw" "fio failed"
        fio_iops "$DEV" "$rw" >>"$DRILL_TMP/dv.$rw" || fail "fio-deltavol-$rw" "fio failed"
        i=$((i + 1))
    done
    l=$(median <"$DRILL_TMP/loop.$rw")
    d=$(median <"$DRILL_TMP/dv.$rw")
    log "RESULT fio 4k $rw iodepth=32 runtime=${RUNTIME}s x$REPEATS kernel=$(uname -r): loop IOPS=$l deltavol IOPS=$d ratio=$(awk -v a="$d" -v b="$l" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}')"
    log "runs loop: $(tr '\n' ' ' <"$DRILL_TMP/loop.$rw")| deltavol: $(tr '\n' ' ' <"$DRILL_TMP/dv.$rw")"
    [ "$d" != 0 ] && [ "$l" != 0 ] && pass "measured-$rw"
done
check del dv_del bench
losetup -d "$LOOPDEV" 2>/dev/null
drill_finish
