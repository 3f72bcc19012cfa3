# shellcheck shell=bash
# Sourced (not run) by setup.sh, test.sh, scripts/install-deps and scripts/check-setup-chroot:
# they need root (apt-get, /dev/kvm for the VM, ublk), and cargo on PATH.
#
#   become_root NAME "$0" "$@"
#       As root: puts the sbin directories on PATH when missing, and returns. Otherwise re-runs
#       the script through sudo, keeping PATH (so the invoking user's ~/.cargo/bin stays on it),
#       rustup's RUSTUP_HOME (the toolchains are in the user's ~/.rustup, not root's) and the
#       CARGO_*, RUSTUP_*, DELTAVOL_*, FUZZ_* and CI variables, with HOME set to root's. Without
#       sudo it exits saying how to run it as root.
#   find_cargo
#       Puts cargo on PATH when it is not there: looks in ${CARGO_HOME:-~/.cargo}/bin, in the
#       sudo-invoking user's ~/.cargo/bin and in /root/.cargo/bin, and points RUSTUP_HOME at the
#       ~/.rustup beside the ~/.cargo it used. Returns non-zero when none has cargo.

become_root() {
    local name=$1 self=$2
    shift 2
    if ((EUID == 0)); then
        # Root's tools (mkfs.ext4, modprobe, ...) are in the sbin directories, which a PATH kept
        # from a user lacks (through sudo here, or Debian's `su` without `-`).
        local d
        for d in /usr/local/sbin /usr/sbin /sbin; do
            [[ :$PATH: == *:$d:* ]] || PATH=$PATH:$d
        done
        export PATH
        return 0
    fi
    self=$(cd "$(dirname "$self")" && pwd)/$(basename "$self")
    if ! command -v sudo >/dev/null; then
        printf '%s: error: needs root (apt-get installs packages; the VM drills use /dev/kvm) and sudo is not installed\n' "$name" >&2
        printf "%s: run it as root:  su -c '%s'\n" "$name" "$self${*:+ $*}" >&2
        printf '%s: (or, as root, apt-get install sudo && adduser %s sudo, then log in again and rerun it)\n' \
            "$name" "$(id -un)" >&2
        exit 1
    fi
    local keep=("PATH=$PATH") v
    local rustup_home=${RUSTUP_HOME:-$HOME/.rustup}
    [[ -d $rustup_home ]] && keep+=("RUSTUP_HOME=$rustup_home")
    while read -r v; do
        [[ $v == RUSTUP_HOME ]] && continue
        keep+=("$v=${!v}")
    done < <(compgen -e | grep -E '^(CARGO_|RUSTUP_|DELTAVOL_|FUZZ_|CI$)' || true)
    echo "$name: not root: running it through sudo" >&2
    exec sudo -H /usr/bin/env "${keep[@]}" "$self" "$@"
}

find_cargo() {
    command -v cargo >/dev/null && return 0
    local dirs=("${CARGO_HOME:-$HOME/.cargo}") user_home d
    if [[ -n ${SUDO_USER:-} ]]; then
        user_home=$(getent passwd "$SUDO_USER" | cut -d: -f6) || user_home=
        [[ -n $user_home ]] && dirs+=("$user_home/.cargo")
    fi
    dirs+=(/root/.cargo)
    for d in "${dirs[@]}"; do
        [[ -x $d/bin/cargo ]] || continue
        export PATH="$d/bin:$PATH"
        # ~/.cargo/bin/cargo is rustup's proxy: it finds the toolchains in RUSTUP_HOME
        # (default ~/.rustup, which under sudo is root's, not the user's).
        if [[ -z ${RUSTUP_HOME:-} && ! -d $HOME/.rustup && $d == */.cargo && -d ${d%/.cargo}/.rustup ]]; then
            export RUSTUP_HOME=${d%/.cargo}/.rustup
        fi
        return 0
    done
    return 1
}
