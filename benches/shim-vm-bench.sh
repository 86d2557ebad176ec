#!/usr/bin/env bash
# containerd's shim in VM mode against its peers, start to exit of `true` on the busybox
# sample image, interleaved in one run of one host, medians:
#   ctr run --rm (shim, VM mode)      vs  nestor run --vm --rm --network none  (the shim's
#                                          cost on VM mode)
#   ctr run --rm (shim, sandbox mode: a container joining a running pod VM)
#                                     vs  the shim's VM mode (a VM booted per container)
#   ctr run --rm (shim, native mode)  vs  nestor run --rm --network none       (native)
#   ctr run --rm (runc's shim, Debian's runc)                                  (containerd's
#                                          own share, when runc is installed)
# (`--network none`: ctr gives a container no network unless asked, nestor run a bridge.)
# containerd is a private one on the work tmpfs (tests/kvm/lib/containerd-env.sh).
#   shim-vm-bench.sh [--runs N]        (default 3: 2N nested VM launches, plus one warm-up
#                                       of each kind and the pod's sandbox)
# Runs in the KVM test host unless this host has hardware KVM. A benchmark run by hand,
# not a test (the TCG test host's kernel can fail after ~30 nested launches per boot).
set -euo pipefail
limit=900
runs=3
script_opt() {
    case $1 in
    --runs) runs=$2; return 2 ;;
    esac
    return 0
}
bench_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)
source "$bench_repo/tests/kvm/lib/prelude.sh"
# prelude.sh takes its paths from the script that sources it: point them at tests/kvm.
here=$bench_repo/tests/kvm repo=$bench_repo tdir=${CARGO_TARGET_DIR:-$bench_repo/target}
[[ -x $tdir/release/containerd-shim-nestor-v2 ]] || die2 "no containerd-shim-nestor-v2 (cargo build --release -p nestor-shim)"
source "$here/lib/vm-env.sh"
source "$here/lib/containerd-env.sh"

shim_vm=(--runtime io.containerd.nestor.v2 --annotation nestor.io/mode=vm)
shim_nat=(--runtime io.containerd.nestor.v2)
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
# Warm-up: one of each (page cache, the image's erofs disk, the snapshot).
cx run --rm "${shim_vm[@]}" "$image" warm-v true
n run --vm --rm --network none busybox true
cx run --rm "${shim_nat[@]}" "$image" warm-n true
n run --rm --network none busybox true
# The pod the sandbox-mode containers join (one VM for every round).
pod_id=bench-pod-$$
shim_pod=(--runtime io.containerd.nestor.v2 --annotation nestor.io/mode=sandbox
    --annotation io.kubernetes.cri.sandbox-id=$pod_id)
cx run -d "${shim_pod[@]}" --annotation io.kubernetes.cri.container-type=sandbox "$image" "$pod_id" sleep 100000
on_exit 'cx task kill -s KILL '"$pod_id"'; sleep 1; cx task rm -f '"$pod_id"'; cx c rm '"$pod_id"
shim_podc=("${shim_pod[@]}" --annotation io.kubernetes.cri.container-type=container)
cx run --rm "${shim_podc[@]}" "$image" warm-p true
have_runc=0
if command -v runc >/dev/null; then
    have_runc=1
    cx run --rm --runtime io.containerd.runc.v2 "$image" warm-r true
fi
declare -a a b c d r p
for i in $(seq "$runs"); do
    echo "shim-vm-bench: round $i/$runs" >&2
    s=$(date +%s%N); cx run --rm "${shim_vm[@]}" "$image" b-v true || bad "shim VM run failed"; a+=($(ms "$s"))
    s=$(date +%s%N); n run --vm --rm --network none busybox true || bad "run --vm failed"; b+=($(ms "$s"))
    s=$(date +%s%N); cx run --rm "${shim_podc[@]}" "$image" b-p true || bad "shim sandbox-mode run failed"; p+=($(ms "$s"))
    s=$(date +%s%N); cx run --rm "${shim_nat[@]}" "$image" b-n true || bad "shim native run failed"; c+=($(ms "$s"))
    s=$(date +%s%N); n run --rm --network none busybox true || bad "native run failed"; d+=($(ms "$s"))
    if ((have_runc)); then
        s=$(date +%s%N); cx run --rm --runtime io.containerd.runc.v2 "$image" b-r true || bad "runc run failed"; r+=($(ms "$s"))
    fi
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print v[int((NR+1)/2)]}'; }
ma=$(median "${a[@]}") mb=$(median "${b[@]}") mc=$(median "${c[@]}") md=$(median "${d[@]}")
mp=$(median "${p[@]}")
ratio() { awk -v x="$1" -v y="$2" 'BEGIN{printf "%.2fx, %+d ms", x/y, x-y}'; }
echo "shim-vm-bench$label, $runs rounds, medians (all samples: ${a[*]} | ${b[*]} | ${c[*]} | ${d[*]} ms):"
echo "  ctr run --rm, shim VM mode:      $ma ms  ($(ratio "$ma" "$mb") against nestor run --vm)"
echo "  nestor run --vm --rm:            $mb ms"
echo "  ctr run --rm, shim sandbox mode: $mp ms  (samples ${p[*]}; a container joining the pod's VM: $(ratio "$mp" "$ma") against VM mode)"
echo "  ctr run --rm, shim native mode:  $mc ms  ($(ratio "$mc" "$md") against nestor run)"
echo "  nestor run --rm:                 $md ms"
if ((have_runc)); then
    mr=$(median "${r[@]}")
    echo "  ctr run --rm, runc's shim:       $mr ms  (samples ${r[*]}; the shim's native mode: $(ratio "$mc" "$mr"))"
fi
finish
