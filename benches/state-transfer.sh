#!/usr/bin/env bash
# benches/state-transfer.sh [--rounds N] [--mem MIB]
#
# Moving `run --vm -d` containers, timed in one test-host run with a guest of MIB
# (default 256) and N rounds (default 3). Each round: a cold start (`run --vm -d` until
# the container runs), `checkpoint` (stop: snapshot, log, manifest; the VM paused from
# the snapshot on) and `restore` (until the container runs again) of an idle container;
# then live `migrate` between it and a second data root, pre-copy out, stop-copy back
# and post-copy out, of an idle container and of one rewriting 16 MiB of random data in
# a loop (paused time, total time, MiB sent, rounds). Prints medians and the ratios the
# state-transfer goals are set in: checkpoint and restore against the cold start,
# pre-copy's paused time of an idle guest, each strategy's paused time against
# stop-copy's. The containers run unjailed (`--no-jail`): post-copy's destination VMM
# needs userfaultfd for kernel faults. Nine VMM launches a round (the test host's
# kernel tires after about 30). Progress on stderr. Runs in the KVM test host unless this host has
# hardware KVM. A benchmark, not a test.
set -euo pipefail
limit=1500
rounds=3
mem=256
script_opt() {
    case $1 in
    --rounds) rounds=$2; return 2 ;;
    --mem) mem=$2; return 2 ;;
    esac
    return 0
}
source "$(dirname "${BASH_SOURCE[0]}")/../tests/kvm/lib/prelude.sh"
source "$repo/tests/kvm/lib/vm-env.sh"

B=$work/root-b
nb() { NESTOR_ROOT=$B timeout --kill-after=5 600 "$bin/nestor" "$@"; }
on_exit 'NESTOR_ROOT='"$B"' "$bin/nestor" gc'
on_exit 'for id in $(NESTOR_ROOT='"$B"' "$bin/nestor" ps -a -q 2>/dev/null); do NESTOR_ROOT='"$B"' "$bin/nestor" rm -f "$id"; done'
nb image import "$img" >/dev/null
ms() { date +%s%3N; }
idle='echo ready; while true; do sleep 1; done'
dirty='head -c 16777216 /dev/urandom >/tmp/r; echo ready; while true; do cp /tmp/r /tmp/f; done'
results=$work/results
: >"$results"
note() { echo "$1 $2" >>"$results"; }
# Waits for the container's "ready" line (in root $1's store).
ready() {
    local root=$1 name=$2
    for _ in $(seq 600); do
        NESTOR_ROOT=$root "$bin/nestor" logs "$name" 2>/dev/null | grep -q '^ready' && return 0
        sleep 0.1
    done
    echo "state-transfer: $name never got ready" >&2
    return 1
}
# migrate FROM-ROOT TO-ROOT NAME STRATEGY KIND: moves NAME, records its figures.
move() {
    local from=$1 to=$2 name=$3 strategy=$4 kind=$5 sock=$work/m.sock out lpid
    rm -f "$sock"
    NESTOR_ROOT=$to timeout 600 "$bin/nestor" migrate --listen "unix:$sock" >"$work/listen.out" 2>&1 &
    lpid=$!
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    out=$(NESTOR_ROOT=$from timeout 600 "$bin/nestor" migrate "$name" --to "unix:$sock" --strategy "$strategy" 2>&1) ||
        {
            wait "$lpid" || true
            echo "state-transfer: migrate $strategy of the $kind container: $out; the receiving side: $(cat "$work/listen.out")" >&2
            return 1
        }
    wait "$lpid" || { echo "state-transfer: migrate --listen: $(cat "$work/listen.out")" >&2; return 1; }
    # "NAME moved to ADDR: P ms paused, T ms in all, M MiB sent in R rounds"
    read -r paused total mib nrounds < <(sed -E 's/.*: ([0-9]+) ms paused, ([0-9]+) ms in all, ([0-9]+) MiB sent in ([0-9]+) rounds.*/\1 \2 \3 \4/' <<<"$out")
    note "$strategy-$kind-paused" "$paused"
    note "$strategy-$kind-total" "$total"
    note "$strategy-$kind-mib" "$mib"
    note "$strategy-$kind-rounds" "$nrounds"
}

for r in $(seq "$rounds"); do
    echo "state-transfer: $mem MiB guest, round $r/$rounds" >&2
    t0=$(ms)
    n run --vm -d --no-jail --vm-mem "$mem" --network none --name st busybox sh -c "$idle" >/dev/null
    note cold-start $(($(ms) - t0))
    ready "$NESTOR_ROOT" st
    t0=$(ms)
    n checkpoint st "$work/ck" >/dev/null
    note checkpoint $(($(ms) - t0))
    note checkpoint-disk-mib $(($(du -sk "$work/ck/vm" | cut -f1) / 1024))
    t0=$(ms)
    n restore "$work/ck" >/dev/null
    note restore $(($(ms) - t0))
    rm -rf "$work/ck"
    move "$NESTOR_ROOT" "$B" st pre-copy idle
    move "$B" "$NESTOR_ROOT" st stop-copy idle
    move "$NESTOR_ROOT" "$B" st post-copy idle
    nb rm -f st >/dev/null
    n run --vm -d --no-jail --vm-mem "$mem" --network none --name sd busybox sh -c "$dirty" >/dev/null
    ready "$NESTOR_ROOT" sd
    move "$NESTOR_ROOT" "$B" sd pre-copy dirtying
    move "$B" "$NESTOR_ROOT" sd stop-copy dirtying
    move "$NESTOR_ROOT" "$B" sd post-copy dirtying
    nb rm -f sd >/dev/null
done

python3 - "$results" "$mem" "$rounds" "$label" <<'PY'
import statistics, sys
path, mem, rounds, label = sys.argv[1:]
vals = {}
for line in open(path):
    k, v = line.split()
    vals.setdefault(k, []).append(float(v))
med = {k: statistics.median(v) for k, v in vals.items()}
rng = {k: (min(v), max(v)) for k, v in vals.items()}
print(f"state transfer, {mem} MiB guest, {rounds} rounds, medians (min-max){label}:")
def row(name, key, unit="ms"):
    if key in med:
        lo, hi = rng[key]
        print(f"  {name:<38} {med[key]:>7.0f} {unit}  ({lo:.0f}-{hi:.0f})")
row("cold start (run --vm -d)", "cold-start")
row("checkpoint (stop)", "checkpoint")
row("  its snapshot on disk", "checkpoint-disk-mib", "MiB")
row("restore to running", "restore")
for kind in ("idle", "dirtying"):
    for s in ("pre-copy", "stop-copy", "post-copy"):
        row(f"migrate {s}, {kind}: paused", f"{s}-{kind}-paused")
        row(f"  total", f"{s}-{kind}-total")
        row(f"  sent", f"{s}-{kind}-mib", "MiB")
        row(f"  rounds", f"{s}-{kind}-rounds", "")
c = med.get("cold-start")
if c:
    print(f"  checkpoint / cold start: {med['checkpoint'] / c:.2f}x (goal <= 1.0x)")
    print(f"  restore / cold start:    {med['restore'] / c:.2f}x (goal <= 0.1x)")
if "pre-copy-idle-paused" in med:
    print(f"  pre-copy paused, idle:   {med['pre-copy-idle-paused']:.0f} ms (goal <= 100 ms)")
for kind in ("idle", "dirtying"):
    stop = med.get(f"stop-copy-{kind}-paused")
    if stop:
        for s in ("pre-copy", "post-copy"):
            if f"{s}-{kind}-paused" in med:
                print(f"  {s} paused, {kind}: {med[f'{s}-{kind}-paused'] / max(stop, 1):.2f}x stop-copy's")
PY
