#!/usr/bin/env bash
# Builds the guest's static binaries: nestor-agent (the guest's /init) and nestor (the
# OCI runtime the agent runs containers with, /bin/nestor in the initramfs), as static
# executables on the gnu target: RUSTFLAGS="-C target-feature=+crt-static" cargo build
# --release --target x86_64-unknown-linux-gnu (musl is not needed, nor downloadable here).
# Both land in $CARGO_TARGET_DIR (default <repo>/target)/x86_64-unknown-linux-gnu/release/.
# Cargo makes a second run fast. Progress on stderr; stdout's last two lines are
# the absolute paths of nestor and, LAST, nestor-agent.
#   --host        nestor-vmm too: every binary `nestor run [--vm]`, `podman --runtime`
#                 and `nestor bench` use (scripts/setup.sh: the host's binaries are these
#                 static ones, so one build serves the host and the guest)
#   --quiet       cargo without its per-crate lines
set -euo pipefail

log() { echo "build-agent: $*" >&2; }
die() { log "error: $*"; exit 1; }

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
target=x86_64-unknown-linux-gnu
tdir=${CARGO_TARGET_DIR:-$repo/target}
what=(-p nestor-guest-agent --bin nestor-agent -p nestor --bin nestor) said="nestor-agent, nestor" quiet=()
bins=(nestor nestor-agent)
# --host builds without cross-crate (thin) LTO: on 2 cores it cost 109 of the build's 346
# CPU seconds (176 s against 124 s of wall time), made the binaries 5% larger, and changed
# nothing measurable (Dec 7: `nestor run --rm busybox true` medians 0.99x and 1.01x,
# hyperfine, 100 runs each; nestor-vmm's boot to exit 1.01x in the test host).
lto=
for a in "$@"; do
    case $a in
    --host) what+=(-p nestor-microvm --bin nestor-vmm) bins+=(nestor-vmm) lto=off
        said="nestor-agent, nestor, nestor-vmm (no cross-crate LTO)" ;;
    --quiet) quiet=(--quiet) ;;
    *) die "unknown argument '$a' (--host, --quiet)" ;;
    esac
done
command -v cargo >/dev/null || die "cargo is not installed"
log "cargo build --release --target $target (crt-static): $said"
(cd "$repo" && env RUSTFLAGS="-C target-feature=+crt-static" ${lto:+CARGO_PROFILE_RELEASE_LTO=$lto} \
    cargo build "${quiet[@]}" --release --target "$target" \
    "${what[@]}" >&2)
out="$(cd "$tdir" && pwd)/$target/release"
for b in "${bins[@]}"; do
    [[ -x $out/$b ]] || die "$out/$b was not built"
    if LC_ALL=C readelf -d "$out/$b" 2>/dev/null | grep -q NEEDED; then
        die "$out/$b is dynamically linked"
    fi
done
log "static, in $out: ${bins[*]}"
echo "$out/nestor"
echo "$out/nestor-agent"
