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
host_summary=$(grep -E '^test result:' build/host-tests.log | awk '{p+=$4; f+=$6} END {print p" passed, "f" failed"}')

if ((host_only)); then
    step "done: host $host_summary"
    exit 0
fi

step "release build"
scripts/build-release

step "benchmark smoke (data-plane ingest vs a plain TCP sink, --quick)"
build/release/deltavol-bench-ingest --quick

drills=(tests/drills/lifecycle.sh tests/drills/fio-verify.sh tests/drills/crash.sh tests/drills/snapshots.sh)
declare -A result
rc=0
for k in 7 6.12; do
    step "VM drills on kernel $k"
    if kernel-setup/vm-run --kernel "$k" --bin-dir build/vm-bin --timeout 1200 "${drills[@]}"; then
        result[$k]=pass
    else
        result[$k]=FAIL
        rc=1
    fi
done
step "summary"
echo "host tests: $host_summary"
for k in 7 6.12; do echo "VM drills, kernel $k: ${result[$k]}"; done
exit $rc
