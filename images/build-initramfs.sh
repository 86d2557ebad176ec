#!/usr/bin/env bash
# Builds nestor's guest initramfs: an lz4 newc cpio holding busybox-static (+ applet
# links), /dev/console, and /init (the agent given with --agent, else the shell test init
# images/initramfs/init.sh), plus /bin/nestor with --nestor. See images/initramfs/README.md
# for the contract with the VMM (boot marker, command line settings).
#
#   build-initramfs.sh [--agent PATH] [--nestor PATH] [--test-rootfs]
#
# --test-rootfs adds a busybox container root filesystem at /rootfs/busybox (for tests
# that run a container in the guest before rootfs disks exist).
#
# Cached under ${NESTOR_CACHE:-$HOME/.cache/nestor}/initramfs/<hash>/initramfs.cpio.lz4,
# <hash> covering this script, the shell init, the busybox package version and the
# contents of the given binaries. Reproducible: fixed mtimes, owners 0:0, sorted entries.
# Compressed with lz4's legacy format (`lz4 -l`, the one the kernel's initramfs reader
# takes; the guest kernel has CONFIG_RD_LZ4): the guest unpacks it much faster than
# gzip, which made most of the agent initramfs's cost at boot (guest init reached a
# median 0.74x as late in the TCG test host; the file is 10 MiB against gzip's 8.4).
# Progress on stderr; the absolute path is the LAST line of stdout.
set -euo pipefail

log() { echo "build-initramfs: $*" >&2; }
die() { log "error: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
agent= nestor= test_rootfs=0
while (($#)); do
    case $1 in
    --agent) [[ -n ${2:-} ]] || die "--agent needs a path"; agent=$2; shift 2 ;;
    --nestor) [[ -n ${2:-} ]] || die "--nestor needs a path"; nestor=$2; shift 2 ;;
    --test-rootfs) test_rootfs=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
    esac
done
check_bin() { # path what
    [[ -f $1 ]] || die "$2 '$1' does not exist"
    [[ -x $1 ]] || die "$2 '$1' is not executable"
    head -c 4 "$1" | grep -q $'^\x7fELF' || die "$2 '$1' is not an ELF binary"
    if file_out=$(LC_ALL=C readelf -d "$1" 2>/dev/null) && grep -q NEEDED <<<"$file_out"; then
        die "$2 '$1' is dynamically linked (needs shared libraries the initramfs lacks); build it with -C target-feature=+crt-static"
    fi
}
[[ -z $agent ]] || { check_bin "$agent" "--agent"; agent=$(readlink -f "$agent"); }
[[ -z $nestor ]] || { check_bin "$nestor" "--nestor"; nestor=$(readlink -f "$nestor"); }

for pkg in busybox-static lz4; do
    if ! dpkg -s "$pkg" >/dev/null 2>&1; then
        log "installing $pkg"
        DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >&2 ||
            { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y "$pkg" >&2; }
    fi
done
version=$(dpkg-query -W -f '${Version}' busybox-static)
hash=$( {
    cat "${BASH_SOURCE[0]}" "$here/initramfs/init.sh"
    echo "busybox-static $version test-rootfs $test_rootfs lz4 $(dpkg-query -W -f '${Version}' lz4)"
    [[ -z $agent ]] || { echo agent; sha256sum <"$agent"; }
    [[ -z $nestor ]] || { echo nestor; sha256sum <"$nestor"; }
} | sha256sum | cut -c1-16)
cache="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/initramfs"
out="$cache/$hash"
if [[ -f $out/initramfs.cpio.lz4 ]]; then
    log "cached: $out/initramfs.cpio.lz4"
    echo "$out/initramfs.cpio.lz4"
    exit 0
fi
mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.build-$hash.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "building (busybox-static $version, init: ${agent:-shell test init}${nestor:+, nestor: $nestor})"

python3 - "$tmp/initramfs.cpio" /bin/busybox "${agent:-$here/initramfs/init.sh}" "$nestor" "$test_rootfs" <<'PY'
import os, subprocess, sys

out, busybox, init, nestor, test_rootfs = sys.argv[1:6]
MTIME = 1704067200  # 2024-01-01T00:00:00Z
entries = {}  # name -> (mode, data, rdev)
hardlinks = {}  # name -> name of the entry whose inode it shares

def d(name, mode=0o755):
    entries[name] = (0o040000 | mode, b"", (0, 0))

def f(name, path, mode=0o755):
    with open(path, "rb") as fh:
        entries[name] = (0o100000 | mode, fh.read(), (0, 0))

def l(name, target):
    entries[name] = (0o120000 | 0o777, target.encode(), (0, 0))

def c(name, major, minor, mode):
    entries[name] = (0o020000 | mode, b"", (major, minor))

for name in ["bin", "sbin", "usr", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run",
             "etc", "mnt", "var"]:
    d(name)
d("tmp", 0o1777)
d("root", 0o700)
c("dev/console", 5, 1, 0o600)
f("bin/busybox", busybox)
applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True,
                         text=True).stdout.split()
for a in applets:
    a = a.strip("/")
    if not a or a in entries or a == "init" or ".." in a.split("/"):
        continue
    depth = a.count("/")
    l(a, "../" * depth + "bin/busybox" if depth else "busybox")
f("init", init)
if test_rootfs == "1":
    r = "rootfs/busybox"
    for name in ["rootfs", r, r + "/bin", r + "/proc", r + "/sys", r + "/dev", r + "/etc",
                 r + "/root", r + "/run"]:
        d(name)
    d(r + "/tmp", 0o1777)
    hardlinks[r + "/bin/busybox"] = "bin/busybox"  # stored once
    for a in applets:
        name = r + "/bin/" + a.strip("/").split("/")[-1]
        if name not in entries and not name.endswith("/busybox"):
            l(name, "busybox")
    entries[r + "/etc/passwd"] = (0o100644, b"root:x:0:0:root:/root:/bin/sh\n", (0, 0))
    entries[r + "/etc/group"] = (0o100644, b"root:x:0:\n", (0, 0))
if nestor:
    f("bin/nestor", nestor)
entries["etc/passwd"] = (0o100644, b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n", (0, 0))
entries["etc/group"] = (0o100644, b"root:x:0:\nnogroup:x:65534:\n", (0, 0))
entries["etc/hostname"] = (0o100644, b"nestor\n", (0, 0))

def hdr(ino, name, mode, size, rdev, nlink):
    fields = [ino, mode, 0, 0, nlink, MTIME, size, 0, 0, rdev[0], rdev[1], len(name) + 1, 0]
    return b"070701" + b"".join(b"%08X" % v for v in fields) + name + b"\0"

def pad(n):
    return b"\0" * ((4 - n % 4) % 4)

for name, target in hardlinks.items():
    entries[name] = entries[target]
names = sorted(entries)
inos, ino = {}, 1
for name in names:
    if name not in hardlinks:
        inos[name] = ino
        ino += 1
for name, target in hardlinks.items():
    inos[name] = inos[target]
members = {}
for name in names:
    members.setdefault(inos[name], []).append(name)
buf = bytearray()
for name in names:
    mode, data, rdev = entries[name]
    group = members[inos[name]]
    # newc hard links: same inode number, the data only with the last member.
    if len(group) > 1 and name != group[-1]:
        data = b""
    nlink = 2 if mode & 0o170000 == 0o040000 else len(group)
    h = hdr(inos[name], name.encode(), mode, len(data), rdev, nlink)
    buf += h + pad(len(h)) + data + pad(len(data))
h = hdr(0, b"TRAILER!!!", 0, 0, (0, 0), 1)
buf += h + pad(len(h))
with open(out, "wb") as fh:
    fh.write(bytes(buf))
print(f"build-initramfs: {len(entries)} entries, {len(buf) // 1024} KiB uncompressed", file=sys.stderr)
PY
mkdir -p "$tmp/out"
lz4 -q -l -9 "$tmp/initramfs.cpio" "$tmp/out/initramfs.cpio.lz4" || die "lz4 failed"
rm -rf "$out"
mv "$tmp/out" "$out"
log "initramfs: $out/initramfs.cpio.lz4 ($(du -h "$out/initramfs.cpio.lz4" | cut -f1))"
echo "$out/initramfs.cpio.lz4"
