#!/usr/bin/env bash
# tests/kvm/vmm-agent.sh [--kernel VMLINUX] [--initrd INITRD] [--nestor PATH] [--agent PATH]
#                        [--vmm PATH] [--timeout SECS]
#
# Scenario 1's path with nestor-vmm as the VMM (tests/kvm/agent-vsock.sh does the same
# with QEMU and vhost-vsock): boots nestor's guest kernel with an initramfs whose /init
# is nestor-agent and /bin/nestor the static runtime, under nestor-vmm --vsock, then
# drives the agent from the host through the vsock Unix socket (`CONNECT 1024` /
# `OK <port>`, then the protocol of crates/agent-protocol on each stream, spoken by
# `nestor-agent client`): ping;
# attach stdout and stderr; run a busybox container; read its output from the vsock
# streams; wait for its exit code; stats; delete; shutdown, after which nestor-vmm must
# exit 0 by itself, ended by the agent's S5 write to the PM1a control port (not by the
# kernel's halt), and leave no socket behind. Prints the phase times (launch -> agent
# answers -> container exited -> VM gone), labelled when inside the TCG test host.
#
# Runs in the KVM test host unless this host has hardware KVM.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=180
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
sock=$work/v.sock

t0=$(date +%s%N)
NESTOR_LOG=info timeout --kill-after=5 "$limit" "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 512 --vcpus 2 \
    --vsock "$sock" --console "$work/console" --cmdline "console=ttyS0 panic=-1 quiet" \
    </dev/null >"$work/vmm.log" 2>&1 &
vpid=$!

# The agent's side of scenario 1, through `nestor-agent client`; the first failure ends it.
c=("$client" client --hybrid "$sock" --timeout "$limit")
drive() {
    local out
    # The socket exists once nestor-vmm runs; the agent listens once the guest has booted.
    out=$("${c[@]}" ping --vmm-pid "$vpid") || { bad "the agent never answered through $sock"; return 1; }
    t_ready=$((($(date +%s%N) - t0) / 1000000))
    expect "pong" '{"type":"pong","version":1,"pid1":true}' "$out"
    # Enough output to need several RX buffers and credit updates on the way out.
    out=$("${c[@]}" run --spec "$work/config.json" --rootfs /rootfs/busybox --t0 "$t0" \
        --stdout "$work/out" --stderr "$work/err" -- \
        sh -c 'echo hello-from-container; uname -r; seq 1 20000; echo oops >&2; exit 7') || { bad "run: $out"; return 1; }
    [[ $(sed -n 1p <<<"$out") == '{"type":"started",'* ]] && pass "run: started" || bad "run: $(sed -n 1p <<<"$out")"
    expect "wait: exit code 7" '{"type":"exited","code":7}' "$(sed -n 2p <<<"$out")"
    t_exited=$(sed -n 3p <<<"$out" | sed 's/.*exited_ms //')
    local lines
    lines=$(wc -l <"$work/out")
    [[ $lines == 20002 && $(sed -n 1p "$work/out") == hello-from-container ]] &&
        [[ $(tail -n +3 "$work/out" | md5sum) == "$(seq 1 20000 | md5sum)" ]] &&
        pass "container stdout: $(wc -c <"$work/out") bytes, intact" ||
        bad "container stdout: $lines lines, starting '$(head -c 100 "$work/out")'"
    guest_kernel=$(sed -n 2p "$work/out")
    [[ -n $guest_kernel && $guest_kernel != "$(uname -r)" ]] && pass "the container sees the guest's kernel $guest_kernel" ||
        bad "the container sees kernel '$guest_kernel' (host: $(uname -r))"
    grep -q oops "$work/err" && pass "container stderr" || bad "container stderr: $(cat "$work/err")"
    out=$("${c[@]}" call '{"type":"stats"}') || { bad "stats: $out"; return 1; }
    kib=$(grep -o '"mem_total_kib":[0-9]*' <<<"$out" | cut -d: -f2)
    [[ $out == '{"type":"stats",'* && ${kib:-0} -gt 0 ]] && pass "stats: guest $kib KiB" || bad "stats: $out"
    expect "delete" '{"type":"ok"}' "$("${c[@]}" call '{"type":"delete","container":"c1"}' 2>&1)"
    expect "shutdown" '{"type":"ok"}' "$("${c[@]}" call '{"type":"shutdown"}' 2>&1)"
}
t_ready=- t_exited=-
drive || true
set +e
wait "$vpid"
vrc=$?
set -e
vpid=
t1=$(date +%s%N)
((vrc == 0)) && pass "nestor-vmm exited 0 by itself after the shutdown request" || bad "nestor-vmm status $vrc (124: time limit)"
# The agent powers off through the VMM's ACPI PM1a control port, not the kernel's halt.
grep -q 'guest ended: poweroff' "$work/vmm.log" && pass "the agent ended the VM at the PM1a control port (S5)" ||
    bad "the VM did not end by S5: $(grep -o 'guest ended: [a-z ]*' "$work/vmm.log" || echo 'no ending logged')"
[[ ! -e $sock ]] && pass "no vsock socket left behind" || bad "vsock socket left behind"
if ((fail)); then
    echo "--- console and nestor-vmm output" >&2
    tail -n 40 "$work/console" "$work/vmm.log" >&2
    finish
fi
echo "vmm-agent: nestor-vmm: $(grep -o 'guest init reached after [0-9]* ms' "$work/vmm.log" || echo 'no boot marker')"
echo "vmm-agent: times from launch: agent answered $t_ready ms, container exited $t_exited ms, VM gone $(((t1 - t0) / 1000000)) ms$label"
finish
