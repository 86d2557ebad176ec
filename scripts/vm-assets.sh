#!/usr/bin/env bash
# Builds what `nestor run --vm` boots (all cached): the static guest binaries
# (images/build-agent.sh --host: the build scripts/setup.sh makes, whose host
# binaries are these; building only the guest's two could resolve other features of
# shared crates and compile them again), the guest kernel (guest-kernel/build.sh) and the agent
# initramfs (images/build-initramfs.sh --agent --nestor), and installs the kernel and
# initramfs where nestor looks for them: $NESTOR_ROOT/vm/{vmlinux,initramfs.cpio.lz4}
# (NESTOR_ROOT defaults to /var/lib/nestor). A file is only replaced when it changed.
# Progress on stderr; the LAST line of stdout is the directory.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
log() { echo "vm-assets: $*" >&2; }

bins=$("$repo/images/build-agent.sh" --host --quiet)
nestor_static=$(tail -n2 <<<"$bins" | head -n1)
agent_static=$(tail -n1 <<<"$bins")
kernel=$("$repo/guest-kernel/build.sh" | tail -n1)
initrd=$("$repo/images/build-initramfs.sh" --agent "$agent_static" --nestor "$nestor_static" | tail -n1)

dest="${NESTOR_ROOT:-/var/lib/nestor}/vm"
mkdir -p "$dest"
install_if_changed() { # SRC NAME
    if ! cmp -s "$1" "$dest/$2"; then
        cp "$1" "$dest/.$2.tmp"
        mv -f "$dest/.$2.tmp" "$dest/$2"
        log "installed $dest/$2"
    fi
}
install_if_changed "$kernel" vmlinux
install_if_changed "$initrd" initramfs.cpio.lz4
# Before the initramfs was lz4, nestor installed a gzip one under another name.
if [[ -e $dest/initramfs.cpio.gz ]]; then
    rm -f "$dest/initramfs.cpio.gz"
    log "removed $dest/initramfs.cpio.gz (replaced by initramfs.cpio.lz4)"
fi
echo "$dest"
