#!/usr/bin/env bash
# tests/testhost/selftest.sh: proves the KVM test host harness on real test-host boots.
# Exit codes and output of tests/testhost/run, the machine's insides (/dev/kvm with
# kvm-amd nested=1, cgroup v2 only, namespaces, tun, the shares), a kernel panic and a
# hang reported as such with the serial log kept, no QEMU left behind, an interrupted
# run, kvm-exec's choice of where to run, the batch runner across several boots, and a
# Linux guest booting on the test host's /dev/kvm. Prints "ok"/"not ok" per check and
# last "N passed, N failed"; exits 1 if any check failed.
# Takes a few minutes (about 15 test-host boots).
set -uo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
run=$here/run
passed=0 failed=0

# Everything this selftest makes (run dirs, kept logs) lives under one unique dir, so
# that leftovers and stray processes can be checked without touching parallel runs.
st=$(mktemp -d "${TMPDIR:-/tmp}/nestor-selftest.XXXXXX")
export TMPDIR=$st/tmp NESTOR_TESTHOST_LOGDIR=$st/logs
mkdir -p "$TMPDIR" "$NESTOR_TESTHOST_LOGDIR"
trap 'rm -rf "$st"' EXIT

ok() { echo "ok - $*"; passed=$((passed + 1)); }
not_ok() { echo "not ok - $*"; failed=$((failed + 1)); }
check() { # description, then a command that must succeed
    local d=$1
    shift
    if "$@"; then ok "$d"; else not_ok "$d"; fi
}
# Runs `run ARGS...`, leaving status in $rc, stdout in $out, stderr in $err.
capture() {
    "$run" "$@" >"$st/out" 2>"$st/err"
    rc=$?
    out=$(<"$st/out") err=$(<"$st/err")
}
qemu_left() { # any process still holding this selftest's dir in its command line?
    local p
    for p in /proc/[0-9]*; do
        [[ $p == "/proc/$$" ]] && continue
        tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -q "$st/tmp" && return 0
    done
    return 1
}
no_leftovers() { ! qemu_left && [[ -z $(ls -A "$TMPDIR") ]]; }
kept_log() { # path from "serial log kept at PATH" exists and holds the kernel's log
    local p
    p=$(sed -n 's/^test host: serial log kept at //p' <<<"$err")
    [[ -n $p && -s $p ]] && grep -q "Linux version" "$p"
}

echo "# testhost selftest: preparing the test host image" >&2
"$here/prepare.sh" >/dev/null || { echo "not ok - prepare.sh failed"; echo "0 passed, 1 failed"; exit 1; }

# --- exit codes and output ---------------------------------------------------------
capture true
check "run true exits 0" test "$rc" = 0
capture false
check "run false exits 1" test "$rc" = 1
capture sh -c 'exit 7'
check "run sh -c 'exit 7' exits 7" test "$rc" = 7
capture sh -c 'echo to-stdout; echo to-stderr >&2; exit 0'
check "CMD's stdout reaches stdout" test "$out" = to-stdout
check "CMD's stderr reaches stderr" test "$err" = to-stderr
capture no-such-command-anywhere
check "a missing command exits 127" test "$rc" = 127
capture --bogus-option true
check "a bad option exits 125 with a message" \
    bash -c '[[ $0 == 125 && $1 == *"unknown option"* ]]' "$rc" "$err"
check "no leftovers after normal runs" no_leftovers

# --- the project's binaries on PATH ---------------------------------------------------
mkdir -p "$st/bin" "$st/target/debug"
printf '#!/bin/sh\necho "fake nestor from NESTOR_BIN_DIR"\n' >"$st/bin/nestor"
printf '#!/bin/sh\necho "fake nestor-vmm from CARGO_TARGET_DIR"\n' >"$st/target/debug/nestor-vmm"
chmod +x "$st/bin/nestor" "$st/target/debug/nestor-vmm"
NESTOR_BIN_DIR=$st/bin capture nestor
check "NESTOR_BIN_DIR comes first on PATH inside" test "$out" = "fake nestor from NESTOR_BIN_DIR"

# --- inside the machine: one boot checks many things ---------------------------------
mkdir -p "$st/share"
(
    cd "$repo/tests" || exit 1
    SELFTEST_VAR='a b "c"' CARGO_TARGET_DIR=$st/target "$run" --share "$st/share" -- bash -c '
        t() { if eval "$2" >/dev/null 2>&1; then echo "ok - inside: $1"; else echo "not ok - inside: $1"; fi; }
        t "/dev/kvm is a character device" "test -c /dev/kvm"
        t "kvm_amd is loaded with nested=1" "grep -qE \"^(1|Y)\$\" /sys/module/kvm_amd/parameters/nested"
        t "the CPU shows svm" "grep -qw svm /proc/cpuinfo"
        t "cgroup2 is mounted on /sys/fs/cgroup" "test \$(stat -fc %T /sys/fs/cgroup) = cgroup2fs"
        t "no cgroup v1 hierarchy is mounted" "! cut -d\" \" -f3 /proc/mounts | grep -qx cgroup"
        t "cgroup controllers are enabled for children" "grep -qw memory /sys/fs/cgroup/cgroup.subtree_control && grep -qw cpu /sys/fs/cgroup/cgroup.subtree_control"
        t "a child cgroup can be made" "mkdir /sys/fs/cgroup/selftest && rmdir /sys/fs/cgroup/selftest"
        t "all namespaces can be made" "unshare -m -n -p -i -u -C -U -f true"
        t "tun: a tap device can be made" "ip tuntap add mode tap name sttap0 && ip link del sttap0"
        t "veth and bridge work" "ip link add stv0 type veth peer name stv1 && ip link add stbr0 type bridge && ip link set stv0 master stbr0 && ip link del stv0 && ip link del stbr0"
        t "modprobe finds the kernel modules" "modprobe dummy && rmmod dummy"
        t "/tmp is writable and the host /tmp is visible" "echo x >/tmp/selftest-$$ && test \$(cat /tmp/selftest-$$) = x && test -d '"$st"'"
        t "the root is writable (overlay)" "mkdir -p /var/lib/nestor-selftest && rmdir /var/lib/nestor-selftest"
        t "the checkout is at the same path" "test -x '"$repo"'/tests/testhost/run"
        t "the working directory is kept" "test \$(pwd -P) = '"$repo"'/tests"
        t "the environment is passed (quoting kept)" "test \"\$SELFTEST_VAR\" = \"a b \\\"c\\\"\""
        t "NESTOR_TESTHOST=inside" "test \"\$NESTOR_TESTHOST\" = inside"
        t "NESTOR_CACHE is the host cache and exists" "test \"\$NESTOR_CACHE\" = \"'"${NESTOR_CACHE:-$HOME/.cache/nestor}"'\" && test -d \"\$NESTOR_CACHE\""
        t "the test host image is found" "test -f \"\$NESTOR_TESTHOST_IMAGE/vmlinux\""
        t "a --share dir is writable" "echo shared >'"$st/share"'/f"
        t "/dev/pts, /dev/shm and /dev/mqueue are mounted" "mountpoint -q /dev/pts && mountpoint -q /dev/shm && mountpoint -q /dev/mqueue"
        t "loopback is up" "ip -o link show lo | grep -q UP"
        t "binaries in \$CARGO_TARGET_DIR/debug are on PATH" "test \"\$(nestor-vmm)\" = \"fake nestor-vmm from CARGO_TARGET_DIR\""
    '
) >"$st/inside" 2>"$st/inside.err"
rc=$?
cat "$st/inside"
passed=$((passed + $(grep -c '^ok' "$st/inside")))
failed=$((failed + $(grep -c '^not ok' "$st/inside")))
check "the inside checks ran (run exited 0)" test "$rc" = 0
check "a write to a --share dir is seen outside" test "$(cat "$st/share/f" 2>/dev/null)" = shared

# --- panic, hang, interruption --------------------------------------------------------
SECONDS=0
capture --timeout 300 sh -c 'echo c >/proc/sysrq-trigger; sleep 600'
check "a kernel panic exits 123" test "$rc" = 123
check "a kernel panic is reported as one" grep -q "^test host: kernel panic" <<<"$err"
check "the panic's serial log is kept" kept_log
echo "# panic reported after $SECONDS s (inside TCG test host; compare only within this run)"
capture --timeout 20 sleep 1000
check "a hang exits 124" test "$rc" = 124
check "a hang is reported as a timeout" grep -q "^test host: timed out after 20 s" <<<"$err"
check "the hang's serial log is kept" kept_log
check "no QEMU or run dir left after panic and timeout" no_leftovers
"$run" sleep 1000 >/dev/null 2>"$st/err" &
rpid=$!
sleep 8
kill -TERM "$rpid"
wait "$rpid"
rc=$?
check "a terminated run exits 143" test "$rc" = 143
check "no QEMU or run dir left after SIGTERM" no_leftovers

# --- kvm-exec ------------------------------------------------------------------------
rc=0
NESTOR_TESTHOST=always "$here/kvm-exec" -- sh -c 'test "$NESTOR_TESTHOST" = inside && exit 5' || rc=$?
check "kvm-exec with NESTOR_TESTHOST=always runs in the test host" test "$rc" = 5
if [[ $("$here/kvm-exec" --why) == direct* ]]; then
    rc=0
    NESTOR_TESTHOST=never "$here/kvm-exec" sh -c 'exit 6' || rc=$?
    check "kvm-exec with NESTOR_TESTHOST=never runs directly on hardware KVM" test "$rc" = 6
else
    rc=0
    msg=$(NESTOR_TESTHOST=never "$here/kvm-exec" true 2>&1) || rc=$?
    check "kvm-exec with NESTOR_TESTHOST=never and no hardware KVM fails, saying why" \
        bash -c '[[ $0 == 125 && $1 == *"no hardware KVM"* ]]' "$rc" "$msg"
fi
rc=0
NESTOR_TESTHOST=bogus "$here/kvm-exec" true 2>/dev/null || rc=$?
check "kvm-exec rejects a bad NESTOR_TESTHOST" test "$rc" = 125

# --- batch: several boots, a panic mid-batch, a per-test timeout -----------------------
cat >"$st/list" <<'EOF'
# pass, fail, per-test timeout in boot 1; a panic ends boot 2 after its first test;
# the panicking test gets one more boot of its own (3), which it ends again; the
# untouched rest runs in boot 4
true
sh -c 'exit 3'
sleep 1000
sh -c 'echo c >/proc/sysrq-trigger; sleep 600'
test -c /dev/kvm
grep -qw svm /proc/cpuinfo
EOF
NESTOR_TESTHOST=always "$here/batch" --batch-size 3 --per-test-timeout 15 "$st/list" >"$st/batch" 2>"$st/batch.err"
rc=$?
check "batch exits 1 when tests fail" test "$rc" = 1
check "batch counts 3 passed, 3 failed" test "$(tail -n1 "$st/batch")" = "3 passed, 3 failed"
check "batch used 4 test-host boots" test "$(grep -c '^batch: test-host boot' "$st/batch.err")" = 4
check "batch retries a test whose boot died, once" \
    test "$(grep -c "^--- RETRY sh -c 'echo c >/proc/sysrq-trigger; sleep 600'" "$st/batch")" = 1
check "batch reports the per-test timeout" grep -q '^--- FAIL sleep 1000 (timed out after 15 s' "$st/batch"
check "batch reports the test that panicked the test host" \
    grep -q "^FAILED: sh -c 'echo c >/proc/sysrq-trigger; sleep 600' (did not finish: the test host's kernel panicked (again))" "$st/batch"
check "no leftovers after batch" no_leftovers

# --retry-failed: a test that fails once (a flag file on a share says which run it is)
# passes on its retry and is reported so; one that always fails fails twice.
mkdir -p "$st/flaky"
cat >"$st/list2" <<EOF
sh -c 'test -e $st/flaky/ran && exit 0; touch $st/flaky/ran; exit 4'
sh -c 'exit 3'
EOF
NESTOR_TESTHOST=always "$here/batch" --retry-failed --batch-size 2 --per-test-timeout 15 \
    --share "$st/flaky" "$st/list2" >"$st/batch2" 2>"$st/batch2.err"
rc=$?
check "batch --retry-failed: a test failing once passes on its retry, one failing twice fails" \
    bash -c '[[ $0 == 1 && $(tail -n1 "$1") == "1 passed, 1 failed" ]]' "$rc" "$st/batch2"
check "batch --retry-failed reports the test that passed on its retry" \
    grep -q "^PASSED ON RETRY: sh -c 'test -e .*(first run failed: status 4 after" "$st/batch2"
check "batch --retry-failed retries a failed test once" \
    test "$(grep -c "^--- RETRY sh -c 'exit 3' (failed: status 3" "$st/batch2")" = 1
check "no leftovers after batch --retry-failed" no_leftovers

# --retries 2: a test failing its first two runs passes on its third.
mkdir -p "$st/flaky3"
cat >"$st/list3" <<EOF
sh -c 'n=\$(cat $st/flaky3/n 2>/dev/null || echo 0); echo \$((n + 1)) >$st/flaky3/n; test \$n -ge 2'
EOF
NESTOR_TESTHOST=always "$here/batch" --retry-failed --retries 2 --batch-size 1 --per-test-timeout 15 \
    --share "$st/flaky3" "$st/list3" >"$st/batch3" 2>"$st/batch3.err"
rc=$?
check "batch --retries 2: a test failing twice passes on its third run" \
    bash -c '[[ $0 == 0 && $(tail -n1 "$1") == "1 passed, 0 failed" ]]' "$rc" "$st/batch3"
check "batch --retries 2 reports both retries" \
    test "$(grep -c '^--- RETRY .*retry [12] of 2)' "$st/batch3")" = 2
check "no leftovers after batch --retries" no_leftovers

# --- a Linux guest on the test host's /dev/kvm ---------------------------------------
capture --timeout 600 "$here/nested-guest.sh" --timeout 300
check "a nested Linux guest boots on the test host's /dev/kvm and powers off" test "$rc" = 0
[[ -n $out ]] && echo "# $out"
((rc == 0)) || echo "$err" | sed 's/^/# /'

echo "$passed passed, $failed failed"
((failed == 0))
