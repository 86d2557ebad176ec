#!/usr/bin/env bash
# Start-to-exit of a networked container: `nestor run --rm busybox true` on nestor's
# default network (bridge, NAT: a veth, an address, the network's rules) against
# `podman --runtime runc run --rm busybox true` on podman's default network (netavark),
# and, with
# --alt BINDIR, another nestor build (e.g. the one before a change) on a data root of
# its own. Same image, same host, same run; hyperfine alternates nothing but the
# command. Prints the medians and their ratios (nestor / podman, nestor / alt; below 1
# is faster). A benchmark run by hand, not a test:
#   benches/net-start-bench.sh [--runs N] [--alt BINDIR]   (root, podman, hyperfine,
#                                                           the release build)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runs=20 alt=
while (($#)); do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --alt) alt=$2; shift 2 ;;
    *) echo "usage: $0 [--runs N] [--alt BINDIR]" >&2; exit 2 ;;
    esac
done
bindir=${NESTOR_BIN_DIR:-$repo/target/release}
for t in podman hyperfine python3; do
    command -v "$t" >/dev/null || { echo "net-start-bench: $t is not installed (scripts/setup.sh)" >&2; exit 2; }
done
[ -x "$bindir/nestor" ] || { echo "net-start-bench: build first (cargo build --release)" >&2; exit 2; }
[[ -z $alt || -x $alt/nestor ]] || { echo "net-start-bench: no nestor in $alt" >&2; exit 2; }
log() { echo "net-start-bench: $*" >&2; }
image=$("$repo/images/build-busybox-image.sh" | tail -n 1)
work=$(mktemp -d /tmp/nestor-net-start.XXXXXX)
p=(podman --root "$work/podman" --runroot "$work/podman-run" --storage-driver overlay)
cleanup() {
    "${p[@]}" rm -af >/dev/null 2>&1 || true
    "${p[@]}" rmi -af >/dev/null 2>&1 || true
    for r in "$work/root" "$work/alt-root"; do
        [[ -d $r/networks ]] || continue
        # The default network (its bridge, rules and subnet claim).
        NESTOR_ROOT=$r "$bindir/nestor" network rm nestor >/dev/null 2>&1 || true
    done
    umount -R "$work/root" "$work/alt-root" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

log "importing busybox into nestor's data root(s) and podman's store"
NESTOR_ROOT=$work/root "$bindir/nestor" image import "$image" >/dev/null
NESTOR_ROOT=$work/root "$bindir/nestor" save -o "$work/busybox.tar" busybox
"${p[@]}" load -q -i "$work/busybox.tar" >/dev/null
cmds=("env NESTOR_ROOT=$work/root $bindir/nestor run --rm busybox true")
names=(nestor)
if [[ -n $alt ]]; then
    NESTOR_ROOT=$work/alt-root "$alt/nestor" image import "$image" >/dev/null
    cmds+=("env NESTOR_ROOT=$work/alt-root $alt/nestor run --rm busybox true")
    names+=(alt)
fi
# podman with runc (crun refuses this host's hybrid cgroups) and limits this host
# allows (podman's default open-files limit is above the hard limit here).
cmds+=("${p[*]} --runtime runc run --rm --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 localhost/busybox true")
names+=(podman)
args=()
for i in "${!cmds[@]}"; do args+=(-n "${names[$i]}" "${cmds[$i]}"); done
log "hyperfine: ${#cmds[@]} commands, $runs runs each (2 warm-up runs: the default networks are made then)"
hyperfine -N --style basic --warmup 2 --runs "$runs" --export-json "$work/h.json" "${args[@]}" >&2
python3 - "$work/h.json" <<'PY'
import json, sys
r = {x["command"]: x for x in json.load(open(sys.argv[1]))["results"]}
med = {k: v["median"] * 1000 for k, v in r.items()}
print("| command | median start-to-exit |")
print("|---|---|")
for k, v in med.items():
    print(f"| {k} | {v:.1f} ms |")
n = med["nestor"]
print(f"\nnestor / podman: {n / med['podman']:.2f}x")
if "alt" in med:
    print(f"nestor / alt: {n / med['alt']:.2f}x")
PY
