#!/usr/bin/env bash
# Set-up on a fresh Debian 12 machine, and the main job: installs what deltavol needs, builds
# it, and runs the lifecycle drill on a real ublk device (in a qemu VM when this kernel has no
# ublk driver: see kernel-setup/README.md).
#
#   sudo ./setup.sh              # the lifecycle drill on the newest 7.x kernel
#   sudo ./setup.sh --kernel 6.12
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
kernel=7
[[ ${1:-} == --kernel ]] && kernel=${2:?--kernel needs 7 or 6.12}

scripts/install-deps
scripts/build-release
kernel-setup/vm-run --kernel "$kernel" --bin-dir build/vm-bin tests/drills/lifecycle.sh
