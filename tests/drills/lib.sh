# shellcheck shell=sh
# Helpers for the VM drills (POSIX sh; runs under busybox ash inside the test VM).
#
#   . "${DRILL_LIB:-/drills/lib.sh}"
#
# Every check prints exactly one machine-readable line on stdout:
#   PASS <drill>: <check>
#   FAIL <drill>: <check>: <reason>
# Commentary lines start with "# ". The VM's /init runs each drill with `sh`, collects the
# result lines (also appended to $DRILL_RESULTS) and treats a drill with no PASS line, a FAIL
# line or a non-zero exit as failed. A drill ends with `drill_finish`.

DRILL=${DRILL_NAME:-$(basename "$0" .sh)}
DRILL_RESULTS=${DRILL_RESULTS:-/tmp/drill-results}
DV=${DELTAVOL:-deltavol}
# Seconds allowed for one deltavol control command (add/del/status) before it is killed.
DV_CMD_TIMEOUT_S=${DV_CMD_TIMEOUT_S:-120}
# Seconds to wait for a /dev/ublkbN node to appear or go away.
DEV_WAIT_S=${DEV_WAIT_S:-30}

# A private scratch directory for the drill (on the VM's /tmp tmpfs).
DRILL_TMP=${TMPDIR:-/tmp}/drill.$DRILL.$$
mkdir -p "$DRILL_TMP"

_emit() {
    echo "$1"
    echo "$1" >>"$DRILL_RESULTS"
}

# log MESSAGE...: a commentary line (ignored by the result parser).
log() {
    echo "# $DRILL: $*"
}

# pass NAME
pass() {
    _emit "PASS $DRILL: $1"
}

# fail NAME REASON...
fail() {
    _fail_name=$1
    shift
    _emit "FAIL $DRILL: $_fail_name: $*"
}

# abort NAME REASON...: fail and end the drill now (the EXIT trap still runs).
abort() {
    fail "$@"
    drill_finish
}

# now_s: seconds since boot, with hundredths (for durations).
now_s() {
    cut -d' ' -f1 /proc/uptime
}

# elapsed_s START: seconds since START (a now_s value), with two decimals.
elapsed_s() {
    awk -v a="$1" -v b="$(now_s)" 'BEGIN { printf "%.2f", b - a }'
}

# run_timeout SECS CMD...: run CMD, SIGKILL it after SECS. Returns CMD's status; 137 when
# killed. Shell functions and builtins cannot be put under `timeout`: they run without a limit.
# (A process in uninterruptible sleep on a dead device cannot be killed: the host-side timeout
# of vm-run is the last resort.)
run_timeout() {
    _rt_s=$1
    shift
    case "$(command -v "$1")" in
        */*) timeout -s KILL "$_rt_s" "$@" ;;
        *) "$@" ;;
    esac
}

# check NAME CMD...: run CMD (with a timeout of ${CHECK_TIMEOUT_S:-300}s); PASS if it exits 0,
# else FAIL with its status and the last lines of its output (which are also printed).
check() {
    _ck_name=$1
    shift
    _ck_out=$DRILL_TMP/check.out
    if run_timeout "${CHECK_TIMEOUT_S:-300}" "$@" >"$_ck_out" 2>&1; then
        pass "$_ck_name"
        return 0
    else
        _ck_rc=$?
        sed 's/^/#   /' "$_ck_out" | tail -n 20
        fail "$_ck_name" "exit $_ck_rc from '$*': $(tail -n 3 "$_ck_out" | tr '\n' '|' | cut -c1-300)"
        return 1
    fi
}

# check_quiet NAME CMD...: like check but shows nothing on success or failure except the line.
check_quiet() {
    _cq_name=$1
    shift
    if run_timeout "${CHECK_TIMEOUT_S:-300}" "$@" >/dev/null 2>&1; then
        pass "$_cq_name"
    else
        _cq_rc=$?
        fail "$_cq_name" "exit $_cq_rc from '$*'"
        return 1
    fi
}

# require CMD...: abort the drill when a command is missing from the VM image.
require() {
    for _rq in "$@"; do
        command -v "$_rq" >/dev/null 2>&1 || abort require "command '$_rq' not found in the VM"
    done
}

# drill_finish: end the drill; exit status 1 if any check failed or none passed.
drill_finish() {
    _df_fail=$(grep -c "^FAIL $DRILL: " "$DRILL_RESULTS" 2>/dev/null)
    _df_pass=$(grep -c "^PASS $DRILL: " "$DRILL_RESULTS" 2>/dev/null)
    if [ "${_df_pass:-0}" -eq 0 ] && [ "${_df_fail:-0}" -eq 0 ]; then
        _emit "FAIL $DRILL: finish: no checks ran"
        _df_fail=1
    fi
    log "finished: ${_df_pass:-0} passed, ${_df_fail:-0} failed"
    if [ "${_df_fail:-0}" -gt 0 ]; then
        exit 1
    fi
    exit 0
}

# scratch_mount DIR SIZE: a fresh tmpfs of SIZE (e.g. 600m) at DIR.
scratch_mount() {
    mkdir -p "$1"
    if grep -q " $1 " /proc/mounts; then
        umount "$1" 2>/dev/null || umount -l "$1"
    fi
    mount -t tmpfs -o "size=$2" "scratch-$(basename "$1")" "$1"
}

# is_mounted DIR
is_mounted() {
    grep -q " $1 " /proc/mounts
}

# wait_for_block DEV [SECS]: wait until DEV is a block device.
wait_for_block() {
    _wb_i=0
    while [ ! -b "$1" ]; do
        _wb_i=$((_wb_i + 1))
        [ "$_wb_i" -le $((${2:-$DEV_WAIT_S} * 10)) ] || return 1
        sleep 0.1
    done
}

# wait_gone PATH [SECS]: wait until PATH no longer exists.
wait_gone() {
    _wg_i=0
    while [ -e "$1" ]; do
        _wg_i=$((_wg_i + 1))
        [ "$_wg_i" -le $((${2:-$DEV_WAIT_S} * 10)) ] || return 1
        sleep 0.1
    done
}

# pid_alive PID
pid_alive() {
    [ -n "$1" ] && kill -0 "$1" 2>/dev/null
}

# wait_pid_gone PID [SECS]
wait_pid_gone() {
    _wp_i=0
    while pid_alive "$1"; do
        _wp_i=$((_wp_i + 1))
        [ "$_wp_i" -le $((${2:-$DEV_WAIT_S} * 10)) ] || return 1
        sleep 0.1
    done
}

# json_get FIELD: the value of a top-level scalar FIELD of the JSON object on stdin (strings
# unquoted, escapes left as written; numbers, true, false, null as written; an object or array
# value prints as "{...}" / "[...]"). Empty when absent. Keys inside nested objects are ignored.
# Enough for what `deltavol ... --json` prints; not a general JSON parser.
json_get() {
    tr -d '\n' | awk -v want="$1" '
    {
        s = $0; n = length(s); depth = 0; i = 1
        while (i <= n) {
            c = substr(s, i, 1)
            if (c == "\"") {
                # a string: find its end (skipping escaped characters)
                j = i + 1
                while (j <= n && substr(s, j, 1) != "\"") { if (substr(s, j, 1) == "\\") j++; j++ }
                str = substr(s, i + 1, j - i - 1)
                i = j + 1
                if (depth == 1 && expect_key) {
                    # a key when followed by ":"
                    while (substr(s, i, 1) ~ /[ \t]/) i++
                    if (substr(s, i, 1) == ":") {
                        i++
                        while (substr(s, i, 1) ~ /[ \t]/) i++
                        if (str == want) {
                            v = substr(s, i, 1)
                            if (v == "\"") {
                                j = i + 1
                                while (j <= n && substr(s, j, 1) != "\"") { if (substr(s, j, 1) == "\\") j++; j++ }
                                print substr(s, i + 1, j - i - 1)
                            } else if (v == "{") print "{...}"
                            else if (v == "[") print "[...]"
                            else { match(substr(s, i), /^[-+.0-9A-Za-z]*/); print substr(s, i, RLENGTH) }
                            exit
                        }
                        expect_key = 0
                    }
                }
                continue
            }
            if (c == "{" || c == "[") { depth++; expect_key = (c == "{" && depth == 1) }
            else if (c == "}" || c == "]") { depth--; expect_key = 0 }
            else if (c == "," && depth == 1) expect_key = 1
            i++
        }
    }'
}

# loop_attach FILE: attach FILE to a free kernel loop device (loop.ko is loaded by /init when
# it is a module) and print the device.
loop_attach() {
    _la_dev=$(losetup -f) || return 1
    losetup "$_la_dev" "$1" || return 1
    echo "$_la_dev"
}

# --- deltavol --------------------------------------------------------------------------------

# dv_add NAME SIZE CACHE_DIR BACKING [EXTRA ARGS...]: create or reattach a volume; prints the
# /dev/ublkbN path on stdout once the block device node exists. Returns non-zero (with the
# command's output on stderr as commentary) on any error.
dv_add() {
    _da_name=$1 _da_size=$2 _da_cache=$3 _da_backing=$4
    shift 4
    _da_out=$DRILL_TMP/add.out
    _da_err=$DRILL_TMP/add.err
    if ! run_timeout "$DV_CMD_TIMEOUT_S" "$DV" add --name "$_da_name" --size "$_da_size" \
        --cache-dir "$_da_cache" --backing "$_da_backing" "$@" >"$_da_out" 2>"$_da_err"; then
        _da_rc=$?
        sed 's/^/# add: /' "$_da_out" "$_da_err" >&2
        echo "# $DRILL: deltavol add $_da_name failed with exit $_da_rc" >&2
        return 1
    fi
    sed 's/^/# add stderr: /' "$_da_err" >&2
    _da_dev=$(grep -o '/dev/ublkb[0-9][0-9]*' "$_da_out" | tail -n 1)
    if [ -z "$_da_dev" ]; then
        sed 's/^/# add: /' "$_da_out" >&2
        echo "# $DRILL: deltavol add printed no /dev/ublkbN path" >&2
        return 1
    fi
    if ! wait_for_block "$_da_dev"; then
        echo "# $DRILL: $_da_dev is not a block device after ${DEV_WAIT_S}s" >&2
        return 1
    fi
    # A run asked for a zero-copy mode (vm-run --env DELTAVOL_ZERO_COPY=...): say what it got.
    if [ -n "${DELTAVOL_ZERO_COPY:-}" ]; then
        echo "# $DRILL: $_da_name io_path $(dv_field "$_da_name" io_path 2>/dev/null) (DELTAVOL_ZERO_COPY=$DELTAVOL_ZERO_COPY)" >&2
    fi
    echo "$_da_dev"
}

# dv_status NAME: the JSON status of a volume on stdout.
dv_status() {
    run_timeout "$DV_CMD_TIMEOUT_S" "$DV" status "$1" --json
}

# dv_field NAME FIELD: one field of the volume's JSON status.
dv_field() {
    dv_status "$1" | json_get "$2"
}

# dv_device NAME: the volume's /dev/ublkbN (from status).
dv_device() {
    dv_field "$1" device
}

# dv_pid NAME: the daemon's pid (from status, else from the run state, else by name).
dv_pid() {
    _dp=$(dv_field "$1" pid 2>/dev/null)
    case "$_dp" in
        '' | null | *[!0-9]*) ;;
        *) echo "$_dp"; return 0 ;;
    esac
    for _dp_f in /run/deltavol/"$1".json /run/deltavol/*/"$1".json; do
        [ -f "$_dp_f" ] || continue
        _dp=$(json_get pid <"$_dp_f")
        [ -n "$_dp" ] && echo "$_dp" && return 0
    done
    return 1
}

# dv_del NAME: remove the volume's device (flushing first).
dv_del() {
    run_timeout "$DV_CMD_TIMEOUT_S" "$DV" del "$1"
}

# dv_del_quiet NAME: like dv_del, but a volume that is already gone is fine. Never fails.
dv_del_quiet() {
    run_timeout "$DV_CMD_TIMEOUT_S" "$DV" del "$1" >/dev/null 2>&1 || true
}

# ublk_devices: the ublk block devices present, one per line.
ublk_devices() {
    for _ud in /dev/ublkb*; do
        [ -b "$_ud" ] && echo "$_ud"
    done
}

# ublk_nodes: the ublk device nodes (/dev/ublkbN, /dev/ublkcN) present, space-separated.
ublk_nodes() {
    find /dev -maxdepth 1 \( -name 'ublkb*' -o -name 'ublkc*' \) 2>/dev/null | sort | tr '\n' ' '
}
# What was there before this drill (left by an earlier one): not this drill's to answer for.
_UBLK_NODES_AT_START=$(ublk_nodes)

# check_no_ublk_devices NAME: PASS if this drill left no ublk device (block /dev/ublkbN or char
# /dev/ublkcN) behind, i.e. every volume it made was deleted from the kernel too.
check_no_ublk_devices() {
    _nd=''
    for _n in $(ublk_nodes); do
        case " $_UBLK_NODES_AT_START " in
            *" $_n "*) ;;
            *) _nd="$_nd $_n" ;;
        esac
    done
    if [ -z "$_nd" ]; then
        pass "$1"
    else
        fail "$1" "ublk devices left in the kernel:$_nd"
    fi
}

# make_tree DIR FILES SIZE_KIB: FILES files of SIZE_KIB KiB of random data (some in subdirs).
make_tree() {
    mkdir -p "$1/a/b" "$1/c"
    _mt_i=0
    while [ "$_mt_i" -lt "$2" ]; do
        case $((_mt_i % 3)) in
            0) _mt_f=$1/file$_mt_i ;;
            1) _mt_f=$1/a/b/file$_mt_i ;;
            *) _mt_f=$1/c/file$_mt_i ;;
        esac
        dd if=/dev/urandom of="$_mt_f" bs=1024 count="$3" 2>/dev/null || return 1
        _mt_i=$((_mt_i + 1))
    done
}

# sums_of DIR: sha256 of every file under DIR, with paths relative to DIR (for sha256sum -c
# run inside DIR).
sums_of() {
    (cd "$1" && find . -type f | sort | xargs sha256sum)
}

# dp_start DATA_DIR TOKEN_FILE [THREADS]: start deltavol-dataplane on 127.0.0.1 (any port) in
# the background; sets DP_PID and DP_ADDR. Returns non-zero if it does not come up in 30 s.
dp_start() {
    # DP_NICE=N runs it at that nice value (the benchmark: a stand-in for a remote machine).
    # busybox has renice but no nice: a shell renices itself, then execs the server, whose
    # threads inherit it.
    sh -c 'if [ -n "$0" ]; then renice -n "$0" -p $$ >/dev/null || exit 97; fi; exec "$@"' "${DP_NICE:-}" \
        deltavol-dataplane --listen 127.0.0.1:0 --data-dir "$1" --threads "${3:-2}" --auth-token-file "$2" \
        >"$DRILL_TMP/dp.out" 2>"$DRILL_TMP/dp.err" &
    DP_PID=$!
    _ds_i=0
    while ! grep -q '^listening on ' "$DRILL_TMP/dp.out" 2>/dev/null; do
        _ds_i=$((_ds_i + 1))
        if [ "$_ds_i" -gt 300 ] || ! pid_alive "$DP_PID"; then
            sed 's/^/# dp: /' "$DRILL_TMP/dp.err" >&2
            return 1
        fi
        sleep 0.1
    done
    DP_ADDR=$(sed -n 's/^listening on //p' "$DRILL_TMP/dp.out" | head -n 1)
}

# dp_with_token DIR SECRET: a token file DIR/token holding SECRET and a data plane storing in
# DIR/dp on 127.0.0.1; sets TOK, DP_PID, DP_ADDR and DPARGS (the clients' --dataplane and
# --auth-token-file). Returns non-zero if the data plane does not come up.
dp_with_token() {
    TOK=$1/token
    echo "$2" >"$TOK"
    dp_start "$1/dp" "$TOK" 2 || return 1
    DPARGS="--dataplane $DP_ADDR --auth-token-file $TOK"
}

# sqlite_kv_create DB: a table kv of 2000 rows of random values (check: sqlite-create).
sqlite_kv_create() {
    check sqlite-create sqlite3 "$1" "create table kv(k integer primary key, v text); with recursive c(x) as (select 1 union all select x+1 from c where x < 2000) insert into kv select x, hex(randomblob(64)) from c;"
}

# sqlite_kv_more DB: 500 more rows in kv, 2500 in all (check: sqlite-more).
sqlite_kv_more() {
    check sqlite-more sqlite3 "$1" "insert into kv select k + 100000, v from kv where k <= 500;"
}
