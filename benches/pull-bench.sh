#!/usr/bin/env bash
# Pull time from a local registry: `nestor pull` against `podman pull`, same image, same
# registry, same run, each from an empty store every time. The registry is Debian's
# docker-registry on 127.0.0.1 (plain HTTP); the image is the busybox sample plus four
# gzip layers made from this host's files (/usr/lib/python3.11, /usr/share/perl,
# /usr/lib/x86_64-linux-gnu/perl, /usr/share/doc/p*), pushed by podman. The rounds
# interleave the pullers; the result is the median of the rounds' ratios (nestor /
# podman; below 1 is faster) with its 95% interval. Both pullers' stores live on a fresh
# journaled ext4 (Debian's default) loop-mounted for the run: this host's root is an
# ext4 without a journal, whose inode allocator skips every inode freed in the last
# minutes (ext4's `recently_deleted`, checked only without a journal), so emptying a
# store right before a round made the next round's file creations scan past the last
# round's freed inodes, slower round after round (nestor 0.7 s to 2.1 s over 8 rounds).
# A benchmark run by hand, not a test:
#   benches/pull-bench.sh [ROUNDS]    (default 5, plus one warm-up round; root,
#                                      docker-registry, podman, python3, the release build)
# NESTOR_BASELINE=PATH times that nestor binary too, in the same run (A/B of a change).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-5}
bin=${NESTOR_BIN_DIR:-$repo/target/release}/nestor
for t in docker-registry podman python3; do
    command -v "$t" >/dev/null || { echo "pull-bench: $t is not installed (scripts/setup.sh)" >&2; exit 2; }
done
work=$(mktemp -d)
reg_pid=
cleanup() {
    [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null
    podman --root "$work/pod-src" --runroot "$work/pod-src-run" --storage-driver vfs rmi -a -f >/dev/null 2>&1 || true
    mountpoint -q "$work/st" 2>/dev/null && { umount "$work/st" 2>/dev/null || umount -l "$work/st"; }
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

# The stores' file system: fresh, journaled, the same for both pullers.
truncate -s 8G "$work/stores.img"
mkfs.ext4 -q -F "$work/stores.img"
mkdir "$work/st"
mount -o loop "$work/stores.img" "$work/st"
st=$work/st
# podman's own storage as podman is usually set up (overlay), in a root of its own.
driver=overlay
podman --root "$st/pod" --runroot "$work/pod-run" --storage-driver overlay info >/dev/null 2>&1 || driver=vfs
log "podman storage driver: $driver; $rounds rounds, interleaved"
pod="podman --root $st/pod --runroot $work/pod-run --storage-driver $driver"
# Rounds interleave the pullers (the order rotates every round), so a load that drifts on
# a shared machine falls on all of them alike; each round's ratio is nestor / podman from
# the same round. Every puller starts from an empty store each time (not timed).
names=(nestor podman)
cmds=("env NESTOR_ROOT=$st/nroot NESTOR_STATE=$work/nstate $bin pull -q --tls-verify=false $ref"
    "$pod pull -q --tls-verify=false $ref")
preps=("rm -rf $st/nroot" "$pod rmi -a -f >/dev/null 2>&1; true")
if [ -n "${NESTOR_BASELINE:-}" ]; then
    names+=(baseline)
    cmds+=("env NESTOR_ROOT=$st/nroot NESTOR_STATE=$work/nstate $NESTOR_BASELINE pull -q --tls-verify=false $ref")
    preps+=("rm -rf $st/nroot")
fi
k=${#names[@]}
: >"$work/times"
for ((round = 0; round <= rounds; round++)); do
    for ((j = 0; j < k; j++)); do
        i=$(((j + round) % k))
        bash -c "${preps[i]}"
        sync
        t0=$(date +%s%N)
        bash -c "${cmds[i]}" >/dev/null || { log "${names[i]} pull failed"; exit 1; }
        t1=$(date +%s%N)
        # Round 0 warms the registry's and the page cache's side up: not counted.
        ((round == 0)) || echo "$round ${names[i]} $(((t1 - t0) / 1000))" >>"$work/times"
    done
    ((round == 0)) || log "round $round of $rounds: $(awk -v r="$round" '$1 == r {printf "%s %.2f s  ", $2, $3 / 1e6}' "$work/times")"
done
python3 - "$work/times" <<'EOF'
import math, statistics, sys
t = {}
for line in open(sys.argv[1]):
    r, name, us = line.split()
    t.setdefault(name, {})[int(r)] = int(us) / 1e6
rounds = sorted(t["nestor"])
def interval(a, b):
    # Student's t on the per-round log ratios (as nestor bench does): the ratio's 95% interval.
    logs = [math.log(t[a][r] / t[b][r]) for r in rounds]
    n = len(logs)
    ratio = statistics.median(math.exp(x) for x in logs)
    if n < 2:
        return ratio, None
    tq = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23,
          11: 2.20, 12: 2.18, 13: 2.16, 14: 2.14, 15: 2.13, 16: 2.12, 17: 2.11, 18: 2.10, 19: 2.09}.get(n - 1, 2.0)
    m, sd = statistics.mean(logs), statistics.stdev(logs)
    h = tq * sd / math.sqrt(n)
    return ratio, (math.exp(m - h), math.exp(m + h))
med = {k: statistics.median(v.values()) for k, v in t.items()}
ratio, ci = interval("nestor", "podman")
out = f"nestor pull {med['nestor']:.3f} s, podman pull {med['podman']:.3f} s (medians of {len(rounds)} interleaved rounds); nestor/podman {ratio:.2f} (median of the rounds' ratios)"
if ci:
    verdict = "no measurable difference" if ci[0] <= 1 <= ci[1] else ("faster" if ci[1] < 1 else "slower")
    out += f", 95% interval {ci[0]:.2f}-{ci[1]:.2f}: {verdict}"
if "baseline" in t:
    b, bci = interval("baseline", "podman")
    out += f"; baseline {med['baseline']:.3f} s, baseline/podman {b:.2f}"
    if bci:
        out += f" ({bci[0]:.2f}-{bci[1]:.2f})"
print(out)
EOF
