#!/usr/bin/env bash
# tests/kvm/vmm-snapshot.sh [--kernel VMLINUX] [--initrd INITRD] [--nestor PATH] [--agent PATH]
#                           [--vmm PATH] [--timeout SECS]
#
# Snapshot and restore of a Linux guest with nestor-agent as init: boots it under
# nestor-vmm (2 vCPUs, 256 MiB, vsock, API), runs a container through the agent, takes
# a snapshot on the API (`snapshot-create`, left paused), stops that VMM, restores the
# snapshot in a new nestor-vmm process (`--restore DIR --resume`, a new vsock socket),
# and checks that the agent answers again (its listening socket survives; the vsock
# transport-reset event drops the old connections), that a container runs and its
# output and exit code come back, that guest time went on (uptime after >= before)
# and that the restored VMM exits 0 after the agent's shutdown. Prints the snapshot's
# time and size, and launch-to-agent times for the boot and for the restore.
#
# Runs in the KVM test host unless this host has hardware KVM.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=240
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_vmm
find_kernel
find_agent_initrd --test-rootfs
find_nestor
rerun_where_kvm_is
need_kvm
find_client

make_work
vpid=
on_exit '[[ -n $vpid ]] && kill "$vpid" && wait "$vpid"'
"$nestor" spec --bundle "$work" >/dev/null
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }

# A container printing the guest's uptime (seconds) and a marker, exiting 3.
run_uptime() {
    local sock=$1 name=$2 out
    out=$("$client" client --hybrid "$sock" --timeout "$limit" run --container "$name" --spec "$work/config.json" \
        --rootfs /rootfs/busybox --stdout "$work/out" -- \
        sh -c 'cut -d" " -f1 /proc/uptime; echo from-the-guest; exit 3') || { bad "run: $out"; return 1; }
    expect "container exit code" '{"type":"exited","code":3}' "$(sed -n 2p <<<"$out")"
    expect "container output" from-the-guest "$(sed -n 2p "$work/out")"
    uptime=$(sed -n 1p "$work/out")
}

# 1. Boot.
t0=$(date +%s%N)
timeout --kill-after=5 "$limit" "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --vcpus 2 \
    --vsock "$work/v1.sock" --api "$work/a.sock" --console "$work/console" \
    --cmdline "console=ttyS0 panic=-1 quiet" </dev/null >"$work/vmm1.log" 2>&1 &
vpid=$!
out=$("$client" client --hybrid "$work/v1.sock" --timeout "$limit" ping --vmm-pid "$vpid") ||
    { bad "the booted agent never answered"; tail -n 30 "$work/console" "$work/vmm1.log" >&2; finish; }
t_boot=$(ms "$t0")
expect "agent answers after boot" '{"type":"pong","version":1,"pid1":true}' "$out"
uptime=
run_uptime "$work/v1.sock" before || true
before=$uptime

# 2. A snapshot the guest runs on after (resumed), then one left paused; then that
# VMM goes.
out=$("$vmm" --api "$work/a.sock" --call "{\"action\":\"snapshot-create\",\"dir\":\"$work/snap0\"}") ||
    bad "snapshot-create (resumed after): $out"
expect "agent answers after a snapshot in place" '{"type":"pong","version":1,"pid1":true}' \
    "$("$client" client --hybrid "$work/v1.sock" --timeout 60 ping 2>&1)"
t1=$(date +%s%N)
out=$("$vmm" --api "$work/a.sock" --call "{\"action\":\"snapshot-create\",\"dir\":\"$work/snap\",\"resume\":false}") ||
    bad "snapshot-create: $out"
t_snap=$(ms "$t1")
[[ $out == '{"ok":true,"snapshot":'* ]] && pass "snapshot-create" || bad "snapshot-create: $out"
mem_written=$(grep -o '"memory_written":[0-9]*' <<<"$out" | cut -d: -f2 || true)
out=$("$vmm" --api "$work/a.sock" --call '{"action":"shutdown"}') || bad "shutdown: $out"
set +e
wait "$vpid"
vrc=$?
set -e
vpid=
((vrc == 0)) && pass "the snapshotted VMM stopped (status 0)" || bad "the snapshotted VMM: status $vrc"

# 3. Restore in a new process, on a new vsock socket.
t2=$(date +%s%N)
timeout --kill-after=5 "$limit" "$vmm" --restore "$work/snap" --resume --vsock "$work/v2.sock" \
    --api "$work/b.sock" --console "$work/console2" </dev/null >"$work/vmm2.log" 2>&1 &
vpid=$!
out=$("$client" client --hybrid "$work/v2.sock" --timeout 90 ping --vmm-pid "$vpid") ||
    { bad "the restored agent never answered"; tail -n 30 "$work/console2" "$work/vmm2.log" >&2; finish; }
t_restore=$(ms "$t2")
expect "agent answers after restore" '{"type":"pong","version":1,"pid1":true}' "$out"
run_uptime "$work/v2.sock" after || true
after=$uptime
awk -v a="$after" -v b="$before" 'BEGIN { exit !(a + 0 >= b + 0 && b + 0 > 0) }' &&
    pass "guest uptime went on: $before s before, $after s after" ||
    bad "guest uptime: $before s before the snapshot, $after s after the restore"
rss=$("$vmm" --api "$work/b.sock" --call '{"action":"metrics"}' | grep -o '"guest_resident_kib":[0-9]*' | cut -d: -f2 || true)
expect "shutdown" '{"type":"ok"}' "$("$client" client --hybrid "$work/v2.sock" --timeout 30 call '{"type":"shutdown"}' 2>&1)"
set +e
wait "$vpid"
vrc=$?
set -e
vpid=
((vrc == 0)) && pass "the restored VMM exited 0 after the agent's shutdown" || bad "restored VMM status $vrc"
[[ ! -e $work/v2.sock && ! -e $work/b.sock ]] && pass "no socket left behind" || bad "socket left behind"
if ((fail)); then
    echo "--- consoles and nestor-vmm output" >&2
    tail -n 30 "$work/console" "$work/vmm1.log" "$work/console2" "$work/vmm2.log" >&2
    finish
fi
echo "vmm-snapshot: boot to agent $t_boot ms; snapshot-create $t_snap ms ($((mem_written / 1024)) KiB of 256 MiB written); restore to agent $t_restore ms (then ${rss:-?} KiB of guest RAM resident: pages touched or in the memory file's page cache)$label"
finish
