#!/usr/bin/env bash
# benches/vmm-vs-peers.sh [--rounds N] [--firecracker PATH] [--kernel VMLINUX] [--vmm PATH]
#                         [--baseline NESTOR-VMM]
#
# nestor-vmm against QEMU `-M microvm` (and Firecracker when given by path), interleaved
# in one run: same kernel and busybox initramfs, 1 vCPU, 128 MiB, the guest's init
# writes the boot marker, prints its uptime and does `reboot -f` (reboot=k: i8042 reset
# for nestor-vmm and Firecracker; reboot=t with -no-reboot for QEMU). Prints the medians
# over N rounds (default 3; the order rotates each round) of launch -> first console
# output, -> init line, -> exit, the guest's uptime at init, peak RSS and stop (the init
# line, written just before `reboot -f`, -> the process gone: the guest's power-off path
# plus the VMM's teardown); then
# nestor-vmm's own --boot-timings (medians), and nestor-vmm's medians as ratios of each
# peer's. With --firecracker, Firecracker runs twice per round: with the same command
# line as the others, and with the i8042 options of its own default command line added
# (`firecracker-i8042`; its i8042 model answers only what they leave the driver to ask).
# Progress goes to stderr. Runs in the KVM test host unless this host has hardware KVM
# (tests/testhost/kvm-exec). --baseline adds another nestor-vmm build (say, before a
# change) as a peer. A benchmark, not a test.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/.." && pwd -P)
cache=${NESTOR_CACHE:-$HOME/.cache/nestor}
rounds=3 fc= kernel= vmm= base=
args=("$@")
while (($#)); do
    case $1 in
    --rounds) rounds=$2; shift 2 ;;
    --firecracker) fc=$(realpath "$2"); shift 2 ;;
    --kernel) kernel=$(realpath "$2"); shift 2 ;;
    --vmm) vmm=$(realpath "$2"); shift 2 ;;
    --baseline) base=$(realpath "$2"); shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "vmm-vs-peers.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [[ ${NESTOR_TESTHOST:-} != inside && -z ${VMM_VS_PEERS_DIRECT:-} ]]; then
    # The host's root (and so every binary given by path) is visible inside read-only.
    exec env VMM_VS_PEERS_DIRECT=1 "$repo/tests/testhost/kvm-exec" --timeout 900 -- "$0" "${args[@]}"
fi

if [[ -z $vmm ]]; then
    for c in "${CARGO_TARGET_DIR:-$repo/target}/release/nestor-vmm" "${CARGO_TARGET_DIR:-$repo/target}/debug/nestor-vmm"; do
        [[ -x $c ]] && { vmm=$c; break; }
    done
fi
[[ -x $vmm ]] || { echo "vmm-vs-peers.sh: no nestor-vmm (cargo build --release -p nestor-microvm)" >&2; exit 2; }
[[ -n $kernel ]] || kernel=$(ls -t "$cache"/guest-kernel/*/vmlinux 2>/dev/null | head -n1 || true)
[[ -r $kernel ]] || { echo "vmm-vs-peers.sh: no kernel (guest-kernel/build.sh or --kernel)" >&2; exit 2; }
[[ -c /dev/kvm ]] || { echo "vmm-vs-peers.sh: no /dev/kvm" >&2; exit 2; }
label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside the TCG test host)"

work=$(mktemp -d "${TMPDIR:-/tmp}/vmm-vs-peers.XXXXXX")
trap 'rm -rf "$work"' EXIT
marker="peers-init-$$"
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev" "$work/root/sys"
cp /bin/busybox "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
cat >"$work/root/init" <<INIT
#!/bin/sh
/bin/busybox mount -t devtmpfs dev /dev
/bin/busybox mount -t proc proc /proc
printf '\173' | /bin/busybox dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
echo "<2>$marker uptime \$(/bin/busybox cut -d' ' -f1 /proc/uptime)" >/dev/kmsg
/bin/busybox reboot -f
INIT
chmod +x "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initrd"
initrd=$work/initrd
cmdline="console=ttyS0 quiet panic=-1 rdinit=/init"

now() { date +%s%N; }
# launch NAME CMD... : console on CMD's stdout; records first output, init line, exit,
# the guest's uptime at init and peak RSS (KiB) as one line in $work/NAME.rows.
launch() {
    local name=$1; shift
    local t0 d=$work/cur
    rm -rf "$d"; mkdir "$d"
    t0=$(now)
    {
        set +e
        /usr/bin/time -f %M -o "$d/rss" timeout --kill-after=5 120 "$@" </dev/null 2>"$d/err"
        echo $? >"$d/rc"
    } | while IFS= read -r line; do
        # Firecracker logs its own start on stdout before it reads the logger config:
        # not the guest's output.
        [[ $line == *'[anonymous-instance:'* ]] && continue
        [[ -e $d/tout ]] || { now >"$d/tout"; printf '%s' "${line:0:60}" | tr -d '\r' >"$d/first"; }
        if [[ $line == *"$marker uptime"* && ! -e $d/tinit ]]; then
            now >"$d/tinit"
            echo "${line##* uptime }" | tr -d '\r' >"$d/uptime"
        fi
    done
    local t1 ms
    t1=$(now)
    ms() { [[ -e $d/$1 ]] && echo $((($(cat "$d/$1") - t0) / 1000000)) || echo -; }
    if [[ ! -e $d/tinit ]]; then
        echo "  $name: init not reached (status $(cat "$d/rc" 2>/dev/null)): $(tail -n 2 "$d/err" | tr '\n' ' ')" >&2
    fi
    local row stop=-
    # Stop: the init line (written just before `reboot -f`) -> the VMM process gone.
    [[ -e $d/tinit ]] && stop=$(((t1 - $(cat "$d/tinit")) / 1000000))
    row="$(ms tout) $(ms tinit) $(((t1 - t0) / 1000000)) $(cat "$d/uptime" 2>/dev/null || echo -) $(tail -n1 "$d/rss") $stop"
    echo "$row" >>"$work/$name.rows"
    echo "  $name: output/init/exit ms, uptime s, RSS KiB, stop ms: $row; first line: $(cat "$d/first" 2>/dev/null)" >&2
    # The milestones only (the VMM's own steps follow a `;`).
    grep -o 'first_kvm_run [^;]*' "$d/err" >>"$work/$name.timings" 2>/dev/null || true
}

peers=(nestor-vmm)
[[ -n $base ]] && peers+=(baseline)
peers+=(qemu-microvm)
[[ -n $fc ]] && peers+=(firecracker firecracker-i8042)
run_peer() {
    case $1 in
    nestor-vmm)
        launch nestor-vmm "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 128 --vcpus 1 \
            --cmdline "$cmdline reboot=k" --boot-timings ;;
    baseline)
        launch baseline "$base" --kernel "$kernel" --initrd "$initrd" --mem 128 --vcpus 1 \
            --cmdline "$cmdline reboot=k" ;;
    qemu-microvm)
        launch qemu-microvm qemu-system-x86_64 -M microvm,rtc=off -enable-kvm -cpu host -m 128 -smp 1 \
            -nodefaults -no-user-config -display none -no-reboot -serial stdio \
            -kernel "$kernel" -initrd "$initrd" -append "$cmdline reboot=t" ;;
    firecracker | firecracker-i8042)
        # Firecracker's own log goes to a file, so the console's first line is the
        # guest's, as for the others. firecracker-i8042 adds the i8042 options of
        # Firecracker's default command line (its i8042 model answers only what they
        # leave the driver to ask).
        local args="$cmdline reboot=k"
        [[ $1 == firecracker-i8042 ]] && args+=" i8042.noaux i8042.nomux i8042.dumbkbd"
        : >"$work/fc.log"
        cat >"$work/fc.json" <<JSON
{"boot-source": {"kernel_image_path": "$kernel", "initrd_path": "$initrd",
                 "boot_args": "$args"},
 "drives": [], "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
 "logger": {"log_path": "$work/fc.log", "level": "Warning"}}
JSON
        launch "$1" "$fc" --no-api --config-file "$work/fc.json" ;;
    esac
}

# The order rotates each round, so no peer always runs first (or right after another).
for i in $(seq "$rounds"); do
    n=${#peers[@]}
    for j in $(seq 0 $((n - 1))); do
        p=${peers[$(((i - 1 + j) % n))]}
        echo "round $i/$rounds: $p" >&2
        run_peer "$p"
    done
done

median() { # column
    awk -v c="$1" '$c != "-" { print $c }' | sort -n | awk '{ v[NR] = $1 } END { if (NR == 0) print "-"; else if (NR % 2) print v[(NR + 1) / 2]; else print (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}
echo "medians of $rounds rounds, 1 vCPU, 128 MiB, $(basename "$kernel")$label"
printf '%-17s %9s %9s %9s %10s %9s %9s\n' "" "->output" "->init" "->exit" "uptime@init" "peak RSS" "stop"
for p in "${peers[@]}"; do
    r=$work/$p.rows
    printf '%-17s %6s ms %6s ms %6s ms %9s s %6s KiB %6s ms\n' "$p" "$(median 1 <"$r")" "$(median 2 <"$r")" \
        "$(median 3 <"$r")" "$(median 4 <"$r")" "$(median 5 <"$r")" "$(median 6 <"$r")"
done
if [[ -s $work/nestor-vmm.timings ]]; then
    t=$work/nestor-vmm.timings
    echo "nestor-vmm --boot-timings (ms since VMM start, medians): first_kvm_run $(median 2 <"$t")" \
        "first_output $(median 4 <"$t") init $(median 6 <"$t") exit $(median 8 <"$t")"
fi
# nestor-vmm's medians as ratios of each peer's (below 1: nestor-vmm is faster).
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-"; else printf "%.2fx", a / b }'; }
for p in "${peers[@]}"; do
    [[ $p == nestor-vmm ]] && continue
    r=$work/$p.rows n=$work/nestor-vmm.rows
    echo "nestor-vmm / $p: output $(ratio "$(median 1 <"$n")" "$(median 1 <"$r")")," \
        "init $(ratio "$(median 2 <"$n")" "$(median 2 <"$r")"), exit $(ratio "$(median 3 <"$n")" "$(median 3 <"$r")")," \
        "uptime at init $(ratio "$(median 4 <"$n")" "$(median 4 <"$r")"), peak RSS $(ratio "$(median 5 <"$n")" "$(median 5 <"$r")")," \
        "stop $(ratio "$(median 6 <"$n")" "$(median 6 <"$r")")"
done
