# shellcheck shell=sh
# Drill "docker-smoke": the real Docker engine on a deltavol volume (vm-run --docker).
# An ext4 filesystem on a `deltavol add` device is bind-mounted into containers: a `docker run
# --rm` writes a file the host reads; a detached container keeps writing while dockerd is
# killed with -9 and restarted (--live-restore: the container stays Running, `docker exec`
# still writes through the mount); then everything stops cleanly, the filesystem checks clean
# and the files are still there after a remount (they went through the ublk device).
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"
# shellcheck source-path=SCRIPTDIR source=docker-lib.sh
. "${DOCKER_LIB:-/drills/docker-lib.sh}"

NAME=dksmoke
MED=/mnt/dkmed
MNT=/mnt/dkvol
CTR=dkwriter

# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    docker_cleanup
    if is_mounted "$MNT"; then umount "$MNT" 2>/dev/null || umount -l "$MNT"; fi
    dv_del_quiet "$NAME"
}
trap cleanup EXIT

require dockerd docker containerd runc mkfs.ext4 e2fsck
scratch_mount "$MED" 600m
mkdir -p "$MNT"
DEV=$(dv_add "$NAME" 256MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 2000) || abort add "add failed"
log "volume $NAME on $DEV"
check mkfs mkfs.ext4 -q "$DEV" || abort mkfs "cannot make ext4 on $DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount $DEV"

docker_check dockerd-start docker_start || abort dockerd "dockerd did not come up"
docker_check image-import docker_image || abort image "no image to run"
docker_check image-import-again docker_image

# A one-shot container writes through a bind mount of the ublk-backed ext4; the host reads it.
docker_check run-write dk run --rm --network none -v "$MNT:/data" "$DOCKER_IMAGE" \
    sh -c 'grep " /data ext4 " /proc/mounts && echo hello-from-container >/data/hello && sync'
if [ "$(cat "$MNT/hello" 2>/dev/null)" = hello-from-container ]; then
    pass host-reads-file
else
    fail host-reads-file "$MNT/hello holds '$(head -c 100 "$MNT/hello" 2>/dev/null)'"
fi

# A detached container that writes a counter every second.
# shellcheck disable=SC2016 # expanded by the container's shell
docker_check run-detached dk run -d --name "$CTR" --network none -v "$MNT:/data" "$DOCKER_IMAGE" \
    sh -c 'i=0; while :; do i=$((i + 1)); echo $i >/data/tick.tmp && mv /data/tick.tmp /data/tick; sleep 1; done'
docker_check detached-running docker_wait_state "$CTR" running 60

# tick_advances WHEN: the counter file grows within 30 s.
# shellcheck disable=SC2317 # called through docker_check
tick_advances() {
    _ta_a=$(cat "$MNT/tick" 2>/dev/null || echo 0)
    _ta_i=0
    while [ "$_ta_i" -lt 30 ]; do
        sleep 1
        _ta_b=$(cat "$MNT/tick" 2>/dev/null || echo 0)
        if [ "${_ta_b:-0}" -gt "${_ta_a:-0}" ] 2>/dev/null; then
            log "$1: tick $_ta_a -> $_ta_b"
            return 0
        fi
        _ta_i=$((_ta_i + 1))
    done
    log "$1: tick stuck at $_ta_a"
    return 1
}
docker_check writes-before-kill tick_advances before-kill

# dockerd dies hard: the container (its shim) lives on and keeps writing.
docker_check dockerd-kill9 docker_kill9
if docker_alive; then fail dockerd-gone "dockerd still runs after kill -9"; else pass dockerd-gone; fi
docker_check writes-without-dockerd tick_advances without-dockerd

# A new dockerd reattaches the container (live restore).
docker_check dockerd-restart docker_restart || abort dockerd-restart "dockerd did not come back"
docker_check live-restored docker_wait_state "$CTR" running 60
docker_check exec-after-restore dk exec "$CTR" sh -c 'echo restored >/data/after && sync && cat /data/after'
if [ "$(cat "$MNT/after" 2>/dev/null)" = restored ]; then
    pass host-reads-exec-file
else
    fail host-reads-exec-file "$MNT/after holds '$(head -c 100 "$MNT/after" 2>/dev/null)'"
fi
docker_check writes-after-restore tick_advances after-restore

# A clean end: container removed, dockerd stopped, then the filesystem and the volume.
docker_check container-rm dk rm -f "$CTR"
docker_check dockerd-stop docker_stop
docker_cleanup
check umount umount "$MNT"
check fsck e2fsck -fn "$DEV"
# The files came through the device: a fresh mount (no page cache) reads them.
check remount mount -t ext4 "$DEV" "$MNT"
check files-on-device sh -c "grep -qx hello-from-container '$MNT/hello' && grep -qx restored '$MNT/after' && [ \"\$(cat '$MNT/tick')\" -gt 3 ]"
check umount-again umount "$MNT"
check del dv_del "$NAME"
check_no_ublk_devices no-devices-left
drill_finish
