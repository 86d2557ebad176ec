#!/usr/bin/env bash
# tests/kvm/vmm-migrate.sh [--kernel VMLINUX] [--initrd INITRD] [--nestor PATH] [--agent PATH]
#                          [--vmm PATH] [--timeout SECS]
#
# Live migration of a Linux guest (nestor-agent as init, 2 vCPUs, 256 MiB, vsock, API,
# --track-dirty-pages) between nestor-vmm processes. A container in the guest keeps
# 8 MiB of random data, and in a loop copies it (dirtying 8 MiB each turn), compares
# the copy with it (a difference is recorded), and counts its turns in a shell
# variable written out each turn. Then:
#   1. a destination that refuses (another --mem): the source's API answers one line,
#      the destination exits 1 with one line, the source runs on;
#   2. a destination killed mid-stream (stopped first so the source blocks on it,
#      then SIGKILL): the source's API answers one line and runs on;
#   3. stop-copy to a new process (Unix socket); 4. pre-copy to a third one (TCP);
#   5. post-copy to a fourth (Unix socket: it runs at once, its guest faulting pages in);
# after each migration the agent answers on the new VMM's vsock socket, the counter
# went on from where it was, the data's MD5 in the guest is the one it had at the
# start, no copy ever differed, guest uptime went on, and the old VMM exited 0. Prints
# downtime, total time, bytes sent and rounds per strategy. Six VMM launches.
#
# Runs in the KVM test host unless this host has hardware KVM.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=230
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_vmm
find_kernel
find_agent_initrd --test-rootfs
find_nestor
rerun_where_kvm_is
need_kvm
find_client

make_work
pids=()
on_exit 'for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null; done; wait'
"$nestor" spec --bundle "$work" >/dev/null
# The containers share files in the (writable) rootfs.
sed -i 's/"readonly": *true/"readonly": false/' "$work/config.json"
grep -q '"readonly": *false' "$work/config.json" || die2 "cannot make the spec's rootfs writable"

# gsh SOCK NAME CMD: runs CMD in a container NAME, its stdout in $out.
n=0
gsh() {
    local name=$2$((++n))
    out=
    if ! "$client" client --hybrid "$1" --timeout 90 run --container "$name" --spec "$work/config.json" \
        --rootfs /rootfs/busybox --stdout "$work/o.$name" -- sh -c "$3" >"$work/r.$name" 2>&1; then
        bad "guest command $name: $(cat "$work/r.$name")"
        return 1
    fi
    out=$(cat "$work/o.$name")
}
# field JSON NAME: a number from a JSON answer.
field() { grep -o "\"$2\":[0-9.]*" <<<"$1" | head -n1 | cut -d: -f2; }
running() { [[ $("$vmm" --api "$1" --call '{"action":"metrics"}' 2>&1) == *'"paused":false'* ]]; }

# 1. Boot the source.
"$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 --vcpus 2 --track-dirty-pages \
    --vsock "$work/v1.sock" --api "$work/a.sock" --console "$work/console1" \
    --cmdline "console=ttyS0 panic=-1 quiet" </dev/null >"$work/vmm1.log" 2>&1 &
apid=$!
pids+=("$apid")
"$client" client --hybrid "$work/v1.sock" --timeout 120 ping --vmm-pid "$apid" >/dev/null ||
    { bad "the booted agent never answered"; tail -n 30 "$work/console1" "$work/vmm1.log" >&2; finish; }

# The dirtier (copying 8 MiB, then 20 ms asleep, a turn): started from the host, left running (its host connection drops at the
# first migration; the process goes on).
"$client" client --hybrid "$work/v1.sock" --timeout 600 run --container dirty --spec "$work/config.json" \
    --rootfs /rootfs/busybox --stdout /dev/null -- sh -c '
    mkdir -p /mig
    dd if=/dev/urandom of=/mig/known.tmp bs=1M count=8 2>/dev/null
    md5sum /mig/known.tmp | cut -d" " -f1 >/mig/known.md5
    mv /mig/known.tmp /mig/known
    i=0
    while :; do
        i=$((i + 1))
        cp /mig/known /mig/copy
        cmp -s /mig/known /mig/copy || echo "$i" >>/mig/bad
        echo "$i" >/mig/counter.tmp && mv /mig/counter.tmp /mig/counter
        usleep 20000
    done' >/dev/null 2>&1 &
pids+=($!)

# state SOCK NAME: the counter, the data's MD5 now and at the start, differences, uptime.
state() {
    gsh "$1" "$2" 'cat /mig/counter; md5sum /mig/known | cut -d" " -f1; cat /mig/known.md5; cat /mig/bad 2>/dev/null | wc -l; cut -d" " -f1 /proc/uptime' || return 1
    counter=$(sed -n 1p <<<"$out") md5_now=$(sed -n 2p <<<"$out") md5_then=$(sed -n 3p <<<"$out")
    diffs=$(sed -n 4p <<<"$out") uptime=$(sed -n 5p <<<"$out")
}
for _ in $(seq 60); do
    gsh "$work/v1.sock" probe 'cat /mig/counter 2>/dev/null || echo 0' || break
    ((${out:-0} >= 3)) && break
    sleep 1
done
state "$work/v1.sock" s0 || finish
c0=$counter u0=$uptime md5=$md5_then
[[ -n $md5 && $md5_now == "$md5" ]] && pass "the guest's data has its MD5 before migrating" ||
    bad "MD5 before migrating: $md5_now, recorded $md5"
((counter >= 3)) && pass "the guest counts (turn $counter)" || bad "the guest's counter: '$counter'"

# check SOCK LABEL: the guest after a migration.
check() {
    local c=$counter
    state "$1" "$2" || return 0
    ((counter > c)) && pass "$3: the counter went on ($c -> $counter)" || bad "$3: counter $c before, $counter after"
    expect "$3: the data's MD5 in the guest" "$md5" "$md5_now"
    expect "$3: copies that differed" 0 "$diffs"
    awk -v a="$uptime" -v b="$u0" 'BEGIN { exit !(a + 0 > b + 0) }' &&
        pass "$3: guest uptime went on ($u0 s -> $uptime s)" || bad "$3: uptime $u0 s before, $uptime s after"
}

# 2. A destination that refuses: another memory size.
"$vmm" --migrate-from "unix:$work/d.mig" --mem 128 --api "$work/d.sock" </dev/null >"$work/vmm-d.log" 2>&1 &
dpid=$!
pids+=("$dpid")
for _ in $(seq 100); do [[ -S $work/d.mig ]] && break; sleep 0.1; done
out=$("$vmm" --api "$work/a.sock" --call "{\"action\":\"migrate\",\"to\":\"unix:$work/d.mig\"}" 2>&1) || true
[[ $out == *'"ok":false'* && $out == *'refused'*'--mem 128'*'runs on here'* ]] && pass "a refusing destination: the source says why" ||
    bad "refusing destination: $out"
set +e
wait "$dpid"
drc=$?
set -e
[[ $drc == 1 && $(wc -l <"$work/vmm-d.log") == 1 ]] && pass "the refusing destination exited 1 with one line" ||
    bad "refusing destination: status $drc, $(cat "$work/vmm-d.log")"
running "$work/a.sock" && pass "the source runs on after a refusal" || bad "the source is not running after a refusal"

# 3. A destination killed mid-stream: stopped, so the source blocks writing, then killed.
"$vmm" --migrate-from "unix:$work/e.mig" --vsock "$work/ve.sock" --api "$work/e.sock" </dev/null >"$work/vmm-e.log" 2>&1 &
epid=$!
pids+=("$epid")
for _ in $(seq 100); do [[ -S $work/e.mig ]] && break; sleep 0.1; done
kill -STOP "$epid"
"$vmm" --api "$work/a.sock" --call "{\"action\":\"migrate\",\"to\":\"unix:$work/e.mig\",\"strategy\":\"pre-copy\"}" \
    >"$work/mig-e.out" 2>&1 &
cpid=$!
sleep 2
kill -9 "$epid"
set +e
wait "$cpid"
wait "$epid" 2>/dev/null
set -e
out=$(cat "$work/mig-e.out")
[[ $out == *'"ok":false'* && $out == *'runs on here'* ]] && pass "a destination killed mid-stream: the source says so" ||
    bad "killed destination: $out"
running "$work/a.sock" && pass "the source runs on after its destination died" ||
    bad "the source is not running after its destination died"
check "$work/v1.sock" s1 "after the failed migrations (on the source)"

# 4. stop-copy to B.
"$vmm" --migrate-from "unix:$work/b.mig" --vsock "$work/v2.sock" --api "$work/b.sock" \
    --console "$work/console2" </dev/null >"$work/vmm2.log" 2>&1 &
bpid=$!
pids+=("$bpid")
for _ in $(seq 100); do [[ -S $work/b.mig ]] && break; sleep 0.1; done
sc=$("$vmm" --api "$work/a.sock" --call "{\"action\":\"migrate\",\"to\":\"unix:$work/b.mig\",\"strategy\":\"stop-copy\"}" 2>&1) || true
dump() {
    echo "--- consoles and nestor-vmm output" >&2
    tail -n 20 "$work"/console* "$work"/vmm*.log >&2 || true
}
[[ $sc == *'"ok":true'* && $sc == *'"migration":'* ]] && pass "stop-copy migration" ||
    { bad "stop-copy: $sc"; dump; finish; }
arc=running
if [[ $sc == *'"ok":true'* ]]; then
    set +e
    wait "$apid"
    arc=$?
    set -e
fi
[[ $arc == 0 ]] && pass "the stop-copy source exited 0" || bad "the stop-copy source: status $arc"
out=$("$client" client --hybrid "$work/v2.sock" --timeout 90 ping --vmm-pid "$bpid" 2>&1) || true
expect "agent answers after stop-copy" '{"type":"pong","version":1,"pid1":true}' "$out"
check "$work/v2.sock" s2 "stop-copy"

# 5. pre-copy to C over TCP.
port=$((20000 + RANDOM % 20000))
"$vmm" --migrate-from "tcp:127.0.0.1:$port" --vsock "$work/v3.sock" --api "$work/c.sock" \
    --console "$work/console3" </dev/null >"$work/vmm3.log" 2>&1 &
cpid=$!
pids+=("$cpid")
hex=$(printf '%04X' "$port")
for _ in $(seq 100); do grep -q ":$hex 00000000:0000 0A" /proc/net/tcp && break; sleep 0.1; done
pc=$("$vmm" --api "$work/b.sock" --call "{\"action\":\"migrate\",\"to\":\"tcp:127.0.0.1:$port\",\"strategy\":\"pre-copy\",\"downtime_ms\":300}" 2>&1) || true
[[ $pc == *'"ok":true'* && $pc == *'"migration":'* ]] && pass "pre-copy migration (TCP)" ||
    { bad "pre-copy: $pc"; echo "vmm-migrate: stop-copy: $sc"; dump; finish; }
brc=running
if [[ $pc == *'"ok":true'* ]]; then
    set +e
    wait "$bpid"
    brc=$?
    set -e
fi
[[ $brc == 0 ]] && pass "the pre-copy source exited 0" || bad "the pre-copy source: status $brc"
out=$("$client" client --hybrid "$work/v3.sock" --timeout 90 ping --vmm-pid "$cpid" 2>&1) || true
expect "agent answers after pre-copy" '{"type":"pong","version":1,"pid1":true}' "$out"
check "$work/v3.sock" s3 "pre-copy"

# 6. post-copy to D: the state alone, D runs at once and its guest (still copying
# 8 MiB a turn) faults its pages in while the rest follow.
"$vmm" --migrate-from "unix:$work/p.mig" --vsock "$work/v4.sock" --api "$work/p.sock" \
    --console "$work/console4" </dev/null >"$work/vmm4.log" 2>&1 &
dpid=$!
pids+=("$dpid")
for _ in $(seq 100); do [[ -S $work/p.mig ]] && break; sleep 0.1; done
oc=$("$vmm" --api "$work/c.sock" --call "{\"action\":\"migrate\",\"to\":\"unix:$work/p.mig\",\"strategy\":\"post-copy\"}" 2>&1) || true
[[ $oc == *'"ok":true'* && $oc == *'"migration":'* ]] && pass "post-copy migration" ||
    { bad "post-copy: $oc"; dump; finish; }
crc=running
if [[ $oc == *'"ok":true'* ]]; then
    set +e
    wait "$cpid"
    crc=$?
    set -e
fi
[[ $crc == 0 ]] && pass "the post-copy source exited 0" || bad "the post-copy source: status $crc"
out=$("$client" client --hybrid "$work/v4.sock" --timeout 90 ping --vmm-pid "$dpid" 2>&1) || true
expect "agent answers after post-copy" '{"type":"pong","version":1,"pid1":true}' "$out"
check "$work/v4.sock" s4 "post-copy"

expect "shutdown" '{"type":"ok"}' "$("$client" client --hybrid "$work/v4.sock" --timeout 30 call '{"type":"shutdown"}' 2>&1)"
set +e
wait "$dpid"
drc=$?
set -e
((drc == 0)) && pass "the last VMM exited 0 after the agent's shutdown" || bad "last VMM status $drc"
((fail)) && dump
fig() {
    echo "downtime $(field "$1" downtime_ms) ms, total $(field "$1" total_ms) ms, $(($(field "$1" bytes) / 1024)) KiB sent ($(($(field "$1" last_round_bytes) / 1024)) KiB paused), $(field "$1" rounds) rounds, first round at $(field "$1" bandwidth_mib_s) MiB/s"
}
[[ $sc == *'"ok":true'* ]] && echo "vmm-migrate: stop-copy (Unix socket): $(fig "$sc")$label"
[[ $pc == *'"ok":true'* ]] && echo "vmm-migrate: pre-copy (TCP, downtime target 300 ms): $(fig "$pc")$label"
[[ $oc == *'"ok":true'* ]] && echo "vmm-migrate: post-copy (Unix socket): $(fig "$oc")$label"
finish
