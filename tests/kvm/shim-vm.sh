#!/usr/bin/env bash
# containerd's shim in VM mode: containerd 1.6 (Debian's, from the host's root) started
# by this test with a config, root, state and socket of its own, and
# containerd-shim-nestor-v2 selecting VM mode per container by the OCI annotation
# nestor.io/mode=vm (the shim drives `nestor --vm-runtime`: one microVM per container).
# Checks: `ctr run --rm` output, stderr and exit code, from inside a guest kernel;
# `ctr run -d`, `task exec` (output, exit code; `task kill --exec-id` reaching the
# process in the guest), `task ps`, `pause`/`resume` (the container stands still),
# `metrics`, OCI `update`/`events --stats`/`ps` on the VM container, `task kill`, `task rm`,
# `c rm`, after which no VMM, VM state or bundle mount is left. Then native mode on the
# test host's cgroup v2, and VM mode: TaskOOM while the task runs. Three nested VM launches; about
# 100-130 s with the boot.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=420
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
[[ -x $tdir/release/containerd-shim-nestor-v2 ]] || die2 "no containerd-shim-nestor-v2 (cargo build --release -p nestor-shim)"
source "$here/lib/vm-env.sh"
source "$here/lib/containerd-env.sh"
vm=(--runtime io.containerd.nestor.v2 --annotation nestor.io/mode=vm)

# 1. ctr run --rm: output, stderr and exit code, from the guest.
set +e
out=$(cx run --rm "${vm[@]}" "$image" vm-rm sh -c 'echo out; echo err >&2; uname -r; exit 7' 2>"$work/err")
rc=$?
set -e
expect "ctr run --rm exit code" 7 "$rc"
expect "stdout" out "$(head -n1 <<<"$out")"
guest=$(sed -n 2p <<<"$out")
[[ -n $guest && $guest != "$(uname -r)" ]] && pass "in the guest kernel ($guest, host $(uname -r))" ||
    bad "uname -r under the shim's VM mode: '$guest' (host $(uname -r)); log: $(tail -n5 "$ctrd/containerd.log")"
grep -qx err "$work/err" && pass "stderr" || bad "stderr: $(cat "$work/err")"
[[ -z $(cx task ls -q) && -z $(cx c ls -q) ]] && pass "run --rm left no task or container" ||
    bad "left: $(cx task ls) $(cx c ls)"

# 2. run -d, task exec, kill, rm.
# The container stamps its uptime every 0.1 s: a pause shows as a gap.
cx run -d "${vm[@]}" "$image" vm-d sh -c 'sleep 1000 & while :; do cut -d" " -f1 /proc/uptime >>/tmp/t; sleep 0.1; done' >/dev/null
st=$(cx task ls | awk '$1 == "vm-d" {print $3}')
expect "run -d: task status" RUNNING "$st"
set +e
out=$(cx task exec --exec-id e1 vm-d sh -c 'echo from-exec; uname -r; exit 5')
rc=$?
set -e
expect "task exec exit code" 5 "$rc"
expect "task exec output" "from-exec $guest" "$(tr '\n' ' ' <<<"$out" | sed 's/ $//')"
# A signal to an exec (`task kill --exec-id`) reaches the process in the guest.
cx task exec --exec-id e2 vm-d sh -c 'trap "exit 42" TERM; echo ready; while :; do sleep 0.1; done' >"$work/e2" 2>&1 &
epid=$!
for _ in $(seq 600); do grep -q ready "$work/e2" 2>/dev/null && break; sleep 0.1; done
cx task kill --exec-id e2 -s TERM vm-d
set +e
wait $epid
rc=$?
set -e
expect "task kill --exec-id: SIGTERM trapped in the guest" 42 "$rc"
# The control verbs in VM mode, done in the guest's cgroup by its agent: ps, pause and
# resume, metrics (the shim drives `nestor --vm-runtime ps/pause/resume/events`), and
# the OCI `update` and `events --stats` verbs themselves.
pids=$(cx task ps vm-d | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {n++} END {print n + 0}')
((pids >= 2)) && pass "task ps: $pids processes in the guest" ||
    bad "task ps in VM mode: $(cx task ps vm-d 2>&1)"
cx task pause vm-d
expect "task pause: status" PAUSED "$(cx task ls | awk '$1 == "vm-d" {print $3}')"
sleep 4
cx task resume vm-d
expect "task resume: status" RUNNING "$(cx task ls | awk '$1 == "vm-d" {print $3}')"
sleep 1
gap=$(cx task exec --exec-id e3 vm-d cat /tmp/t |
    awk 'NR > 1 && $1 - p > g {g = $1 - p} {p = $1} END {printf "%.1f", g}')
awk -v g="$gap" 'BEGIN {exit !(g >= 3)}' && pass "paused 4 s: the container stood still for $gap s" ||
    bad "pause did not stop the container: its longest gap was $gap s"
metrics=$(cx task metrics vm-d 2>&1)
grep -Eq 'pids.current +[2-9]' <<<"$metrics" && grep -Eq 'memory.usage_in_bytes +[1-9]' <<<"$metrics" &&
    pass "task metrics: pids and memory from the guest's cgroup" || bad "task metrics: $metrics"
ocivm=("$bin/nestor" --vm-runtime --root "/run/containerd/nestor/$ns")
"${ocivm[@]}" update --memory 67108864 --pids-limit 40 vm-d
ev=$("${ocivm[@]}" events --stats vm-d)
lim=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["data"]; print(d["memory"]["usage"]["limit"], d["pids"]["limit"])' "$ev")
expect "OCI update then events --stats: memory and pids limits in the guest" "67108864 40" "$lim"
ps=$("${ocivm[@]}" ps --format json vm-d)
[[ $ps =~ ^\[[0-9]+(,[0-9]+)+\]$ ]] && pass "OCI ps --format json: the guest's pids $ps" || bad "OCI ps --format json: '$ps'"
expect "still running" RUNNING "$(cx task ls | awk '$1 == "vm-d" {print $3}')"
cx task kill -s KILL vm-d
for _ in $(seq 300); do
    [[ $(cx task ls | awk '$1 == "vm-d" {print $3}') == STOPPED ]] && break
    sleep 0.1
done
expect "task kill: status" STOPPED "$(cx task ls | awk '$1 == "vm-d" {print $3}')"
set +e
rmout=$(cx task rm vm-d 2>&1)
rc=$?
set -e
expect "task rm" 0 "$rc"
grep -q 137 <<<"$rmout" && pass "task rm reports the SIGKILL exit (137)" || bad "task rm said: $rmout"
cx c rm vm-d
sleep 1
left=
pgrep -f "nestor-vmm.*vm-d" >/dev/null && left+=" a nestor-vmm"
[[ -e /run/containerd/nestor/$ns/.vm/vm-d ]] && left+=" VM state"
grep -q "/vm-d/rootfs " /proc/self/mountinfo && left+=" the rootfs mount"
[[ -z $left ]] && pass "nothing left after task rm and c rm" || bad "left behind:$left"
# 3. Native mode on cgroup v2 (the test host mounts no v1): TaskOOM while the task
#    runs, from memory.events (the host-side tests cover v1's eventfd).
cx events >"$work/events" 2>&1 &
evpid=$!
for _ in $(seq 100); do
    cx namespaces label "$ns" probe=$RANDOM
    grep -q /namespaces/update "$work/events" && break
    sleep 0.2
done
cx run -d --memory-limit 33554432 --runtime io.containerd.nestor.v2 "$image" nat-oom \
    sh -c 'tail /dev/zero; exec sleep 1000'
for _ in $(seq 300); do
    grep "nat-oom" "$work/events" | grep -q /tasks/oom && break
    sleep 0.2
done
grep "nat-oom" "$work/events" | grep -q /tasks/oom && pass "cgroup v2: TaskOOM while the task runs" ||
    bad "cgroup v2: no /tasks/oom: $(cat "$work/events")"
expect "cgroup v2: the init lived on" RUNNING "$(cx task ls | awk '$1 == "nat-oom" {print $3}')"
grep "nat-oom" "$work/events" | grep -q /tasks/exit && bad "an exit was reported: $(cat "$work/events")"
cx task kill -s KILL nat-oom
for _ in $(seq 100); do
    [[ $(cx task ls | awk '$1 == "nat-oom" {print $3}') == STOPPED ]] && break
    sleep 0.1
done
cx task rm nat-oom >/dev/null
cx c rm nat-oom
expect "cgroup v2: one OOM event" 1 "$(grep nat-oom "$work/events" | grep -c /tasks/oom)"
# 4. VM mode: TaskOOM while the task runs, from the guest's cgroup (the shim follows
#    the VM-mode `events` stream).
cx run -d --memory-limit 33554432 "${vm[@]}" "$image" vm-oom \
    sh -c 'tail /dev/zero; exec sleep 1000'
for _ in $(seq 600); do
    grep "vm-oom" "$work/events" | grep -q /tasks/oom && break
    sleep 0.2
done
grep "vm-oom" "$work/events" | grep -q /tasks/oom && pass "VM mode: TaskOOM while the task runs" ||
    bad "VM mode: no /tasks/oom: $(grep vm-oom "$work/events")"
expect "VM mode: the init lived on" RUNNING "$(cx task ls | awk '$1 == "vm-oom" {print $3}')"
cx task kill -s KILL vm-oom
for _ in $(seq 300); do
    [[ $(cx task ls | awk '$1 == "vm-oom" {print $3}') == STOPPED ]] && break
    sleep 0.1
done
cx task rm vm-oom >/dev/null
cx c rm vm-oom
expect "VM mode: one OOM event" 1 "$(grep vm-oom "$work/events" | grep -c /tasks/oom)"
kill "$evpid" 2>/dev/null || true

if ((fail)); then
    echo "--- containerd log (tail)" >&2
    tail -n 40 "$ctrd/containerd.log" >&2
fi
finish
