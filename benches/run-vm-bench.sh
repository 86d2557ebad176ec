#!/usr/bin/env bash
# Scenario 1's cost: `nestor run --vm --rm busybox true` against a plain microVM boot of
# the same kernel and initramfs (nestor-vmm, the agent running `true` from the kernel
# command line) and a native `nestor run --rm busybox true`, interleaved in one run,
# medians, with the breakdown of each VM run (NESTOR_VM_TIMINGS; times from the VMM's
# spawn, the network's attachment before it). `run --vm` is timed with its defaults (a
# jail, the default network), with --no-jail, and with --no-jail --network none (the
# same work as the plain microVM plus the container). Warm starts (`--vm-warm`: the VM
# restored from its shape's template, made by one untimed run first) are timed with the
# defaults and with --no-jail --network none, each against its cold row. Last, one
# untimed run prints the guest runtime's own steps (its log on the guest console,
# `nestor.agent.log`).
#   run-vm-bench.sh [--runs N] [--alt BINDIR INITRD] [prelude options: --nestor ...]
# --alt adds a row for another build, interleaved with the others: `run --vm --no-jail
# --network none` (the row with the least noise) with nestor and nestor-vmm from BINDIR
# booting INITRD (give paths under the checkout or $NESTOR_CACHE, the directories the
# test host shares).
# Runs in the KVM test host unless this host has hardware KVM. A benchmark, not a test:
# not part of scripts/test.sh (the TCG test host has stalled during its run of nested
# launches; run it by hand).
set -euo pipefail
runs=3 alt_bin= alt_initrd=
script_opt() {
    case $1 in
    --runs) runs=$2; return 2 ;;
    --alt) alt_bin=$2 alt_initrd=$3; return 3 ;;
    esac
    return 0
}
limit=900
source "$(dirname "${BASH_SOURCE[0]}")/../tests/kvm/lib/prelude.sh"
source "$repo/tests/kvm/lib/vm-env.sh"
if [[ -n $alt_bin ]]; then
    # Like $bin: run from the tmpfs inside the test host (9p keeps no page cache).
    mkdir "$work/alt"
    cp "$alt_bin/nestor" "$alt_bin/nestor-vmm" "$work/alt/"
    alt_bin=$work/alt
fi

# Benchmark: plain microVM vs run --vm (vs the --alt build's) vs native, interleaved,
# medians.
cmd_b64=$(printf 'true' | base64 -w0)
declare -a t_vm t_run t_nojail t_bare t_alt t_native t_warm t_warm_bare
warm_breakdown=$work/warm-breakdown warm_bare_breakdown=$work/warm-bare-breakdown
# The templates of the two warm shapes, made before anything is timed.
n run --vm --vm-warm --rm busybox true >/dev/null 2>&1 || echo "bench: the warm template (defaults) was not made" >&2
n run --vm --vm-warm --no-jail --network none --rm busybox true >/dev/null 2>&1 ||
    echo "bench: the warm template (--network none) was not made" >&2
breakdown=$work/breakdown alt_breakdown=$work/alt-breakdown
nojail_breakdown=$work/nojail-breakdown bare_breakdown=$work/bare-breakdown
ms_since() { echo $((($(date +%s%N) - $1) / 1000000)); }
for i in $(seq "$runs"); do
    echo "bench: run $i/$runs" >&2
    s=$(date +%s%N)
    timeout 120 "$bin/nestor-vmm" --kernel "$NESTOR_VM_KERNEL" --initrd "$NESTOR_VM_INITRD" \
        --cmdline "console=ttyS0 reboot=t panic=-1 quiet nestor.cmd=$cmd_b64" --mem 256 \
        --console none >/dev/null 2>&1 || true
    t_vm+=("$(ms_since "$s")")
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --rm busybox true 2>>"$breakdown" || true
    t_run+=("$(ms_since "$s")")
    # The defaults (a jail, the default network) against the VM alone: what each adds.
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --no-jail --rm busybox true 2>>"$nojail_breakdown" || true
    t_nojail+=("$(ms_since "$s")")
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --no-jail --network none --rm busybox true 2>>"$bare_breakdown" || true
    t_bare+=("$(ms_since "$s")")
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --vm-warm --rm busybox true 2>>"$warm_breakdown" || true
    t_warm+=("$(ms_since "$s")")
    s=$(date +%s%N)
    NESTOR_VM_TIMINGS=1 n run --vm --vm-warm --no-jail --network none --rm busybox true 2>>"$warm_bare_breakdown" || true
    t_warm_bare+=("$(ms_since "$s")")
    if [[ -n $alt_bin ]]; then
        s=$(date +%s%N)
        NESTOR_VM_TIMINGS=1 NESTOR_VM_INITRD=$alt_initrd timeout --kill-after=5 240 \
            "$alt_bin/nestor" run --vm --no-jail --network none --rm busybox true 2>>"$alt_breakdown" || true
        t_alt+=("$(ms_since "$s")")
    fi
    s=$(date +%s%N)
    n run --rm busybox true || true
    t_native+=("$(ms_since "$s")")
done
# One more run, not timed: the guest runtime's own step times (its debug log, on the
# container's stderr when the agent's `nestor.agent.log` names nestor_container).
probe() { # BIN INITRD
    NESTOR_VM_INITRD=$2 NESTOR_VM_CMDLINE="nestor.agent.log=warn,nestor_container=debug" \
        timeout --kill-after=5 240 "$1/nestor" run --vm --no-jail --network none --rm busybox true 2>&1 |
        grep -E 'create [0-9a-f]+: ' | sed 's/^/    guest runtime: /' | tr -d '\r' || true
}
median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.2fx", a/b}'; }
breakdown() { # FILE
    python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l.split(": ", 1)[1]) for l in open(sys.argv[1]) if l.startswith("nestor-vm-timings: ")]
if rows:
    keys = list(dict.fromkeys(k for r in rows for k in r if k.endswith("_ms")))
    print("    breakdown (median ms from VMM spawn):", ", ".join(
        f"{k[:-3]} {statistics.median([r[k] for r in rows if r.get(k) is not None]):.0f}"
        for k in keys if any(r.get(k) is not None for r in rows)))
PY
}
mv=$(median "${t_vm[@]}") mr=$(median "${t_run[@]}") mn=$(median "${t_native[@]}")
echo "bench$label, $runs runs each, medians:"
echo "  plain microVM boot + exit (nestor-vmm, agent runs true): $mv ms  (all: ${t_vm[*]})"
echo "  nestor run --vm --rm busybox true:                       $mr ms ($(ratio "$mr" "$mv") of the plain microVM; +$((mr - mv)) ms)  (all: ${t_run[*]})"
[[ -s $breakdown ]] && breakdown "$breakdown"
mj=$(median "${t_nojail[@]}") mb=$(median "${t_bare[@]}")
echo "  nestor run --vm --no-jail --rm busybox true:             $mj ms ($(ratio "$mj" "$mv") of the plain microVM; +$((mj - mv)) ms)  (all: ${t_nojail[*]})"
[[ -s $nojail_breakdown ]] && breakdown "$nojail_breakdown"
echo "  nestor run --vm --no-jail --network none --rm busybox true: $mb ms ($(ratio "$mb" "$mv") of the plain microVM; +$((mb - mv)) ms)  (all: ${t_bare[*]})"
[[ -s $bare_breakdown ]] && breakdown "$bare_breakdown"
mw=$(median "${t_warm[@]}") mwb=$(median "${t_warm_bare[@]}")
echo "  nestor run --vm --vm-warm --rm busybox true:             $mw ms ($(ratio "$mw" "$mr") of the cold start with the defaults, $(ratio "$mw" "$mv") of the plain microVM)  (all: ${t_warm[*]})"
[[ -s $warm_breakdown ]] && breakdown "$warm_breakdown"
echo "  nestor run --vm --vm-warm --no-jail --network none --rm busybox true: $mwb ms ($(ratio "$mwb" "$mb") of its cold start, $(ratio "$mwb" "$mv") of the plain microVM)  (all: ${t_warm_bare[*]})"
[[ -s $warm_bare_breakdown ]] && breakdown "$warm_bare_breakdown"
probe "$bin" "$NESTOR_VM_INITRD"
if [[ -n $alt_bin ]]; then
    ma=$(median "${t_alt[@]}")
    echo "  --alt build's run --vm --no-jail --network none --rm busybox true: $ma ms ($(ratio "$ma" "$mv") of the plain microVM; +$((ma - mv)) ms)  (all: ${t_alt[*]})"
    [[ -s $alt_breakdown ]] && breakdown "$alt_breakdown"
    probe "$alt_bin" "$alt_initrd"
fi
echo "  nestor run --rm busybox true (native):                   $mn ms"
exit $fail
