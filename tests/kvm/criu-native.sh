#!/usr/bin/env bash
# tests/kvm/criu-native.sh [--nestor PATH] [--timeout SECS]
#
# Checkpoint and restore of native containers through CRIU (`nestor checkpoint` /
# `nestor restore`, runc's flags). A busybox container counts in its shell's memory
# (one number a line on its stdout, a pipe) with a `sleep` child:
# - checkpoint stops it (its state and cgroup are gone), restore (same id, --detach)
#   brings it back counting on from where it was, not from 1, on the restorer's stdout,
#   with the same PIDs inside its PID namespace, as a running container that
#   `kill`/`delete` end as any other;
# - checkpoint --leave-running keeps it counting; its images restore under a new id
#   (next to the original) from the checkpoint's count;
# - restore from a directory without a checkpoint, and from a corrupt one, fails with
#   one `error:` line and leaves no state, cgroup or mount behind;
# - podman container checkpoint/restore with `--runtime nestor`, when podman can run
#   a container here (else skipped, saying why).
# Prints checkpoint and restore times of this small container (test-host timings
# inside the test host).
#
# CRIU needs a kernel it knows: runs here when `criu check` passes, else in the test
# host (Debian's 6.1 kernel; no nested KVM needed). Containers live on /run (tmpfs):
# the test host's root is an overlay.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=300
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_nestor
rerun_in_testhost_unless criu check
command -v criu >/dev/null || die2 "criu is not installed (scripts/setup.sh)"
criu check >/dev/null 2>&1 || die2 "criu check fails on this kernel: $(criu check 2>&1 | grep -m1 Error)"
busybox=$(command -v busybox) || die2 "no busybox (scripts/setup.sh)"

TMPDIR=/run make_work
root=$work/state
tag=criu$$
ms() { echo $((($(date +%s%N) - $1) / 1000000)); }
nst() { timeout 60 "$nestor" --root "$root" "$@"; }
on_exit 'for c in $(nst list -q); do nst delete --force "$c"; done'

# A busybox bundle whose container counts: `N` every 50 ms, after a `sleep` child.
b=$work/bundle
mkdir -p "$b/rootfs/bin"
cp "$busybox" "$b/rootfs/bin/busybox"
for a in sh sleep cat ps echo; do ln -s busybox "$b/rootfs/bin/$a"; done
mkdir -p "$b/rootfs/"{proc,sys,dev,tmp,etc}
"$nestor" spec --bundle "$b"
python3 - "$b/config.json" <<'EOF'
import json, sys
p = sys.argv[1]
c = json.load(open(p))
c["process"]["terminal"] = False
c["process"]["args"] = ["sh", "-c",
    "sleep 1000 & i=0; while :; do i=$((i+1)); echo $i; usleep 50000; done"]
json.dump(c, open(p, "w"))
EOF
ln -s busybox "$b/rootfs/bin/usleep"

# wait_count FILE N: until FILE's last line is a number >= N (10 s).
wait_count() {
    local i
    for i in $(seq 200); do
        (($(tail -n1 "$1" 2>/dev/null || echo 0) >= $2)) 2>/dev/null && return 0
        sleep 0.05
    done
    return 1
}
# sleep_pid ID: the PID of the container's `sleep` inside its PID namespace.
sleep_pid() { nst exec "$1" ps -o pid,args | awk '$2 == "sleep" { print $1 }'; }
status_of() {
    local j
    j=$(nst state "$1" 2>/dev/null) || { echo gone; return; }
    python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])' <<<"$j"
}
cgroup_left() { find /sys/fs/cgroup -type d -name "$1" 2>/dev/null | head -n1; }

# --- checkpoint stops, restore continues -------------------------------------------
id=$tag-a
nst run --bundle "$b" -d "$id" </dev/null > >(cat >"$work/out1") 2> >(cat >"$work/err1") || { bad "run: $(cat "$work/err1")"; finish; }
wait_count "$work/out1" 5 || bad "the container never counted to 5: $(cat "$work/out1" "$work/err1")"
pid_before=$(sleep_pid "$id")
[[ -n $pid_before ]] || bad "no sleep child in the container"
t0=$(date +%s%N)
if nst checkpoint --image-path "$work/img1" --work-path "$work/wk1" "$id" 2>"$work/cerr"; then
    ck_ms=$(ms "$t0")
    pass "checkpoint"
else
    bad "checkpoint: $(cat "$work/cerr")"
    tail -n 30 "$work/wk1/dump.log" >&2 || true
    finish
fi
expect "checkpointed container is gone" gone "$(status_of "$id")"
expect "its cgroup is gone" "" "$(cgroup_left "$id")"
last1=$(tail -n1 "$work/out1")
sleep 0.3
expect "it counts no more after the checkpoint" "$last1" "$(tail -n1 "$work/out1")"

t0=$(date +%s%N)
if nst restore --image-path "$work/img1" --work-path "$work/wk1r" --bundle "$b" --detach "$id" \
    </dev/null > >(cat >"$work/out2") 2>"$work/rerr"; then
    rs_ms=$(ms "$t0")
    pass "restore"
else
    bad "restore: $(cat "$work/rerr")"
    tail -n 30 "$work/wk1r/restore.log" >&2 || true
    finish
fi
expect "restored container is running" running "$(status_of "$id")"
wait_count "$work/out2" $((last1 + 3)) || bad "the restored container does not count on: $(head -c 300 "$work/out2")"
first2=$(head -n1 "$work/out2")
if ((first2 > last1 && first2 <= last1 + 2)); then
    pass "restored counter goes on from $last1 to $first2 (not from 1)"
else
    bad "restored counter starts at '$first2', checkpoint was at $last1"
fi
expect "the sleep child keeps its PID inside the namespace" "$pid_before" "$(sleep_pid "$id")"
nst kill "$id" KILL
for i in $(seq 100); do [[ $(status_of "$id") == stopped ]] && break; sleep 0.05; done
expect "kill stops the restored container" stopped "$(status_of "$id")"
nst delete "$id"
expect "delete removes it" gone "$(status_of "$id")"
expect "and its cgroup" "" "$(cgroup_left "$id")"

# --- leave-running, then restore under a new id ------------------------------------
id=$tag-b
nst run --bundle "$b" -d "$id" </dev/null > >(cat >"$work/out3") 2> >(cat >/dev/null)
wait_count "$work/out3" 5 || bad "second container never counted to 5"
before=$(tail -n1 "$work/out3")
nst checkpoint --leave-running --image-path "$work/img2" "$id" 2>"$work/cerr" || bad "checkpoint --leave-running: $(cat "$work/cerr")"
at=$(tail -n1 "$work/out3")
expect "--leave-running leaves it running" running "$(status_of "$id")"
wait_count "$work/out3" $((at + 10)) || bad "it stopped counting after --leave-running"
id2=$tag-c
if nst restore --image-path "$work/img2" --bundle "$b" -d "$id2" </dev/null > >(cat >"$work/out4") 2>"$work/rerr"; then
    wait_count "$work/out4" $((before + 3)) || bad "the copy does not count"
    first4=$(head -n1 "$work/out4")
    # The dump froze it somewhere between the counts read before and after it.
    if ((first4 > before && first4 <= at + 1)); then
        pass "restore under a new id counts on from the checkpoint ($before..$at -> $first4)"
    else
        bad "copy under a new id starts at '$first4', checkpoint between $before and $at"
    fi
    expect "the original still runs next to it" running "$(status_of "$id")"
    nst delete --force "$id2"
else
    bad "restore under a new id: $(cat "$work/rerr")"
fi
nst delete --force "$id"

# --- bad image directories ---------------------------------------------------------
id=$tag-d
mkdir -p "$work/empty"
if nst restore --image-path "$work/empty" --bundle "$b" -d "$id" </dev/null >/dev/null 2>"$work/e1"; then
    bad "restore from an empty directory succeeded"
else
    expect "empty image dir: one error line" 1 "$(grep -c . "$work/e1")"
    grep -q '^error: .*no checkpoint' "$work/e1" && pass "empty image dir: $(cat "$work/e1")" || bad "empty image dir said: $(cat "$work/e1")"
fi
cp -a "$work/img1" "$work/bad"
for f in "$work"/bad/core-*.img "$work"/bad/mm-*.img; do head -c 20 /dev/urandom >"$f"; done
if nst restore --image-path "$work/bad" --bundle "$b" -d "$id" </dev/null >/dev/null 2>"$work/e2"; then
    bad "restore from a corrupt checkpoint succeeded"
else
    expect "corrupt image dir: one error line" 1 "$(grep -c . "$work/e2")"
    grep -q '^error: restore .*criu restore failed' "$work/e2" && pass "corrupt image dir: $(cat "$work/e2")" || bad "corrupt image dir said: $(cat "$work/e2")"
fi
expect "failed restores leave no state" gone "$(status_of "$id")"
expect "nor a cgroup" "" "$(cgroup_left "$id")"
expect "nor a mount" 0 "$(grep -c "$work" /proc/self/mountinfo || true)"

echo "checkpoint ${ck_ms:-?} ms, restore ${rs_ms:-?} ms (busybox sh + sleep, $(du -sk "$work/img1" | cut -f1) KiB of images)$label"

# --- podman ------------------------------------------------------------------------
podman_case() {
    command -v podman >/dev/null || { echo "skip podman: not installed"; return 0; }
    local pr=$work/podman name=$tag-p img
    mkdir -p "$pr"
    local p=(podman --root "$pr/root" --runroot "$pr/run" --storage-driver vfs --runtime "$nestor"
        --cgroup-manager cgroupfs --events-backend none)
    img=$work/pimg.tar
    tar -C "$b/rootfs" -cf "$work/rootfs.tar" .
    if ! "${p[@]}" import "$work/rootfs.tar" "localhost/$tag:1" >/dev/null 2>"$work/perr"; then
        echo "skip podman: cannot import an image here: $(tail -n1 "$work/perr")"
        return 0
    fi
    on_exit "${p[*]} rm -f -a; ${p[*]} rmi -a -f"
    if ! "${p[@]}" run -d --name "$name" --network none "localhost/$tag:1" \
        sh -c 'i=0; while :; do i=$((i+1)); echo $i; usleep 50000; done' >/dev/null 2>"$work/perr"; then
        echo "skip podman: cannot run a container here: $(tail -n1 "$work/perr")"
        return 0
    fi
    sleep 1
    if ! "${p[@]}" container checkpoint "$name" >/dev/null 2>"$work/perr"; then
        bad "podman container checkpoint: $(tail -n3 "$work/perr")"
        return 0
    fi
    local at
    at=$("${p[@]}" logs "$name" | tail -n1)
    expect "podman: checkpointed container is exited" exited "$("${p[@]}" inspect -f '{{.State.Status}}' "$name")"
    if ! "${p[@]}" container restore "$name" >/dev/null 2>"$work/perr"; then
        bad "podman container restore: $(tail -n3 "$work/perr")"
        return 0
    fi
    expect "podman: restored container is running" running "$("${p[@]}" inspect -f '{{.State.Status}}' "$name")"
    sleep 1
    local now
    now=$("${p[@]}" logs "$name" | tail -n1)
    if ((now > at)); then pass "podman: counter went on after restore ($at -> $now)"; else bad "podman: counter at $now after restore, $at at checkpoint"; fi
    "${p[@]}" rm -f "$name" >/dev/null 2>&1 || true
}
podman_case
finish
