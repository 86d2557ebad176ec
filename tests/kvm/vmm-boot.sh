#!/usr/bin/env bash
# tests/kvm/vmm-boot.sh [--kernel VMLINUX] [--initrd INITRD] [--vmm PATH] [--no-qemu]
#
# Boots a Linux guest with nestor-vmm on /dev/kvm and checks that: the guest reaches its
# init (console line + the boot marker nestor-vmm reports), it sees every vCPU (2), a
# guest `poweroff -f` ends nestor-vmm with status 0 (ACPI S5, or every vCPU halted for a
# kernel without ACPI) and a guest `reboot -f` with status 2; and, when the kernel has
# virtio-mmio command-line devices (the project's guest kernel), that the guest reads and
# writes a virtio-blk disk (the data is in the host file afterwards), a read-only disk
# refuses writes, and virtio-rng is the guest's hardware RNG; that the guest's command
# line has pci=off; and, where the host's THP policy is `always` and KVM has debugfs,
# that KVM maps guest RAM with 2 MiB entries (its pages_2m count while a guest waits).
# Then, in the same run, boots the same kernel and initramfs with 1 vCPU under nestor-vmm
# and under QEMU `-M microvm` (guest `reboot -f` with `reboot=t` and `-no-reboot`, which
# ends QEMU with or without guest ACPI) and prints launch -> init, launch -> exit, peak
# RSS and nestor-vmm's own overhead beyond guest pages (labelled when inside the TCG test
# host). QEMU not reaching init is reported, not a failure. Every launch runs under
# `timeout 60`.
#
# Runs in the KVM test host unless this host has hardware KVM. Without --kernel it uses
# guest-kernel/build.sh's (cached) vmlinux; without --initrd it builds a busybox one.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=300
qemu=1
script_opt() { [[ $1 == --no-qemu ]] && qemu=0 && return 1; return 0; }
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_vmm
find_kernel
rerun_where_kvm_is
need_kvm

make_work
marker="vmm-boot-init-$$-$RANDOM"
custom_initrd=$initrd
if [[ -z $initrd ]]; then
    mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev" "$work/root/sys"
    cp /bin/busybox "$work/root/bin/busybox"
    ln -s busybox "$work/root/bin/sh"
    cat >"$work/root/init" <<INIT
#!/bin/sh
/bin/busybox mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
# Boot marker: 123 to port 0x3f0 (1008), Firecracker's convention.
printf '\173' | /bin/busybox dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
# Reports go through /dev/kmsg: printk reaches the console synchronously, so nothing is
# lost when the guest powers off right after (tty output may still be queued then).
say() { echo "<2>\$*" >/dev/kmsg; }
[ -c /dev/port ] && say "devport: yes" || say "devport: no"
say "cmdline: \$(/bin/busybox cat /proc/cmdline)"
if [ -b /dev/vda ]; then
    say "vda: \$(/bin/busybox dd if=/dev/vda bs=8 count=1 2>/dev/null)"
    printf GUESTWROTE | /bin/busybox dd of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null
    /bin/busybox sync
    if printf X | /bin/busybox dd of=/dev/vdb bs=1 count=1 conv=notrunc 2>/dev/null; then
        say "vdb: write accepted"
    else
        say "vdb: write refused"
    fi
    say "rng: \$(/bin/busybox dd if=/dev/hwrng bs=16 count=1 2>/dev/null | /bin/busybox wc -c) bytes from /dev/hwrng; current \$(/bin/busybox cat /sys/devices/virtual/misc/hw_random/rng_current 2>&1); virtio ids \$(/bin/busybox cat /sys/bus/virtio/devices/*/device 2>/dev/null | /bin/busybox tr '\\n' ' ')"
fi
say "$marker uptime \$(/bin/busybox cut -d' ' -f1 /proc/uptime) cpus \$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
case \$(/bin/busybox cat /proc/cmdline) in
*nestor.action=reboot*) /bin/busybox reboot -f ;;
*nestor.action=hold*) /bin/busybox sleep 3; /bin/busybox poweroff -f ;;
*) /bin/busybox poweroff -f ;;
esac
INIT
    chmod 755 "$work/root/init"
    (cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initrd"
    initrd=$work/initrd
fi
cmdline="console=ttyS0 quiet panic=-1 rdinit=/init"

now() { date +%s%N; }
# launch NAME CMD... : runs CMD (console on its stdout) under a time limit; records the
# status, the time the init marker appeared on the console, launch -> exit, peak RSS.
launch() {
    local name=$1; shift
    local t0
    t0=$(now)
    echo "$t0" >"$work/$name.t0"
    {
        set +e
        /usr/bin/time -f %M -o "$work/$name.rss" timeout --kill-after=5 60 "$@" </dev/null 2>"$work/$name.err"
        echo $? >"$work/$name.rc"
    } | while IFS= read -r line; do
        if [[ $line == *"$marker"* && ! -e $work/$name.tinit ]]; then now >"$work/$name.tinit"; fi
        printf '%s\n' "$line" >>"$work/$name.console"
    done
    now >"$work/$name.t1"
}
ms() { echo $((($(cat "$work/$1.$3") - $(cat "$work/$1.$2")) / 1000000)); }
rc() { tail -n1 "$work/$1.rc"; }

check() { # NAME EXPECTED_STATUS EXPECTED_CPUS
    local name=$1 want=$2 cpus=$3
    if ! grep -q "$marker" "$work/$name.console" 2>/dev/null; then
        bad "$name: the guest's init never ran (status $(rc "$name")); console and stderr:"
        tail -n 20 "$work/$name.console" "$work/$name.err" >&2 2>/dev/null || true
        return
    fi
    if [[ $(rc "$name") != "$want" ]]; then
        bad "$name: exit status $(rc "$name"), want $want"
        tail -n 5 "$work/$name.err" >&2; return
    fi
    local seen
    seen=$(grep "$marker" "$work/$name.console" | tr -d '\r' | sed 's/.* cpus //')
    if [[ $seen != "$cpus" ]]; then
        bad "$name: guest sees $seen vCPUs, want $cpus"; return
    fi
    pass "$name: init ran, guest sees $seen vCPU(s), exit status $want"
}

echo "kernel $kernel; initrd $initrd; vmm $vmm" >&2
virtio=0
[[ $kernel == "$cache"/guest-kernel/* ]] && virtio=1
printf 'HOSTDATA' >"$work/rw.img"; truncate -s 1M "$work/rw.img"
printf 'READONLY' >"$work/ro.img"; truncate -s 1M "$work/ro.img"
cp "$work/ro.img" "$work/ro.orig"
launch nestor-smp-poweroff "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --vcpus 2 \
    --disk "$work/rw.img" --disk "$work/ro.img,ro" --cmdline "$cmdline"
check nestor-smp-poweroff 0 2
con=$work/nestor-smp-poweroff.console
if grep -q "vda: " "$con"; then
    grep -q "vda: HOSTDATA" "$con" && pass "virtio-blk: guest read the host's data" ||
        bad "virtio-blk: guest read '$(grep "vda: " "$con")'"
    [[ $(dd if="$work/rw.img" bs=1 skip=512 count=10 2>/dev/null) == GUESTWROTE ]] &&
        pass "virtio-blk: guest's write is in the host file" ||
        bad "virtio-blk: guest's write not in the host file"
    grep -q "vdb: write refused" "$con" && cmp -s "$work/ro.img" "$work/ro.orig" &&
        pass "virtio-blk: read-only disk refused the write" ||
        bad "virtio-blk: read-only disk: $(grep "vdb: " "$con")"
    grep -q "rng: 16 bytes from /dev/hwrng" "$con" && pass "virtio-rng: $(grep -o "rng: .*" "$con" | tr -d '\r')" ||
        bad "virtio-rng: $(grep "rng: " "$con")"
elif ((virtio)); then
    bad "virtio: the guest kernel sees no /dev/vda"
else
    echo "skip virtio checks: this kernel has no virtio-mmio command-line devices"
fi
if grep -q "devport: no" "$work/nestor-smp-poweroff.console"; then
    echo "skip boot-marker check: the guest kernel has no /dev/port (CONFIG_DEVPORT)"
elif grep -q "guest init reached after" "$work/nestor-smp-poweroff.err"; then
    pass "boot marker: $(grep -o 'guest init reached after [0-9]* ms' "$work/nestor-smp-poweroff.err")"
else
    bad "nestor-smp-poweroff: no boot-marker line from nestor-vmm"
fi
launch nestor-reboot "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --cmdline "$cmdline nestor.action=reboot"
check nestor-reboot 2 1
NESTOR_VMM_STATS=1 launch nestor "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --cmdline "$cmdline"
check nestor 0 1
# The machine has no PCI bus and says so on the command line it gives the guest.
if [[ -z $custom_initrd ]]; then
    grep -q "cmdline: .* pci=off" "$work/nestor.console" && pass "the guest's command line has pci=off" ||
        bad "no pci=off on the guest's command line: $(grep -o 'cmdline: .*' "$work/nestor.console" | tr -d '\r')"
fi
# Guest RAM starts on a 2 MiB boundary, so KVM can map it with 2 MiB entries where the
# host backs it with huge pages (THP `always`, as in the test host): KVM's own count of
# such entries (debugfs pages_2m of the VM) while a guest holds still for 3 s. With the
# mapping on any 4 KiB boundary it stayed 0.
dbg=/sys/kernel/debug
mounted_dbg=0
if ! mountpoint -q "$dbg" && mount -t debugfs none "$dbg" 2>/dev/null; then
    mounted_dbg=1 # unmounted below: the host is left as it was
fi
if ! grep -q '\[always\]' /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null; then
    echo "skip huge-page check: this host's THP policy is not 'always' ($(cat /sys/kernel/mm/transparent_hugepage/enabled 2>/dev/null || echo no THP))"
elif [[ ! -d $dbg/kvm ]]; then
    echo "skip huge-page check: no KVM debugfs ($dbg/kvm)"
else
    launch nestor-huge "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --cmdline "$cmdline nestor.action=hold" &
    lp=$!
    most=0 seen=0
    for _ in $(seq 100); do
        for f in "$dbg"/kvm/*-*/pages_2m; do
            [[ -r $f ]] || continue
            pid=${f#"$dbg"/kvm/}; pid=${pid%%-*}
            grep -q 'nestor.action=hold' "/proc/$pid/cmdline" 2>/dev/null || continue
            seen=1
            v=$(cat "$f" 2>/dev/null || echo 0)
            ((v > most)) && most=$v
        done
        kill -0 "$lp" 2>/dev/null || break
        sleep 0.1
    done
    wait "$lp" || true
    huge=$(grep -o '"guest_huge_kib":[0-9]*' "$work/nestor.err" | cut -d: -f2 || true)
    if ((!seen)); then
        echo "skip huge-page check: the VM's pages_2m never showed in $dbg/kvm"
    elif ((most > 0)); then
        pass "KVM maps guest RAM with 2 MiB entries: up to $most (host huge pages: ${huge:-?} KiB at exit)"
    else
        bad "KVM mapped no guest RAM with 2 MiB entries (pages_2m 0; host huge pages ${huge:-?} KiB at exit)"
    fi
fi
((mounted_dbg)) && umount "$dbg" 2>/dev/null || true

report() { # NAME
    local name=$1
    [[ -e $work/$name.tinit ]] || return 0
    printf '%-14s launch -> init %5d ms, launch -> exit %5d ms, peak RSS %6d KiB%s\n' \
        "$name" "$(ms "$name" t0 tinit)" "$(ms "$name" t0 t1)" "$(cat "$work/$name.rss" | tail -n1)" "$label"
}
if ((qemu)) && command -v qemu-system-x86_64 >/dev/null; then
    launch qemu-microvm qemu-system-x86_64 -M microvm,rtc=off -enable-kvm -cpu host -m 256 -smp 1 \
        -nodefaults -no-user-config -display none -no-reboot -serial stdio \
        -kernel "$kernel" -initrd "$initrd" -append "$cmdline reboot=t nestor.action=reboot"
    grep -q "$marker" "$work/qemu-microvm.console" 2>/dev/null ||
        { echo "note qemu-microvm: init not reached (status $(rc qemu-microvm)); its console and stderr:"
          tail -n 5 "$work/qemu-microvm.console" "$work/qemu-microvm.err" 2>/dev/null || true; }
fi
echo "--- same kernel, initramfs, 1 vCPU, 256 MiB$label"
report nestor
echo "    nestor-vmm's own marker: $(grep -o 'guest init reached after [0-9]* ms' "$work/nestor.err" || echo none)"
echo "    nestor-vmm at exit: $(grep -o 'stats: .*' "$work/nestor.err" || echo none)"
report qemu-microvm
finish
