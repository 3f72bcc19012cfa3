# shellcheck shell=sh
# Inside the test VM (run by bench/run through kernel-setup/vm-run): the fio job files of
# bench/fio/ against every target of issue 5, in one boot. Each (job, target, run) prints one
# machine-readable line
#
#   # RESULT {"job":"randwrite","iodepth":32,"numjobs":1,"target":"dv","run":1,...}
#
# which bench/run collects from the serial log. A cell is one job at one iodepth and one
# numjobs; its runs are interleaved across the targets (loop, dv, null, busy, loop, dv, ...).
#
# Targets (all on one tmpfs, the "medium"; volumes 256 MiB, fio uses the first FIO_SIZE of each,
# filled beforehand):
#   dv       deltavol, 1 queue, depth 64, no flush during the run: writes land in the SSD mirror
#   dv-hit   the same device, read: the blocks are in the SSD mirror (cache hits)
#   dv-miss  deltavol with --read-cache 0, filled then `deltavol flush`ed: reads come from the
#            backing file (misses)
#   dv-rc    deltavol with --read-cache 256MiB, filled, `deltavol flush`ed, then read once: reads
#            are served from the in-memory LRU read cache (no file I/O at all)
#   dv-2q    deltavol, 2 queues
#   busy     deltavol with a cut every second (--flush-interval-ms 1000), each epoch flushed and
#            shipped to deltavol-dataplane on 127.0.0.1; after each of its runs a `deltavol
#            snapshot` drains what is left, so the next target does not pay for it
#   loop     the kernel loop device over a tmpfs file (losetup defaults)
#   null     libublk 0.4.8's `null` example (installed as ublk-null), 1 queue, depth 64, async
#            handler: the ublk framework's ceiling on this machine
#
# Knobs (environment, set with vm-run --env): BENCH_SET (smoke | default | full), FIO_RUNTIME_S
# (8), FIO_RAMP_S (2), FIO_REPEATS (3), FIO_SIZE (128m), BENCH_JOB_DIR (/usr/local/bin: the job
# files travel there as dvbench-<job>.fio, since vm-run ships only executables).
. "${DRILL_LIB:-/drills/lib.sh}"

SET=${BENCH_SET:-default}
RUNTIME=${FIO_RUNTIME_S:-8}
RAMP=${FIO_RAMP_S:-2}
REPEATS=${FIO_REPEATS:-3}
SIZE=${FIO_SIZE:-128m}
JOBDIR=${BENCH_JOB_DIR:-/usr/local/bin}
VOL_SIZE=256MiB
NULL_ID=100
QUIET_FLUSH_MS=86400000
MED=/mnt/bench
KERNEL=$(uname -r)

# The cells: "JOB IODEPTH NUMJOBS TARGET..." one a line.
case "$SET" in
    smoke)
        CELLS="randwrite 32 1 dv dv-2q loop null busy
randread 32 1 dv-hit dv-miss dv-rc loop null" ;;
    default)
        CELLS="randwrite 32 1 dv loop null busy
randwrite 1 1 dv loop
randread 32 1 dv-hit dv-miss dv-rc loop null
randread 1 1 dv-hit dv-miss dv-rc loop
seqwrite 32 1 dv loop null
randrw 32 1 dv loop null
randwrite 32 2 dv dv-2q loop" ;;
    full)
        CELLS=''
        for qd in 1 32; do
            for nj in 1 2; do
                CELLS="$CELLS
randwrite $qd $nj dv dv-2q busy loop null
randread $qd $nj dv-hit dv-miss dv-rc dv-2q loop null
seqwrite $qd $nj dv dv-2q loop null
randrw $qd $nj dv dv-2q loop null"
            done
        done ;;
    *) abort set "BENCH_SET must be smoke, default or full, not '$SET'" ;;
esac

require fio losetup
for j in randwrite randread seqwrite randrw; do
    [ -f "$JOBDIR/dvbench-$j.fio" ] || abort jobs "$JOBDIR/dvbench-$j.fio missing"
done
uses() {
    echo "$CELLS" | awk -v t="$1" '{ for (i = 4; i <= NF; i++) if ($i == t) f = 1 } END { exit !f }'
}

# One RESULT/INFO line: KIND then a JSON object body.
emit() {
    echo "# $1 {$2}"
}

scratch_mount "$MED" 3200m
t_start=$(now_s)
emit INFO "\"kernel\":\"$KERNEL\",\"set\":\"$SET\",\"runtime_s\":$RUNTIME,\"ramp_s\":$RAMP,\"repeats\":$REPEATS,\"size\":\"$SIZE\",\"cpus\":$(nproc),\"mem_kib\":$(sed -n 's/^MemTotal: *\([0-9]*\).*/\1/p' /proc/meminfo),\"fio\":\"$(fio --version)\""

fill() {
    fio --name=fill --filename="$1" --rw=write --bs=1M --size="$SIZE" --ioengine=io_uring \
        --direct=1 --iodepth=8 --minimal >/dev/null
}

# --- targets ---------------------------------------------------------------------------------
if uses loop; then
    dd if=/dev/zero of="$MED/loop.img" bs=1M count=0 seek=256 2>/dev/null
    LOOP_DEV=$(loop_attach "$MED/loop.img") || abort setup-loop "losetup failed"
    check setup-loop fill "$LOOP_DEV"
fi
if uses dv || uses dv-hit; then
    DV_DEV=$(dv_add bdv "$VOL_SIZE" "$MED/dv-cache" "$MED/dv-backing.img" \
        --flush-interval-ms "$QUIET_FLUSH_MS" --queues 1 --depth 64) || abort setup-dv "deltavol add failed"
    check setup-dv fill "$DV_DEV"
    dirty=$(dv_field bdv dirty_bytes)
    log "dv: dirty_bytes=$dirty after the fill (cache hits need the data in the mirror)"
    [ "${dirty:-0}" -gt 0 ] && pass dv-dirty-in-mirror || fail dv-dirty-in-mirror "dirty_bytes=$dirty"
fi
if uses dv-miss; then
    MISS_DEV=$(dv_add bmiss "$VOL_SIZE" "$MED/miss-cache" "$MED/miss-backing.img" \
        --flush-interval-ms "$QUIET_FLUSH_MS" --queues 1 --depth 64 --read-cache 0) ||
        abort setup-dv-miss "deltavol add failed"
    check setup-dv-miss fill "$MISS_DEV"
    check setup-dv-miss-flush "$DV" flush bmiss
    dirty=$(dv_field bmiss dirty_bytes)
    log "dv-miss: dirty_bytes=$dirty ssd_used_bytes=$(dv_field bmiss ssd_used_bytes) after the flush"
    [ "$dirty" = 0 ] && pass dv-miss-clean || fail dv-miss-clean "dirty_bytes=$dirty after flush"
fi
if uses dv-rc; then
    RC_DEV=$(dv_add brc "$VOL_SIZE" "$MED/rc-cache" "$MED/rc-backing.img" \
        --flush-interval-ms "$QUIET_FLUSH_MS" --queues 1 --depth 64 --read-cache 256MiB) ||
        abort setup-dv-rc "deltavol add failed"
    check setup-dv-rc fill "$RC_DEV"
    check setup-dv-rc-flush "$DV" flush brc
    # One read pass puts every block of the region in the LRU read cache.
    check setup-dv-rc-warm fio --name=warm --filename="$RC_DEV" --rw=read --bs=1M --size="$SIZE" \
        --ioengine=io_uring --direct=1 --iodepth=8 --minimal
    log "dv-rc: read_cache_blocks=$(dv_field brc read_cache_blocks) after the warm-up read"
fi
if uses dv-2q; then
    DV2_DEV=$(dv_add bdv2q "$VOL_SIZE" "$MED/dv2-cache" "$MED/dv2-backing.img" \
        --flush-interval-ms "$QUIET_FLUSH_MS" --queues 2 --depth 64) || abort setup-dv-2q "deltavol add failed"
    check setup-dv-2q fill "$DV2_DEV"
fi
if uses busy; then
    require deltavol-dataplane
    echo "bench-secret" >"$MED/token"
    # In production the data plane is another machine; here it shares the VM's 2 vCPUs with
    # fio, so it runs at the background priority of deltavol's own flush and shipper threads
    # (nice 10; README "Performance"). It still receives every byte over 127.0.0.1.
    DP_NICE=${BENCH_DP_NICE:-10} dp_start "$MED/dp" "$MED/token" || abort setup-dataplane "the data plane did not start"
    BUSY_DEV=$(dv_add bbusy "$VOL_SIZE" "$MED/busy-cache" "$MED/busy-backing.img" \
        --flush-interval-ms 1000 --queues 1 --depth 64 --dataplane "$DP_ADDR" \
        --auth-token-file "$MED/token") || abort setup-busy "deltavol add failed"
    check setup-busy fill "$BUSY_DEV"
    check setup-busy-snapshot "$DV" snapshot bbusy
fi
if uses null; then
    require ublk-null
    ublk-null add -n "$NULL_ID" -q 1 -d 64 -a >"$DRILL_TMP/null.out" 2>&1
    if wait_for_block "/dev/ublkb$NULL_ID"; then
        NULL_DEV=/dev/ublkb$NULL_ID
        pass setup-null
    else
        sed 's/^/# null: /' "$DRILL_TMP/null.out"
        abort setup-null "/dev/ublkb$NULL_ID did not appear"
    fi
fi
log "targets ready after $(elapsed_s "$t_start") s: loop=${LOOP_DEV:-} dv=${DV_DEV:-} dv-miss=${MISS_DEV:-} dv-rc=${RC_DEV:-} dv-2q=${DV2_DEV:-} busy=${BUSY_DEV:-} null=${NULL_DEV:-}"

target_dev() {
    case "$1" in
        dv | dv-hit) echo "$DV_DEV" ;;
        dv-miss) echo "$MISS_DEV" ;;
        dv-rc) echo "$RC_DEV" ;;
        dv-2q) echo "$DV2_DEV" ;;
        busy) echo "$BUSY_DEV" ;;
        loop) echo "$LOOP_DEV" ;;
        null) echo "$NULL_DEV" ;;
    esac
}

# fio_parse FILE: from fio's JSON (one job: group_reporting), print
#   error read_iops write_iops read_bw_bytes write_bw_bytes read_clat_mean_ns
#   write_clat_mean_ns read_clat_p99_ns write_clat_p99_ns
# fio indents its JSON by two spaces a level: the job's "read"/"write" objects are at 6, their
# scalars at 8, clat_ns's at 10 and its percentiles at 12.
fio_parse() {
    awk '
    /^      "error" : / { v = $3; sub(/,$/, "", v); err = v }
    /^      "(read|write|trim|sync)" : \{/ { sec = $1; gsub(/"/, "", sec); sub_ = ""; next }
    /^      [^ ]/ { sec = "" }
    sec != "" && /^        "[a-z_]+" : \{/ { sub_ = $1; gsub(/"/, "", sub_); next }
    sec != "" && /^        }/ { sub_ = ""; next }
    sec != "" && sub_ == "" && /^        "(iops|bw_bytes)" : / {
        v = $3; sub(/,$/, "", v); val[sec "_" substr($1, 2, length($1) - 2)] = v
    }
    sec != "" && sub_ == "clat_ns" && /^          "mean" : / { v = $3; sub(/,$/, "", v); val[sec "_mean"] = v }
    sec != "" && sub_ == "clat_ns" && /^            "99.000000" : / { v = $3; sub(/,$/, "", v); val[sec "_p99"] = v }
    END {
        n = split("read_iops write_iops read_bw_bytes write_bw_bytes read_mean write_mean read_p99 write_p99", k, " ")
        printf "%s", (err == "" ? "missing" : err)
        for (i = 1; i <= n; i++) printf " %s", (val[k[i]] == "" ? 0 : val[k[i]])
        printf "\n"
    }' "$1"
}

# busy_bytes: "DATA ZERO SENT" totals of the busy volume (flush's bytes written to the backing
# file and punched there, bytes written to the data plane), from its status.
busy_bytes() {
    _s=$(dv_status bbusy | tr -d '\n ')
    for _k in data_bytes_total zero_bytes_total bytes_sent; do
        _v=$(printf '%s' "$_s" | grep -o "\"$_k\":[0-9]*" | head -n 1 | cut -d: -f2)
        printf '%s ' "${_v:-0}"
    done
}

# run_one JOB IODEPTH NUMJOBS TARGET RUN
run_one() {
    _dev=$(target_dev "$4")
    _out=$DRILL_TMP/fio.json
    _extra=''
    if [ "$4" = busy ]; then
        _e0=$(dv_field bbusy epoch)
        read -r _d0 _z0 _s0 <<EOF
$(busy_bytes)
EOF
    fi
    _t0=$(now_s)
    if ! DEV=$_dev SIZE=$SIZE IODEPTH=$2 NUMJOBS=$3 RUNTIME=$RUNTIME RAMP=$RAMP \
        run_timeout $((RUNTIME + RAMP + 120)) fio --output-format=json --output="$_out" \
        "$JOBDIR/dvbench-$1.fio" >"$DRILL_TMP/fio.err" 2>&1; then
        sed 's/^/# fio: /' "$DRILL_TMP/fio.err" | tail -n 5
        fail "fio-$1-qd$2-j$3-$4" "fio failed (run $5)"
        emit RESULT "\"job\":\"$1\",\"iodepth\":$2,\"numjobs\":$3,\"target\":\"$4\",\"run\":$5,\"ok\":false"
        return 1
    fi
    _secs=$(elapsed_s "$_t0")
    if [ "$4" = busy ]; then
        _e1=$(dv_field bbusy epoch)
        _extra=",\"epochs_during_run\":$((_e1 - _e0))"
        # Drain what the run left dirty, so that it does not run under the next target.
        _st=$(now_s)
        run_timeout 120 "$DV" snapshot bbusy >/dev/null 2>&1 || fail busy-drain "deltavol snapshot failed after run $5"
        _extra="$_extra,\"drain_s\":$(elapsed_s "$_st")"
        # Bytes during the run and its drain: the dirty blocks the flushes found (written to
        # the backing file, or punched there when discarded), the bytes written to the backing
        # file, and the bytes written to the data plane's socket (frames and payload).
        read -r _d1 _z1 _s1 <<EOF
$(busy_bytes)
EOF
        _extra="$_extra,\"backing_bytes\":$((_d1 - _d0)),\"dirty_bytes\":$((_d1 + _z1 - _d0 - _z0)),\"sent_bytes\":$((_s1 - _s0))"
    fi
    # shellcheck disable=SC2046 # word splitting wanted
    set -- "$@" $(fio_parse "$_out")
    # $6 error, $7 read_iops, $8 write_iops, $9 read_bw, $10 write_bw, $11/$12 mean, $13/$14 p99
    _ok=true
    if [ "$6" != 0 ]; then
        _ok=false
        fail "fio-$1-qd$2-j$3-$4" "fio error $6 (run $5)"
    elif awk -v r="$7" -v w="$8" 'BEGIN { exit !(r + w > 0) }'; then
        :
    else
        _ok=false
        fail "fio-$1-qd$2-j$3-$4" "no I/O measured (run $5)"
    fi
    emit RESULT "\"job\":\"$1\",\"iodepth\":$2,\"numjobs\":$3,\"target\":\"$4\",\"run\":$5,\"ok\":$_ok,\"kernel\":\"$KERNEL\",\"runtime_s\":$RUNTIME,\"ramp_s\":$RAMP,\"size\":\"$SIZE\",\"wall_s\":$_secs,\"read_iops\":$7,\"write_iops\":$8,\"read_bw_bytes\":$9,\"write_bw_bytes\":${10},\"read_clat_mean_ns\":${11},\"write_clat_mean_ns\":${12},\"read_clat_p99_ns\":${13},\"write_clat_p99_ns\":${14}$_extra"
    [ "$_ok" = true ]
}

# --- the runs --------------------------------------------------------------------------------
ncells=$(echo "$CELLS" | grep -c .)
cell=0
nfailed=0
echo "$CELLS" | grep . >"$DRILL_TMP/cells"
while read -r job qd nj targets; do
    cell=$((cell + 1))
    log "cell $cell/$ncells: $job iodepth=$qd numjobs=$nj: $targets (t=$(elapsed_s "$t_start") s)"
    run=1
    while [ "$run" -le "$REPEATS" ]; do
        for t in $targets; do
            run_one "$job" "$qd" "$nj" "$t" "$run" </dev/null || nfailed=$((nfailed + 1))
        done
        run=$((run + 1))
    done
done <"$DRILL_TMP/cells"
[ "$nfailed" -eq 0 ] && pass "all-runs-measured" || fail all-runs-measured "$nfailed run(s) failed"

# --- memory of the real daemon (issue 5, item 4) ---------------------------------------------
# A 64 GiB sparse volume with a 64 MiB read cache: its daemon's resident memory after the read
# cache is filled (random 4k reads of never-written blocks: from the backing file, into the
# cache) and after 4k writes scattered over the whole 64 GiB (dirty bitmap words everywhere),
# against the budget: read cache + the two epochs' bitmaps (1 bit per 4 KiB block each) +
# the per-tag I/O buffers (depth x 512 KiB, touched only as far as requests reach) + 16 MiB.
mem_kib() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
MEM_DEV=$(dv_add bmem 64GiB "$MED/mem-cache" "$MED/mem-backing.img" \
    --flush-interval-ms "$QUIET_FLUSH_MS" --queues 1 --depth 64 --read-cache 64MiB) || {
    fail setup-memory "deltavol add of the 64 GiB volume failed"
    MEM_DEV=''
}
if [ -n "${MEM_DEV:-}" ]; then
    MEM_PID=$(dv_pid bmem)
    m0=$(mem_kib "$MEM_PID" VmRSS)
    fio --name=fillrc --filename="$MEM_DEV" --rw=randread --bs=4k --size=64g --io_size=128m \
        --ioengine=io_uring --direct=1 --iodepth=32 --randrepeat=0 --minimal >/dev/null 2>&1 ||
        fail memory-reads "fio random reads failed"
    m1=$(mem_kib "$MEM_PID" VmRSS)
    fio --name=scatter --filename="$MEM_DEV" --rw=randwrite --bs=4k --size=64g --io_size=64m \
        --ioengine=io_uring --direct=1 --iodepth=32 --randrepeat=0 --minimal >/dev/null 2>&1 ||
        fail memory-writes "fio scattered writes failed"
    m2=$(mem_kib "$MEM_PID" VmRSS)
    hwm=$(mem_kib "$MEM_PID" VmHWM)
    rc_blocks=$(dv_field bmem read_cache_blocks)
    # KiB: 64 MiB read cache, 2 x 2 MiB bitmaps, 64 x 512 KiB tag buffers, 16 MiB fixed.
    budget=$((65536 + 2 * 2048 + 64 * 512 + 16384))
    emit RESULT "\"job\":\"memory\",\"target\":\"dv\",\"ok\":true,\"volume_bytes\":68719476736,\"read_cache_bytes\":67108864,\"read_cache_blocks\":${rc_blocks:-0},\"rss_kib_start\":${m0:-0},\"rss_kib_after_reads\":${m1:-0},\"rss_kib_after_writes\":${m2:-0},\"hwm_kib\":${hwm:-0},\"budget_kib\":$budget"
    log "memory: 64 GiB volume, read cache ${rc_blocks:-?} blocks: RSS ${m0:-?} -> ${m1:-?} -> ${m2:-?} KiB, HWM ${hwm:-?} KiB, budget $budget KiB"
    [ "${hwm:-0}" -gt 0 ] && [ "$hwm" -le "$budget" ] && pass memory-within-budget ||
        fail memory-within-budget "HWM ${hwm:-?} KiB > budget $budget KiB"
fi

if uses busy; then
    log "busy: $(dv_status bbusy | tr -d '\n ' | grep -o '"shipping":{[^}]*}')"
    check busy-snapshots-listed "$DV" snapshots bbusy --dataplane "$DP_ADDR" --auth-token-file "$MED/token"
fi

# --- teardown --------------------------------------------------------------------------------
if uses dv-rc; then
    log "dv-rc: $(dv_status brc | tr -d '\n ' | grep -o '"read_cache_h[a-z_]*":[0-9.]*' | tr '\n' ' ')"
fi
for v in bdv bmiss brc bdv2q bbusy bmem; do
    case "$v" in
        bmem) [ -n "${MEM_DEV:-}" ] || continue ;;
        bdv) [ -n "${DV_DEV:-}" ] || continue ;;
        bmiss) [ -n "${MISS_DEV:-}" ] || continue ;;
        brc) [ -n "${RC_DEV:-}" ] || continue ;;
        bdv2q) [ -n "${DV2_DEV:-}" ] || continue ;;
        bbusy) [ -n "${BUSY_DEV:-}" ] || continue ;;
    esac
    check "del-$v" dv_del "$v"
done
[ -n "${NULL_DEV:-}" ] && check del-null ublk-null del -n "$NULL_ID"
[ -n "${DP_PID:-}" ] && kill "$DP_PID" 2>/dev/null
[ -n "${LOOP_DEV:-}" ] && losetup -d "$LOOP_DEV" 2>/dev/null
log "done in $(elapsed_s "$t_start") s"
drill_finish
