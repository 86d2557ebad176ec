#!/usr/bin/env bash
# Scenario 1 end to end with QEMU as the VMM: boots nestor's guest kernel with an
# initramfs whose /init is nestor-agent and /bin/nestor the static runtime, under QEMU
# -M microvm with a vhost-vsock device, then drives the agent from the host over AF_VSOCK
# (`nestor-agent client`, on the protocol of crates/agent-protocol): ping; attach stdout and stderr; run a busybox
# container (spec from `nestor spec`, rootfs /rootfs/busybox in the initramfs); read its
# output straight from the vsock streams; wait for its exit code; stats; shutdown, after
# which QEMU must exit by itself. Checks that the container sees the guest's kernel, not
# the host's. Prints the phase times (launch -> agent answers -> container exited -> VM
# gone), labelled when inside the TCG test host. Exit 0 on success.
#   agent-vsock.sh [--timeout SECS] [--kernel VMLINUX] [--initrd INITRD] [--nestor PATH]
#                  [--agent PATH]
set -euo pipefail
limit=180
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_kernel
find_agent_initrd --test-rootfs
find_nestor
rerun_where_kvm_is
need_kvm
command -v qemu-system-x86_64 >/dev/null || die2 "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"
[[ -c /dev/vhost-vsock ]] || modprobe vhost_vsock 2>/dev/null || true
[[ -c /dev/vhost-vsock ]] || die2 "no /dev/vhost-vsock (modprobe vhost_vsock failed)"
find_client

make_work
qpid=
on_exit '[[ -n $qpid ]] && kill "$qpid" && wait "$qpid"'
"$nestor" spec --bundle "$work" >/dev/null
cid=$((1000 + RANDOM % 30000))

t0=$(date +%s%N)
timeout --kill-after=5 "$limit" qemu-system-x86_64 -M microvm,rtc=off,acpi=off -enable-kvm -cpu host \
    -m 512 -smp 2 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$work/console" -kernel "$kernel" -initrd "$initrd" \
    -device "vhost-vsock-device,guest-cid=$cid" \
    -append "console=ttyS0 reboot=t panic=-1 quiet nestor.reboot=1" \
    </dev/null >"$work/qemu.log" 2>&1 &
qpid=$!

# The agent's side of scenario 1, through `nestor-agent client`; the first failure ends it.
c=("$client" client --vsock "$cid" --timeout "$limit")
drive() {
    local out
    out=$("${c[@]}" ping --vmm-pid "$qpid") || { bad "the agent never answered on vsock CID $cid port 1024"; return 1; }
    t_ready=$((($(date +%s%N) - t0) / 1000000))
    expect "pong" '{"type":"pong","version":1,"pid1":true}' "$out"
    out=$("${c[@]}" run --spec "$work/config.json" --rootfs /rootfs/busybox --t0 "$t0" \
        --stdout "$work/out" --stderr "$work/err" -- \
        sh -c 'echo hello-from-container; uname -r; echo oops >&2; exit 7') || { bad "run: $out"; return 1; }
    [[ $(sed -n 1p <<<"$out") == '{"type":"started",'* ]] && pass "run: started" || bad "run: $(sed -n 1p <<<"$out")"
    expect "wait: exit code 7" '{"type":"exited","code":7}' "$(sed -n 2p <<<"$out")"
    times=$(sed -n 3p <<<"$out")
    expect "container stdout, first line" hello-from-container "$(sed -n 1p "$work/out")"
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
t_ready=- times=
drive || true
set +e
wait "$qpid"
qrc=$?
set -e
qpid=
t1=$(date +%s%N)
((qrc == 0)) && pass "QEMU exited by itself after the shutdown request" || bad "QEMU status $qrc (124: time limit)"
if ((fail)); then
    echo "--- console and QEMU output" >&2
    tail -n 40 "$work/console" "$work/qemu.log" >&2
    finish
fi
echo "agent-vsock: times from launch: agent answered $t_ready ms, $(sed 's/started_ms \([0-9]*\) exited_ms \([0-9]*\)/container started \1 ms, exited \2 ms/' <<<"$times"); VM gone $(((t1 - t0) / 1000000)) ms$label"
finish
