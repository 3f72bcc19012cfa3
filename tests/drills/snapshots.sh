# shellcheck shell=sh
# Drill: point-in-time snapshots of a mounted ext4 volume, shipped to a data plane on
# 127.0.0.1 inside the VM. Files are written between three `deltavol snapshot` calls (the
# filesystem frozen around each, as a consistent backup would do); each snapshot is then read
# back from the data plane alone into an image file, which must pass `e2fsck -fn` and hold
# exactly the files of its moment.
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
NAME=snapvol
MED=/mnt/snapmed
MNT=/mnt/snapvol
IMG_MNT=/mnt/snapimg
scratch_mount "$MED" 1100m
mkdir -p "$MNT" "$IMG_MNT"
TOK=$MED/token
printf 'drill-secret-%s\n' "$$" >"$TOK"

dp_start "$MED/dp" "$TOK" 2 || abort dataplane-start "the data plane did not start"
ADDR=$DP_ADDR
pass dataplane-start
log "data plane at $ADDR"

DEV=$(dv_add "$NAME" 128MiB "$MED/cache" "$MED/backing.img" --flush-interval-ms 600000 \
    --dataplane "$ADDR" --auth-token-file "$TOK") || abort add "deltavol add --dataplane failed"
pass add
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"

ids=""
for round in 1 2 3; do
    mkdir -p "$MNT/round$round"
    make_tree "$MNT/round$round" 6 64 || fail "write-$round" "could not write files"
    [ "$round" = 3 ] && rm -rf "$MNT/round1/c"   # deletions must show up too
    (cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.$round"
    sync
    check "freeze-$round" fsfreeze --freeze "$MNT"
    if run_timeout 120 "$DV" snapshot "$NAME" >"$DRILL_TMP/snap.$round" 2>"$DRILL_TMP/snap.err.$round"; then
        id=$(tail -n 1 "$DRILL_TMP/snap.$round")
        pass "snapshot-$round"
        log "snapshot $round is $id"
    else
        id=""
        fail "snapshot-$round" "$(tr '\n' ' ' <"$DRILL_TMP/snap.err.$round")"
    fi
    fsfreeze --unfreeze "$MNT"
    ids="$ids $id"
    # More writes after the snapshot must not leak into it.
    dd if=/dev/urandom of="$MNT/after-$round" bs=1024 count=128 2>/dev/null
done
dv_status "$NAME" >"$DRILL_TMP/status.json"
log "status: $(tr -d '\n ' <"$DRILL_TMP/status.json" | grep -o '"shipping":{[^}]*}')"
check umount umount "$MNT"

check list-snapshots "$DV" snapshots "$NAME" --dataplane "$ADDR" --auth-token-file "$TOK"
round=1
for id in $ids; do
    img=$MED/img.$round
    if ! run_timeout 300 "$DV" export "$NAME@$id" --dataplane "$ADDR" --auth-token-file "$TOK" --output "$img" >/dev/null 2>"$DRILL_TMP/export.err"; then
        fail "export-$round" "$(tail -n 2 "$DRILL_TMP/export.err" | tr '\n' ' ')"
        round=$((round + 1))
        continue
    fi
    pass "export-$round"
    check "fsck-$round" e2fsck -fn "$img"
    LOOPDEV=$(loop_attach "$img") || abort "loop-$round" "no loop device"
    if mount -t ext4 -o ro,noload "$LOOPDEV" "$IMG_MNT"; then
        (cd "$IMG_MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/got.$round"
        if cmp -s "$DRILL_TMP/sums.$round" "$DRILL_TMP/got.$round"; then
            pass "files-of-moment-$round"
        else
            fail "files-of-moment-$round" "snapshot $id does not hold exactly the files of its moment"
            diff "$DRILL_TMP/sums.$round" "$DRILL_TMP/got.$round" | head -n 10 | sed 's/^/# /'
        fi
        umount "$IMG_MNT"
    else
        fail "mount-image-$round" "cannot mount the image of snapshot $id"
    fi
    losetup -d "$LOOPDEV"
    rm -f "$img"
    round=$((round + 1))
done

# --- Retention on the real device: a pinned snapshot, snapshots being read (the exports
# above read them), a policy applied after each commit, and the newest snapshot exact after
# the snapshots before it were merged into it.
DPA="--dataplane $ADDR --auth-token-file $TOK"
check remount mount -t ext4 "$DEV" "$MNT" || abort remount "cannot mount again"
# snap_round N [ARGS...]: files of round N, a frozen snapshot (ARGS to `deltavol snapshot`);
# sets SNAP to its id.
snap_round() {
    _sr=$1
    shift
    mkdir -p "$MNT/round$_sr"
    make_tree "$MNT/round$_sr" 4 64 || fail "write-$_sr" "could not write files"
    (cd "$MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/sums.$_sr"
    sync
    fsfreeze --freeze "$MNT"
    SNAP=$(run_timeout 120 "$DV" snapshot "$NAME" "$@" 2>"$DRILL_TMP/snap.err.$_sr" | tail -n 1)
    fsfreeze --unfreeze "$MNT"
    if [ -n "$SNAP" ]; then pass "snapshot-$_sr"; else
        fail "snapshot-$_sr" "$(tr '\n' ' ' <"$DRILL_TMP/snap.err.$_sr")"; fi
}
snap_round 4 --pin --label drill
P=$SNAP
# shellcheck disable=SC2086
"$DV" snapshots "$NAME" $DPA >"$DRILL_TMP/list.4" 2>&1
if grep -Eq "^ +$P .*pinned drill$" "$DRILL_TMP/list.4"; then pass pinned-listed; else
    fail pinned-listed "$(tail -n 3 "$DRILL_TMP/list.4" | tr '\n' '|')"; fi
# shellcheck disable=SC2086
check retention-set "$DV" snapshots retention "$NAME" last=1 $DPA
snap_round 5
# shellcheck disable=SC2086
check unpin "$DV" snapshots unpin "$NAME@$P" $DPA
snap_round 6
R=$SNAP
# The policy ran after the commit of R: the unpinned P and snapshot 5 went; the three the
# exports read stay (a hydration reading them would be cut off), R is the head.
# shellcheck disable=SC2086
"$DV" snapshots prune "$NAME" --dry-run --json $DPA >"$DRILL_TMP/prune.json" 2>&1
# shellcheck disable=SC2086
got=$("$DV" snapshots "$NAME" --json $DPA 2>/dev/null | grep -o '"id": [0-9]*' | sed 's/"id": //' | tr '\n' ' ')
# shellcheck disable=SC2086,SC2116
want="$(echo $ids) $R "
if [ "$got" = "$want" ]; then pass retention-applied; else
    fail retention-applied "kept '$got', expected '$want'"; fi
if grep -q '"being read"' "$DRILL_TMP/prune.json"; then pass read-snapshots-protected; else
    fail read-snapshots-protected "$(tr -d '\n' <"$DRILL_TMP/prune.json" | head -c 300)"; fi
check umount-2 umount "$MNT"
img=$MED/img.last
# shellcheck disable=SC2086
if run_timeout 300 "$DV" export "$NAME@$R" $DPA --output "$img" >/dev/null 2>"$DRILL_TMP/export.err"; then
    check fsck-after-merge e2fsck -fn "$img"
    LOOPDEV=$(loop_attach "$img") || abort loop-last "no loop device"
    if mount -t ext4 -o ro,noload "$LOOPDEV" "$IMG_MNT"; then
        (cd "$IMG_MNT" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum) >"$DRILL_TMP/got.6"
        if cmp -s "$DRILL_TMP/sums.6" "$DRILL_TMP/got.6"; then pass files-after-merge; else
            fail files-after-merge "snapshot $R differs after its predecessors merged into it"; fi
        umount "$IMG_MNT"
    else
        fail mount-image-last "cannot mount the image of snapshot $R"
    fi
    losetup -d "$LOOPDEV"
else
    fail export-last "$(tail -n 2 "$DRILL_TMP/export.err" | tr '\n' ' ')"
fi

check del dv_del "$NAME"
kill "$DP_PID" 2>/dev/null
wait_pid_gone "$DP_PID" 10 || kill -9 "$DP_PID" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
