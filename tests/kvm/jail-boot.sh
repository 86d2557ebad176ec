#!/usr/bin/env bash
# tests/kvm/jail-boot.sh [--kernel VMLINUX] [--nestor PATH] [--vmm PATH] [--agent PATH] [--runs N]
#
# Scenario 2 with a real Linux guest: nestor-vmm inside nestor's jail.
# 1. Measures, with strace -ff, which syscalls each nestor-vmm thread (main, vcpuN,
#    virtio-events) makes after its start-up while booting the project's guest
#    (unfiltered: --seccomp none), prints them, and fails if one is missing from the
#    built-in filter of that thread (nestor-vmm --seccomp-print).
# 2. Boots the guest unjailed under the default filters: init runs, virtio-blk read and
#    write work, a read-only disk refuses writes, status 0.
# 3. Boots it with `nestor vm run --jail` (user namespace, cgroup limits, read-only
#    kernel/initramfs, rw and ro disks): the same checks, and while the guest runs, seen
#    from the host, the VMM has CapEff 0, the jail's unprivileged uid, Seccomp 2 on every
#    thread, its cgroup limits, and a root listing only the jail's files; afterwards no
#    jail directory, cgroup or runtime state is left.
#    vsock through the jail: the host connects to the socket the jail shares and talks
#    to `nestor-agent vsock-cat` in the guest, both sides through `vsock-cat` (skipped
#    without a static nestor-agent that has it).
# 4. Benchmark: launch -> guest init and peak RSS (largest process of the launch) of the
#    jailed against the unjailed VMM, N runs each (default 3), medians, labelled.
#
# Runs in the KVM test host unless this host has hardware KVM.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=600
runs=3
script_opt() { [[ $1 == --runs ]] && runs=$2 && return 2; return 0; }
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
# A static nestor-vmm (RUSTFLAGS="-C target-feature=+crt-static" cargo build --release
# --target x86_64-unknown-linux-gnu -p nestor-microvm) is preferred: the jail then needs
# none of the host's libraries, its root is the VMM, /dev and /vm only.
find_vmm --static-first
find_nestor
find_kernel
# The static guest agent (scripts/test.sh builds it before the KVM batch) brings
# `vsock-cat`, the vsock client/server of both sides of the vsock check.
[[ -n $agent ]] || agent=${NESTOR_AGENT:-$tdir/x86_64-unknown-linux-gnu/release/nestor-agent}
rerun_where_kvm_is
need_kvm
if ! command -v strace >/dev/null; then
    dpkg -s strace >/dev/null 2>&1 || apt-get install -y -q strace >&2
fi
command -v strace >/dev/null || die2 "strace missing"

make_work
chmod 755 "$work"
export NESTOR_STATE=$work/state NESTOR_ROOT=$work/root-data
juid=$((200000 + RANDOM % 50000))
on_exit '"$nestor"' gc
trap 'echo "jail-boot.sh: line $LINENO: command failed (status $?)" >&2' ERR
marker="jail-boot-init-$$-$RANDOM"
mkdir -p "$work/root/bin" "$work/root/proc" "$work/root/dev" "$work/root/sys"
cp /bin/busybox "$work/root/bin/busybox"
ln -s busybox "$work/root/bin/sh"
have_vsock=0
if [[ -x $agent ]] && grep -aq "hybrid SOCKET PORT" "$agent" && "$vmm" --help 2>/dev/null | grep -c -- --vsock >/dev/null; then
    cp "$agent" "$work/root/bin/nestor-agent"
    have_vsock=1
fi
cat >"$work/root/init" <<INIT
#!/bin/sh
/bin/busybox mount -t devtmpfs dev /dev
exec </dev/console >/dev/console 2>&1
/bin/busybox mount -t proc proc /proc
printf '\173' | /bin/busybox dd of=/dev/port bs=1 seek=1008 count=1 2>/dev/null
say() { echo "<2>\$*" >/dev/kmsg; }
if [ -b /dev/vda ]; then
    say "vda: \$(/bin/busybox dd if=/dev/vda bs=8 count=1 2>/dev/null)"
    printf GUESTWROTE | /bin/busybox dd of=/dev/vda bs=512 seek=1 conv=notrunc 2>/dev/null
    /bin/busybox sync
    if printf X | /bin/busybox dd of=/dev/vdb bs=1 count=1 conv=notrunc 2>/dev/null; then
        say "vdb: write accepted"
    else
        say "vdb: write refused"
    fi
    /bin/busybox dd if=/dev/hwrng bs=16 count=1 2>/dev/null | /bin/busybox wc -c >/dev/null
fi
say "$marker cpus \$(/bin/busybox grep -c ^processor /proc/cpuinfo)"
for a in \$(/bin/busybox cat /proc/cmdline); do
    case \$a in
    nestor.vsock=1)
        echo guest-says-hi | /bin/nestor-agent vsock-cat listen 5000 >/vsock.got 2>/vsock.err
        say "vsock: \$(/bin/busybox cat /vsock.got /vsock.err)" ;;
    nestor.sleep=*) /bin/busybox sleep \${a#nestor.sleep=} ;;
    esac
done
/bin/busybox poweroff -f
INIT
chmod 755 "$work/root/init"
(cd "$work/root" && find . | cpio -o -H newc --quiet) >"$work/initrd"
initrd=$work/initrd
cmdline="console=ttyS0 quiet panic=-1 rdinit=/init"

fresh_disks() {
    printf 'HOSTDATA' >"$work/rw.img"; truncate -s 1M "$work/rw.img"
    printf 'READONLY' >"$work/ro.img"; truncate -s 1M "$work/ro.img"
    cp "$work/ro.img" "$work/ro.orig"
    chown "$juid:$juid" "$work/rw.img"
}

now() { date +%s%N; }
# launch NAME CMD... : console on stdout, marker time, launch -> exit, peak RSS, status.
launch() {
    local name=$1; shift
    now >"$work/$name.t0"
    {
        set +e
        /usr/bin/time -f %M -o "$work/$name.rss" timeout --kill-after=5 120 "$@" </dev/null 2>"$work/$name.err"
        echo $? >"$work/$name.rc"
    } | while IFS= read -r line; do
        if [[ $line == *"$marker"* && ! -e $work/$name.tinit ]]; then now >"$work/$name.tinit"; fi
        printf '%s\n' "$line" >>"$work/$name.console"
    done
    now >"$work/$name.t1"
}
ms() { echo $((($(cat "$work/$1.$3") - $(cat "$work/$1.$2")) / 1000000)); }
rc() { tail -n1 "$work/$1.rc"; }

check_boot() { # NAME
    local name=$1 con=$work/$1.console
    if ! grep -q "$marker" "$con" 2>/dev/null; then
        bad "$name: the guest's init never ran (status $(rc "$name")); console and stderr:"
        tail -n 20 "$con" "$work/$name.err" >&2 2>/dev/null || true
        return
    fi
    [[ $(rc "$name") == 0 ]] && pass "$name: init ran, exit status 0" ||
        { bad "$name: exit status $(rc "$name"), want 0"; tail -n 5 "$work/$name.err" >&2; }
    grep -q "vda: HOSTDATA" "$con" && pass "$name: virtio-blk read the host's data" ||
        bad "$name: guest read '$(grep "vda: " "$con" || true)'"
    [[ $(dd if="$work/rw.img" bs=1 skip=512 count=10 2>/dev/null) == GUESTWROTE ]] &&
        pass "$name: the guest's write is in the host file" || bad "$name: guest's write not in the host file"
    grep -q "vdb: write refused" "$con" && cmp -s "$work/ro.img" "$work/ro.orig" &&
        pass "$name: read-only disk refused the write" || bad "$name: read-only disk: $(grep "vdb: " "$con" || true)"
}

echo "kernel $kernel; nestor $nestor; vmm $vmm" >&2

# vsock_client SOCKET: the host side of the hybrid vsock (`nestor-agent vsock-cat
# hybrid`: CONNECT 5000 on the Unix socket, retried for up to 90 s while the guest's
# listener is not up yet): sends host-says-hi, prints what the guest sends back.
vsock_client() {
    echo host-says-hi | "$agent" vsock-cat hybrid "$1" 5000 90
}

# --- 1. syscalls per thread, measured -------------------------------------------------
fresh_disks
mkdir -p "$work/st"
st_vsock=() st_cmd=
((have_vsock)) && { st_vsock=(--vsock "$work/st.sock"); st_cmd=nestor.vsock=1; }
launch strace strace -qq -f -ff -o "$work/st/t" "$vmm" --seccomp none --kernel "$kernel" --initrd "$initrd" \
    --mem 256 --vcpus 2 --disk "$work/rw.img" --disk "$work/ro.img,ro" "${st_vsock[@]}" \
    --cmdline "$cmdline $st_cmd" &
spid=$!
# With vsock, the guest waits for the host's connection: its syscalls are measured too.
((have_vsock)) && { vsock_client "$work/st.sock" >/dev/null || bad "strace run: vsock exchange failed"; }
wait "$spid" || true
check_boot strace
"$vmm" --seccomp-print >"$work/filters.json"
python3 - "$work/st" "$work/filters.json" <<'PY' || fail=1
import json, os, re, sys
d, filt = sys.argv[1], json.load(open(sys.argv[2]))
allowed = {k: {r["syscall"] for r in v["filter"]} for k, v in filt.items()}
seen = {}
for f in sorted(os.listdir(d)):
    lines = open(os.path.join(d, f)).read().splitlines()
    m = next((re.search(r'PR_SET_NAME, "([^"]+)"', l) for l in lines if "PR_SET_NAME" in l), None)
    name = m.group(1) if m else "main"
    if name == "main":
        # The main thread's filter goes in after the last thread is spawned.
        idx = max([i for i, l in enumerate(lines) if l.startswith("clone")] or [0])
    else:
        # A thread's own code starts once std installed its signal stack.
        idx = next((i for i, l in enumerate(lines) if l.startswith("sigaltstack({ss_sp=0x")), 0)
    calls = {re.match(r"([a-z0-9_]+)\(", l).group(1) for l in lines[idx + 1:] if re.match(r"[a-z0-9_]+\(", l)}
    kind = "vcpu" if name.startswith("vcpu") else "virtio" if name == "virtio-events" else "main"
    seen.setdefault(kind, set()).update(calls)
rc = 0
for kind in ("main", "vcpu", "virtio"):
    calls = sorted(seen.get(kind, ()))
    print(f"measured syscalls of the {kind} thread(s) after start-up: {' '.join(calls)}")
    missing = [c for c in calls if c not in allowed[kind]]
    if missing:
        print(f"FAIL seccomp: the {kind} filter lacks {' '.join(missing)}", file=sys.stderr)
        rc = 1
    else:
        print(f"ok   seccomp: the {kind} filter allows every measured syscall")
sys.exit(rc)
PY

# --- 2. unjailed, default filters -----------------------------------------------------
fresh_disks
launch plain "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --vcpus 2 \
    --disk "$work/rw.img" --disk "$work/ro.img,ro" --cmdline "$cmdline"
check_boot plain
grep -q "seccomp:" "$work/plain.err" && bad "plain: $(grep seccomp: "$work/plain.err")"

# --- 3. jailed ------------------------------------------------------------------------
fresh_disks
vsock_args=() vsock_cmd=
((have_vsock)) && { vsock_args=(--vsock "$work/v.sock"); vsock_cmd=nestor.vsock=1; }
jails_before=$( (ls /run/nestor-jail 2>/dev/null || true) | wc -l)
launch jailed "$nestor" vm run --jail --jail-uid "$juid" --jail-gid "$juid" --memory 512m \
    --pids-limit 32 --vmm "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --vcpus 2 \
    --disk "$work/rw.img" --disk "$work/ro.img,ro" "${vsock_args[@]}" --cmdline "$cmdline $vsock_cmd nestor.sleep=2" &
lpid=$!
vpid=
for _ in $(seq 1 600); do
    for p in $(pgrep -x nestor-vmm || true); do
        [[ $(awk '/^Uid:/{print $2}' "/proc/$p/status" 2>/dev/null) == "$juid" ]] && vpid=$p
    done
    [[ -n $vpid ]] && grep -q "$marker" "$work/jailed.console" 2>/dev/null && break
    sleep 0.1
done
if [[ -z $vpid ]]; then
    bad "jailed: no nestor-vmm running as uid $juid"
else
    # Checks of a live process: a vanished one fails them, it never aborts the script.
    set +e
    st=/proc/$vpid/status
    [[ $(awk '/^CapEff:/{print $2}' "$st") == 0000000000000000 ]] && pass "jailed: CapEff 0" || bad "jailed: $(grep CapEff "$st")"
    [[ $(awk '/^Uid:/{print $2}' "$st") == "$juid" ]] && pass "jailed: runs as host uid $juid (root in its user namespace)" || bad "jailed: uid $(grep Uid "$st")"
    nt=$(ls /proc/"$vpid"/task 2>/dev/null | wc -l)
    nf=$(grep -L "Seccomp:.2" /proc/"$vpid"/task/*/status 2>/dev/null | wc -l)
    [[ $nt -gt 0 && $nf == 0 ]] && pass "jailed: Seccomp 2 on all $nt threads" || bad "jailed: $nf of $nt threads without a filter"
    rootls=$(ls /proc/"$vpid"/root | tr '\n' ' ')
    # The host's libraries are there (read-only) only for a dynamically linked VMM, /run
    # (the directory shared with the host) only with vsock.
    want="dev nestor-vmm vm "
    ((have_vsock)) && want="dev nestor-vmm run vm "
    [[ $(echo "$rootls" | sed -E 's/\b(lib|lib64|usr) //g') == "$want" ]] &&
        pass "jailed: root holds only: $rootls" || bad "jailed: root holds: $rootls"
    pass "jailed: /vm holds: $(ls /proc/"$vpid"/root/vm | tr '\n' ' ')"
    cg=$(awk -F: '$1=="0"{print $3}' /proc/"$vpid"/cgroup)
    if [[ -n $cg && -e /sys/fs/cgroup$cg/memory.max ]]; then
        [[ $(cat "/sys/fs/cgroup$cg/memory.max") == $((512 << 20)) ]] && pass "jailed: cgroup memory.max 512 MiB" || bad "jailed: memory.max $(cat "/sys/fs/cgroup$cg/memory.max")"
        [[ $(cat "/sys/fs/cgroup$cg/pids.max") == 32 ]] && pass "jailed: cgroup pids.max 32" || bad "jailed: pids.max $(cat "/sys/fs/cgroup$cg/pids.max")"
    else
        echo "skip cgroup v2 limit check (no unified cgroup for $vpid)"
    fi
    set -e
fi
if ((have_vsock)); then
    # Host side of Firecracker's hybrid vsock: CONNECT <port> on the Unix socket, which
    # the jail shares with the host (the --vsock path is a link to it).
    got=$(vsock_client "$work/v.sock" || true)
    [[ $got == guest-says-hi ]] && pass "jailed: vsock host -> guest: the host read '$got' from the guest" ||
        bad "jailed: vsock: the host got '$got'"
fi
wait "$lpid" || true
check_boot jailed
grep -q "seccomp:" "$work/jailed.err" && bad "jailed: $(grep seccomp: "$work/jailed.err")"
left=$( (ls /run/nestor-jail 2>/dev/null || true) | wc -l)
[[ $left == "$jails_before" ]] && pass "jailed: no jail directory left" || bad "jailed: jail directories left: $(ls /run/nestor-jail || true)"
[[ -z $("$nestor" list -q 2>/dev/null || true) ]] && pass "jailed: no runtime state left" || bad "jailed: state left: $("$nestor" list -q || true)"
if ((have_vsock)); then
    grep -q "vsock: host-says-hi" "$work/jailed.console" && pass "jailed: vsock guest side read 'host-says-hi'" ||
        bad "jailed: vsock guest side: $(grep "vsock: " "$work/jailed.console" || echo nothing)"
    [[ ! -e $work/v.sock && ! -L $work/v.sock ]] && pass "jailed: vsock link removed" || bad "jailed: $work/v.sock left"
else
    echo "skip vsock through the jail: no static nestor-agent with vsock-cat hybrid ($agent) or no --vsock in nestor-vmm"
fi

# --- 4. benchmark ---------------------------------------------------------------------
bench() { # NAME CMD...
    local name=$1; shift
    for i in $(seq 1 "$runs"); do
        fresh_disks
        rm -f "$work/$name-$i".*
        launch "$name-$i" "$@"
        [[ -e $work/$name-$i.tinit && $(rc "$name-$i") == 0 ]] ||
            { bad "bench $name run $i: no init or status $(rc "$name-$i")"; tail -n 5 "$work/$name-$i.err" >&2; continue; }
        echo "$(ms "$name-$i" t0 tinit) $(ms "$name-$i" t0 t1) $(tail -n1 "$work/$name-$i.rss")" >>"$work/$name.samples"
    done
}
median() { sort -n | awk '{a[NR]=$1} END{if(NR) print a[int((NR+1)/2)]; else print "n/a"}'; }
# The kernel and initramfs in a directory the jail's uid can enter (bound as they are)
# and where the cache keeps them (under /root: copied once for all jails, then bound).
cp "$kernel" "$work/vmlinux"
chmod 644 "$work/vmlinux" "$initrd"
bench b-plain "$vmm" --kernel "$work/vmlinux" --initrd "$initrd" --mem 256 --disk "$work/rw.img" --cmdline "$cmdline"
bench b-jailed "$nestor" vm run --jail --jail-uid "$juid" --jail-gid "$juid" --memory 512m --vmm "$vmm" \
    --kernel "$work/vmlinux" --initrd "$initrd" --mem 256 --disk "$work/rw.img" --cmdline "$cmdline"
copy_note=""
if [[ -n $(d=$(dirname "$kernel"); while [[ $d != / ]]; do [[ $(stat -c %a "$d") == *0 ]] && echo "$d"; d=$(dirname "$d"); done) ]]; then
    bench b-jailed-copy "$nestor" vm run --jail --jail-uid "$juid" --jail-gid "$juid" --memory 512m --vmm "$vmm" \
        --kernel "$kernel" --initrd "$initrd" --mem 256 --disk "$work/rw.img" --cmdline "$cmdline"
    copy_note=" (jailed-copy: the kernel sits behind a directory closed to the jail's uid, so jails bind a copy made once: $(du -k "$kernel" | cut -f1) KiB)"
fi
echo "--- jail overhead: same kernel, initramfs, 1 vCPU, 256 MiB, $runs runs each, medians$label"
for n in b-plain b-jailed b-jailed-copy; do
    [[ -s $work/$n.samples ]] || continue
    printf '%-12s launch -> init %5s ms, launch -> exit %5s ms, peak RSS %6s KiB\n' "${n#b-}" \
        "$(cut -d' ' -f1 "$work/$n.samples" | median)" "$(cut -d' ' -f2 "$work/$n.samples" | median)" \
        "$(cut -d' ' -f3 "$work/$n.samples" | median)"
done
echo "    peak RSS: the largest process of the launch (the VMM; for jailed runs nestor waits for it)$copy_note"
finish
