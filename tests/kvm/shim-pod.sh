#!/usr/bin/env bash
# containerd's shim in sandbox mode (one microVM per pod, as Kata's): containerd 1.6
# started by this test with a config, root, state and socket of its own (as
# shim-vm.sh), the shim in sandbox mode by the OCI annotation nestor.io/mode=sandbox,
# and the CRI plugin's annotations io.kubernetes.cri.container-type and
# io.kubernetes.cri.sandbox-id given with `ctr run --annotation`: a sandbox (pause)
# container, then two containers of it running at once. Checks: the three share one
# guest (one boot id, one nestor-vmm, one shim process for the pod, one network
# namespace); a container's output, stderr and exit code; exec (output, exit code), ps,
# pause/resume, metrics and OCI update on a container in the pod's VM, whose writes land
# in its containerd snapshot; a container still running when the sandbox is killed stops
# with the VM; a container of a sandbox that does not exist is refused with one clear
# line; after everything is deleted no VMM, VM state, share mount or shim is left and
# `nestor gc` finds nothing.
# One nested VM launch; 75-105 s with the test host's boot.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=300
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
[[ -x $tdir/release/containerd-shim-nestor-v2 ]] || die2 "no containerd-shim-nestor-v2 (cargo build --release -p nestor-shim)"
source "$here/lib/vm-env.sh"
source "$here/lib/containerd-env.sh"
sid=podsb-$$
pod=(--runtime io.containerd.nestor.v2 --annotation nestor.io/mode=sandbox
    --annotation io.kubernetes.cri.sandbox-id=$sid)
state=/run/containerd/nestor/$ns/.vm
status_of() { cx task ls | awk -v id="$1" '$1 == id {print $3}'; }
vmms() { { pgrep -x nestor-vmm || true; } | wc -l; }
vmm0=$(vmms)

# 1. The sandbox boots the pod's VM.
t0=$(date +%s.%N)
cx run -d "${pod[@]}" --annotation io.kubernetes.cri.container-type=sandbox "$image" "$sid" sleep 100000
expect "sandbox: task status" RUNNING "$(status_of "$sid")"
boot_sb=$(cx task exec --exec-id b0 "$sid" cat /proc/sys/kernel/random/boot_id)
[[ $boot_sb =~ ^[0-9a-f-]{36}$ ]] && pass "sandbox: guest boot id $boot_sb" || bad "sandbox boot id: '$boot_sb'"
echo "sandbox up in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s$label"

# 2. Two containers of the pod at once: a long-lived one, then one whose output,
#    stderr and exit code come back, both in the sandbox's guest.
ctr_=(--annotation io.kubernetes.cri.container-type=container)
c1=pod-c1-$$
cx run -d "${pod[@]}" "${ctr_[@]}" "$image" "$c1" sh -c 'echo hi >/tmp/mine; sleep 1000 & while :; do cut -d" " -f1 /proc/uptime >>/tmp/t; sleep 0.1; done'
expect "pod container -d: task status" RUNNING "$(status_of "$c1")"
t0=$(date +%s.%N)
set +e
out=$(cx run --rm "${pod[@]}" "${ctr_[@]}" "$image" pod-c2-$$ \
    sh -c 'cat /proc/sys/kernel/random/boot_id; echo out; echo err >&2; exit 7' 2>"$work/err")
rc=$?
set -e
echo "a container in the running pod VM: ctr run --rm in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}') s$label"
expect "pod container: exit code" 7 "$rc"
expect "pod container: same guest as the sandbox (boot id)" "$boot_sb" "$(sed -n 1p <<<"$out")"
expect "pod container: stdout" out "$(sed -n 2p <<<"$out")"
grep -qx err "$work/err" && pass "pod container: stderr" || bad "stderr: $(cat "$work/err")"
[[ ! -e $state/pod-c2-$$ && ! -e $state/$sid/pod/pod-c2-$$ ]] && pass "run --rm left no state or share mount" ||
    bad "left: $(ls "$state" "$state/$sid/pod")"
expect "one nestor-vmm for the pod" $((vmm0 + 1)) "$(vmms)"
nshim=$({ pgrep -f "containerd-shim-nestor-v2 -namespace $ns " || true; } | wc -l)
expect "one shim process for the pod (grouped by the sandbox id)" 1 "$nshim"
net_sb=$(cx task exec --exec-id n0 "$sid" readlink /proc/self/ns/net)
net_c1=$(cx task exec --exec-id n1 "$c1" readlink /proc/self/ns/net)
[[ $net_sb == net:\[* && $net_sb == "$net_c1" ]] && pass "the pod's containers share the guest's network namespace ($net_sb)" ||
    bad "network namespaces: sandbox '$net_sb', container '$net_c1'"

# 3. The long-lived container: exec, ps, pause/resume, metrics, update, kill.
set +e
out=$(cx task exec --exec-id e1 "$c1" sh -c 'cat /proc/sys/kernel/random/boot_id; cat /tmp/mine; exit 5')
rc=$?
set -e
expect "task exec: exit code" 5 "$rc"
expect "task exec: same guest, own rootfs" "$boot_sb hi" "$(tr '\n' ' ' <<<"$out" | sed 's/ $//')"
# The rootfs is containerd's snapshot itself (shared over virtio-fs, as runc's is
# written): what the container wrote is in its bundle's rootfs on the host.
mine=$(cat "$ctrd/state/io.containerd.runtime.v2.task/$ns/$c1/rootfs/tmp/mine" 2>&1 || true)
expect "the container's writes are in its snapshot on the host" hi "$mine"
set +e
cx task exec --exec-id e2 "$sid" cat /tmp/mine >/dev/null 2>&1
rc=$?
set -e
((rc != 0)) && pass "the sandbox does not see the container's files" || bad "the sandbox reads the container's /tmp/mine"
pids=$(cx task ps "$c1" | awk 'NR > 1 && $1 ~ /^[0-9]+$/ {n++} END {print n + 0}')
((pids >= 2)) && pass "task ps: $pids processes in the guest" || bad "task ps: $(cx task ps "$c1" 2>&1)"
cx task pause "$c1"
expect "task pause: status" PAUSED "$(status_of "$c1")"
sleep 3
cx task resume "$c1"
expect "task resume: status" RUNNING "$(status_of "$c1")"
sleep 1
gap=$(cx task exec --exec-id e3 "$c1" cat /tmp/t |
    awk 'NR > 1 && $1 - p > g {g = $1 - p} {p = $1} END {printf "%.1f", g}')
awk -v g="$gap" 'BEGIN {exit !(g >= 2)}' && pass "paused 3 s: the container stood still for $gap s" ||
    bad "pause did not stop the container: its longest gap was $gap s"
metrics=$(cx task metrics "$c1" 2>&1)
grep -Eq 'pids.current +[2-9]' <<<"$metrics" && pass "task metrics: from the container's cgroup in the guest" ||
    bad "task metrics: $metrics"
ocivm=("$bin/nestor" --vm-runtime --root "/run/containerd/nestor/$ns")
"${ocivm[@]}" update --pids-limit 40 "$c1"
ev=$("${ocivm[@]}" events --stats "$c1")
lim=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["data"]["pids"]["limit"])' "$ev")
expect "OCI update then events --stats: the pids limit in the guest" 40 "$lim"

# 4. A container of a sandbox that does not exist: one clear line.
set +e
cx run --rm --runtime io.containerd.nestor.v2 --annotation nestor.io/mode=sandbox "${ctr_[@]}" \
    --annotation io.kubernetes.cri.sandbox-id=nosuch-$$ "$image" pod-bad-$$ true >/dev/null 2>"$work/bad"
rc=$?
set -e
((rc != 0)) && grep -q "sandbox nosuch-$$ (io.kubernetes.cri.sandbox-id) is not a running pod sandbox" "$work/bad" &&
    pass "no such sandbox: $(grep -o 'sandbox nosuch[^"]*' "$work/bad" | head -n1)" || bad "no such sandbox: rc $rc, $(cat "$work/bad")"
cx c rm pod-bad-$$ >/dev/null 2>&1 || true

# 5. Kill the container, then the sandbox: everything goes.
cx task kill -s KILL "$c1"
for _ in $(seq 300); do [[ $(status_of "$c1") == STOPPED ]] && break; sleep 0.1; done
expect "task kill: status" STOPPED "$(status_of "$c1")"
expect "the sandbox runs on" RUNNING "$(status_of "$sid")"
rmout=$(cx task rm "$c1" 2>&1)
grep -q 137 <<<"$rmout" && pass "task rm reports the SIGKILL exit (137)" || bad "task rm said: $rmout"
cx c rm "$c1"
# A container still running when the sandbox goes: it stops with the pod's VM.
c3=pod-c3-$$
cx run -d "${pod[@]}" "${ctr_[@]}" "$image" "$c3" sleep 1000
expect "a third container: task status" RUNNING "$(status_of "$c3")"
cx task kill -s KILL "$sid"
for _ in $(seq 300); do [[ $(status_of "$sid") == STOPPED ]] && break; sleep 0.1; done
for _ in $(seq 300); do [[ $(status_of "$c3") == STOPPED ]] && break; sleep 0.1; done
expect "the pod's container stops with the sandbox's VM" STOPPED "$(status_of "$c3")"
cx task rm "$c3" >/dev/null
cx c rm "$c3"
cx task rm "$sid" >/dev/null
cx c rm "$sid"
sleep 1
left=
(($(vmms) > vmm0)) && left+=" a nestor-vmm"
[[ -n $(ls "$state" 2>/dev/null) ]] && left+=" VM state: $(ls "$state")"
grep -q "$state" /proc/self/mountinfo && left+=" a pod share mount"
pgrep -f "containerd-shim-nestor-v2 -namespace $ns " >/dev/null && left+=" the shim"
[[ -z $left ]] && pass "nothing left after task rm and c rm" || bad "left behind:$left"
gc=$("$bin/nestor" gc 2>&1)
grep -Eq '[1-9]' <<<"$gc" && bad "nestor gc found leftovers: $gc" || pass "nestor gc: nothing to collect ($gc)"

if ((fail)); then
    echo "--- containerd log (tail)" >&2
    tail -n 40 "$ctrd/containerd.log" >&2
fi
finish
