#!/usr/bin/env bash
# Builds the redis sample container image offline, from Debian's redis-server, as an OCI
# image layout directory, and prints its absolute path as the last line of stdout.
#
# The image (reference name "redis:latest", which nestor shows as localhost/redis:latest
# and finds as "redis") has one gzip layer: redis-server and the shared libraries it
# loads (from ldd, at the same paths), /etc/passwd and /etc/group (root, redis, nobody),
# /data (the working directory, owned by redis), /tmp (1777). No shell: the image runs
# one program. Config: Entrypoint ["redis-server"], Cmd with no persistence and protected
# mode off (it listens on the container's own address; publish a port to reach it),
# ExposedPorts 6379/tcp, User redis. Reproducible (images/lib/oci_layout.py); cached
# under ${NESTOR_CACHE:-$HOME/.cache/nestor}/images/redis-<hash of this script, the
# layout library, the package version and arch>/; a second run only prints the path.
set -euo pipefail

log() { echo "build-redis-image: $*" >&2; }

if ! dpkg -s redis-server >/dev/null 2>&1; then
    log "installing redis-server"
    DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2 ||
        { apt-get update >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y redis-server >&2; }
fi
version=$(dpkg-query -W -f '${Version}' redis-server)
arch=$(dpkg --print-architecture)
script="${BASH_SOURCE[0]}"
here=$(cd "$(dirname "$script")" && pwd)
hash=$( { cat "$script" "$here/lib/oci_layout.py"; echo "$version $arch"; } | sha256sum | cut -c1-16)
cache="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/images"
out="$cache/redis-$hash"

if [ -f "$out/index.json" ]; then
    log "cached: $out"
    echo "$out"
    exit 0
fi

mkdir -p "$cache"
tmp=$(mktemp -d "$cache/.redis-$hash.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
log "building redis image from redis-server $version ($arch)"
server=$(readlink -f /usr/bin/redis-server)
# Every library the loader maps, by the path ldd names (the loader's own included).
libs=$(ldd "$server" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }' | sort -u)

PYTHONPATH="$here/lib" python3 - "$tmp" "$server" "$arch" "$version" $libs <<'PY'
import os, sys
from oci_layout import D, F, GZIP, build_tar, gzipped, write_layout

out, server, arch, version, *libs = sys.argv[1:]
entries, dirs = [], set()

def add_dirs(path):
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        dirs.add("/".join(parts[:i]))

def add_file(path, src, mode):
    with open(src, "rb") as f:
        entries.append((path, F, mode, f.read()))
    add_dirs(path)

add_file("usr/bin/redis-server", server, 0o755)
for lib in libs:
    add_file(lib.lstrip("/"), os.path.realpath(lib), 0o755)
text = lambda s: s.encode()
for path, body in [
    ("etc/passwd", "root:x:0:0:root:/root:/sbin/nologin\nredis:x:999:999:redis:/data:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n"),
    ("etc/group", "root:x:0:\nredis:x:999:\nnobody:x:65534:\n"),
    ("etc/hostname", "redis\n"),
    ("etc/hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost\n"),
]:
    entries.append((path, F, 0o644, text(body)))
    add_dirs(path)
dirs.update(["dev", "proc", "sys", "run", "root", "tmp"])
entries += [(d, D, 0o1777 if d == "tmp" else 0o700 if d == "root" else 0o755, None)
            for d in sorted(dirs) if d]
entries.append(("data", D, 0o755, None, 999))
layer = build_tar(entries)
layer_gz = gzipped(layer)
config = {
    "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
    "Entrypoint": ["redis-server"],
    "Cmd": ["--protected-mode", "no", "--save", "", "--appendonly", "no"],
    "ExposedPorts": {"6379/tcp": {}},
    "WorkingDir": "/data",
    "User": "redis",
    "Labels": {"org.opencontainers.image.title": "nestor redis sample",
               "org.opencontainers.image.version": version},
}
write_layout(out, "redis:latest", arch, config, [(GZIP, layer_gz, layer)],
             ["build-redis-image.sh: redis-server " + version + " and its libraries"])
print(f"build-redis-image: {len(libs)} libraries, layer {len(layer_gz)} bytes gzipped", file=sys.stderr)
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
