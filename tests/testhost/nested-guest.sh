#!/usr/bin/env bash
# Boots a Linux guest on /dev/kvm with QEMU (-M microvm -enable-kvm -cpu host): the
# test host's own kernel (ELF vmlinux, PVH entry) and a busybox initramfs whose init
# prints a marker and powers off. Passes (exit 0) only if the guest's init ran and
# QEMU exited by itself within the time limit. Meant to run inside the test host
# (tests/testhost/run -- tests/testhost/nested-guest.sh) or on a host with hardware
# KVM. Prints the launch-to-exit wall time, labelled when inside the test host.
#   nested-guest.sh [--timeout SECS] [--kernel VMLINUX]
set -euo pipefail

limit=120
kernel=
while (($#)); do
    case $1 in
    --timeout) limit=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    *) echo "nested-guest.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [[ -z $kernel ]]; then
    img=${NESTOR_TESTHOST_IMAGE:-$("$(dirname "$0")/prepare.sh" | tail -n1)}
    kernel=$img/vmlinux
fi
[[ -r $kernel ]] || { echo "nested-guest.sh: no kernel at $kernel" >&2; exit 2; }
[[ -c /dev/kvm ]] || { echo "nested-guest.sh: no /dev/kvm" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/nested-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev"
cp /bin/busybox "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
marker="nested-guest-init-$$-$RANDOM"
cat >"$work/root/init" <<INIT
#!/bin/sh
/bin/busybox mount -t proc proc /proc
echo "$marker uptime \$(/bin/busybox cat /proc/uptime)"
/bin/busybox poweroff -f
INIT
chmod 755 "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initrd"

label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside TCG test host; compare only within this run)"
t0=$(date +%s%N)
set +e
timeout --kill-after=5 "$limit" qemu-system-x86_64 -M microvm,rtc=on -enable-kvm -cpu host -m 256 -smp 1 \
    -nodefaults -no-user-config -display none -no-reboot -serial "file:$work/console" \
    -kernel "$kernel" -initrd "$work/initrd" \
    -append "console=ttyS0 quiet panic=-1 rdinit=/init" </dev/null >"$work/qemu.log" 2>&1
rc=$?
set -e
t1=$(date +%s%N)
if ! grep -q "^$marker" "$work/console"; then
    echo "nested-guest.sh: the guest's init never ran (QEMU status $rc); console and QEMU output:" >&2
    tail -n 30 "$work/console" "$work/qemu.log" >&2
    exit 1
fi
if ((rc != 0)); then
    echo "nested-guest.sh: the guest's init ran, but QEMU ended with status $rc (124: time limit $limit s)" >&2
    exit 1
fi
echo "nested guest: init ran ($(grep "^$marker" "$work/console" | tr -d '\r' | cut -d' ' -f2-3)), launch -> QEMU exit $(((t1 - t0) / 1000000)) ms$label"
