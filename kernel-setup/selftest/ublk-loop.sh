# shellcheck shell=sh
# Rig self-test (not a deltavol drill): libublk 0.4.8's `loop` example serves a tmpfs file as
# /dev/ublkbN; mkfs.ext4, mount, write, read back, fsck; a short fio run compares it with the
# kernel loop device. Run by `kernel-setup/vm-run --kernel K --selftest`.
# shellcheck source-path=SCRIPTDIR source=../../tests/drills/lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"

require ublk-loop mkfs.ext4 e2fsck fio losetup
DEV_ID=7
DEV=/dev/ublkb$DEV_ID
IMG=/mnt/selftest/backing.img
MNT=/mnt/selftest-fs

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    is_mounted "$MNT" && umount "$MNT" 2>/dev/null
    run_timeout 30 ublk-loop del -n "$DEV_ID" >/dev/null 2>&1
    [ -n "${LOOPDEV:-}" ] && losetup -d "$LOOPDEV" 2>/dev/null
    rm -rf "$DRILL_TMP"
}
trap cleanup EXIT

check kernel-release sh -c 'uname -r | grep -q .'
log "kernel $(uname -r)"
check ublk-control test -c /dev/ublk-control

scratch_mount /mnt/selftest 700m
check backing-file truncate -s 256M "$IMG"

t0=$(now_s)
# The example daemonizes and keeps its stdout; the device appears once its queues are up.
if ublk-loop add -n "$DEV_ID" -q 2 -d 64 -a -f "$IMG" >"$DRILL_TMP/add.log" 2>&1 && wait_for_block "$DEV"; then
    pass add
    log "ublk-loop add took $(elapsed_s "$t0")s"
else
    sed 's/^/#   /' "$DRILL_TMP/add.log"
    abort add "no $DEV after ublk-loop add"
fi

check mkfs mkfs.ext4 -q -F "$DEV"
mkdir -p "$MNT"
check mount mount -t ext4 "$DEV" "$MNT"
mkdir -p "$DRILL_TMP/src"
check make-tree make_tree "$DRILL_TMP/src" 12 256
sums_of "$DRILL_TMP/src" >"$DRILL_TMP/sums"
check copy-tree cp -a "$DRILL_TMP/src/." "$MNT/"
check sync sync
check umount umount "$MNT"
# Drop the page cache so the read-back comes from the device.
echo 3 >/proc/sys/vm/drop_caches
check remount mount -t ext4 "$DEV" "$MNT"
check verify sh -c "cd '$MNT' && sha256sum -c -s '$DRILL_TMP/sums'"
check umount-2 umount "$MNT"
check fsck e2fsck -fn "$DEV"

# Quick, informational fio comparison (4k random read, iodepth 32, 5 s each).
fio_iops() {
    fio --name=q --filename="$1" --rw=randread --bs=4k --iodepth=32 --ioengine=io_uring \
        --direct=1 --runtime=5 --time_based --size=128M --output-format=terse --terse-version=3 \
        2>/dev/null | awk -F';' '{ print $8 }'
}
iops_ublk=$(fio_iops "$DEV")
log "fio 4k randread qd32 5s on ublk-loop: ${iops_ublk:-?} IOPS"
check del run_timeout 60 ublk-loop del -n "$DEV_ID"
check device-gone wait_gone "$DEV" 30
LOOPDEV=$(loop_attach "$IMG" 2>/dev/null || true)
if [ -n "$LOOPDEV" ]; then
    pass kernel-loop
    iops_loop=$(fio_iops "$LOOPDEV")
    log "fio 4k randread qd32 5s on kernel loop: ${iops_loop:-?} IOPS"
else
    fail kernel-loop "losetup failed: is loop.ko loaded?"
fi
log "self-test took $(elapsed_s "$t0")s after add"
drill_finish
