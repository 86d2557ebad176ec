#!/usr/bin/env bash
# Container start-to-exit through containerd: `ctr run --rm IMAGE ID true` with the
# nestor shim (io.containerd.nestor.v2) against the runc shim (io.containerd.runc.v2,
# Debian's runc), same containerd, same image, same run. containerd is started here
# with its own config, root, state and socket in a temp dir (CRI off), the busybox
# sample image imported. hyperfine runs the rounds, alternating nothing but the runtime;
# the result is the ratio of medians (nestor / runc; below 1 is faster; the goal is
# <= 1.0). A benchmark run by hand, not a test:
#   benches/shim-bench.sh [ROUNDS]    (default 20; root, containerd, runc, hyperfine,
#                                      the release build)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-20}
bindir=${NESTOR_BIN_DIR:-$repo/target/release}
for t in containerd ctr runc hyperfine python3; do
    command -v "$t" >/dev/null || { echo "shim-bench: $t is not installed (scripts/setup.sh)" >&2; exit 2; }
done
[ -x "$bindir/containerd-shim-nestor-v2" ] && [ -x "$bindir/nestor" ] ||
    { echo "shim-bench: build first (cargo build --release --workspace)" >&2; exit 2; }
log() { echo "shim-bench: $*" >&2; }
work=$(mktemp -d /tmp/nestor-shim-bench.XXXXXX)
ns=shim-bench-$$
ctrd_pid=
ctr() { command ctr -a "$work/containerd.sock" -n "$ns" "$@"; }
cleanup() {
    for c in $(ctr c ls -q 2>/dev/null); do
        ctr task kill -s KILL "$c" >/dev/null 2>&1 || true
        ctr task rm -f "$c" >/dev/null 2>&1 || true
        ctr c rm "$c" >/dev/null 2>&1 || true
    done
    [ -n "$ctrd_pid" ] && kill "$ctrd_pid" 2>/dev/null && wait "$ctrd_pid" 2>/dev/null || true
    awk '{print $5}' /proc/self/mountinfo | grep "^$work/" | sort -r | xargs -r -n1 umount -l 2>/dev/null || true
    rm -rf "$work" "/run/containerd/nestor/$ns"
    for d in /sys/fs/cgroup/*/"$ns"; do [ -d "$d" ] && rmdir "$d" 2>/dev/null; done
    true
}
trap cleanup EXIT

cat >"$work/config.toml" <<CFG
version = 2
root = "$work/root"
state = "$work/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$work/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$work/opt"
CFG
PATH="$bindir:$PATH" containerd --config "$work/config.toml" >"$work/containerd.log" 2>&1 &
ctrd_pid=$!
for _ in $(seq 200); do ctr version >/dev/null 2>&1 && break; sleep 0.05; done
ctr version >/dev/null || { log "containerd did not start"; tail "$work/containerd.log" >&2; exit 1; }
layout=$("$repo/images/build-busybox-image.sh" | tail -n 1)
tar -C "$layout" -cf "$work/busybox.tar" .
ctr image import "$work/busybox.tar" >/dev/null
image=$(ctr image ls -q | head -n 1)
log "containerd $(containerd --version | awk '{print $3}'), runc $(runc --version | head -n1 | awk '{print $3}'), image $image, $rounds rounds each"

# A run of each first (the shims' pages, the snapshot), then the measured rounds (the
# same id each round: --rm removes the container before the next).
ctr run --rm --runtime io.containerd.nestor.v2 "$image" warm-n true
ctr run --rm --runtime io.containerd.runc.v2 "$image" warm-r true
hyperfine --style basic -N --warmup 2 --runs "$rounds" --export-json "$work/h.json" \
    -n nestor "ctr -a $work/containerd.sock -n $ns run --rm --runtime io.containerd.nestor.v2 $image bench-n true" \
    -n runc "ctr -a $work/containerd.sock -n $ns run --rm --runtime io.containerd.runc.v2 $image bench-r true" \
    >&2 2>&1 || true
python3 - "$work/h.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
n, c = r["nestor"]["median"], r["runc"]["median"]
print(f"ctr run --rm true: nestor shim {n*1000:.1f} ms, runc shim {c*1000:.1f} ms (medians); ratio {n/c:.2f}x (goal <= 1.0)")
PY
