#!/usr/bin/env bash
# tests/kvm/vmm-rate-limit.sh [--kernel VMLINUX] [--initrd INITRD] [--agent NESTOR-AGENT] [--vmm PATH]
#
# nestor-vmm's virtio-blk rate limiter under a real Linux guest, in one boot: two 2 MiB
# disks, /dev/vda unlimited and /dev/vdb with `bw=262144/s` (256 KiB/s). The guest reads
# each whole disk with dd (a fresh boot: nothing cached) and times it with
# /proc/uptime. Checks: both reads succeed with the disks' bytes; the limited read takes
# at least 5 s (the bucket starts full with 256 KiB, so 2 MiB need 7 s of refill: a
# limiter that lets bytes through faster fails this); it is clearly slower than the
# unlimited one (at least twice the time); and nestor-vmm exits 0 on the guest's
# power-off. The measured rates are printed.
#
# Runs in the KVM test host unless this host has hardware KVM. Without --kernel it uses
# guest-kernel/build.sh's (cached) vmlinux; without --agent the static nestor-agent
# (images/build-agent.sh). The launch runs under `timeout 120`.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=240
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_vmm
find_kernel
[[ -n $initrd ]] || { find_static_bins; initrd=$("$repo/images/build-initramfs.sh" --agent "$agent" | tail -n1); }
rerun_where_kvm_is
need_kvm

make_work
size=$((2 << 20))
head -c $size /dev/urandom >"$work/fast.img"
head -c $size /dev/urandom >"$work/slow.img"
# The guest's part: results go to the console as "rl: ..." lines.
guest=$(cat <<'G'
r() { echo "rl: $*"; }
# Centiseconds of uptime. Not "tr -d ." of /proc/uptime: "0.95" becomes 095, which
# the shell's arithmetic reads as a bad octal number (CI saw this in a guest that
# reached init within its first second).
cs() { read -r u _ </proc/uptime; echo $(( ${u%.*} * 100 + 1${u#*.} - 100 )); }
for d in vda vdb; do
  a=$(cs); n=$(dd if=/dev/$d bs=65536 2>/dev/null | wc -c); rc=$?; b=$(cs)
  r "$d rc=$rc bytes=$n ms=$(( (b - a) * 10 ))"
done
G
)
b64=$(printf '%s' "$guest" | base64 -w0)
cmdline="console=ttyS0 quiet panic=-1 nestor.cmd=$b64"

echo "kernel $kernel; initrd $initrd; vmm $vmm" >&2
set +e
timeout --kill-after=5 120 "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 \
    --disk "$work/fast.img,ro" --disk "$work/slow.img,ro,bw=262144/s" --cmdline "$cmdline" \
    </dev/null >"$work/console" 2>"$work/err"
rc=$?
set -e

con() { tr -d '\r' <"$work/console" | grep -o "rl: $1 .*" | head -n1 || true; }
field() { sed -n "s/.* $1=\([0-9]*\).*/\1/p" <<<"$2" || true; }
[[ $rc == 0 ]] && pass "nestor-vmm exited 0 on the guest's power-off" || bad "nestor-vmm exit status $rc"
fast=$(con vda) slow=$(con vdb)
fast_ms=$(field ms "$fast") slow_ms=$(field ms "$slow")
[[ $(field bytes "$fast") == "$size" && $(field bytes "$slow") == "$size" ]] &&
    pass "both disks read whole ($size bytes each)" || bad "reads: vda '$fast', vdb '$slow'"
if [[ -n $fast_ms && -n $slow_ms ]]; then
    rate() { echo "$((size * 1000 / ($1 > 0 ? $1 : 1) / 1024)) KiB/s"; }
    ((slow_ms >= 5000)) && pass "limited disk: $slow_ms ms for 2 MiB ($(rate "$slow_ms"); limit 256 KiB/s after a 256 KiB bucket)$label" ||
        bad "limited disk read 2 MiB in $slow_ms ms ($(rate "$slow_ms")): faster than 256 KiB/s allows"
    ((slow_ms >= 2 * fast_ms)) && pass "unlimited disk: $fast_ms ms ($(rate "$fast_ms")), limited ${slow_ms} ms" ||
        bad "limited disk not clearly slower: unlimited $fast_ms ms, limited $slow_ms ms"
else
    bad "no timings from the guest"
fi
if ((fail)); then
    echo "--- console (last 30 lines)"; tail -n 30 "$work/console"
    echo "--- nestor-vmm stderr"; tail -n 20 "$work/err"
fi
finish
