# shellcheck shell=sh
# Inside the test VM: 4k random write and read IOPS at iodepth 32 and 1 on deltavol devices and
# on the kernel loop device, all over the same medium (a tmpfs file) in the same boot, runs
# interleaved. deltavol runs with its defaults (plain `add`: no queue or depth tuning; only a
# flush interval longer than the run, so it measures the foreground path — flush costs are
# another issue's subject), once per inline-I/O mode in FIO_MODES (the daemon's
# `DELTAVOL_INLINE_IO`: `off` puts every target I/O on the queue's io_uring, as before the
# inline path existed; `auto` is the default (with the bitmap journal: no journal write per
# write); `records` is `auto` with `DELTAVOL_JOURNAL=records`, a 32-byte journal record per
# write, written once per round for all the round's writes; `nobatch` is `records` with
# `DELTAVOL_JOURNAL_BATCH=off`, one journal write per write). These run the copy path
# (`--zero-copy off`); `zc` is `auto` with `--zero-copy on` (the request's pages go to and from
# the cache files with READ_FIXED/WRITE_FIXED, UBLK_F_AUTO_BUF_REG, Linux 6.16+), and `default`
# a plain `add` (whatever `--zero-copy auto` picks). Prints
# `# RESULT ...` lines with the ratio to loop. Run it with:
#
#   kernel-setup/vm-run --kernel 7 --bin-dir build/vm-bin bench/vm-fio-compare.sh
#
# Knobs (environment): FIO_RUNTIME_S (default 10), FIO_REPEATS (default 3), FIO_SIZE (128m),
# FIO_MODES ("off auto"), FIO_DEPTHS ("32 1"), FIO_RWS ("randwrite randread"; `write` and `read`
# are sequential) — lists with spaces or commas —, FIO_BS (4k; e.g. 128k), FIO_MEDIUM
# (`tmpfs`, the default, or `ext4`: an ext4 filesystem on a loop device over the tmpfs, closer
# to an SSD's filesystem — there buffered reads can be tried with RWF_NOWAIT and buffered
# writes cannot, so `auto` reads inline and writes on the ring).
. "${DRILL_LIB:-/drills/lib.sh}"

RUNTIME=${FIO_RUNTIME_S:-10}
REPEATS=${FIO_REPEATS:-3}
SIZE=${FIO_SIZE:-128m}
# Lists may be given with commas (vm-run's --env takes no spaces).
MODES=$(echo "${FIO_MODES:-off auto}" | tr ',' ' ')
DEPTHS=$(echo "${FIO_DEPTHS:-32 1}" | tr ',' ' ')
RWS=$(echo "${FIO_RWS:-randwrite randread}" | tr ',' ' ')
BS=${FIO_BS:-4k}
MEDIUM=${FIO_MEDIUM:-tmpfs}
MED=/mnt/medium
scratch_mount "$MED" 1200m
if [ "$MEDIUM" = ext4 ]; then
    dd if=/dev/zero of="$MED/ext4.img" bs=1M count=0 seek=1100 2>/dev/null
    EXT4DEV=$(loop_attach "$MED/ext4.img") || abort "no loop device for the ext4 medium"
    check mkfs-ext4 mkfs.ext4 -q -F "$EXT4DEV"
    mkdir -p /mnt/ext4
    check mount-ext4 mount -t ext4 "$EXT4DEV" /mnt/ext4
    MED=/mnt/ext4
fi

# fio_iops DEV RW QD: IOPS of one run (terse output: read IOPS is field 8, write IOPS field 49).
fio_iops() {
    _f=$(fio --name=b --filename="$1" --rw="$2" --bs="$BS" --iodepth="$3" --ioengine=io_uring \
        --direct=1 --size="$SIZE" --runtime="$RUNTIME" --ramp_time=2 --time_based \
        --norandommap --randrepeat=0 --invalidate=0 --minimal 2>/dev/null) || return 1
    case $2 in
        randread | read) echo "$_f" | cut -d';' -f8 ;;
        *) echo "$_f" | cut -d';' -f49 ;;
    esac
}

# median of the numbers on stdin
median() {
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) print 0; else print a[int((NR + 1) / 2)]}'
}

# dv_inline_log MODE: the daemon's last "inline I/O" log line (its files and counts), uncoloured.
dv_inline_log() {
    _esc=$(printf '\033')
    grep -h "inline I/O" "$MED/cache-$1/deltavol.log" 2>/dev/null | tail -n 1 |
        sed -e "s/${_esc}\[[0-9;]*m//g" -e "s/^/# [$1] /" >&2
}

ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'
}

# The loop baseline: a file on the medium.
dd if=/dev/zero of="$MED/loop.img" bs=1M count=0 seek=256 2>/dev/null
LOOPDEV=$(loop_attach "$MED/loop.img") || abort "no loop device"
check loop-fill fio --name=fill --filename="$LOOPDEV" --rw=write --bs=1M --size="$SIZE" --ioengine=io_uring --direct=1 --minimal

# deltavol, one volume per mode: cache dir and backing file on the same medium, defaults but a
# flush interval longer than the run.
for m in $MODES; do
    # The daemon `add` starts inherits these.
    zc=off
    case $m in
        nobatch) export DELTAVOL_INLINE_IO=auto DELTAVOL_JOURNAL=records DELTAVOL_JOURNAL_BATCH=off ;;
        records) export DELTAVOL_INLINE_IO=auto DELTAVOL_JOURNAL=records ;;
        zc) export DELTAVOL_INLINE_IO=auto; zc=on ;;
        default) zc=auto ;;
        *) export DELTAVOL_INLINE_IO="$m" ;;
    esac
    dev=$(dv_add "bench-$m" 256MiB "$MED/cache-$m" "$MED/backing-$m.img" --flush-interval-ms 600000 --zero-copy "$zc") \
        || abort "deltavol add ($m) failed"
    log "[$m] i/o path: $(dv_field "bench-$m" io_path)"
    unset DELTAVOL_INLINE_IO DELTAVOL_JOURNAL DELTAVOL_JOURNAL_BATCH
    eval "DEV_$m=\$dev"
    check "dv-fill-$m" fio --name=fill --filename="$dev" --rw=write --bs=1M --size="$SIZE" --ioengine=io_uring --direct=1 --minimal
    dv_inline_log "$m"
done

for rw in $RWS; do
    for qd in $DEPTHS; do
        k="$rw.$qd"
        : >"$DRILL_TMP/loop.$k"
        for m in $MODES; do : >"$DRILL_TMP/dv-$m.$k"; done
        i=0
        while [ "$i" -lt "$REPEATS" ]; do
            fio_iops "$LOOPDEV" "$rw" "$qd" >>"$DRILL_TMP/loop.$k" || fail "fio-loop-$k" "fio failed"
            for m in $MODES; do
                eval "dev=\$DEV_$m"
                fio_iops "$dev" "$rw" "$qd" >>"$DRILL_TMP/dv-$m.$k" || fail "fio-deltavol-$m-$k" "fio failed"
            done
            i=$((i + 1))
        done
        l=$(median <"$DRILL_TMP/loop.$k")
        for m in $MODES; do
            d=$(median <"$DRILL_TMP/dv-$m.$k")
            log "RESULT fio $BS $rw iodepth=$qd runtime=${RUNTIME}s x$REPEATS kernel=$(uname -r) medium=$MEDIUM defaults inline=$m: loop IOPS=$l deltavol IOPS=$d ratio=$(ratio "$d" "$l")"
            log "runs loop: $(tr '\n' ' ' <"$DRILL_TMP/loop.$k")| deltavol[$m]: $(tr '\n' ' ' <"$DRILL_TMP/dv-$m.$k")"
            [ "$d" != 0 ] && [ "$l" != 0 ] && pass "measured-$rw-qd$qd-$m"
        done
    done
done
for m in $MODES; do
    check "del-$m" dv_del "bench-$m"
    dv_inline_log "$m"
done
losetup -d "$LOOPDEV" 2>/dev/null
if [ "$MEDIUM" = ext4 ]; then
    umount /mnt/ext4 2>/dev/null
    losetup -d "$EXT4DEV" 2>/dev/null
fi
drill_finish
