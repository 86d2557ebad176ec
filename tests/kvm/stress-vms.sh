#!/usr/bin/env bash
# Load: 20 microVMs at once (12 in the TCG test host). That many `run --vm -d`
# containers are started (in waves, a line each); each must run in a VM of its own
# (distinct guest boot ids through exec), and after as many `rm -f` at once no VMM,
# sandbox, container or runtime state is left. Prints the time to start and to remove
# them all. Runs in the KVM test host unless this host has hardware KVM (this test gets
# a test-host boot of its own). Exit 0 when all pass.
set -euo pipefail
limit=900
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

# 20 where KVM is hardware. In the TCG test host, 12: every guest there boots and
# runs on one emulated CPU. With 20, CI's run of 2026-12-06 ran past the 420 s limit in
# all 3 boots (the first before the starts had ended, with no console output and no
# panic; the others in the execs), and one boot here stalled the same way.
if [[ ${NESTOR_TESTHOST:-} == inside ]]; then
    count=${NESTOR_STRESS_VMS:-12}
    echo "stress-vms: $count microVMs in the TCG test host (20 on hardware KVM; NESTOR_STRESS_VMS sets it)"
else
    count=${NESTOR_STRESS_VMS:-20}
fi
export NESTOR_VM_RUN=$work/vmrun
t0=$(date +%s.%N)
# Booted in waves of $wave at once: 20 Linux guests booting together under the test
# host's TCG miss any sane boot deadline; what is tested is 20 running at once.
wave=${NESTOR_STRESS_WAVE:-5}
export NESTOR_VM_TIMEOUT=300
for i in $(seq 1 "$count"); do
    n run --vm -d --vm-mem 96 --network none --name "sv$i" busybox sleep 900 \
        >"$work/start$i.out" 2>"$work/start$i.err" &
    if ((i % wave == 0 || i == count)); then
        wait || true
        echo "stress-vms: $i started or failed after $(python3 -c "import sys,time; print(f'{time.time()-float(sys.argv[1]):.0f}')" "$t0") s"
    fi
done
# Under the TCG test host's emulated nested SVM a Linux guest can die in its first
# second (a triple fault at 0.03-0.9 s of guest time, nothing on the console). With two
# test-host vCPUs that was 1 boot in 6-20 when guests booted side by side; with one
# (the test host's default since) none in 64. Should it still happen, a start that
# failed that way is tried once more (at most 3 of them) and said so: what this test
# is about is 20 VMs at once, not the emulator. On hardware KVM nothing is retried.
retried=0
if [[ ${NESTOR_TESTHOST:-} == inside ]]; then
    for i in $(seq 1 "$count"); do
        [[ -s $work/start$i.out ]] && continue
        grep -qE "before its agent answered|agent closed the connection|did not (report ready|answer)" "$work/start$i.err" || continue
        ((retried < 3)) || break
        retried=$((retried + 1))
        echo "sv$i: retried once (the test host's guest died while booting: $(grep -m1 -E 'triple fault|error:' "$work/start$i.err"))"
        n rm -f "sv$i" >/dev/null 2>&1 || true
        n run --vm -d --vm-mem 96 --network none --name "sv$i" busybox sleep 900 \
            >"$work/start$i.out" 2>"$work/start$i.err" || true
    done
fi
t1=$(date +%s.%N)
started=0
for i in $(seq 1 "$count"); do
    if [[ -s $work/start$i.out ]]; then
        started=$((started + 1))
    else
        echo "sv$i: $(tail -n 3 "$work/start$i.err")" >&2
    fi
done
expect "$count microVMs started" "$count" "$started"
running=$(n ps --json | python3 -c 'import json,sys; print(sum(1 for c in json.load(sys.stdin) if c["status"] == "running"))')
expect "all $count running" "$count" "$running"
# Each container's VMM (jailed by default: its command line holds only jail paths) by
# the pid `inspect` records.
vmms=$(for c in $(n ps -q); do
    pid=$(n inspect "$c" | python3 -c 'import json,sys; print((json.load(sys.stdin).get("VM") or {}).get("VmmPid") or 0)')
    [[ $pid != 0 && -d /proc/$pid ]] && echo "$pid"
done | sort -u | wc -l)
expect "one VMM each" "$count" "$vmms"
# The execs go in waves, as the starts do (one after another they took most of the
# test's time limit in a test host).
for i in $(seq 1 "$count"); do
    { n exec "sv$i" cat /proc/sys/kernel/random/boot_id || echo none; } >"$work/boot$i" 2>/dev/null &
    if ((i % wave == 0)); then wait || true; fi
done
wait || true
ids=$(cat "$work"/boot* | sort -u | grep -vc none || true)
expect "each in a VM of its own (distinct boot ids)" "$count" "$ids"

t2=$(date +%s.%N)
for i in $(seq 1 "$count"); do n rm -f "sv$i" >/dev/null 2>"$work/rm$i.err" & done
wait || true
t3=$(date +%s.%N)
sleep 1
left=$(n ps -aq | wc -l)
expect "no container left" 0 "$left"
# Each container's VMM (jailed by default: its command line holds only jail paths) by
# the pid `inspect` records.
vmms=$(for c in $(n ps -q); do
    pid=$(n inspect "$c" | python3 -c 'import json,sys; print((json.load(sys.stdin).get("VM") or {}).get("VmmPid") or 0)')
    [[ $pid != 0 && -d /proc/$pid ]] && echo "$pid"
done | sort -u | wc -l)
expect "no VMM left" 0 "$vmms"
sand=$(find "$NESTOR_VM_RUN" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l || true)
expect "no sandbox left" 0 "$sand"
state=$(find "$NESTOR_STATE" -mindepth 1 -maxdepth 1 -not -name '.*' 2>/dev/null | wc -l || true)
expect "no runtime state left" 0 "$state"
python3 -c "import sys; a=[float(x) for x in sys.argv[1:]]; print(f'figures: {int(a[4])} microVMs started in {a[1]-a[0]:.1f} s ({int(a[5])} retried), removed in {a[3]-a[2]:.1f} s')" \
    "$t0" "$t1" "$t2" "$t3" "$count" "$retried"
finish
