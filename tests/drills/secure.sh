# shellcheck shell=sh
# Drill "secure": the data plane set up as the README's secure path (issue 14) on the real
# device: TLS with a CA of its own (`deltavol-dataplane tls init`), a per-volume credential for
# the node, the admin token kept for recovery, and a volume encrypted on the node. The data
# plane never holds the plaintext; the node's credential cannot recover (fence) the volume;
# recovery needs the admin credential and the key, and gives back exactly the files.
. "${DRILL_LIB:-/drills/lib.sh}"

require deltavol-dataplane
MED=/mnt/secmed
MNT=/mnt/sec
NAME=sec
MARKER=DVSECRETMARKER-7f3a9c
scratch_mount "$MED" 700m
mkdir -p "$MNT"

# --- the data plane's machine: certificates, credentials, admin token ---
TLS=$MED/tls
check tls-init sh -c "deltavol-dataplane tls init --no-config --dir '$TLS' --host 127.0.0.1 >/dev/null"
echo "secure-drill-admin-token-0123456789" >"$MED/admin.token"
CF=$MED/credentials.json
check issue-node-credential sh -c "deltavol-dataplane credentials --no-config --credentials-file '$CF' \
    issue --write $NAME --label drill-node --out '$MED/node.cred' 2>/dev/null"
deltavol-dataplane --no-config --listen 127.0.0.1:0 --data-dir "$MED/dp" --threads 2 \
    --auth-token-file "$MED/admin.token" --credentials-file "$CF" \
    --tls-cert "$TLS/server.pem" --tls-key "$TLS/server.key" >"$DRILL_TMP/dp.out" 2>"$DRILL_TMP/dp.err" &
DP_PID=$!
i=0
while ! grep -q '^listening on ' "$DRILL_TMP/dp.out" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -gt 300 ] || ! pid_alive "$DP_PID"; then
        sed 's/^/# dp: /' "$DRILL_TMP/dp.err"
        abort dataplane-start "the data plane did not start"
    fi
    sleep 0.1
done
DP_ADDR=$(sed -n 's/^listening on //p' "$DRILL_TMP/dp.out" | head -n 1)
NODE="--dataplane $DP_ADDR --auth-token-file $MED/node.cred --tls-ca $TLS/ca.pem"
ADMIN="--dataplane $DP_ADDR --auth-token-file $MED/admin.token --tls-ca $TLS/ca.pem"
pass dataplane-tls-credentials

# --- the node: an encrypted volume shipping over TLS with its own credential ---
check keygen sh -c "'$DV' keygen '$MED/sec.key' >/dev/null"
export DELTAVOL_RUN_DIR=/run/dv-s1
# shellcheck disable=SC2086
DEV=$(dv_add "$NAME" 96MiB "$MED/m1/cache" "$MED/m1/backing.img" --flush-interval-ms 600000 $NODE \
    --encryption-key-file "$MED/sec.key") || abort add "add failed"
st=$(dv_status "$NAME" | tr -d '\n')
echo "$st" | grep -q '"dataplane_transport": *"tls"' && pass status-says-tls ||
    fail status-says-tls "status: $(echo "$st" | grep -o '"dataplane_transport":[^,]*')"
echo "$st" | grep -q '"encryption": *"xchacha20poly1305' && pass status-says-encrypted ||
    fail status-says-encrypted "status: $(echo "$st" | grep -o '"encryption":[^,]*')"
check mkfs mkfs.ext4 -q "$DEV"
check mount mount -t ext4 "$DEV" "$MNT" || abort mount "cannot mount"
yes "$MARKER" | head -c 2097152 >"$MNT/secret.txt"
make_tree "$MNT/tree" 4 48 || fail write "could not write"
sync
sums() { (cd "$1" && find . -path ./lost+found -prune -o -type f -print | sort | xargs sha256sum); }
sums "$MNT" >"$DRILL_TMP/sums.s1"
check freeze fsfreeze --freeze "$MNT"
S1=$(run_timeout 120 "$DV" snapshot "$NAME") || fail snapshot "snapshot failed"
fsfreeze --unfreeze "$MNT"
log "snapshot $S1 shipped over TLS, sealed"

# The data plane holds no plaintext (the node's backing file, plaintext by design, does: the
# scan finds what is there).
if grep -r -a -q "$MARKER" "$MED/m1/backing.img"; then pass scan-finds-plaintext-on-the-node; else fail scan-finds-plaintext-on-the-node "the marker is not in the node's backing file"; fi
if grep -r -a -q "$MARKER" "$MED/dp"; then fail no-plaintext-on-the-dataplane "the marker is in the data plane's files"; else pass no-plaintext-on-the-dataplane; fi
key=$(cat "$MED/sec.key")
if grep -r -a -q "$key" "$MED/dp"; then fail no-key-on-the-dataplane "the key is in the data plane's files"; else pass no-key-on-the-dataplane; fi

# A plain client gets no session from the TLS data plane.
# shellcheck disable=SC2086
if run_timeout 30 "$DV" volume info "$NAME" --dataplane "$DP_ADDR" --auth-token-file "$MED/node.cred" >/dev/null 2>&1; then
    fail plain-client-refused "a plain-TCP client read the volume's info"
else
    pass plain-client-refused
fi

# --- the machine is lost ---
PID1=$(dv_pid "$NAME")
umount "$MNT"
kill -9 "$PID1"
wait_pid_gone "$PID1" 30 || fail kill "daemon $PID1 survived SIGKILL"
run_timeout 60 "$DV" del "$NAME" >/dev/null 2>&1
rm -rf "$MED/m1"
pass machine-1-lost

# --- machine 2: the node's credential cannot recover (it would fence the writer) ---
export DELTAVOL_RUN_DIR=/run/dv-s2
# shellcheck disable=SC2086
if run_timeout 120 "$DV" recover "$NAME" --cache-dir "$MED/m2/cache" --backing "$MED/m2/backing.img" \
    $NODE --encryption-key-file "$MED/sec.key" >"$DRILL_TMP/r-node.out" 2>"$DRILL_TMP/r-node.err"; then
    fail node-credential-cannot-recover "recover with the node's write credential succeeded"
    dv_del_quiet "$NAME"
elif grep -q "new generation" "$DRILL_TMP/r-node.err"; then
    pass node-credential-cannot-recover
    log "told: $(grep -m1 'new generation' "$DRILL_TMP/r-node.err" | cut -c1-200)"
else
    fail node-credential-cannot-recover "no clear refusal: $(tr '\n' ' ' <"$DRILL_TMP/r-node.err" | cut -c1-200)"
fi
rm -rf "$MED/m2"
# ... nor can the admin without the key.
# shellcheck disable=SC2086
if run_timeout 120 "$DV" recover "$NAME" --cache-dir "$MED/m2/cache" --backing "$MED/m2/backing.img" \
    $ADMIN >"$DRILL_TMP/r-nokey.out" 2>"$DRILL_TMP/r-nokey.err"; then
    fail recover-needs-the-key "recover without the key succeeded"
    dv_del_quiet "$NAME"
elif grep -q "encrypted on the data plane" "$DRILL_TMP/r-nokey.err"; then
    pass recover-needs-the-key
else
    fail recover-needs-the-key "no clear refusal: $(tr '\n' ' ' <"$DRILL_TMP/r-nokey.err" | cut -c1-200)"
fi
rm -rf "$MED/m2"
# The admin credential and the key: the files of the snapshot, exactly.
# shellcheck disable=SC2086
if run_timeout 120 "$DV" recover "$NAME" --cache-dir "$MED/m2/cache" --backing "$MED/m2/backing.img" \
    $ADMIN --encryption-key-file "$MED/sec.key" >"$DRILL_TMP/recover.out" 2>"$DRILL_TMP/recover.err"; then
    pass recover-admin-with-key
else
    sed 's/^/# recover: /' "$DRILL_TMP/recover.err"
    abort recover-admin-with-key "deltavol recover failed"
fi
DEV=$(grep -o '/dev/ublkb[0-9][0-9]*' "$DRILL_TMP/recover.out" | tail -n 1)
wait_for_block "$DEV" || abort recover-device "no device"
check mount-recovered mount -t ext4 "$DEV" "$MNT" || abort mount-recovered "cannot mount"
sums "$MNT" >"$DRILL_TMP/sums.got"
if cmp -s "$DRILL_TMP/sums.s1" "$DRILL_TMP/sums.got"; then
    pass files-of-the-snapshot
else
    fail files-of-the-snapshot "the recovered volume differs from snapshot $S1"
    diff "$DRILL_TMP/sums.s1" "$DRILL_TMP/sums.got" | head -n 10 | sed 's/^/# /'
fi
check umount-recovered umount "$MNT"
check fsck-recovered e2fsck -fn "$DEV"
check del dv_del "$NAME"
kill "$DP_PID" 2>/dev/null
check_no_ublk_devices no-devices-left
drill_finish
