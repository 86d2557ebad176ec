# tests/kvm/lib/counter.sh: sourced by the tests that move a `run --vm -d` container
# counting in its shell's memory (after vm-env.sh, whose `n` they use): the counter, and
# how to read its log and status.

# The container's command: prints each count and writes it to /tmp/count of its
# writable layer, its shell's PID to /tmp/pid.
counter='echo $$ >/tmp/pid; i=0; while true; do i=$((i+1)); echo $i; echo $i >/tmp/count; sleep 0.1; done'
# The container's output lines (nestor's own notices left out).
lines() { n logs "$1" 2>/dev/null | grep -v '^nestor:' || true; }
count() { lines "$1" | wc -l; }
# Waits until container $1 has printed at least $2 lines.
wait_lines() {
    for _ in $(seq 600); do (($(count "$1") >= $2)) && return 0; sleep 0.1; done
    return 1
}
# The log is exactly 1..N for some N >= $2: nothing lost, nothing repeated.
consecutive() {
    local got
    got=$(lines "$1")
    [[ -n $got && $got == "$(seq 1 "$(wc -l <<<"$got")")" ]] && (($(wc -l <<<"$got") >= $2))
}
ms() { date +%s%3N; }
status() { n inspect "$1" 2>/dev/null | python3 -c 'import json,sys; print(json.load(sys.stdin)["Status"])' 2>/dev/null || true; }

# one_line NAME EXPECTED-SUBSTRING CMD...: CMD fails with one line naming the problem.
one_line() {
    local name=$1 want=$2 out rc
    shift 2
    set +e
    out=$("$@" 2>&1)
    rc=$?
    set -e
    if [[ $rc != 0 && $(wc -l <<<"$out") == 1 && $out == *"$want"* ]]; then
        pass "$name: $out"
    else
        bad "$name: exit $rc, $out"
    fi
}
# Passes when no nestor-vmm runs and no jail is left.
no_vmm_left() {
    local jails=${NESTOR_JAILS:-/run/nestor-jail}
    for _ in $(seq 50); do ! pgrep -x nestor-vmm >/dev/null && break; sleep 0.1; done
    ! pgrep -x nestor-vmm >/dev/null && [[ -z $(ls "$jails" 2>/dev/null) ]] &&
        pass "no VMM and no jail left" || bad "left: $(pgrep -a nestor-vmm) $(ls "$jails" 2>/dev/null)"
}
