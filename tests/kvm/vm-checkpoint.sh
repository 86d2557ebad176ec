#!/usr/bin/env bash
# `nestor checkpoint NAME DIR` and `nestor restore DIR` of `run --vm -d` containers (the
# whole microVM snapshotted): a container counting in its shell's memory, printing each
# count and writing it to a file of its writable layer, is checkpointed and stopped,
# then restored into its own record; checkpointed with --leave-running and restored as a
# copy beside it; jailed (the default) and unjailed. After each restore its output goes
# on from where the log stood, none lost or repeated; its PID and files are the same;
# exec, logs, stop and rm work. Bad input (a directory that is not a checkpoint, a
# corrupt one, a non-empty target, a restore over a running container) gets one line,
# leaves the container running and no record behind. A networked container restored
# under another name: its guest's /etc/hosts names it so, its hostname stays. Ends with
# no VMM and no jail left. Live migration to another data root: vm-migrate.sh;
# networked moves: vm-move-net.sh.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=600
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"
source "$here/lib/counter.sh"

for variant in jailed unjailed; do
    flags=()
    [[ $variant == unjailed ]] && flags=(--no-jail)
    c=ck-$variant
    n run --vm -d --vm-mem 128 --network none "${flags[@]}" --name "$c" busybox sh -c "$counter" >/dev/null
    wait_lines "$c" 10 || bad "$variant: the counter did not start: $(lines "$c" | tail -n3)"
    pid=$(n exec "$c" cat /tmp/pid)

    # Checkpoint and stop: the record says so, the VM is gone, the output stops.
    t0=$(ms)
    out=$(n checkpoint "$c" "$work/$c.1" 2>&1) || bad "$variant: checkpoint: $out"
    t1=$(ms)
    expect "$variant: checkpoint stops the container" "Exited (checkpointed)" "$(status "$c")"
    before=$(count "$c")
    sleep 1
    expect "$variant: no output while checkpointed" "$before" "$(count "$c")"
    [[ -s $work/$c.1/vm/memory && -s $work/$c.1/checkpoint.json ]] &&
        pass "$variant: the checkpoint holds the VM's memory and the manifest" ||
        bad "$variant: checkpoint dir: $(ls -R "$work/$c.1")"

    # Restore into its own record: it counts on from where it stopped.
    t2=$(ms)
    out=$(n restore "$work/$c.1" 2>&1) || bad "$variant: restore: $out"
    t3=$(ms)
    echo "$variant: checkpoint $((t1 - t0)) ms, restore $((t3 - t2)) ms (128 MiB guest)$label"
    wait_lines "$c" $((before + 10)) || bad "$variant: no output after the restore"
    consecutive "$c" $((before + 10)) && pass "$variant: output goes on after the restore, none lost or repeated" ||
        bad "$variant: output across the restore: $(lines "$c" | tr '\n' ' ' | tail -c 300)"
    expect "$variant: same PID after the restore" "$pid" "$(n exec "$c" cat /tmp/pid 2>&1)"
    file=$(n exec "$c" cat /tmp/count 2>&1)
    ((file > before)) 2>/dev/null && pass "$variant: its file counts on ($file > $before)" ||
        bad "$variant: /tmp/count is '$file', $before before"
    expect "$variant: running again" Up "$(status "$c")"

    # Checkpoint that leaves it running, then a copy of it beside it.
    out=$(n checkpoint --leave-running "$c" "$work/$c.2" 2>&1) || bad "$variant: checkpoint --leave-running: $out"
    at=$(count "$c")
    wait_lines "$c" $((at + 5)) && pass "$variant: --leave-running: it runs on" ||
        bad "$variant: --leave-running: output stopped"
    out=$(n restore --name "$c-copy" "$work/$c.2" 2>&1) || bad "$variant: restore --name: $out"
    wait_lines "$c-copy" $((at + 10)) || bad "$variant: the copy prints nothing new"
    consecutive "$c-copy" $((at + 10)) && pass "$variant: the copy's log is the original's up to the checkpoint, then its own count" ||
        bad "$variant: the copy's output: $(lines "$c-copy" | tr '\n' ' ' | tail -c 300)"
    expect "$variant: the copy has the same PID" "$pid" "$(n exec "$c-copy" cat /tmp/pid 2>&1)"
    consecutive "$c" $((at + 5)) && pass "$variant: the original counts on beside its copy" ||
        bad "$variant: the original's output: $(lines "$c" | tr '\n' ' ' | tail -c 300)"
    # A second checkpoint of the VM that ran on. Jailed, the first one's memory file
    # once stayed charged to the jail's memory limit (tmpfs pages are not reclaimed)
    # and this snapshot had the VMM killed mid-way.
    out=$(n checkpoint "$c" "$work/$c.3" 2>&1) || bad "$variant: a second checkpoint: $out"
    expect "$variant: a second checkpoint stops it" "Exited (checkpointed)" "$(status "$c")"
    n rm "$c" >/dev/null || bad "$variant: rm $c"

    # The counting shell is PID 1 in its container and ignores SIGTERM: stop kills it.
    for x in "$c-copy"; do
        n stop -t 1 "$x" >/dev/null || bad "$variant: stop $x"
        expect "$variant: stop of $x records exit 137" "Exited (137)" "$(status "$x")"
        n rm "$x" >/dev/null || bad "$variant: rm $x"
    done
done

# Bad input: one line each; the container runs on and no record is left.
n run --vm -d --vm-mem 128 --network none --name ck-bad busybox sh -c "$counter" >/dev/null
wait_lines ck-bad 5 || bad "ck-bad did not start"
mkdir "$work/full" && touch "$work/full/x"
one_line "checkpoint into a non-empty directory" "is not empty" n checkpoint ck-bad "$work/full"
one_line "restore of a directory that is no checkpoint" "is not a checkpoint" n restore "$work/full"
n checkpoint --leave-running ck-bad "$work/ck-bad.1" >/dev/null
one_line "restore over the running container" "is running" n restore "$work/ck-bad.1"
cp -r "$work/ck-bad.1" "$work/ck-bad.2"
printf 'x' | dd of="$work/ck-bad.2/vm/state.json" bs=1 seek=40 conv=notrunc status=none
one_line "restore of a corrupt snapshot" "corrupt" n restore --name ck-corrupt "$work/ck-bad.2"
sed -i 's/"version": 1/"version": 9/' "$work/ck-bad.2/checkpoint.json"
one_line "restore of another version" "version 9" n restore --name ck-corrupt "$work/ck-bad.2"
[[ -z $(status ck-corrupt) ]] && pass "a failed restore leaves no record" || bad "ck-corrupt: $(status ck-corrupt)"
expect "the container runs on after the bad input" Up "$(status ck-bad)"
n rm -f ck-bad >/dev/null

# A networked container (the default network; jailed) checkpointed, stopped and restored
# under another name: its guest's /etc/hosts names it so, its hostname stays.
# own_line CONTAINER: the names on its /etc/hosts line for its own address.
own_line() {
    local ip
    ip=$(n inspect "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["NetworkSettings"]["IPAddress"])' 2>/dev/null)
    n exec "$1" cat /etc/hosts 2>/dev/null | awk -v ip="$ip" '$1 == ip { $1 = ""; print }'
}
# The last lines of every VMM's log (after a failure).
vmm_logs() { find /run -name vmm.err 2>/dev/null | while read -r f; do echo "== $f: $(tail -n 3 "$f" | tr '\n' ' ')"; done; }
if [[ -x /usr/lib/cni/bridge ]]; then
    n run --vm -d --vm-mem 128 --name ck-net busybox sh -c "$counter" >/dev/null
    wait_lines ck-net 5 || bad "ck-net did not start"
    short=$(n inspect ck-net | python3 -c 'import json,sys; print(json.load(sys.stdin)["Id"][:12])')
    expect "networked: its hostname is its short id" "$short" "$(n exec ck-net hostname 2>&1)"
    expect "networked: /etc/hosts names it" " $short ck-net" "$(own_line ck-net)"
    out=$(n checkpoint ck-net "$work/ck-net" 2>&1) || bad "networked: checkpoint: $out $(vmm_logs)"
    out=$(n restore --name ck-renamed "$work/ck-net" 2>&1) || bad "networked: restore --name: $out $(vmm_logs)"
    [[ $out == *warning* ]] && bad "networked: restore --name: $out"
    expect "networked, restored as ck-renamed: /etc/hosts names it so" " $short ck-renamed" "$(own_line ck-renamed)"
    expect "networked, restored as ck-renamed: its hostname stays" "$short" "$(n exec ck-renamed hostname 2>&1)"
    expect "networked, restored as ck-renamed: /etc/hostname stays" "$short" "$(n exec ck-renamed cat /etc/hostname 2>&1)"
    n rm -f ck-net ck-renamed >/dev/null
else
    echo "skip: the renamed networked restore (containernetworking-plugins is not installed)"
fi

no_vmm_left
finish
