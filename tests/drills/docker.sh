# shellcheck shell=sh
# Drill "docker": the container workflow with the real Docker engine (vm-run --docker) and the
# deltavol agent's volume plugin, end to end on the real ublk driver:
#   1. `docker volume create -d deltavol` with bad options, and for an unknown snapshot: clear
#      errors reach `docker`;
#   2. a container writes files and an SQLite database to a new volume (the agent makes ext4 on
#      the first mount); `docker volume inspect` shows device, epochs, last snapshot;
#   3. two containers share the volume; `deltavol snapshot` goes through the agent, which
#      freezes the filesystem around the cut; one container stops and the other keeps its
#      mount and its writes;
#   4. `-o from=db1@SNAP` clones the snapshot: a second container sees exactly it (not what was
#      written after);
#   5. the volume's daemon is killed (-9): the agent restarts it, the device is taken over and
#      the running container writes on without an error; the agent itself is killed and
#      restarted, and dockerd is killed and restarted under the running container (live
#      restore): when the container ends at last, the volume is unmounted (no stale mount);
#   6. the node is lost (agent, daemons and every local file); on a "new node" (fresh agent
#      dirs), a plain create of the name is refused (it lives on the data plane), and
#      `-o recover=db1` brings it back: a third container verifies every file and the database
#      while hydration is still below 100%.
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "${DRILL_LIB:-/drills/lib.sh}"
# shellcheck source-path=SCRIPTDIR source=docker-lib.sh
. "${DOCKER_LIB:-/drills/docker-lib.sh}"

MED=/mnt/dkmed
AGENT_PID=
# shellcheck disable=SC2317 # called from the EXIT trap
cleanup() {
    docker_cleanup
    [ -n "$AGENT_PID" ] && kill -9 "$AGENT_PID" 2>/dev/null
    for v in db1 db1c; do
        for mp in /var/lib/dv-n1/mounts/$v /var/lib/dv-n2/mounts/$v; do
            is_mounted "$mp" && { umount "$mp" 2>/dev/null || umount -l "$mp"; }
        done
        dv_del_quiet "$v"
    done
}
trap cleanup EXIT

require dockerd docker deltavol-dataplane sqlite3 mkfs.ext4
scratch_mount "$MED" 1200m
dp_with_token "$MED" docker-drill-secret || abort dataplane-start "the data plane did not start"

# agent_start NODE: a deltavol agent with its state, caches, backing files and mounts under
# NODE's own dirs (a node of its own), logging to $DRILL_TMP/agent-NODE.log.
# shellcheck disable=SC2317 # called through docker_check
agent_start() {
    cat >"$DRILL_TMP/agent-$1.toml" <<EOF
dataplane = "$DP_ADDR"
auth_token_file = "$TOK"
state_dir = "$MED/$1/agent"
cache_root = "$MED/$1/cache"
backing_root = "$MED/$1/backing"
mount_root = "/var/lib/dv-$1/mounts"
flush_interval = "2s"
read_cache = "8MiB"
cache_limit = "256MiB"
EOF
    deltavol agent --config "$DRILL_TMP/agent-$1.toml" >>"$DRILL_TMP/agent-$1.log" 2>&1 &
    AGENT_PID=$!
    _as_i=0
    while ! grep -q '^agent ready' "$DRILL_TMP/agent-$1.log"; do
        _as_i=$((_as_i + 1))
        if [ "$_as_i" -gt 300 ] || ! pid_alive "$AGENT_PID"; then
            sed 's/^/# agent: /' "$DRILL_TMP/agent-$1.log"
            return 1
        fi
        sleep 0.1
    done
}

# expect_refused NAME PATTERN CMD...: CMD fails and its error output matches PATTERN.
expect_refused() {
    _er_name=$1 _er_pat=$2
    shift 2
    if "$@" >"$DRILL_TMP/out" 2>&1; then
        fail "$_er_name" "succeeded: $(head -c 300 "$DRILL_TMP/out")"
    elif grep -q "$_er_pat" "$DRILL_TMP/out"; then
        log "$_er_name: $(tail -n 1 "$DRILL_TMP/out" | head -c 400)"
        pass "$_er_name"
    else
        fail "$_er_name" "error does not say '$_er_pat': $(head -c 400 "$DRILL_TMP/out")"
    fi
}

# The host's sqlite3 and its libraries, bind-mounted read-only into the busybox image (the VM
# has no ldd: the dynamic loader lists them).
SQL_V=
SQLITE=$(command -v sqlite3)
for f in "$SQLITE" $(/lib64/ld-linux-x86-64.so.2 --list "$SQLITE" | grep -o '/[^ ]*'); do
    SQL_V="$SQL_V -v $f:$f:ro"
done
IMG=$DOCKER_IMAGE
# Sums of the files and the database (the drill's data; not the writers' tick files).
SUMS='cd /data && find files app.db -type f | sort | xargs sha256sum'

docker_check agent-start agent_start n1 || abort agent-start "the agent did not start"
docker_check dockerd-start docker_start || abort dockerd "dockerd did not come up"
docker_check image-import docker_image || abort image "no image to run"

# --- 1. errors reach docker ---
expect_refused create-bad-size 'size="lots"' dk volume create -d deltavol --name bad1 -o size=lots
expect_refused create-unknown-option 'unknown option' dk volume create -d deltavol --name bad2 -o colour=red

# --- 2. a new volume, written by a container ---
docker_check create dk volume create -d deltavol --name db1 -o size=256MiB -o flush-interval=2s
# shellcheck disable=SC2086,SC2016
docker_check write-files dk run --rm --network none -v db1:/data $SQL_V "$IMG" sh -c '
    grep " /data ext4 " /proc/mounts || exit 1
    mkdir -p /data/files/a /data/files/b
    i=0; while [ $i -lt 12 ]; do dd if=/dev/urandom of=/data/files/$((i % 2))-f$i bs=1024 count=96 2>/dev/null || exit 1; i=$((i + 1)); done
    mv /data/files/0-f0 /data/files/a/ && mv /data/files/1-f1 /data/files/b/
    sqlite3 /data/app.db "create table kv(k integer primary key, v text); with recursive c(x) as (select 1 union all select x+1 from c where x < 2000) insert into kv select x, hex(randomblob(64)) from c;" || exit 1
    sync'
# shellcheck disable=SC2086
dk run --rm --network none -v db1:/data "$IMG" sh -c "$SUMS" >"$DRILL_TMP/sums.snap" 2>"$DRILL_TMP/err"
if [ "$(wc -l <"$DRILL_TMP/sums.snap")" -eq 13 ]; then pass sums-read; else fail sums-read "$(cat "$DRILL_TMP/sums.snap" "$DRILL_TMP/err" | head -c 400)"; fi
dk volume inspect db1 >"$DRILL_TMP/inspect" 2>&1
if grep -q '"device": "/dev/ublkb' "$DRILL_TMP/inspect" && grep -q '"last_snapshot"' "$DRILL_TMP/inspect" &&
    grep -q '"epoch"' "$DRILL_TMP/inspect"; then
    pass inspect-status
else
    fail inspect-status "$(head -c 600 "$DRILL_TMP/inspect")"
fi
MP1=/var/lib/dv-n1/mounts/db1
if is_mounted "$MP1"; then fail unmounted-after-run "$MP1 still mounted with no container"; else pass unmounted-after-run; fi

# --- 3. two containers share it; a filesystem-consistent snapshot; one stops ---
# shellcheck disable=SC2016
WRITER='i=0; while :; do i=$((i + 1)); echo $i >/data/tick-$N.tmp && mv /data/tick-$N.tmp /data/tick-$N; sleep 1; done'
docker_check run-c1 dk run -d --name c1 --network none -e N=c1 -v db1:/data "$IMG" sh -c "$WRITER"
docker_check run-c2 dk run -d --name c2 --network none -e N=c2 -v db1:/data "$IMG" sh -c "$WRITER"
docker_check c1-running docker_wait_state c1 running 60
docker_check c2-running docker_wait_state c2 running 60
if run_timeout 120 "$DV" snapshot db1 >"$DRILL_TMP/snap.out" 2>&1 && grep -q 'filesystem frozen' "$DRILL_TMP/snap.out"; then
    SNAP=$(sed -n 's/^db1@\([0-9]*\).*/\1/p' "$DRILL_TMP/snap.out")
    log "snapshot: $(cat "$DRILL_TMP/snap.out")"
    pass snapshot-frozen
else
    fail snapshot-frozen "$(head -c 400 "$DRILL_TMP/snap.out")"
fi
# Written after the snapshot: the clone must not have it.
echo after >"$MP1/after-snapshot" && sync

# tick_advances FILE: the counter file grows within 30 s.
# shellcheck disable=SC2317
tick_advances() {
    _ta_a=$(cat "$1" 2>/dev/null || echo 0)
    _ta_i=0
    while [ "$_ta_i" -lt 30 ]; do
        sleep 1
        _ta_b=$(cat "$1" 2>/dev/null || echo 0)
        if [ "${_ta_b:-0}" -gt "${_ta_a:-0}" ] 2>/dev/null; then
            return 0
        fi
        _ta_i=$((_ta_i + 1))
    done
    log "$1 stuck at $_ta_a"
    return 1
}
docker_check c2-stop dk rm -f c2
docker_check c1-keeps-mount is_mounted "$MP1"
docker_check c1-keeps-writing tick_advances "$MP1/tick-c1"

# --- 4. a clone of the snapshot, seen by another container ---
docker_check clone-create dk volume create -d deltavol --name db1c -o "from=db1@${SNAP:-0}"
# shellcheck disable=SC2086
dk run --rm --network none -v db1c:/data $SQL_V "$IMG" sh -c "$SUMS; ls /data/after-snapshot 2>&1; sqlite3 /data/app.db 'pragma integrity_check; select count(*) from kv;' 2>&1" \
    >"$DRILL_TMP/clone.out" 2>"$DRILL_TMP/clone.err"
head -n 13 "$DRILL_TMP/clone.out" >"$DRILL_TMP/sums.clone"
if cmp -s "$DRILL_TMP/sums.snap" "$DRILL_TMP/sums.clone"; then pass clone-files-exact; else
    fail clone-files-exact "$(diff "$DRILL_TMP/sums.snap" "$DRILL_TMP/sums.clone" | head -c 400)"; fi
if grep -q 'after-snapshot: No such file' "$DRILL_TMP/clone.out"; then pass clone-is-the-snapshot; else
    fail clone-is-the-snapshot "$(tail -n 4 "$DRILL_TMP/clone.out")"; fi
if [ "$(tail -n 2 "$DRILL_TMP/clone.out" | tr '\n' ' ')" = "ok 2000 " ]; then pass clone-sqlite; else
    fail clone-sqlite "$(tail -n 3 "$DRILL_TMP/clone.out")"; fi
expect_refused clone-unknown-snapshot '999' dk volume create -d deltavol --name bad3 -o from=db1@999

# --- 5. restarts under a running container ---
IOERR0=$(dmesg | grep -ci 'i/o error')
PID=$(dv_pid db1)
kill -9 "$PID"
wait_pid_gone "$PID" 30 || fail daemon-kill "daemon $PID survived SIGKILL"
# The agent notices within a second and takes the device over; I/O that waited carries on.
docker_check daemon-restarted-writes-go-on tick_advances "$MP1/tick-c1"
NEWPID=$(dv_pid db1)
if [ -n "$NEWPID" ] && [ "$NEWPID" != "$PID" ]; then pass daemon-restarted; else fail daemon-restarted "pid '$NEWPID'"; fi
if grep -q 'daemon restarted' "$DRILL_TMP/agent-n1.log"; then pass agent-says-restarted; else fail agent-says-restarted "no log line"; fi
IOERR1=$(dmesg | grep -ci 'i/o error')
if [ "$IOERR1" -gt "$IOERR0" ]; then
    fail no-io-error "$((IOERR1 - IOERR0)) new I/O errors in the kernel log: $(dmesg | grep -i 'i/o error' | tail -n 2)"
else
    pass no-io-error
fi
kill -9 "$AGENT_PID"
docker_check agent-restart agent_start n1 || abort agent-restart "the agent did not come back"
docker_check dockerd-kill9 docker_kill9
docker_check dockerd-restart docker_restart || abort dockerd-restart "dockerd did not come back"
docker_check c1-live-restored docker_wait_state c1 running 60
docker_check c1-writes-after-restarts tick_advances "$MP1/tick-c1"
docker_check c1-stop dk rm -f c1
if is_mounted "$MP1"; then fail no-stale-mount "$MP1 still mounted after its last container"; else pass no-stale-mount; fi
# The recovery point: a snapshot of the quiet volume, and its files as they are now.
# shellcheck disable=SC2086
dk run --rm --network none -v db1:/data "$IMG" sh -c "$SUMS" >"$DRILL_TMP/sums.last" 2>/dev/null
check snapshot-last run_timeout 120 "$DV" snapshot db1

# --- 6. the node is lost; the volume comes back on another ---
kill -9 "$AGENT_PID"
for v in db1 db1c; do
    p=$(dv_pid "$v")
    [ -n "$p" ] && kill -9 "$p"
done
sleep 1
for v in db1 db1c; do run_timeout 60 "$DV" del "$v" >/dev/null 2>&1; done
# Docker forgets the volumes (the driver does not answer: -f).
dk volume rm -f db1 db1c >/dev/null 2>&1
rm -rf "$MED/n1"
[ ! -e "$MED/n1" ] && pass node-1-lost
docker_check agent-node-2 agent_start n2 || abort agent-node-2 "the agent did not start on node 2"
expect_refused create-taken-name 'exists on the data plane' dk volume create -d deltavol --name db1 -o size=256MiB
docker_check recover-create dk volume create -d deltavol --name db1 -o recover=db1 -o hydrate-rate=32KiB
pct() { dk volume inspect --format '{{index .Status "hydration_percent"}}' db1 2>/dev/null; }
P0=$(pct)
# shellcheck disable=SC2086
dk run --rm --network none -v db1:/data $SQL_V "$IMG" sh -c "$SUMS; sqlite3 /data/app.db 'pragma integrity_check; select count(*) from kv;' 2>&1" \
    >"$DRILL_TMP/rec.out" 2>"$DRILL_TMP/rec.err"
P1=$(pct)
log "hydration before the container: ${P0}%, after it: ${P1}%"
head -n 13 "$DRILL_TMP/rec.out" >"$DRILL_TMP/sums.rec"
if cmp -s "$DRILL_TMP/sums.last" "$DRILL_TMP/sums.rec"; then pass recovered-files-exact; else
    fail recovered-files-exact "$(diff "$DRILL_TMP/sums.last" "$DRILL_TMP/sums.rec" | head -c 400)"; fi
if [ "$(tail -n 2 "$DRILL_TMP/rec.out" | tr '\n' ' ')" = "ok 2000 " ]; then pass recovered-sqlite; else
    fail recovered-sqlite "$(tail -n 3 "$DRILL_TMP/rec.out")"; fi
if awk -v p="$P1" 'BEGIN { exit !(p ~ /^[0-9.]+$/ && p < 100) }'; then
    pass verified-while-hydrating
else
    fail verified-while-hydrating "hydration at '${P1}' after the check"
fi
docker_check remove-recovered dk volume rm db1
if [ ! -e "$MED/n2/backing/db1.img" ]; then pass removed-files; else fail removed-files "backing file left"; fi
drill_finish
