# shellcheck shell=sh
# Inside the test VM: recovery of a volume from the data plane on the real device, with the
# baselines measured in the same boot. Run it with:
#
#   kernel-setup/vm-run --kernel 7 --offline --bin-dir build/vm-bin --timeout 1800 bench/vm-recovery.sh
#
# A 256 MiB volume is filled with random data and snapshotted to deltavol-dataplane on
# 127.0.0.1 (data on a tmpfs, like the cache and backing files). Then, per repeat, interleaved:
#
#   usable       `deltavol recover` until the device is there (the command's wall time)
#   seq-read     with background hydration held back (--hydrate-rate 1), 64 MiB read in order
#                from a quarter of the way in, 128 KiB O_DIRECT reads at queue depth 1 (dd),
#                with readahead (the default)
#   seq-read-no-ra  the same with --hydrate-readahead 0 (each 256 KiB extent fetched when a
#                read reaches it: what the volume did before readahead)
#   hydrate      unlimited background hydration, from `recover` until status says done
#   copy         the baseline: the source's 256 MiB streamed over TCP on 127.0.0.1 (busybox nc)
#                into a file on the same medium, fsynced
#   ws, ws-lba   the source read a working set (4 regions of 2 MiB, 4 times each) and shipped
#                its heat map (--heat-interval-s 2); a full-speed recovery reads that working set
#                at once (dd, 2 MiB direct reads): time from the end of `recover` until it is
#                all read, and the extents fetched on demand, with the hottest regions hydrated
#                first (the default) and in block order (--hydrate-order lba)
#
# Every recovered device's first 64 MiB and the seq-read range are compared with the source
# (sha256). Prints `# RESULT` lines: MB/s (10^6 bytes/s) medians and the ratios
# seq-read / seq-read-no-ra and hydrate / copy. Knobs (environment): REC_REPEATS (3).
. "${DRILL_LIB:-/drills/lib.sh}"

REPEATS=${REC_REPEATS:-3}
MED=/mnt/recovery
NAME=recbench
SIZE_MIB=256
SEQ_SKIP=512   # 128 KiB units: 64 MiB in
SEQ_COUNT=512  # 64 MiB
scratch_mount "$MED" 1400m

dp_with_token "$MED" recovery-bench-secret || abort dataplane-start "the data plane did not start"

# The source, snapshotted, then gone (the machine is lost).
WS="8 37 64 101" # the working set: regions of 2 MiB
DEV=$(dv_add "$NAME" ${SIZE_MIB}MiB "$MED/src/cache" "$MED/src/backing.img" $DPARGS --heat-interval-s 2) \
    || abort add-source "deltavol add failed"
check fill-source dd if=/dev/urandom of="$DEV" bs=1M count=$SIZE_MIB oflag=direct
SNAP=$(run_timeout 300 "$DV" snapshot "$NAME") || abort snapshot "deltavol snapshot failed"
log "source: snapshot $SNAP"
# The application's working set, read (it counts in the heat map); only these reads count.
for _r in 1 2 3 4; do
    for _w in $WS; do dd if="$DEV" of=/dev/null bs=2M skip="$_w" count=1 iflag=direct 2>/dev/null; done
done
sleep 5 # two heat intervals: the map is on the data plane
check del-source dv_del "$NAME"
SRC_BACKING="$MED/src/backing.img"
dd if="$SRC_BACKING" bs=1M count=64 2>/dev/null | sha256sum | cut -d' ' -f1 >"$DRILL_TMP/head.sum"
dd if="$SRC_BACKING" bs=128k skip=$SEQ_SKIP count=$SEQ_COUNT 2>/dev/null | sha256sum | cut -d' ' -f1 >"$DRILL_TMP/seq.sum"
for _w in $WS; do dd if="$SRC_BACKING" bs=2M skip="$_w" count=1 2>/dev/null; done | sha256sum | cut -d' ' -f1 >"$DRILL_TMP/ws.sum"

# mbps BYTES SECONDS
mbps() {
    awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f\n", b / 1e6 / s; else print 0 }'
}

median() {
    sort -n | awk '{a[NR]=$1} END {if (NR == 0) print 0; else print a[int((NR + 1) / 2)]}'
}

# recover_as DIR [EXTRA...]: recover the volume into DIR; sets DEV; prints the wall seconds.
recover_as() {
    _ra_dir=$1
    shift
    _ra_t0=$(now_s)
    if ! run_timeout 300 "$DV" recover "$NAME" --cache-dir "$_ra_dir/cache" --backing "$_ra_dir/backing.img" \
        --flush-interval-ms 600000 $DPARGS "$@" >"$DRILL_TMP/recover.out" 2>"$DRILL_TMP/recover.err"; then
        sed 's/^/# recover: /' "$DRILL_TMP/recover.err" >&2
        return 1
    fi
    DEV=$(grep -o '/dev/ublkb[0-9][0-9]*' "$DRILL_TMP/recover.out" | tail -n 1)
    wait_for_block "$DEV" || return 1
    elapsed_s "$_ra_t0"
}

# seq_read MODE EXTRA...: one held-back recovery read in order; appends MB/s to $DRILL_TMP/MODE.
seq_read() {
    _sr_mode=$1
    shift
    _sr_dir=$MED/$_sr_mode.$i
    _sr_usable=$(recover_as "$_sr_dir" --hydrate-rate 1 "$@") || { fail "recover-$_sr_mode" "recover failed"; return 1; }
    echo "$_sr_usable" >>"$DRILL_TMP/usable"
    _sr_t0=$(now_s)
    dd if="$DEV" of="$DRILL_TMP/seq.out" bs=128k skip=$SEQ_SKIP count=$SEQ_COUNT iflag=direct 2>/dev/null \
        || { fail "read-$_sr_mode" "dd failed"; return 1; }
    _sr_s=$(elapsed_s "$_sr_t0")
    mbps $((SEQ_COUNT * 131072)) "$_sr_s" >>"$DRILL_TMP/$_sr_mode"
    [ "$(sha256sum <"$DRILL_TMP/seq.out" | cut -d' ' -f1)" = "$(cat "$DRILL_TMP/seq.sum")" ] \
        || fail "data-$_sr_mode.$i" "the recovered volume's bytes differ from the source"
    log "$_sr_mode run $i: usable in ${_sr_usable}s, 64 MiB in order in ${_sr_s}s; $(dv_status "$NAME" | tr -d ' \n' | grep -o '"fetched_on_demand":[0-9]*\|"extents_fetched":[0-9]*\|"extents_read_ahead":[0-9]*' | tr '\n' ' ')"
    rm -f "$DRILL_TMP/seq.out"
    dv_del "$NAME" >/dev/null || fail "del-$_sr_mode" "del failed"
    rm -rf "$_sr_dir"
}

: >"$DRILL_TMP/usable"
: >"$DRILL_TMP/seq-read"
: >"$DRILL_TMP/seq-read-no-ra"
: >"$DRILL_TMP/hydrate"
: >"$DRILL_TMP/copy"
: >"$DRILL_TMP/ws"
: >"$DRILL_TMP/ws-lba"
: >"$DRILL_TMP/ws.od"
: >"$DRILL_TMP/ws-lba.od"

# ws MODE EXTRA...: a full-speed recovery reads the working set at once; appends the seconds
# to $DRILL_TMP/MODE and the extents fetched on demand to $DRILL_TMP/MODE.od.
ws() {
    _ws_mode=$1
    shift
    _ws_dir=$MED/$_ws_mode.$i
    recover_as "$_ws_dir" "$@" >/dev/null || { fail "recover-$_ws_mode" "recover failed"; return 1; }
    _ws_t0=$(now_s)
    for _w in $WS; do dd if="$DEV" bs=2M skip="$_w" count=1 iflag=direct 2>/dev/null; done >"$DRILL_TMP/ws.out"
    _ws_s=$(elapsed_s "$_ws_t0")
    echo "$_ws_s" >>"$DRILL_TMP/$_ws_mode"
    _ws_od=$(dv_status "$NAME" | tr -d ' \n' | grep -o '"fetched_on_demand":[0-9]*' | cut -d: -f2)
    echo "${_ws_od:-0}" >>"$DRILL_TMP/$_ws_mode.od"
    [ "$(sha256sum <"$DRILL_TMP/ws.out" | cut -d' ' -f1)" = "$(cat "$DRILL_TMP/ws.sum")" ] \
        || fail "data-$_ws_mode.$i" "the working set read differs from the source"
    log "$_ws_mode run $i: working set read ${_ws_s}s after recover returned, ${_ws_od:-?} extents fetched on demand; $(dv_status "$NAME" | tr -d ' \n' | grep -o '"extents_fetched":[0-9]*\|"fetches_shared":[0-9]*' | tr '\n' ' ')"
    rm -f "$DRILL_TMP/ws.out"
    dv_del "$NAME" >/dev/null || fail "del-$_ws_mode" "del failed"
    rm -rf "$_ws_dir"
}
PORT=7411
i=1
while [ "$i" -le "$REPEATS" ]; do
    seq_read seq-read
    seq_read seq-read-no-ra --hydrate-readahead 0
    ws ws
    ws ws-lba --hydrate-order lba

    # Background hydration at full speed.
    _dir=$MED/hydrate.$i
    _t0=$(now_s)
    if recover_as "$_dir" >/dev/null; then
        _n=0
        while ! dv_status "$NAME" | tr -d ' \n' | grep -q '"done":true'; do
            _n=$((_n + 1))
            [ "$_n" -gt 6000 ] && break
            sleep 0.05
        done
        _s=$(elapsed_s "$_t0")
        mbps $((SIZE_MIB << 20)) "$_s" >>"$DRILL_TMP/hydrate"
        [ "$(dd if="$DEV" bs=1M count=64 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)" = "$(cat "$DRILL_TMP/head.sum")" ] \
            || fail "data-hydrate.$i" "the hydrated volume's bytes differ from the source"
        log "hydrate run $i: ${SIZE_MIB} MiB in ${_s}s"
        dv_del "$NAME" >/dev/null || fail del-hydrate "del failed"
    else
        fail "recover-hydrate" "recover failed"
    fi
    rm -rf "$_dir"

    # The baseline: the same bytes over TCP on loopback into a file, fsynced. busybox nc ends
    # at the end of its stdin, so the listener's stdin is a fifo held open (fd 3) until the
    # copy is done; the sender ends at the end of the file, the clock when all bytes are in
    # the file and synced.
    PORT=$((PORT + 1))
    rm -f "$DRILL_TMP/nc.fifo"
    mkfifo "$DRILL_TMP/nc.fifo"
    exec 3<>"$DRILL_TMP/nc.fifo"
    nc -l -p "$PORT" <"$DRILL_TMP/nc.fifo" >"$MED/copy.img" &
    _nc=$!
    sleep 0.3
    _want=$((SIZE_MIB << 20))
    _t0=$(now_s)
    nc 127.0.0.1 "$PORT" <"$SRC_BACKING" >/dev/null
    _n=0
    while [ "$(stat -c %s "$MED/copy.img")" -lt "$_want" ] && [ "$_n" -lt 6000 ]; do
        _n=$((_n + 1))
        sleep 0.01
    done
    sync
    _s=$(elapsed_s "$_t0")
    exec 3>&-
    kill "$_nc" 2>/dev/null
    wait "$_nc" 2>/dev/null
    _got=$(stat -c %s "$MED/copy.img")
    if [ "$_got" -eq "$_want" ] && cmp -s "$MED/copy.img" "$SRC_BACKING"; then
        mbps "$_got" "$_s" >>"$DRILL_TMP/copy"
        log "copy run $i: ${SIZE_MIB} MiB in ${_s}s"
    else
        fail "copy.$i" "the copy got $_got bytes, or other bytes"
    fi
    rm -f "$MED/copy.img"
    i=$((i + 1))
done

K=$(uname -r)
U=$(median <"$DRILL_TMP/usable")
S=$(median <"$DRILL_TMP/seq-read")
N=$(median <"$DRILL_TMP/seq-read-no-ra")
H=$(median <"$DRILL_TMP/hydrate")
C=$(median <"$DRILL_TMP/copy")
W=$(median <"$DRILL_TMP/ws")
WL=$(median <"$DRILL_TMP/ws-lba")
WO=$(median <"$DRILL_TMP/ws.od")
WLO=$(median <"$DRILL_TMP/ws-lba.od")
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.2f", a / b; else print "n/a" }'; }
log "RESULT recovery kernel=$K repeats=$REPEATS: usable median ${U}s; seq-read MB/s=$S seq-read-no-ra MB/s=$N ratio=$(ratio "$S" "$N"); hydrate MB/s=$H copy MB/s=$C ratio=$(ratio "$H" "$C")"
log "RESULT working set kernel=$K: hot-first ${W}s (${WO} extents on demand), lba ${WL}s (${WLO} on demand), lba / hot-first time ratio=$(ratio "$WL" "$W")"
log "runs seq-read: $(tr '\n' ' ' <"$DRILL_TMP/seq-read")| no-ra: $(tr '\n' ' ' <"$DRILL_TMP/seq-read-no-ra")| hydrate: $(tr '\n' ' ' <"$DRILL_TMP/hydrate")| copy: $(tr '\n' ' ' <"$DRILL_TMP/copy")| usable: $(tr '\n' ' ' <"$DRILL_TMP/usable")"
[ "$S" != 0 ] && [ "$N" != 0 ] && pass measured-seq-read
[ "$H" != 0 ] && [ "$C" != 0 ] && pass measured-hydrate
[ -s "$DRILL_TMP/ws" ] && [ -s "$DRILL_TMP/ws-lba" ] && pass measured-working-set
kill "$DP_PID" 2>/dev/null
drill_finish
