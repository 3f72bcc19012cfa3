# shellcheck shell=sh
# Drill: zero copy (`--zero-copy`, UBLK_F_AUTO_BUF_REG) is used where the kernel has it and
# serves every path of the engine byte-exact; where the kernel lacks it, `auto` falls back to
# the copy path and `on` is refused with a clear error.
#
# Kernel with UBLK_F_AUTO_BUF_REG (6.16+; the rig's 7.x):
#   - `add --zero-copy on`: status says io_path zero-copy;
#   - fio random writes with crc32c verify (4k and 128k, iodepth 32): writes go to the mirror
#     with WRITE_FIXED, the verify reads come back from the mirror with READ_FIXED;
#   - dd of random data at an odd offset, read back with O_DIRECT and compared byte for byte;
#   - after the flush (dirty 0): a verify pass reads from the backing file (read-cache misses:
#     through memory into the read cache, then user copy), a second pass hits the read cache
#     (user copy); the status' read-cache counters must show both;
#   - reattached with --read-cache 0: the backing file's blocks go straight into the request
#     (READ_FIXED) and verify;
#   - reattached with --zero-copy off (the copy path) and with auto: the same data verifies; auto
#     chooses the copy path for these cache files on tmpfs (a memory filesystem: every SQE to it
#     goes through a worker thread, the copy path's inline copies do not), and zero copy for a
#     volume whose cache dir is on ext4 (a loop device), which then verifies too.
# Kernel without it (6.12): `--zero-copy on` is refused naming UBLK_F_AUTO_BUF_REG, `auto` runs
# the copy path (status io_path copy) and verifies.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol fio cmp mkfs.ext4 losetup

NAME=zcvol
SIZE=256MiB
SSD=/mnt/zc-ssd
HDD=/mnt/zc-hdd
CACHE_DIR=$SSD/$NAME
BACKING=$HDD/$NAME.img
FLUSH_INTERVAL_MS=1000

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    dv_del_quiet "$NAME"
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

scratch_mount "$SSD" 700m
scratch_mount "$HDD" 700m

# Whether this kernel has UBLK_F_AUTO_BUF_REG: Linux 6.16 and later.
kver=$(uname -r)
kmaj=${kver%%.*}
kmin=${kver#*.}
kmin=${kmin%%[!0-9]*}
if [ "$kmaj" -gt 6 ] || { [ "$kmaj" -eq 6 ] && [ "$kmin" -ge 16 ]; }; then
    HAVE_ZC=1
else
    HAVE_ZC=0
fi
log "kernel $kver: zero copy expected: $HAVE_ZC"

is_number() {
    case "$1" in '' | *[!0-9]*) return 1 ;; *) return 0 ;; esac
}

# expect_path WANT CHECK: PASS CHECK when the volume's status says io_path WANT.
expect_path() {
    _ep=$(dv_field "$NAME" io_path 2>/dev/null)
    if [ "$_ep" = "$1" ]; then
        pass "$2"
    else
        fail "$2" "status io_path is '$_ep', expected '$1'"
    fi
}

ENGINE=io_uring
# job_file BS SIZE OFFSET0 OFFSET1 > file: two random-write jobs with crc32c verify.
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

# run_fio NAME JOBFILE [EXTRA...]
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

# jobs: (re)write the job files for the current $DEV
jobs() {
    job_file 4k 16M 0 16M >"$DRILL_TMP/4k.fio"
    job_file 128k 32M 64M 96M >"$DRILL_TMP/128k.fio"
}

# dd_check NAME: the random file written at the odd offset reads back byte-exact.
dd_check() {
    rm -f "$DRILL_TMP/back.bin"
    if dd if="$DEV" of="$DRILL_TMP/back.bin" bs=4096 skip=40001 count=1283 iflag=direct 2>/dev/null &&
        cmp "$DRILL_TMP/rand.bin" "$DRILL_TMP/back.bin"; then
        pass "$1"
    else
        fail "$1" "the dd region does not read back byte-exact"
    fi
}

# wait_flushed: until no dirty bytes are left (what was written is in the backing file).
wait_flushed() {
    _wf_i=0
    while [ "$_wf_i" -lt 90 ]; do
        _wf_db=$(dv_field "$NAME" dirty_bytes 2>/dev/null)
        if is_number "$_wf_db" && [ "$_wf_db" -eq 0 ]; then
            pass "$1"
            return 0
        fi
        sleep 0.5
        _wf_i=$((_wf_i + 1))
    done
    fail "$1" "still dirty_bytes='$_wf_db' after 45s"
}

# reattach CHECK ARGS...: del, then add again with ARGS.
reattach() {
    _ra_name=$1
    shift
    check "del-before-$_ra_name" dv_del "$NAME"
    wait_gone "$DEV" 30 || fail "device-gone-$_ra_name" "$DEV still exists 30s after del"
    DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms "$FLUSH_INTERVAL_MS" "$@") ||
        abort "$_ra_name" "deltavol add $* failed"
    pass "$_ra_name"
    jobs
}

if [ "$HAVE_ZC" = 0 ]; then
    # --- a kernel without auto buffer registration ---
    if run_timeout "$DV_CMD_TIMEOUT_S" "$DV" add --name "$NAME" --size "$SIZE" --cache-dir "$CACHE_DIR" \
        --backing "$BACKING" --zero-copy on >"$DRILL_TMP/on.out" 2>"$DRILL_TMP/on.err"; then
        fail on-refused "add --zero-copy on succeeded on a kernel without UBLK_F_AUTO_BUF_REG"
        dv_del_quiet "$NAME"
    elif grep -q "UBLK_F_AUTO_BUF_REG" "$DRILL_TMP/on.err" "$DRILL_TMP/on.out"; then
        pass on-refused
        sed 's/^/#   /' "$DRILL_TMP/on.err" | head -n 3
    else
        fail on-refused "refused without naming UBLK_F_AUTO_BUF_REG: $(cat "$DRILL_TMP/on.err" "$DRILL_TMP/on.out" | tr '\n' '|' | cut -c1-250)"
    fi
    check_no_ublk_devices on-left-no-device
    DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms "$FLUSH_INTERVAL_MS" --zero-copy auto) ||
        abort auto-add "deltavol add --zero-copy auto failed"
    pass auto-add
    expect_path copy auto-is-copy
    jobs
    run_fio copy-write-verify-4k "$DRILL_TMP/4k.fio"
    run_fio copy-write-verify-128k "$DRILL_TMP/128k.fio"
    check del dv_del "$NAME"
    wait_gone "$DEV" 30
    check_no_ublk_devices no-devices-left
    drill_finish
fi

# --- a kernel with auto buffer registration ---
DEV=$(dv_add "$NAME" "$SIZE" "$CACHE_DIR" "$BACKING" --flush-interval-ms "$FLUSH_INTERVAL_MS" --zero-copy on) ||
    abort add-on "deltavol add --zero-copy on failed"
pass add-on
expect_path zero-copy on-is-zero-copy
if ! fio --name=probe --filename="$DEV" --ioengine=io_uring --direct=1 --rw=read --bs=4k \
    --size=4k >"$DRILL_TMP/probe.out" 2>&1; then
    ENGINE=libaio
fi
log "fio engine: $ENGINE"
jobs

# Writes (WRITE_FIXED to the mirror) verified by reads from the mirror (READ_FIXED).
run_fio zc-write-verify-4k "$DRILL_TMP/4k.fio"
run_fio zc-write-verify-128k "$DRILL_TMP/128k.fio"
dd if=/dev/urandom of="$DRILL_TMP/rand.bin" bs=4096 count=1283 2>/dev/null
check dd-write dd if="$DRILL_TMP/rand.bin" of="$DEV" bs=4096 seek=40001 oflag=direct conv=notrunc
dd_check dd-mirror-read

# After the flush: the blocks come from the backing file, then from the read cache.
wait_flushed flushed
h0=$(dv_field "$NAME" read_cache_hits)
m0=$(dv_field "$NAME" read_cache_misses)
# (The 4k region, 32 MiB, and the dd region fit the 64 MiB read cache; the 128k region after.)
run_fio zc-backing-verify-4k "$DRILL_TMP/4k.fio" --verify_only
h1=$(dv_field "$NAME" read_cache_hits)
m1=$(dv_field "$NAME" read_cache_misses)
run_fio zc-rcache-verify-4k "$DRILL_TMP/4k.fio" --verify_only
h2=$(dv_field "$NAME" read_cache_hits)
m2=$(dv_field "$NAME" read_cache_misses)
log "read cache: hits $h0 -> $h1 -> $h2, misses $m0 -> $m1 -> $m2"
# 8192 blocks in the 4k region, all clean now: the first pass reads each of them through the
# read cache — a miss (backing file → request) or a hit (→ request by user copy) — and the
# second hits them. How many the first pass finds cached already depends on timing: a timed
# flush (every second) can make blocks clean before the write job's own verify pass reads them,
# and those reads fill the cache (on a quiet host nearly all of them). The backing file's
# blocks straight into the request are checked below with --read-cache 0.
if is_number "$m1" && is_number "$m0" && is_number "$h1" && is_number "$h0" &&
    [ "$((m1 - m0 + h1 - h0))" -ge 8000 ]; then
    pass backing-reads-through-the-cache
else
    fail backing-reads-through-the-cache "first pass: read-cache misses '$m0' -> '$m1', hits '$h0' -> '$h1' (expected 8000 or more blocks through the read cache)"
fi
if is_number "$h2" && is_number "$h1" && [ "$((h2 - h1))" -ge 7000 ]; then
    pass second-pass-hit-the-cache
else
    fail second-pass-hit-the-cache "read-cache hits went from '$h1' to '$h2' (expected +7000 or more)"
fi
dd_check dd-backing-read
dd_check dd-rcache-read
run_fio zc-backing-verify-128k "$DRILL_TMP/128k.fio" --verify_only

# Overwrites of flushed blocks, then read back from the mirror again.
run_fio zc-overwrite-verify-4k "$DRILL_TMP/4k.fio"

# No read cache: the backing file's blocks straight into the request.
wait_flushed flushed-2
reattach re-add-no-read-cache --zero-copy on --read-cache 0
expect_path zero-copy no-read-cache-is-zero-copy
run_fio zc-norcache-verify-4k "$DRILL_TMP/4k.fio" --verify_only
run_fio zc-norcache-verify-128k "$DRILL_TMP/128k.fio" --verify_only
dd_check dd-norcache-read

# The copy path reads what zero copy wrote; auto chooses the copy path on tmpfs.
reattach re-add-copy --zero-copy off
expect_path copy off-is-copy
run_fio copy-verify-4k "$DRILL_TMP/4k.fio" --verify_only
run_fio copy-verify-128k "$DRILL_TMP/128k.fio" --verify_only
dd_check dd-copy-read
reattach re-add-auto --zero-copy auto
expect_path copy auto-on-tmpfs-is-copy
run_fio auto-verify-4k "$DRILL_TMP/4k.fio" --verify_only
dd_check dd-auto-read
check del dv_del "$NAME"
wait_gone "$DEV" 30

# auto on a disk filesystem: zero copy.
dd if=/dev/zero of="$HDD/ext4.img" bs=1M count=0 seek=300 2>/dev/null
EXT4DEV=$(loop_attach "$HDD/ext4.img") || abort ext4-loop "no loop device for the ext4 cache dir"
check mkfs-ext4 mkfs.ext4 -q -F "$EXT4DEV"
mkdir -p /mnt/zc-ext4
check mount-ext4 mount -t ext4 "$EXT4DEV" /mnt/zc-ext4 || abort mount-ext4 "cannot mount ext4"
NAME=zcext4
DEV=$(dv_add "$NAME" 128MiB /mnt/zc-ext4/$NAME "$HDD/$NAME.img" --flush-interval-ms "$FLUSH_INTERVAL_MS") ||
    abort add-ext4 "deltavol add with the cache dir on ext4 failed"
pass add-ext4
expect_path zero-copy auto-on-ext4-is-zero-copy
jobs
run_fio ext4-write-verify-4k "$DRILL_TMP/4k.fio"
run_fio ext4-write-verify-128k "$DRILL_TMP/128k.fio"
wait_flushed ext4-flushed
run_fio ext4-backing-verify-4k "$DRILL_TMP/4k.fio" --verify_only
check del-ext4 dv_del "$NAME"
wait_gone "$DEV" 30
umount /mnt/zc-ext4 2>/dev/null
losetup -d "$EXT4DEV" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
