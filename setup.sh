#!/usr/bin/env bash
# Set-up on a fresh Debian 12 machine, and the main job: installs what deltavol needs, builds
# it, and runs the lifecycle drill on a real ublk device (in a qemu VM when this kernel has no
# ublk driver: see kernel-setup/README.md).
#
#   ./setup.sh                   # the lifecycle drill on the newest 7.x kernel
#   ./setup.sh --kernel 6.12
#
# Needs root: run it as root, or as a user with sudo (it re-runs itself through sudo, keeping
# the user's ~/.cargo/bin on PATH). scripts/check-setup-chroot runs it on a fresh Debian 12.
set -euo pipefail
# shellcheck source=scripts/as-root.sh
. "$(dirname "${BASH_SOURCE[0]}")/scripts/as-root.sh"
become_root setup.sh "$0" "$@"
cd "$(dirname "${BASH_SOURCE[0]}")"
find_cargo || true  # install-deps says how to install Rust when it is missing
kernel=7
[[ ${1:-} == --kernel ]] && kernel=${2:?--kernel needs 7 or 6.12}

scripts/install-deps
scripts/build-release
kernel-setup/vm-run --kernel "$kernel" --bin-dir build/vm-bin tests/drills/lifecycle.sh
