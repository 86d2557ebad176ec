#!/usr/bin/env bash
# Prepares the KVM test host's kernel, modules and initramfs, cached under
# $NESTOR_CACHE/testhost/<key>/, where <key> hashes the Debian kernel package's name
# and version with this script and the stage-1 init. Installs the apt packages the
# test host needs when they are missing. Progress goes to stderr; the last line of
# stdout is the absolute path of the cache directory, which holds:
#   vmlinuz                 Debian's generic kernel (has 9p, kvm, kvm-amd as modules)
#   modules/lib/modules/V/  the package's whole module tree, with modules.dep
#   initramfs.cpio          busybox-static + stage-1 init + the modules stage 1 loads
#   kernel-version          V
#   last-used               touched by every use; other keys unused for 3 days are removed
#
# Environment:
#   NESTOR_CACHE                 cache root (default $HOME/.cache/nestor)
#   NESTOR_TESTHOST_KERNEL_PKG   kernel package (default: what linux-image-amd64 depends on)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
cache_root=${NESTOR_CACHE:-$HOME/.cache/nestor}
log() { echo "testhost prepare: $*" >&2; }
die() { echo "testhost prepare: error: $*" >&2; exit 1; }

# --- apt packages the harness itself needs --------------------------------------
need_pkgs=(qemu-system-x86 busybox-static kmod cpio xz-utils iproute2)
missing=()
for p in "${need_pkgs[@]}"; do
    dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
    log "installing ${missing[*]} (apt-get)"
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >&2 \
        || { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y \
                --no-install-recommends "${missing[@]}" >&2; } \
        || die "could not install ${missing[*]}"
fi

# --- which kernel package --------------------------------------------------------
resolve_pkg() {
    if [[ -n ${NESTOR_TESTHOST_KERNEL_PKG:-} ]]; then
        echo "$NESTOR_TESTHOST_KERNEL_PKG"
        return
    fi
    apt-cache depends linux-image-amd64 2>/dev/null \
        | sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n1
}
# apt-cache takes about a second; remember its answer until apt's lists change.
memo=$cache_root/testhost/resolved
if [[ -z ${NESTOR_TESTHOST_KERNEL_PKG:-} && -f $memo && $memo -nt /var/lib/apt/lists ]] \
    && read -r pkg version <"$memo" && [[ -n $pkg && -n $version ]]; then
    :
else
    pkg='' version=''
fi
[[ -n $pkg ]] || pkg=$(resolve_pkg)
if [[ -z $pkg ]]; then
    log "apt has no linux-image-amd64 metadata; running apt-get update"
    apt-get update >&2 || die "apt-get update failed"
    pkg=$(resolve_pkg)
fi
[[ -n $pkg ]] || die "cannot find Debian's generic kernel package (linux-image-*-amd64) with apt-cache"
if [[ -z ${version:-} ]]; then
    version=$(apt-cache policy "$pkg" | sed -n 's/^ *Candidate: //p' | head -n1)
    [[ -n $version && $version != "(none)" ]] || die "apt knows no version of $pkg"
    if [[ -z ${NESTOR_TESTHOST_KERNEL_PKG:-} ]]; then
        mkdir -p "$cache_root/testhost"
        echo "$pkg $version" >"$memo.$$" && mv "$memo.$$" "$memo"
    fi
fi

key=$( { echo "$pkg $version"; cat "$here/prepare.sh" "$here/init"; } | sha256sum | cut -c1-16)
dir=$cache_root/testhost/$key
if [[ -f $dir/ready ]]; then
    touch "$dir/last-used"
    echo "$dir"
    exit 0
fi

mkdir -p "$cache_root/testhost"
exec 9>"$cache_root/testhost/.lock"
flock 9
if [[ -f $dir/ready ]]; then
    touch "$dir/last-used"
    echo "$dir"
    exit 0
fi

tmp=$(mktemp -d "$cache_root/testhost/.build.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

log "downloading $pkg $version"
(cd "$tmp" && apt-get download "$pkg=$version" >&2 2>/dev/null) \
    || (cd "$tmp" && apt-get download "$pkg=$version" >&2) \
    || die "apt-get download $pkg=$version failed"
deb=$(ls "$tmp"/*.deb)
log "unpacking $(basename "$deb")"
mkdir "$tmp/x"
dpkg-deb -x "$deb" "$tmp/x"
rm -f "$deb"
kver=$(ls "$tmp/x/lib/modules")
[[ -n $kver && -f $tmp/x/boot/vmlinuz-$kver ]] || die "$pkg holds no /boot/vmlinuz-<version>"
depmod -b "$tmp/x" "$kver"
mkdir -p "$tmp/out/modules/lib/modules"
mv "$tmp/x/boot/vmlinuz-$kver" "$tmp/out/vmlinuz"
mv "$tmp/x/boot/config-$kver" "$tmp/out/config"
mv "$tmp/x/lib/modules/$kver" "$tmp/out/modules/lib/modules/"
# An uncompressed ELF vmlinux boots through its PVH entry: no firmware, no in-guest
# decompression (about 3 s less under TCG than the xz bzImage).
off=$(grep -abo $'\xfd7zXZ\x00' "$tmp/out/vmlinuz" | head -n1 | cut -d: -f1)
[[ -n $off ]] || die "no xz payload in $pkg's vmlinuz"
tail -c +$((off + 1)) "$tmp/out/vmlinuz" | xz -dc --single-stream >"$tmp/out/vmlinux" 2>/dev/null || true
[[ $(head -c 4 "$tmp/out/vmlinux" | od -An -tx1 | tr -d ' ') == 7f454c46 ]] \
    || die "could not extract an ELF vmlinux from $pkg's vmlinuz"
echo "$kver" >"$tmp/out/kernel-version"
echo "$pkg $version" >"$tmp/out/package"

# --- initramfs: busybox + init + the modules stage 1 loads, in dependency order ---
log "building initramfs"
mods=$tmp/out/modules/lib/modules/$kver
# Two groups, each in dependency order (deps from modules.dep, each module once):
# "boot" is needed to reach the root filesystem; "late" loads in the background at
# the same time (kvm-amd gets nested=1 from the init), so they share no module.
# shellcheck disable=SC2034 # used through declare -n
boot_mods=(virtio_pci virtio_mmio virtio_console virtio-rng 9pnet_virtio 9p overlay)
# shellcheck disable=SC2034
late_mods=(kvm-amd tun veth bridge vsock)
declare -A seen=()
order=()
add_mod() { # $1: path relative to the module tree
    local rel=$1 line dep
    [[ -n ${seen[$rel]:-} ]] && return 0
    seen[$rel]=1
    line=$(grep -E "^${rel//./\\.}:" "$mods/modules.dep") || die "module $rel not in modules.dep"
    for dep in ${line#*:}; do
        add_mod "$dep"
    done
    order+=("$rel")
}
resolve_group() { # names... -> fills order
    local m rel
    order=()
    for m in "$@"; do
        rel=$(grep -oE "^[^:]*/${m}\.ko(\.[a-z]+)?:" "$mods/modules.dep" | head -n1)
        rel=${rel%:}
        if [[ -z $rel ]]; then
            # Built in? Then there is nothing to load.
            grep -qE "/${m//-/[-_]}\.ko" "$mods/modules.builtin" && continue
            die "module $m is neither in modules.dep nor built in"
        fi
        add_mod "$rel"
    done
}
root=$tmp/initramfs
mkdir -p "$root"/{bin,dev,proc,sys,newroot,lower,rw,modules}
cp /bin/busybox "$root/bin/busybox"
if command -v readelf >/dev/null && LC_ALL=C readelf -d /bin/busybox 2>/dev/null | grep -q NEEDED; then
    die "/bin/busybox is not static (install busybox-static)"
fi
ln -s busybox "$root/bin/sh"
declare -A in_boot=()
for group in boot late; do
    declare -n names=${group}_mods
    # The two groups load at the same time: they must not share a module.
    seen=()
    resolve_group "${names[@]}"
    : >"$root/modules/$group"
    for rel in "${order[@]}"; do
        [[ $group == boot ]] && in_boot[$rel]=1
        [[ $group == late && -n ${in_boot[$rel]:-} ]] \
            && die "late module $rel is also a boot module; the groups load in parallel"
        cp "$mods/$rel" "$root/modules/"
        basename "$rel" >>"$root/modules/$group"
    done
done
cp "$here/init" "$root/init"
chmod 755 "$root/init"
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc --quiet) >"$tmp/out/initramfs.cpio"
touch "$tmp/out/ready"
rm -rf "$tmp/x"
mv "$tmp/out" "$dir"
touch "$dir/last-used"
log "cached in $dir ($(du -sh "$dir" | cut -f1))"
# Other keys (older harness or kernel versions) unused for 3 days go.
find "$cache_root/testhost" -mindepth 2 -maxdepth 2 -name last-used -mtime +3 -printf '%h\n' \
    | while read -r old; do
        [[ $old != "$dir" ]] && log "removing unused $old" && rm -rf "$old"
    done
echo "$dir"
