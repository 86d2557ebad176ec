#!/usr/bin/env bash
# Networked `run --vm -d` containers across `nestor checkpoint`/`restore` and live
# `nestor migrate` within one host and data root. A container on the default network
# with a published port (an echo server) is checkpointed and restored: it keeps its
# address and serves on the same port. Then it moves live twice (jailed, pre-copy then
# stop-copy back, the migrating nestor sent SIGTERM mid-way: it finishes the move): one
# TCP connection opened before the moves carries a line after each,
# the published port answers new connections, the address and port are the same, its
# namespace holds one tap, its old record is gone, and its /etc/hosts names it by its
# new name (its hostname unchanged). An unjailed one moves with
# post-copy (and SIGTERM mid-way), its connection alive too. A move whose destination
# VMM is killed mid-way leaves it serving where it was, on its own tap, connection alive. A networked container cannot move to another
# data root (one line; it serves on). Ends with no VMM, jail, attachment or namespace
# left. Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all
# pass.
set -euo pipefail
limit=400
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

if [[ ! -x /usr/lib/cni/bridge ]]; then
    echo "skip: containernetworking-plugins is not installed"
    exit 0
fi
status() { n inspect "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["Status"])' 2>/dev/null || true; }
field() { n inspect "$1" 2>/dev/null | python3 -c "import json,sys; v=json.load(sys.stdin); print($2)" 2>/dev/null || true; }
ip_of() { field "$1" 'v["NetworkSettings"]["IPAddress"]'; }
# The names on container $1's /etc/hosts line for its own address.
own_line() { n exec "$1" cat /etc/hosts 2>/dev/null | awk -v ip="$(ip_of "$1")" '$1 == ip { $1 = ""; print }'; }
# Sends line $2 on connection fd $1 and prints the echo (empty after 30 s).
talk() {
    local got=""
    echo "$2" >&"$1"
    IFS= read -r -t 30 got <&"$1" || true
    echo "$got"
}
# A fresh connection to 127.0.0.1:$1: its first echo of $2 (tried for up to 30 s).
fresh() {
    local got=""
    for _ in $(seq 60); do
        if exec {f}<>"/dev/tcp/127.0.0.1/$1"; then
            got=$(talk "$f" "$2")
            exec {f}>&-
            [[ -n $got ]] && break
        fi 2>/dev/null
        sleep 0.5
    done
    echo "$got"
}
# The taps in the namespace of the container first attached as id $1.
taps() { nsenter --net="$(ls -d /run/nestor-net/*/netns/"$1")" ip -o link 2>/dev/null | grep -o 'tap[0-9]*' | sort | tr '\n' ' '; }
# Moves container $1 to a listener in this data root as $2 with strategy $3; with $4,
# sends the migrating nestor that signal once the move is under way (it must finish).
move() {
    local sock=$work/mv-$2.sock lpid lrc mpid src
    src=$(field "$1" 'v["Id"]')
    n migrate --listen "unix:$sock" --name "$2" >"$work/listen.out" 2>&1 &
    lpid=$!
    for _ in $(seq 100); do [[ -S $sock ]] && break; sleep 0.1; done
    "$bin/nestor" migrate "$1" --to "unix:$sock" --strategy "$3" >"$work/mig.out" 2>&1 &
    mpid=$!
    if [[ -n ${4:-} ]]; then
        for _ in $(seq 300); do [[ -e $NESTOR_ROOT/containers/$src/stopped-by ]] && break; sleep 0.02; done
        # Under way: SIGHUP, SIGINT and SIGTERM are blocked (mask 0x4003), then one comes.
        blk=$(awk '/^SigBlk:/ {print $2}' "/proc/$mpid/status" 2>/dev/null || true)
        (((0x${blk:-0} & 0x4003) == 0x4003)) && pass "$3: the migrating nestor holds SIGHUP, SIGINT and SIGTERM" ||
            bad "$3: the migrating nestor's blocked signals: '$blk'"
        kill -s "$4" "$mpid" && pass "$3: SIG$4 sent mid-move" || bad "$3: SIG$4 found no migrating nestor"
    fi
    set +e
    wait "$mpid"
    expect "$3: the migrating nestor ends well${4:+ after SIG$4}" 0 "$?"
    wait $lpid
    lrc=$?
    set -e
    [[ $lrc == 0 ]] && pass "$3: $1 moved to $2 ($(cat "$work/mig.out"))$label" ||
        bad "$3: migrate --listen: exit $lrc, $(cat "$work/listen.out") / source: $(cat "$work/mig.out")"
}

port=$((20000 + RANDOM % 20000))
n run --vm -d --vm-mem 128 -p "127.0.0.1:$port:7000" --name net1 busybox nc -ll -p 7000 -e cat >/dev/null
id=$(field net1 'v["Id"]')
addr=$(ip_of net1)
expect "the echo server answers on its published port" one "$(fresh "$port" one)"

# Checkpoint and restore: the host side is attached again with the same address.
out=$(n checkpoint net1 "$work/net1.ck" 2>&1) || bad "checkpoint: $out"
out=$(n restore "$work/net1.ck" 2>&1) || bad "restore: $out"
expect "restored: it answers on the same port" two "$(fresh "$port" two)"
expect "restored: same address" "$addr" "$(ip_of net1)"
id=$(field net1 'v["Id"]')

# One connection, kept open across two live moves (jailed: the jails make the taps).
exec {c}<>"/dev/tcp/127.0.0.1/$port"
expect "a connection before the moves" before "$(talk "$c" before)"
move net1 net2 pre-copy
expect "pre-copy: the connection lives on" after-one "$(talk "$c" after-one)"
expect "pre-copy: the source's record is gone" "" "$(status net1)"
expect "pre-copy: same address" "$addr" "$(ip_of net2)"
expect "pre-copy: one tap in its namespace" "tap1 " "$(taps "$id")"
expect "pre-copy: a new connection" three "$(fresh "$port" three)"
expect "pre-copy: /etc/hosts names it net2, its hostname stays" " ${id:0:12} net2" "$(own_line net2)"
move net2 net3 stop-copy TERM
expect "stop-copy: the connection lives on" after-two "$(talk "$c" after-two)"
expect "stop-copy: the port" "7000/tcp -> 127.0.0.1:$port" "$(n port net3 2>&1)"
expect "stop-copy: same address" "$addr" "$(ip_of net3)"
expect "stop-copy: one tap in its namespace" "tap0 " "$(taps "$id")"
expect "stop-copy: /etc/hosts names it net3" " ${id:0:12} net3" "$(own_line net3)"
exec {c}>&-

# Another data root cannot take a networked container: one line, it serves on.
B=$work/root-b
nb() { NESTOR_ROOT=$B timeout --kill-after=5 120 "$bin/nestor" "$@"; }
on_exit 'NESTOR_ROOT='"$B"' "$bin/nestor" gc'
nb image import "$img" >/dev/null
nb migrate --listen "unix:$work/b.sock" >"$work/listen-b.out" 2>&1 &
lpid=$!
for _ in $(seq 100); do [[ -S $work/b.sock ]] && break; sleep 0.1; done
set +e
out=$(n migrate net3 --to "unix:$work/b.sock" 2>&1)
rc=$?
set -e
wait $lpid 2>/dev/null || true
[[ $rc != 0 && $(wc -l <<<"$out") == 1 && $out == *"only within one host and data root"* ]] &&
    pass "a move to another data root is refused: $out" || bad "move to another root: exit $rc, $out"
expect "after the refused move it answers" four "$(fresh "$port" four)"
# A move whose destination VMM dies mid-way: the source runs on, with its network.
exec {c}<>"/dev/tcp/127.0.0.1/$port"
expect "a connection before the failed move" again "$(talk "$c" again)"
before=$(pgrep -x nestor-vmm | sort)
n migrate --listen "unix:$work/fail.sock" --name net4 >"$work/listen-f.out" 2>&1 &
lpid=$!
for _ in $(seq 100); do [[ -S $work/fail.sock ]] && break; sleep 0.1; done
"$bin/nestor" migrate net3 --to "unix:$work/fail.sock" --strategy stop-copy >"$work/mig-f.out" 2>&1 &
mpid=$!
# The destination's VMM: the one nestor-vmm that was not there before.
dpid=
for _ in $(seq 500); do
    dpid=$(comm -13 <(echo "$before") <(pgrep -x nestor-vmm | sort) | head -n1)
    [[ -n $dpid ]] && break
    sleep 0.01
done
[[ -n $dpid ]] && kill -9 "$dpid" || bad "no destination VMM to kill"
set +e
wait "$mpid"
mrc=$?
wait "$lpid"
set -e
[[ $mrc != 0 && $(cat "$work/mig-f.out") == *"runs on here"* ]] &&
    pass "a move whose destination VMM dies fails: $(tail -n1 "$work/mig-f.out")" ||
    bad "failed move: exit $mrc, $(cat "$work/mig-f.out") / $(cat "$work/listen-f.out")"
expect "after the failed move: the connection lives on" still "$(talk "$c" still)"
expect "after the failed move: it runs here" Up "$(status net3)"
expect "after the failed move: the destination's record is gone" "" "$(status net4)"
expect "after the failed move: only its own tap" "tap0 " "$(taps "$id")"
exec {c}>&-
n rm -f net3 >/dev/null || bad "rm -f net3"

# Unjailed (nestor makes the taps), post-copy.
uport=$((20000 + RANDOM % 20000))
n run --vm -d --vm-mem 128 --no-jail -p "127.0.0.1:$uport:7000" --name unj1 busybox nc -ll -p 7000 -e cat >/dev/null
uid=$(field unj1 'v["Id"]')
expect "unjailed: it answers" five "$(fresh "$uport" five)"
exec {c}<>"/dev/tcp/127.0.0.1/$uport"
expect "unjailed: a connection before the move" before "$(talk "$c" before)"
move unj1 unj2 post-copy TERM
expect "post-copy: the connection lives on" after "$(talk "$c" after)"
expect "post-copy: one tap in its namespace" "tap1 " "$(taps "$uid")"
exec {c}>&-
n rm -f unj2 >/dev/null

jails=${NESTOR_JAILS:-/run/nestor-jail}
for _ in $(seq 50); do ! pgrep -x nestor-vmm >/dev/null && break; sleep 0.1; done
left="$(pgrep -a nestor-vmm || true)$(ls "$jails" 2>/dev/null)$(ls "$NESTOR_ROOT/networks/attachments" 2>/dev/null)"
left+=$(ls /run/nestor-net/*/netns/ 2>/dev/null | grep -E "^($id|$uid)" || true)
expect "no VMM, jail, attachment or namespace left" "" "$left"
finish
