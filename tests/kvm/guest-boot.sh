#!/usr/bin/env bash
# Boots nestor's guest kernel (guest-kernel/build.sh) with the shell-init initramfs
# (images/build-initramfs.sh) under QEMU -M microvm on /dev/kvm, 2 vCPUs, and checks
# that /init ran the command given on the kernel command line (nestor.cmd), saw both
# vCPUs and every cgroup v2 controller the agent needs, and that QEMU exited by itself
# when the guest rebooted (nestor.reboot=1, reboot=t: triple fault; -no-reboot).
# Prints the launch-to-exit time and the guest's uptime at /init, labelled when inside
# the TCG test host. Exit 0 on success.
#
# Builds (or finds cached) the kernel and initramfs on this host, then runs in the KVM
# test host unless this host has hardware KVM (see tests/kvm/lib/prelude.sh).
#   guest-boot.sh [--timeout SECS] [--kernel VMLINUX] [--initrd INITRD]
set -euo pipefail
limit=120
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_kernel
[[ -n $initrd ]] || initrd=$("$repo/images/build-initramfs.sh" | tail -n1)
rerun_where_kvm_is
need_kvm
command -v qemu-system-x86_64 >/dev/null || die2 "qemu-system-x86_64 missing (apt-get install qemu-system-x86)"

make_work
marker="guest-boot-$$-$RANDOM"
cmd="echo $marker up=\$(cut -d' ' -f1 /proc/uptime) cpus=\$(grep -c ^processor /proc/cpuinfo) ctl=\$(tr ' ' , </sys/fs/cgroup/cgroup.controllers) kernel=\$(uname -r); exit 3"
b64=$(printf '%s' "$cmd" | base64 -w0)

t0=$(date +%s%N)
set +e
timeout --kill-after=5 "$limit" qemu-system-x86_64 -M microvm,rtc=off,acpi=off -enable-kvm -cpu host \
    -m 256 -smp 2 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$work/console" -kernel "$kernel" -initrd "$initrd" \
    -append "console=ttyS0 reboot=t panic=-1 quiet nestor.reboot=1 nestor.cmd=$b64" \
    </dev/null >"$work/qemu.log" 2>&1
rc=$?
set -e
t1=$(date +%s%N)
fatal() {
    echo "guest-boot.sh: $* (QEMU status $rc); console and QEMU output:" >&2
    tail -n 40 "$work/console" "$work/qemu.log" >&2
    exit 1
}
line=$(grep -a "^$marker " "$work/console" || true)
[[ -n $line ]] || fatal "the guest's /init never ran the command"
grep -aq "^nestor-init: exit 3" "$work/console" || fatal "/init did not report the command's exit code 3"
[[ $rc == 0 ]] || fatal "QEMU did not exit by itself after the guest rebooted"
[[ $line == *" cpus=2 "* ]] || fatal "the guest does not see both vCPUs: $line"
for c in cpu cpuset io memory pids; do
    [[ $line =~ ctl=([^ ]*) && ,${BASH_REMATCH[1]}, == *",$c,"* ]] || fatal "cgroup controller $c missing: $line"
done
up=${line#* up=}; up=${up%% *}
echo "guest-boot: ok: ${line#"$marker "}"
echo "guest-boot: QEMU microvm launch to exit $(( (t1 - t0) / 1000000 )) ms; guest uptime at /init ${up} s$label"
finish
