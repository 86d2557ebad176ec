#!/usr/bin/env bash
# Builds the busybox sample container image offline, from Debian's busybox-static, as an
# OCI image layout directory, and prints its absolute path as the last line of stdout.
#
# The image (reference name "busybox:latest", which nestor shows as
# localhost/busybox:latest and finds as "busybox") has two layers:
#   1. base (tar+gzip): /bin/busybox with a symlink per applet (`busybox --list-full`),
#      /etc/passwd and /etc/group (root, nobody), /etc/hostname, /etc/hosts, empty /proc
#      /sys /dev /run /home, /tmp and /var/tmp (1777), /root (0700), plus two sample
#      files that layer 2 removes: /etc/motd and /var/cache/sample/old;
#   2. change (plain tar): a whiteout of /etc/motd (etc/.wh.motd), an opaque
#      /var/cache/sample (.wh..wh..opq) holding only "new", and /etc/nestor-sample.
# Config: Cmd ["sh"], Env PATH. Reproducible: fixed mtimes (2024-01-01), owners 0:0,
# sorted entries, gzip without name or time, so the same busybox package gives the same
# digests. Cached under ${NESTOR_CACHE:-$HOME/.cache/nestor}/images/busybox-<hash of this
# script, the package version and arch>/; a second run only prints the path.
set -euo pipefail

log() { echo "build-busybox-image: $*" >&2; }

if ! dpkg -s busybox-static >/dev/null 2>&1; then
    log "installing busybox-static"
    DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >&2; }
fi
version=$(dpkg-query -W -f '${Version}' busybox-static)
arch=$(dpkg --print-architecture)
script="${BASH_SOURCE[0]}"
here=$(cd "$(dirname "$script")" && pwd)
hash=$( { cat "$script" "$here/lib/oci_layout.py"; echo "$version $arch"; } | sha256sum | cut -c1-16)
cache="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/images"
out="$cache/busybox-$hash"

if [ -f "$out/index.json" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.busybox-$hash.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "building busybox image from busybox-static $version ($arch)"

PYTHONPATH="$here/lib" python3 - "$tmp" /bin/busybox "$arch" "$version" <<'PY'
import subprocess, sys
from oci_layout import D, F, L, GZIP, PLAIN, build_tar, gzipped, write_layout

out, busybox, arch, version = sys.argv[1:5]
base = [(d, D, 0o755, None) for d in
        ["bin", "dev", "etc", "home", "proc", "run", "sbin", "sys", "usr", "usr/bin",
         "usr/sbin", "var", "var/cache", "var/cache/sample"]]
base += [("tmp", D, 0o1777, None), ("var/tmp", D, 0o1777, None), ("root", D, 0o700, None)]
with open(busybox, "rb") as f:
    base.append(("bin/busybox", F, 0o755, f.read()))
applets = subprocess.run([busybox, "--list-full"], check=True, capture_output=True, text=True).stdout.split()
for a in sorted(set(applets)):
    if a != "bin/busybox":
        base.append((a, L, 0o777, "/bin/busybox"))
text = lambda s: s.encode()
base += [
    ("etc/passwd", F, 0o644, text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")),
    ("etc/group", F, 0o644, text("root:x:0:\nnobody:x:65534:\n")),
    ("etc/hostname", F, 0o644, text("busybox\n")),
    ("etc/hosts", F, 0o644, text("127.0.0.1\tlocalhost\n::1\tlocalhost\n")),
    ("etc/motd", F, 0o644, text("this file is removed by a whiteout in layer 2\n")),
    ("var/cache/sample/old", F, 0o644, text("hidden by the opaque directory of layer 2\n")),
]
change = [
    ("etc", D, 0o755, None),
    ("etc/.wh.motd", F, 0o600, b""),
    ("etc/nestor-sample", F, 0o644, text(f"nestor busybox sample image, busybox-static {version}\n")),
    ("var", D, 0o755, None),
    ("var/cache", D, 0o755, None),
    ("var/cache/sample", D, 0o755, None),
    ("var/cache/sample/.wh..wh..opq", F, 0o600, b""),
    ("var/cache/sample/new", F, 0o644, text("added by layer 2\n")),
]
base_tar, change_tar = build_tar(base), build_tar(change)
base_gz = gzipped(base_tar)
config = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Cmd": ["sh"],
    "Labels": {"org.opencontainers.image.title": "nestor busybox sample",
               "org.opencontainers.image.version": version},
}
write_layout(out, "busybox:latest", arch, config,
             [(GZIP, base_gz, base_tar), (PLAIN, change_tar, change_tar)],
             ["build-busybox-image.sh: busybox-static " + version,
              "build-busybox-image.sh: whiteout /etc/motd, opaque /var/cache/sample"])
print(f"build-busybox-image: {len(applets)} applets, base layer {len(base_gz)} bytes gzipped", file=sys.stderr)
PY

chmod 0755 "$tmp"
# Atomic publish; a parallel build that got there first wins and ours is dropped.
if ! mv -T "$tmp" "$out" 2>/dev/null; then
    [ -f "$out/index.json" ] || { log "cannot publish $out"; exit 1; }
fi
trap - EXIT
rm -rf "$tmp"
log "built: $out"
echo "$(cd "$out" && pwd)"
