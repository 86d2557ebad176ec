#!/usr/bin/env bash
# Scenario 1's cost: `nestor run --vm --rm busybox true` against a plain microVM boot of
# the same kernel and initramfs (nestor-vmm, the agent running `true` from the kernel
# command line) and a native `nestor run --rm busybox true`, interleaved in one run,
# medians, with the breakdown of the VM run (NESTOR_VM_TIMINGS).
#   run-vm-bench.sh [--runs N]
# Runs in the KVM test host unless this host has hardware KVM. A benchmark, not a test:
# not part of scripts/test.sh (the TCG test host has stalled during its run of nested
# launches; run it by hand).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/.." && pwd)
runs=3 direct=0
args=("$@")
while (($#)); do
    case $1 in
    --runs) runs=$2; shift 2 ;;
    --direct) direct=1; shift ;;
    *) echo "run-vm-bench.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
set -- "${args[@]}"
source "$repo/tests/kvm/lib/vm-env.sh"

# Benchmark: plain microVM vs run --vm vs native, interleaved, medians.
cmd_b64=$(printf 'true' | base64 -w0)
declare -a t_vm t_run t_native
breakdown=$work/breakdown
for i in $(seq "$runs"); do
    echo "bench: run $i/$runs" >&2
    s=$(date +%s%N)
    timeout 120 "$bin/nestor-vmm" --kernel "$NESTOR_VM_KERNEL" --initrd "$NESTOR_VM_INITRD" \
        --cmdline "console=ttyS0 reboot=t panic=-1 quiet nestor.cmd=$cmd_b64" --mem 256 \
        --console none >/dev/null 2>&1 || true
    t_vm+=($((($(date +%s%N) - s) / 1000000)))
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --rm busybox true 2>>"$breakdown" || true
    t_run+=($((($(date +%s%N) - s) / 1000000)))
    s=$(date +%s%N)
    n run --rm busybox true || true
    t_native+=($((($(date +%s%N) - s) / 1000000)))
done
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
mv=$(median "${t_vm[@]}") mr=$(median "${t_run[@]}") mn=$(median "${t_native[@]}")
echo "bench$label, $runs runs each, medians:"
echo "  plain microVM boot + exit (nestor-vmm, agent runs true): $mv ms"
echo "  nestor run --vm --rm busybox true:                       $mr ms ($(awk -v a="$mr" -v b="$mv" 'BEGIN{printf "%.2fx", a/b}') of the plain microVM; +$((mr - mv)) ms)"
echo "  nestor run --rm busybox true (native):                   $mn ms"
python3 - "$breakdown" <<'PY'
import json, statistics, sys
rows = [json.loads(l.split(": ", 1)[1]) for l in open(sys.argv[1]) if l.startswith("nestor-vm-timings: ")]
if rows:
    keys = ["before_vmm_ms", "vmm_spawned_ms", "guest_init_ms", "agent_ready_ms", "attached_ms", "container_started_ms", "container_exited_ms", "vm_gone_ms", "done_ms"]
    print("  run --vm breakdown (median ms from VMM spawn):", ", ".join(
        f"{k[:-3]} {statistics.median([r[k] for r in rows if r.get(k) is not None]):.0f}"
        for k in keys if any(r.get(k) is not None for r in rows)))
PY
exit $fail
