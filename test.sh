#!/usr/bin/env bash
# The whole test suite: formatting and lints, the host-level tests (cargo test), and the VM
# drills on the real ublk driver on both supported kernels. Exits non-zero on any failure.
#
#   sudo ./test.sh                 # everything (what CI runs)
#   sudo ./test.sh --host-only     # skip the VM drills
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
host_only=0
[[ ${1:-} == --host-only ]] && host_only=1
t0=$SECONDS
step() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - t0)); }

step "dependencies"
scripts/install-deps

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "host tests (cargo test)"
cargo test --workspace 2>&1 | tee build/host-tests.log
host_passed=$(grep -E '^test result:' build/host-tests.log | awk '{p+=$4} END {print p+0}')
host_failed=$(grep -E '^test result:' build/host-tests.log | awk '{f+=$6} END {print f+0}')
host_summary="$host_passed passed, $host_failed failed"

if ((host_only)); then
    step "done"
    echo "test.sh: $host_passed passed, $host_failed failed"
    exit 0
fi

step "release build"
scripts/build-release

step "benchmark smoke (ingest vs a TCP sink, hydration vs a plain copy; --quick)"
build/release/deltavol-bench-ingest --quick
build/release/deltavol-bench-hydrate --quick

drills=(tests/drills/lifecycle.sh tests/drills/fio-verify.sh tests/drills/crash.sh tests/drills/snapshots.sh
        tests/drills/recovery.sh tests/drills/clone.sh tests/drills/restart.sh)
declare -A result
rc=0
for k in 7 6.12; do
    step "VM drills on kernel $k"
    if kernel-setup/vm-run --kernel "$k" --bin-dir build/vm-bin --timeout 1200 "${drills[@]}" 2>&1 | tee "build/vm-$k.log"; then
        result[$k]=pass
    else
        result[$k]=FAIL
        rc=1
    fi
    # vm-run's closing count: "vm-run: N passed, M failed"
    vp='' vf=''
    read -r vp vf < <(sed -nE 's/^vm-run: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "build/vm-$k.log" | tail -n 1) || true
    vm_passed=$((${vm_passed:-0} + ${vp:-0}))
    vm_failed=$((${vm_failed:-0} + ${vf:-0}))
    [[ -n ${vp:-} ]] || { vm_failed=$((vm_failed + 1)); rc=1; }
done
step "summary"
echo "host tests: $host_summary"
for k in 7 6.12; do echo "VM drills, kernel $k: ${result[$k]}"; done
((rc == 0)) || vm_failed=$((vm_failed > 0 ? vm_failed : 1))
echo "test.sh: $((host_passed + vm_passed)) passed, $((host_failed + vm_failed)) failed"
exit $rc
