# shellcheck shell=sh
# Helpers for drills that run the real Docker engine in the test VM (POSIX sh, busybox ash).
# The engine is there when the VM was started with `kernel-setup/vm-run --docker` (a drill that
# sources this file turns --docker on by itself). Source it after lib.sh:
#
#   . "${DRILL_LIB:-/drills/lib.sh}"
#   . "${DOCKER_LIB:-/drills/docker-lib.sh}"
#
# What is in the VM: Debian 12's dockerd, docker, containerd, containerd-shim-runc-v2, runc,
# docker-init (tini) and docker-proxy in /usr/bin; the overlay module (loaded at boot); the tar
# of a busybox root filesystem that docker_image imports as $DOCKER_IMAGE (no registry: nothing
# can be pulled). dockerd runs as the VM allows it (kernel-setup/README.md says why):
#   DOCKER_RAMDISK=1 dockerd --iptables=false --ip6tables=false --bridge=none
#       --storage-driver=$DOCKER_STORAGE_DRIVER --data-root=$DOCKER_DATA_ROOT --live-restore
# with its data root on a tmpfs, so containers must run with `--network none` (there is no
# bridge, no iptables). DOCKER_RAMDISK=1 is what lets runc start a container whose host root is
# the initramfs (no pivot_root). Under TCG, count 12-30 s for dockerd to answer (a restart
# 6-25 s), 3-11 s for the import and 10-35 s per `docker run`.
#
# Functions (each returns non-zero on failure, with commentary lines saying why; wrap them in
# `docker_check NAME ...`, or lib.sh's `check`, for a PASS/FAIL line):
#   docker_mounts          cgroup2 on /sys/fs/cgroup, devpts, /dev/shm, a tmpfs data root,
#                          /run/docker/plugins (whatever is missing); docker_start calls it
#   docker_start           start dockerd in the background (log: $DOCKER_LOG, pid: $DOCKER_PID)
#                          and wait up to $DOCKER_START_WAIT_S s for the API to answer; on
#                          failure prints the tail of the log
#   docker_stop            SIGTERM to dockerd and wait for it to exit (under --live-restore the
#                          containers keep running: remove them first for a clean stop)
#   docker_kill9           SIGKILL to dockerd (containers keep running: their shims survive)
#   docker_restart         docker_stop if dockerd runs, then docker_start
#   docker_alive           dockerd's process exists
#   docker_image           import the busybox tar as $DOCKER_IMAGE once (idempotent)
#   dk ARGS...             `docker ARGS...` killed after $DOCKER_CMD_TIMEOUT_S s
#   docker_state NAME      a container's state (created, running, exited, ...), empty if none
#   docker_wait_state NAME STATE [SECS]   wait until the container is in STATE
#   docker_log_tail [N]    the last N (30) lines of dockerd's log ($DOCKER_LOG), as commentary
#   docker_check NAME CMD...   like lib.sh's check (PASS/FAIL line), but CMD runs in this shell
#                          (so docker_start's DOCKER_PID sticks), its output is shown as
#                          commentary and its duration logged; CMD's own timeouts apply (dk's)
#   docker_cleanup         for the drill's EXIT trap: remove every container, stop dockerd,
#                          end what is left of containerd and the shims, unmount the data root
#
# Volume plugins (deltavol agent, whose plugin socket is /run/docker/plugins/deltavol.sock by
# default): dockerd finds a plugin NAME by its socket /run/docker/plugins/NAME.sock (the
# directory exists from boot: vm-init makes it when dockerd is in the VM). The plugin may be started
# before docker_start or after it: dockerd looks the socket up at first use (`docker volume
# create -d NAME`, `docker run -v VOL:/data --volume-driver NAME`), no restart needed. A drill
# that starts the agent first can call docker_mounts before it, for /run/docker/plugins and the
# mounts; either way the agent should be listening before the first docker command that names
# the driver. Mind that one `docker run` mounts a volume twice, with two different IDs.
#
# Settings (environment, or set before calling): DOCKER_STORAGE_DRIVER (overlay2; vfs needs no
# module but copies every layer), DOCKER_DATA_ROOT (/var/lib/docker), DOCKER_EXTRA_ARGS (more
# dockerd flags), DOCKER_START_WAIT_S (120), DOCKER_CMD_TIMEOUT_S (180), DOCKER_IMAGE
# (dvbox:latest), DOCKER_IMAGE_TAR (/usr/share/deltavol/dvbox.tar).

DOCKER_STORAGE_DRIVER=${DOCKER_STORAGE_DRIVER:-overlay2}
DOCKER_DATA_ROOT=${DOCKER_DATA_ROOT:-/var/lib/docker}
DOCKER_EXTRA_ARGS=${DOCKER_EXTRA_ARGS:-}
DOCKER_START_WAIT_S=${DOCKER_START_WAIT_S:-120}
DOCKER_CMD_TIMEOUT_S=${DOCKER_CMD_TIMEOUT_S:-180}
DOCKER_IMAGE=${DOCKER_IMAGE:-dvbox:latest}
DOCKER_IMAGE_TAR=${DOCKER_IMAGE_TAR:-/usr/share/deltavol/dvbox.tar}
DOCKER_LOG=$DRILL_TMP/dockerd.log
DOCKER_PIDFILE=/run/docker.pid
DOCKER_PID=''

# _dk_say MESSAGE: a commentary line on stdout (where `check` collects it).
_dk_say() {
    echo "# $DRILL: docker: $*"
}

# docker_log_tail [N]: the last N (30) lines of dockerd's log, as commentary.
docker_log_tail() {
    [ -f "$DOCKER_LOG" ] || return 0
    tail -n "${1:-30}" "$DOCKER_LOG" | sed 's/^/# dockerd: /'
}

# docker_mounts: what dockerd needs mounted, where it is missing.
docker_mounts() {
    if ! command -v dockerd >/dev/null 2>&1; then
        _dk_say "dockerd is not in this VM: run it with kernel-setup/vm-run --docker"
        return 1
    fi
    if ! grep -q ' /sys/fs/cgroup cgroup2 ' /proc/mounts; then
        mkdir -p /sys/fs/cgroup
        mount -t cgroup2 cgroup2 /sys/fs/cgroup || { _dk_say "cannot mount cgroup2"; return 1; }
    fi
    mkdir -p /dev/pts /dev/shm /run/docker/plugins /etc/docker "$DOCKER_DATA_ROOT"
    is_mounted /dev/pts || mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts ||
        { _dk_say "cannot mount devpts"; return 1; }
    is_mounted /dev/shm || mount -t tmpfs -o mode=1777 shm /dev/shm ||
        { _dk_say "cannot mount /dev/shm"; return 1; }
    # The initramfs root cannot hold overlay2's upper layers (and must not fill up): a tmpfs.
    is_mounted "$DOCKER_DATA_ROOT" || mount -t tmpfs -o mode=711 docker-data "$DOCKER_DATA_ROOT" ||
        { _dk_say "cannot mount a tmpfs on $DOCKER_DATA_ROOT"; return 1; }
    if [ "$DOCKER_STORAGE_DRIVER" = overlay2 ] && ! grep -qw overlay /proc/filesystems; then
        _dk_say "no overlay filesystem in this kernel (overlay.ko not loaded?): use DOCKER_STORAGE_DRIVER=vfs"
        return 1
    fi
}

# _dk_pid: dockerd's pid (this drill's, else its pid file's), empty when none runs.
_dk_pid() {
    if pid_alive "$DOCKER_PID"; then
        echo "$DOCKER_PID"
        return 0
    fi
    _dkp=$(cat "$DOCKER_PIDFILE" 2>/dev/null)
    if pid_alive "$_dkp" && grep -q dockerd "/proc/$_dkp/comm" 2>/dev/null; then
        echo "$_dkp"
    fi
}

# docker_alive: dockerd's process exists.
docker_alive() {
    [ -n "$(_dk_pid)" ]
}

# dk ARGS...: the docker client, killed after DOCKER_CMD_TIMEOUT_S seconds.
dk() {
    run_timeout "$DOCKER_CMD_TIMEOUT_S" docker "$@"
}

# _dk_answers: the API answers (`docker version` reaches the server).
_dk_answers() {
    run_timeout 30 docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# docker_start: start dockerd and wait for its API.
docker_start() {
    docker_mounts || return 1
    _dks_t0=$(now_s)
    if docker_alive; then
        DOCKER_PID=$(_dk_pid)
        _dk_say "dockerd already runs (pid $DOCKER_PID)"
    else
        echo "=== dockerd start at uptime $(now_s)" >>"$DOCKER_LOG"
        # shellcheck disable=SC2086 # DOCKER_EXTRA_ARGS is a list of words
        DOCKER_RAMDISK=1 dockerd --iptables=false --ip6tables=false --bridge=none \
            --storage-driver="$DOCKER_STORAGE_DRIVER" --data-root="$DOCKER_DATA_ROOT" --live-restore \
            --pidfile="$DOCKER_PIDFILE" $DOCKER_EXTRA_ARGS </dev/null >>"$DOCKER_LOG" 2>&1 &
        DOCKER_PID=$!
    fi
    while :; do
        if ! pid_alive "$DOCKER_PID"; then
            _dk_say "dockerd (pid $DOCKER_PID) exited after $(elapsed_s "$_dks_t0")s; the end of $DOCKER_LOG:"
            docker_log_tail
            return 1
        fi
        if [ -S /run/docker.sock ] && _dk_answers; then
            _dk_say "dockerd (pid $DOCKER_PID, $DOCKER_STORAGE_DRIVER) answers after $(elapsed_s "$_dks_t0")s"
            return 0
        fi
        if awk -v a="$_dks_t0" -v b="$(now_s)" -v w="$DOCKER_START_WAIT_S" 'BEGIN { exit !(b - a > w) }'; then
            _dk_say "dockerd (pid $DOCKER_PID) does not answer after ${DOCKER_START_WAIT_S}s; the end of $DOCKER_LOG:"
            docker_log_tail
            return 1
        fi
        sleep 1
    done
}

# docker_stop: SIGTERM to dockerd, wait for it to exit (SIGKILL and failure after 90 s).
docker_stop() {
    _dkst_pid=$(_dk_pid)
    if [ -z "$_dkst_pid" ]; then
        _dk_say "dockerd is not running"
        return 0
    fi
    _dkst_t0=$(now_s)
    kill -TERM "$_dkst_pid"
    if ! wait_pid_gone "$_dkst_pid" 90; then
        _dk_say "dockerd (pid $_dkst_pid) still runs 90 s after SIGTERM: SIGKILL; the end of $DOCKER_LOG:"
        docker_log_tail 20
        kill -9 "$_dkst_pid" 2>/dev/null
        wait_pid_gone "$_dkst_pid" 30
        return 1
    fi
    _dk_say "dockerd (pid $_dkst_pid) stopped after $(elapsed_s "$_dkst_t0")s"
    DOCKER_PID=''
}

# docker_kill9: SIGKILL to dockerd (containers live on under --live-restore).
docker_kill9() {
    _dkk_pid=$(_dk_pid)
    if [ -z "$_dkk_pid" ]; then
        _dk_say "dockerd is not running"
        return 1
    fi
    kill -9 "$_dkk_pid"
    wait_pid_gone "$_dkk_pid" 30 || { _dk_say "dockerd (pid $_dkk_pid) survived SIGKILL"; return 1; }
    _dk_say "dockerd (pid $_dkk_pid) killed"
    DOCKER_PID=''
}

# docker_restart: stop dockerd if it runs (SIGTERM), start it again, wait for its API.
docker_restart() {
    if docker_alive; then
        docker_stop || return 1
    fi
    docker_start
}

# docker_image: $DOCKER_IMAGE from $DOCKER_IMAGE_TAR, imported once.
docker_image() {
    if dk image inspect "$DOCKER_IMAGE" >/dev/null 2>&1; then
        _dk_say "$DOCKER_IMAGE is there"
        return 0
    fi
    if [ ! -f "$DOCKER_IMAGE_TAR" ]; then
        _dk_say "$DOCKER_IMAGE_TAR is missing (vm-run --docker puts it there)"
        return 1
    fi
    _dki_t0=$(now_s)
    dk import --change 'CMD ["/bin/sh"]' "$DOCKER_IMAGE_TAR" "$DOCKER_IMAGE" || return 1
    _dk_say "imported $DOCKER_IMAGE in $(elapsed_s "$_dki_t0")s"
}

# docker_state NAME: the container's state, empty when there is no such container.
docker_state() {
    dk inspect --format '{{.State.Status}}' "$1" 2>/dev/null
}

# docker_wait_state NAME STATE [SECS]: wait (default 60 s) until the container is in STATE.
docker_wait_state() {
    _dkw_t0=$(now_s)
    while :; do
        _dkw_s=$(docker_state "$1")
        [ "$_dkw_s" = "$2" ] && return 0
        if awk -v a="$_dkw_t0" -v b="$(now_s)" -v w="${3:-60}" 'BEGIN { exit !(b - a > w) }'; then
            _dk_say "container $1 is '${_dkw_s:-absent}', not '$2', after ${3:-60}s"
            return 1
        fi
        sleep 1
    done
}

# docker_check NAME CMD...: PASS if CMD exits 0, else FAIL; CMD's output as commentary, and the
# time it took.
docker_check() {
    _dc_name=$1
    shift
    _dc_out=$DRILL_TMP/docker-check.out
    _dc_t0=$(now_s)
    if "$@" >"$_dc_out" 2>&1; then _dc_rc=0; else _dc_rc=$?; fi
    _dc_secs=$(elapsed_s "$_dc_t0")
    sed 's/^#* */#   /' "$_dc_out" | tail -n 40
    if [ "$_dc_rc" -eq 0 ]; then
        pass "$_dc_name"
        log "$_dc_name: ${_dc_secs}s"
        return 0
    fi
    fail "$_dc_name" "exit $_dc_rc from '$*' after ${_dc_secs}s: $(grep -v '^# ' "$_dc_out" | tail -n 3 | tr '\n' '|' | cut -c1-300)"
    return 1
}

# _dk_pids_named COMM: pids of the processes whose command name is COMM.
_dk_pids_named() {
    for _dkn in /proc/[0-9]*/comm; do
        [ "$(cat "$_dkn" 2>/dev/null)" = "$1" ] || continue
        _dkn=${_dkn#/proc/}
        echo "${_dkn%/comm}"
    done
}

# docker_cleanup: no container, no dockerd, no containerd or shim left; the data root unmounted.
# Never fails (for EXIT traps).
docker_cleanup() {
    if docker_alive; then
        _dkc_ids=$(run_timeout 60 docker ps -aq 2>/dev/null)
        # shellcheck disable=SC2086 # ids are words
        [ -z "$_dkc_ids" ] || run_timeout 120 docker rm -f $_dkc_ids >/dev/null 2>&1
        docker_stop >/dev/null 2>&1
    fi
    # Containers left by a dockerd killed with -9 and not restarted (or not answering): through
    # runc, whose state dockerd keeps under /run/docker/runtime-runc/moby.
    for _dkc_id in $(run_timeout 30 runc --root /run/docker/runtime-runc/moby list -q 2>/dev/null); do
        run_timeout 30 runc --root /run/docker/runtime-runc/moby delete --force "$_dkc_id" >/dev/null 2>&1
    done
    # What is left of containerd and the shims.
    for _dkc_p in $(_dk_pids_named containerd-shim) $(_dk_pids_named containerd); do
        kill -TERM "$_dkc_p" 2>/dev/null
    done
    for _dkc_p in $(_dk_pids_named containerd-shim) $(_dk_pids_named containerd); do
        wait_pid_gone "$_dkc_p" 10 || kill -9 "$_dkc_p" 2>/dev/null
    done
    if is_mounted "$DOCKER_DATA_ROOT"; then
        umount -l "$DOCKER_DATA_ROOT" 2>/dev/null
    fi
    return 0
}
