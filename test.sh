#!/usr/bin/env bash
# The whole test suite: formatting and lints, the host-level tests (cargo test: engine, faults,
# crash trials, shipping, hydration, the data plane on local disk and on an S3 server (moto),
# hostile clients), a bounded fuzzing run, the benchmark smoke runs, and the VM drills on the
# real ublk driver on both supported kernels, then the fio benchmark's smoke set in the VM.
# Exits non-zero on any failure; the last line is "test.sh: N passed, M failed".
#
#   ./test.sh                 # everything (what CI runs)
#   ./test.sh --host-only     # skip the release build, benchmarks and the VM
#
# Needs root: run it as root, or as a user with sudo (it re-runs itself through sudo, keeping
# the user's ~/.cargo/bin on PATH).
#
# The long tier (not in CI): scripts/crash-trials (100 crash trials),
# FUZZ_SECONDS=3600 scripts/fuzz-smoke, bench/run (the full fio suite; bench/README.md).
set -euo pipefail
# shellcheck source=scripts/as-root.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/as-root.sh"
become_root test.sh "$0" "$@"
cd "$(dirname "${BASH_SOURCE[0]}")"
find_cargo || true  # install-deps says how to install Rust when it is missing
host_only=0
[[ ${1:-} == --host-only ]] && host_only=1
t0=$SECONDS
step() { printf '\n=== %s (%ds)\n' "$*" $((SECONDS - t0)); }
# Steps that are one check each (smoke runs): counted, and the suite goes on after a failure.
steps_passed=0 steps_failed=0 failed_steps=()
check_step() {
    local name=$1
    shift
    step "$name"
    if "$@"; then
        steps_passed=$((steps_passed + 1))
    else
        steps_failed=$((steps_failed + 1))
        failed_steps+=("$name")
        echo "test.sh: FAILED: $name" >&2
    fi
}

step "dependencies"
scripts/install-deps
# moto's S3 server for the object-store tests: they fail rather than skip when it is missing.
export DELTAVOL_REQUIRE_MOTO=1

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "host tests (cargo test)"
host_rc=0
cargo test --workspace 2>&1 | tee build/host-tests.log || host_rc=$?
host_passed=$(grep -E '^test result:' build/host-tests.log | awk '{p+=$4} END {print p+0}')
host_failed=$(grep -E '^test result:' build/host-tests.log | awk '{f+=$6} END {print f+0}')
# A test binary that did not build or crashed prints no "test result" line for its failures.
((host_rc == 0 || host_failed > 0)) || host_failed=1
host_summary="$host_passed passed, $host_failed failed"

check_step "fuzzing smoke (scripts/fuzz-smoke, ${FUZZ_SECONDS:-60} s)" scripts/fuzz-smoke

summary() {
    step "summary"
    echo "host tests: $host_summary"
    echo "smoke steps: $steps_passed passed, $steps_failed failed${failed_steps[*]:+ (${failed_steps[*]})}"
    [[ -n ${1:-} ]] && echo "$1"
    local p=$((host_passed + steps_passed + ${vm_passed:-0}))
    local f=$((host_failed + steps_failed + ${vm_failed:-0}))
    echo "test.sh: $p passed, $f failed"
    ((f == 0))
}

if ((host_only)); then
    summary
    exit
fi

step "release build"
scripts/build-release

check_step "the .deb: build and inspect (scripts/build-deb --no-build --fast, scripts/check-deb)" \
    bash -c 'scripts/build-deb --no-build --fast && scripts/check-deb'
check_step "benchmark smoke: ingest vs a TCP sink, with TLS and encryption (--quick --tls --encrypt)" build/release/deltavol-bench-ingest --quick --tls --encrypt
check_step "benchmark smoke: hydration vs a plain copy, with encryption (--quick --encrypt)" build/release/deltavol-bench-hydrate --quick --encrypt
check_step "benchmark smoke: engine vs raw io_uring (--quick)" build/release/deltavol-bench-engine --quick
check_step "benchmark smoke: long life under retention (--quick)" build/release/deltavol-bench-longlife --quick

drills=(tests/drills/lifecycle.sh tests/drills/fio-verify.sh tests/drills/zerocopy.sh tests/drills/crash.sh tests/drills/snapshots.sh
        tests/drills/recovery.sh tests/drills/clone.sh tests/drills/restart.sh tests/drills/verify.sh
        tests/drills/identity.sh tests/drills/recover-at.sh tests/drills/secure.sh tests/drills/docker.sh)
declare -A result
vm_passed=0 vm_failed=0
for k in 7 6.12; do
    step "VM drills on kernel $k"
    if kernel-setup/vm-run --kernel "$k" --bin-dir build/vm-bin --timeout 1200 "${drills[@]}" 2>&1 | tee "build/vm-$k.log"; then
        result[$k]=pass
    else
        result[$k]=FAIL
    fi
    # vm-run's closing count: "vm-run: N passed, M failed"
    vp='' vf=''
    read -r vp vf < <(sed -nE 's/^vm-run: ([0-9]+) passed, ([0-9]+) failed.*/\1 \2/p' "build/vm-$k.log" | tail -n 1) || true
    vm_passed=$((vm_passed + ${vp:-0}))
    vm_failed=$((vm_failed + ${vf:-0}))
    # A VM run that failed without counting a failure (no boot, timeout) is one failure.
    if [[ ${result[$k]} == FAIL && ${vf:-0} -eq 0 ]]; then vm_failed=$((vm_failed + 1)); fi
done

check_step "fio benchmark smoke in the VM (bench/run --smoke, kernel 7)" bench/run --smoke --kernel 7 --offline

summary "$(for k in 7 6.12; do echo "VM drills, kernel $k: ${result[$k]}"; done)"
