#!/usr/bin/env bash
# Builds nestor's guest kernel: an uncompressed ELF vmlinux (bootable at its PVH entry
# point, as Firecracker and nestor-vmm start it, or by QEMU -kernel) from Debian's
# linux-source-6.1 package, configured as `make allnoconfig` + guest-kernel/nestor.config
# (merged with scripts/kconfig/merge_config.sh, then `make olddefconfig`). No patches, no
# modules. After configuring, every symbol of the fragment is checked in the final .config
# and the build fails naming any that did not stick.
#
# Cache: ${NESTOR_CACHE:-$HOME/.cache/nestor}/guest-kernel/<hash>/vmlinux, where <hash>
# covers this script, the fragment and the linux-source package version; the unpacked
# source tree is cached once per package version next to it. The build runs in a temp dir
# and is moved into place atomically; a second run only prints the path.
# Env: NESTOR_KERNEL_JOBS (default 2).
# Progress goes to stderr; the absolute path of vmlinux is the LAST line of stdout.
set -euo pipefail

log() { echo "guest-kernel: $*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fragment="$here/nestor.config"
pkg=linux-source-6.1
tarball=/usr/src/linux-source-6.1.tar.xz
jobs=${NESTOR_KERNEL_JOBS:-2}

need=()
for p in "$pkg" build-essential flex bison bc libelf-dev libssl-dev xz-utils; do
    dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    log "installing ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "${need[@]}" >&2; }
fi
[ -f "$tarball" ] || die "$tarball missing after installing $pkg"
[ -f "$fragment" ] || die "config fragment $fragment missing"

version=$(dpkg-query -W -f '${Version}' "$pkg")
hash=$( { cat "${BASH_SOURCE[0]}" "$fragment"; echo "$pkg $version"; } | sha256sum | cut -c1-16)
cache="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/guest-kernel"
out="$cache/$hash"

if [ -f "$out/vmlinux" ]; then
    log "cached: $out/vmlinux"
    echo "$out/vmlinux"
    exit 0
fi
mkdir -p "$cache"

# Unpacked source, shared by every config (read-only use: we build out of tree with O=).
src="$cache/src-$version/linux-source-6.1"
if [ ! -f "$src/Makefile" ]; then
    log "unpacking $tarball ($pkg $version)"
    stmp=$(mktemp -d "$cache/.src-$version.XXXXXX")
    tar -C "$stmp" -xf "$tarball"
    [ -f "$stmp/linux-source-6.1/Makefile" ] || die "$tarball has no linux-source-6.1/Makefile"
    rm -rf "$cache/src-$version"
    mv "$stmp" "$cache/src-$version"
fi

tmp=$(mktemp -d "$cache/.build-$hash.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
obj="$tmp/obj"
mkdir -p "$obj"
export ARCH=x86_64
kmake() { make -s -C "$src" O="$obj" ARCH=x86_64 "$@"; }

log "configuring: allnoconfig + $(basename "$fragment")"
(cd "$src" && ./scripts/kconfig/merge_config.sh -n -O "$obj" "$fragment") \
    >"$tmp/config.log" 2>&1 || { tail -n 30 "$tmp/config.log" >&2; die "merge_config.sh failed"; }
kmake olddefconfig >>"$tmp/config.log" 2>&1 || { tail -n 30 "$tmp/config.log" >&2; die "olddefconfig failed"; }

# Every symbol of the fragment must have its value in the final .config.
missing=()
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*)
            sym=${line%%=*}
            grep -qx -- "$line" "$obj/.config" || missing+=("$sym (want ${line#*=}, got $(grep -E "^(# )?$sym[= ]" "$obj/.config" || echo unset))")
            ;;
        "# CONFIG_"*" is not set")
            sym=${line#\# }; sym=${sym%% *}
            grep -q "^$sym=" "$obj/.config" && missing+=("$sym (want unset, got $(grep "^$sym=" "$obj/.config"))")
            ;;
    esac
done <"$fragment"
if [ ${#missing[@]} -gt 0 ]; then
    for m in "${missing[@]}"; do log "required symbol not in final .config: $m"; done
    die "${#missing[@]} required symbol(s) missing (a dependency is probably off)"
fi
log "config ok: all $(grep -c '^CONFIG_\|^# CONFIG_.* is not set' "$fragment") required symbols present"

log "building vmlinux with make -j$jobs (a few minutes on 2 cores)"
start=$(date +%s)
set +e
make -C "$src" O="$obj" ARCH=x86_64 -j"$jobs" vmlinux 2>&1 | tee "$tmp/build.log" |
    awk '/^  [A-Z]/ { n++; if (n % 200 == 0) { printf "guest-kernel: %d objects built\n", n > "/dev/stderr"; fflush("/dev/stderr") } }'
rc=${PIPESTATUS[0]}
set -e
if [ "$rc" -ne 0 ]; then
    grep -E 'error|Error' "$tmp/build.log" | head -n 20 >&2 || true
    tail -n 20 "$tmp/build.log" >&2
    die "make vmlinux failed (exit $rc)"
fi
[ -f "$obj/vmlinux" ] || die "make succeeded but $obj/vmlinux is missing"
log "built in $(( $(date +%s) - start )) s"

stage="$tmp/out"
mkdir -p "$stage"
cp "$obj/vmlinux" "$stage/vmlinux"
cp "$obj/.config" "$stage/config"
rm -rf "$out"
mv "$stage" "$out"
log "vmlinux: $out/vmlinux ($(du -h "$out/vmlinux" | cut -f1))"
echo "$out/vmlinux"
