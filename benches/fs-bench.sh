#!/usr/bin/env bash
# Shared directories compared: one directory read and written by a host process, by a
# native container (bind mount), by a container in a microVM over virtio-fs (virtiofsd
# with --cache auto, always and never), and, for reference, an ext4 image on the same
# file system as a virtio-blk volume disk. Each runs the same static `nestor workload`:
# disk (1 MiB sequential write + fdatasync and read with the cache dropped first, 4 KiB
# random read and write; O_DIRECT where the file system takes it, else buffered) and
# meta (create + stat + rename + unlink of small files). Printed as values and as ratios
# to the host process.
#   fs-bench.sh [--mib N] [--secs S]      (defaults 64 MiB, 2 s per timed pattern)
# Runs in the KVM test host unless this host has hardware KVM; there the directory is on
# a tmpfs (the test host's root is 9p + overlay), so the figures compare the transports,
# not a disk. A benchmark, not a test: not part of scripts/test.sh (4 VM boots).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
mib=64 secs=2
script_opt() {
    case $1 in
    --mib) mib=$2; return 2 ;;
    --secs) secs=$2; return 2 ;;
    esac
    return 0
}
limit=900
source "$repo/tests/kvm/lib/prelude.sh"
# The prelude places the checkout from tests/kvm; this script lives in benches/.
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
tdir=${CARGO_TARGET_DIR:-$repo/target}
find_static_bins
source "$repo/tests/kvm/lib/vm-env.sh"

dir=$work/fsb
tools=$work/tools
mkdir -p "$dir" "$tools"
cp "$nestor_static" "$tools/nestor"
img=$work/blk.img
truncate -s $((mib * 2 + 64))M "$img"
mkfs.ext4 -q -F "$img"
res=$work/results
: >"$res"
wl="/t/nestor workload disk --disk /w/bench.dat --disk-mib $mib --secs $secs; /t/nestor workload meta --disk /w --secs $secs"

record() { # MODE < output
    sed -n "s/^NESTOR-WORKLOAD /$1 /p" | tr -d '\r' | tee -a "$res" >&2
}
echo "fs-bench: host process" >&2
{ "$tools/nestor" workload disk --disk "$dir/bench.dat" --disk-mib "$mib" --secs "$secs"
  "$tools/nestor" workload meta --disk "$dir" --secs "$secs"; } | record host
echo "fs-bench: native container, bind mount" >&2
n run --rm -v "$tools:/t:ro" -v "$dir:/w" busybox sh -c "$wl" | record native-bind
for cache in auto always never; do
    echo "fs-bench: microVM, virtio-fs cache=$cache" >&2
    n run --vm --rm --vm-fs-cache "$cache" -v "$tools:/t:ro" -v "$dir:/w" busybox sh -c "$wl" |
        record "virtio-fs-$cache"
done
echo "fs-bench: microVM, virtio-blk (ext4 image on the same file system)" >&2
n run --vm --rm -v "$tools:/t:ro" -v "$img:/w" busybox sh -c "$wl" | record virtio-blk

python3 - "$res" "$label" <<'EOF'
import json, sys
rows, label = {}, sys.argv[2]
for line in open(sys.argv[1]):
    mode, _, js = line.partition(" ")
    v = json.loads(js)
    if "value" in v:
        rows.setdefault(v["workload"], {})[mode] = (v["value"], v["unit"], v.get("detail", {}).get("direct"))
modes = ["host", "native-bind", "virtio-fs-auto", "virtio-fs-always", "virtio-fs-never", "virtio-blk"]
print(f"shared directory benchmark{label}")
print(f"{'workload':<16} {'unit':<8} " + " ".join(f"{m:>17}" for m in modes))
for w, by in rows.items():
    unit = next(iter(by.values()))[1]
    base = by.get("host", (None,))[0]
    cells = []
    for m in modes:
        if m not in by:
            cells.append(f"{'-':>17}")
            continue
        val, _, d = by[m]
        ratio = f"{val / base:.2f}x" if base else "?"
        flag = "" if d is None else ("D" if d else "b")
        cells.append(f"{val:>9.0f} {ratio:>6}{flag}")
    print(f"{w:<16} {unit:<8} " + " ".join(cells))
print("ratios to the host process on the same directory; D = O_DIRECT, b = buffered (cache dropped)")
EOF
finish
