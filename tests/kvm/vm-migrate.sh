#!/usr/bin/env bash
# `nestor migrate` of `run --vm -d` containers to another nestor (a second data root
# stands for a second host): a container counting in its shell's memory, printing each
# count and writing it to a file of its writable layer, moves live pre-copy over a Unix
# socket (jailed), stop-copy over TCP (unjailed) and post-copy (jailed); each time its
# output goes on there from where it stood, none lost or repeated, with the same PID,
# and its record here goes. A move to nobody, or to a nestor without the image, gets
# one line and leaves it running. Ends with no VMM and no jail left. Checkpoint and
# restore: vm-checkpoint.sh; networked moves: vm-move-net.sh.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=400
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"
source "$here/lib/counter.sh"

# Live migration to another nestor (a second data root stands for a second host): the
# container goes on there with its PID, files and output; its record here goes.
# Jailed with pre-copy over a Unix socket, unjailed with stop-copy over TCP, and jailed
# with post-copy (its destination VMM takes the guest's pages in as they are touched,
# through the jail's /dev/userfaultfd).
B=$work/root-b
nb() { NESTOR_ROOT=$B timeout --kill-after=5 240 "$bin/nestor" "$@"; }
on_exit 'NESTOR_ROOT='"$B"' "$bin/nestor" gc'
on_exit 'for id in $(NESTOR_ROOT='"$B"' "$bin/nestor" ps -a -q 2>/dev/null); do NESTOR_ROOT='"$B"' "$bin/nestor" rm -f "$id"; done'
nb image import "$img" >/dev/null
statusb() { nb inspect "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["Status"])' 2>/dev/null || true; }
countb() { nb logs "$1" 2>/dev/null | grep -vc '^nestor:' || true; }
for how in "pre-copy unix:$work/mig.sock" "stop-copy tcp:127.0.0.1:$((20000 + RANDOM % 20000))" \
    "post-copy unix:$work/mig-post.sock"; do
    read -r strategy addr <<<"$how"
    flags=()
    [[ $strategy == stop-copy ]] && flags=(--no-jail)
    n run --vm -d --vm-mem 128 --network none "${flags[@]}" --name mv busybox sh -c "$counter" >/dev/null
    wait_lines mv 10 || bad "$strategy: the counter did not start"
    pid=$(n exec mv cat /tmp/pid)
    nb migrate --listen "$addr" >"$work/listen.out" 2>&1 &
    lpid=$!
    for _ in $(seq 100); do
        [[ $addr != unix:* || -S ${addr#unix:} ]] && n migrate mv --to "$addr" --strategy "$strategy" >"$work/mig.out" 2>&1 && break
        sleep 0.1
    done
    set +e
    wait $lpid
    lrc=$?
    set -e
    [[ $lrc == 0 ]] && pass "$strategy: the destination took the container in ($(tail -n1 "$work/listen.out" | head -c 12))" ||
        bad "$strategy: migrate --listen: exit $lrc, $(cat "$work/listen.out") / source: $(cat "$work/mig.out")"
    echo "$strategy: $(cat "$work/mig.out")$label"
    expect "$strategy: its record on the source is gone" "" "$(status mv)"
    expect "$strategy: it runs on the destination" Up "$(statusb mv)"
    at=$(countb mv)
    for _ in $(seq 300); do (($(countb mv) >= at + 10)) && break; sleep 0.1; done
    got=$(nb logs mv 2>/dev/null | grep -v '^nestor:' || true)
    [[ -n $got && $got == "$(seq 1 "$(wc -l <<<"$got")")" ]] && (($(wc -l <<<"$got") >= at + 10)) &&
        pass "$strategy: its output goes on there, none lost or repeated ($(wc -l <<<"$got") lines)" ||
        bad "$strategy: output after the move: $(tr '\n' ' ' <<<"$got" | tail -c 300)"
    expect "$strategy: same PID there" "$pid" "$(nb exec mv cat /tmp/pid 2>&1)"
    nb rm -f mv >/dev/null
done

# A move that cannot happen leaves the container running here, with one line.
n run --vm -d --vm-mem 128 --network none --name stay busybox sh -c "$counter" >/dev/null
wait_lines stay 5 || bad "stay did not start"
one_line "migrate to where nobody listens" "connect to" n migrate stay --to "unix:$work/nobody.sock"
C=$work/root-c # no image there
NESTOR_ROOT=$C timeout 60 "$bin/nestor" migrate --listen "unix:$work/mig-c.sock" >"$work/listen-c.out" 2>&1 &
lpid=$!
for _ in $(seq 100); do [[ -S $work/mig-c.sock ]] && break; sleep 0.1; done
one_line "migrate to a nestor without the image" "not in this store" n migrate stay --to "unix:$work/mig-c.sock"
wait $lpid 2>/dev/null || true
at=$(count stay)
wait_lines stay $((at + 5)) && pass "the container runs on after the failed moves" || bad "stay stopped"
n rm -f stay >/dev/null

no_vmm_left
finish
