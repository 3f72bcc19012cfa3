#!/usr/bin/env bash
# The flush thread's syscalls, by name, in one flush of deltavol-bench-flush (one round):
#   bench/flush-syscalls.sh [BENCH-BIN] [bench options...]
set -euo pipefail
bin=${1:-build/release/deltavol-bench-flush}
shift || true
out=$(mktemp -d)
strace -f -qq -o "$out/trace" "$bin" --rounds 1 "$@" 2>"$out/err" >/dev/null
tid=$(sed -n 's/^threads: flush \([0-9]*\).*/\1/p' "$out/err")
grep "round 0" "$out/err" || true
awk -v t="$tid" '$1 == t { split($2, a, "("); n[a[1]]++; tot++ } END { for (k in n) printf "%8d %s\n", n[k], k; printf "%8d total\n", tot }' "$out/trace" | sort -n
rm -rf "$out"
