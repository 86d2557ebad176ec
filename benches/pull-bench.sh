#!/usr/bin/env bash
# Pull time from a local registry: `nestor pull` against `podman pull`, same image, same
# registry, same run, each from an empty store every time. The registry is Debian's
# docker-registry on 127.0.0.1 (plain HTTP); the image is the busybox sample plus four
# gzip layers made from this host's files (/usr/lib/python3.11, /usr/share/perl,
# /usr/lib/x86_64-linux-gnu/perl, /usr/share/doc/p*), pushed by podman. hyperfine runs
# the rounds; the result is the ratio of medians (nestor / podman; below 1 is faster).
# A benchmark run by hand, not a test:
#   benches/pull-bench.sh [ROUNDS]    (default 5; root, docker-registry, podman, hyperfine,
#                                      python3, the release build)
# NESTOR_BASELINE=PATH times that nestor binary too, in the same run (A/B of a change).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-5}
bin=${NESTOR_BIN_DIR:-$repo/target/release}/nestor
for t in docker-registry podman hyperfine python3; do
    command -v "$t" >/dev/null || { echo "pull-bench: $t is not installed (scripts/setup.sh)" >&2; exit 2; }
done
work=$(mktemp -d)
reg_pid=
cleanup() {
    [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null
    podman --root "$work/pod-src" --runroot "$work/pod-src-run" --storage-driver vfs rmi -a -f >/dev/null 2>&1 || true
    rm -rf "$work"
}
trap cleanup EXIT
log() { echo "pull-bench: $*" >&2; }

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
cat >"$work/registry.yml" <<EOF
version: 0.1
log:
  level: error
storage:
  filesystem:
    rootdirectory: $work/registry
http:
  addr: 127.0.0.1:$port
EOF
docker-registry serve "$work/registry.yml" >/dev/null 2>&1 &
reg_pid=$!
for _ in $(seq 100); do
    python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$port/v2/')" 2>/dev/null && break
    sleep 0.1
done

# The image: the sample's OCI layout plus four gzip layers.
sample=$("$repo/images/build-busybox-image.sh" 2>/dev/null | tail -n1)
cp -a "$sample" "$work/layout"
i=0
for src in usr/lib/python3.11 usr/share/perl usr/lib/x86_64-linux-gnu/perl 'usr/share/doc/p*'; do
    i=$((i + 1))
    # shellcheck disable=SC2086 # the last one is a glob on purpose
    (cd / && tar --owner=0 --group=0 -c $src 2>/dev/null) >"$work/layer$i.tar" || true
done
python3 - "$work" <<'EOF'
import gzip, hashlib, json, os, sys
w = sys.argv[1]; lay = os.path.join(w, "layout"); blobs = os.path.join(lay, "blobs", "sha256")
def put(b):
    d = hashlib.sha256(b).hexdigest(); open(os.path.join(blobs, d), "wb").write(b); return "sha256:" + d
def get(d): return open(os.path.join(blobs, d.split(":")[1]), "rb").read()
idx = json.load(open(os.path.join(lay, "index.json")))
man = json.loads(get(idx["manifests"][0]["digest"])); cfg = json.loads(get(man["config"]["digest"]))
for n in sorted(f for f in os.listdir(w) if f.startswith("layer")):
    raw = open(os.path.join(w, n), "rb").read()
    gz = gzip.compress(raw, 6, mtime=0)
    cfg["rootfs"]["diff_ids"].append("sha256:" + hashlib.sha256(raw).hexdigest())
    cfg.setdefault("history", []).append({"created_by": "pull-bench " + n})
    man["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": put(gz), "size": len(gz)})
c = json.dumps(cfg).encode(); man["config"] = {"mediaType": man["config"]["mediaType"], "digest": put(c), "size": len(c)}
m = json.dumps(man).encode()
idx["manifests"][0].update({"digest": put(m), "size": len(m)})
idx["manifests"][0]["annotations"] = {"org.opencontainers.image.ref.name": "pullbench:latest"}
json.dump(idx, open(os.path.join(lay, "index.json"), "w"))
print("layers:", len(man["layers"]), "compressed MiB:", round(sum(l["size"] for l in man["layers"]) / 2**20, 1), file=sys.stderr)
EOF
tar -C "$work/layout" -cf "$work/image.tar" .
pod_src=(podman --root "$work/pod-src" --runroot "$work/pod-src-run" --storage-driver vfs)
"${pod_src[@]}" load -q -i "$work/image.tar" >/dev/null
ref=127.0.0.1:$port/bench/pullbench:latest
"${pod_src[@]}" push -q --tls-verify=false localhost/pullbench:latest "$ref"
log "image pushed: $ref"

# podman's own storage as podman is usually set up (overlay), in a root of its own.
driver=overlay
podman --root "$work/pod" --runroot "$work/pod-run" --storage-driver overlay info >/dev/null 2>&1 || driver=vfs
log "podman storage driver: $driver; $rounds rounds each"
pod="podman --root $work/pod --runroot $work/pod-run --storage-driver $driver"
base=()
if [ -n "${NESTOR_BASELINE:-}" ]; then
    base=(--prepare "rm -rf $work/nroot"
        "NESTOR_ROOT=$work/nroot NESTOR_STATE=$work/nstate $NESTOR_BASELINE pull -q --tls-verify=false $ref")
fi
hyperfine --runs "$rounds" --warmup 1 --export-json "$work/result.json" \
    --prepare "rm -rf $work/nroot" \
    "NESTOR_ROOT=$work/nroot NESTOR_STATE=$work/nstate $bin pull -q --tls-verify=false $ref" \
    --prepare "$pod rmi -a -f >/dev/null 2>&1; true" \
    "$pod pull -q --tls-verify=false $ref" "${base[@]}" >&2
python3 - "$work/result.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))["results"]
n, p = r[0]["median"], r[1]["median"]
print(f"nestor pull {n:.3f} s, podman pull {p:.3f} s (medians); ratio nestor/podman {n / p:.2f}", end="")
if len(r) > 2:
    b = r[2]["median"]
    print(f"; baseline {b:.3f} s, ratio {b / p:.2f}", end="")
print()
EOF
