#!/bin/busybox sh
# nestor's shell test init: /init of a guest initramfs built without --agent.
# Mounts what a guest needs, writes the boot marker, runs nestor.cmd (base64 of a shell
# command line) from the kernel command line, prints "nestor-init: exit N" and ends
# the VM: poweroff -f, or reboot -f with nestor.reboot=1. See images/initramfs/README.md.
/bin/busybox mount -t devtmpfs -o mode=0755 devtmpfs /dev
# Boot marker (as Firecracker's): byte 123 to I/O port 0x3f0 (= 1008), via /dev/port.
printf '\173' | dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
mount -t proc -o nosuid,nodev,noexec proc /proc
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup
mkdir -p /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=0755 tmpfs /run
hostname nestor
ip link set lo up 2>/dev/null
reboot=0
cmd=
for w in $(cat /proc/cmdline); do
    case "$w" in
    nestor.cmd=*) cmd=$(echo "${w#nestor.cmd=}" | base64 -d) ;;
    nestor.reboot=1) reboot=1 ;;
    esac
done
if [ -n "$cmd" ]; then
    sh -c "$cmd"
    code=$?
else
    echo "nestor-init: no nestor.cmd on the kernel command line"
    code=0
fi
echo "nestor-init: exit $code"
# Synced, the VMM is asked first (nestor-vmm ends the VM at that port write, without
# the kernel's shutdown path): the i8042 reset line (0xfe to port 0x64), or S5|SLP_EN
# (0x3400) to the ACPI PM1a control port 0x604. Where nothing answers, the kernel's own
# reboot or power-off follows.
sync
if [ "$reboot" = 1 ]; then
    printf '\376' | dd of=/dev/port bs=1 seek=100 count=1 2>/dev/null
    reboot -f
else
    printf '\000\064' | dd of=/dev/port bs=1 seek=1540 count=2 2>/dev/null
    poweroff -f
fi
