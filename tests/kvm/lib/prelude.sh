# tests/kvm/lib/prelude.sh: sourced first by every tests/kvm/*.sh (after `set -euo
# pipefail`). What it gives a test, and what a test owes it:
#
# Before sourcing, a test may set
#   limit=SECS           its default time limit (--timeout overrides; default 120)
#   script_opt() {...}   its own options: called with the remaining arguments when the
#                        first is not a common one; returns how many it consumed (0: not
#                        its option either, which is a usage error)
# Arguments (parsed at once; later ones win):
#   --kernel VMLINUX     the guest kernel            -> $kernel
#   --initrd FILE        the guest initramfs         -> $initrd
#   --vmm PATH           nestor-vmm                  -> $vmm
#   --nestor PATH        nestor, run on the host     -> $nestor
#   --agent PATH         the static nestor-agent     -> $agent
#   --timeout SECS                                   -> $limit
#   --direct             already re-run where KVM is (see rerun_where_kvm_is)
#   -h, --help           the test's leading comment block
# It sets: $here (tests/kvm, or benches/ for a benchmark sourcing it), $repo, $cache ($NESTOR_CACHE or ~/.cache/nestor), $tdir
# (cargo's target dir), $test (the script's name without .sh), $label (" (inside TCG test
# host; ...)" inside the test host, else empty: append it to every printed timing),
# $fail=0.
#
# Lookup (each fills its variable unless an argument already did; missing parts are a
# usage error, status 2, naming how to build them):
#   find_vmm [--static-first]  $vmm: target/{release,debug}/nestor-vmm, then the static
#                              x86_64-unknown-linux-gnu build (scripts/setup.sh's; first
#                              when asked)
#   find_nestor                $nestor: target/{release,debug}/nestor, then the static one
#   find_kernel                $kernel: guest-kernel/build.sh's vmlinux (cached by hash)
#   find_static_bins           $nestor_static, $agent (static, for the guest): the ones
#                              scripts/test.sh built, else images/build-agent.sh --host
#   find_agent_initrd [--test-rootfs]   $initrd: the agent initramfs of those binaries
#   find_client                $client: a nestor-agent to run on the host for its test
#                              tools (`client`: the agent protocol; `vsock-cat`): $agent,
#                              else target/{release,debug}/nestor-agent
# Where KVM is:
#   rerun_where_kvm_is         unless inside the test host or --direct: re-runs this
#                              script through tests/testhost/kvm-exec (directly on a
#                              host with hardware KVM, else in the TCG test host) with
#                              --direct, the original arguments and every path looked up
#                              so far (nothing is built inside: no cargo or kernel build
#                              under TCG), time limit $limit + 120 s; exits with its status
#   need_kvm                   status 2 unless /dev/kvm exists
# Where something other than KVM works (no nested KVM needed):
#   rerun_in_testhost_unless CMD...   unless inside the test host, --direct, or CMD
#                              succeeds here (e.g. `criu check`): re-runs this script in
#                              the test host (tests/testhost/run, always TCG) with
#                              --direct, the original arguments and the paths looked up
#                              so far, time limit $limit + 120 s; exits with its status
# The work dir:
#   make_work                  $work: a fresh directory under $TMPDIR (or /tmp), removed
#                              on exit after every on_exit command
#   on_exit CMD...             run CMD on exit (last registered first); errors ignored
# Results:
#   pass MSG                   "ok   MSG" on stdout
#   bad MSG                    "FAIL MSG" on stderr; the test fails ($fail=1) but goes on
#   expect NAME WANT GOT       pass or bad
#   finish                     exits 0 if nothing failed, else 1
#   die2 MSG                   usage or missing parts: message on stderr, exit 2

here=$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd -P)
# A test in tests/kvm, or a benchmark in benches/ that runs the same way.
if [[ -f $here/../Cargo.toml ]]; then
    repo=$(cd "$here/.." && pwd -P)
else
    repo=$(cd "$here/../.." && pwd -P)
fi
cache=${NESTOR_CACHE:-$HOME/.cache/nestor}
tdir=${CARGO_TARGET_DIR:-$repo/target}
test=$(basename "${BASH_SOURCE[1]}" .sh)
limit=${limit:-120}
kernel= initrd= vmm= nestor= agent= nestor_static= direct=0
label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside TCG test host; compare only within this run)"
fail=0

die2() { echo "$test: $*" >&2; exit 2; }
pass() { echo "ok   $*"; }
bad() { echo "FAIL $*" >&2; fail=1; }
expect() { if [[ $3 == "$2" ]]; then pass "$1"; else bad "$1: want '$2', got '$3'"; fi; }
finish() { exit $((fail ? 1 : 0)); }

prelude_args=("$@")
while (($#)); do
    case $1 in
    --kernel | --initrd | --vmm | --nestor | --agent | --timeout)
        (($# >= 2)) || die2 "$1 needs a value" ;;&
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --vmm) vmm=$2; shift 2 ;;
    --nestor) nestor=$2; shift 2 ;;
    --agent) agent=$2; shift 2 ;;
    --timeout) limit=$2; shift 2 ;;
    --direct) direct=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *)
        used=0
        if declare -F script_opt >/dev/null; then script_opt "$@" || used=$?; fi
        ((used)) || die2 "unknown argument '$1' (see --help)"
        shift "$used"
        ;;
    esac
done
unset used

# The static build (what scripts/setup.sh makes) is the last place looked, after
# cargo's own (what scripts/test.sh makes), unless asked for first.
find_vmm() {
    local static=$tdir/x86_64-unknown-linux-gnu/release/nestor-vmm
    [[ -n $vmm ]] || for c in ${1:+"$static"} \
        "$tdir/release/nestor-vmm" "$tdir/debug/nestor-vmm" "$static"; do
        [[ -x $c ]] && { vmm=$c; break; }
    done
    [[ -x $vmm ]] || die2 "no nestor-vmm (scripts/setup.sh, cargo build --release -p nestor-microvm, or --vmm)"
}

find_nestor() {
    [[ -n $nestor ]] || for c in "$tdir/release/nestor" "$tdir/debug/nestor" \
        "$tdir/x86_64-unknown-linux-gnu/release/nestor"; do
        [[ -x $c ]] && { nestor=$c; break; }
    done
    [[ -x $nestor ]] || die2 "no nestor (scripts/setup.sh, cargo build --release -p nestor, or --nestor)"
}

find_kernel() {
    [[ -n $kernel ]] || kernel=$("$repo/guest-kernel/build.sh" | tail -n1)
    [[ -r $kernel ]] || die2 "no guest kernel (guest-kernel/build.sh, or --kernel)"
}

find_static_bins() {
    local static=$tdir/x86_64-unknown-linux-gnu/release bins
    if [[ -x $static/nestor && -x $static/nestor-agent ]]; then
        nestor_static=$static/nestor
        [[ -n $agent ]] || agent=$static/nestor-agent
    else
        bins=$("$repo/images/build-agent.sh" --host --quiet)
        nestor_static=$(tail -n2 <<<"$bins" | head -n1)
        [[ -n $agent ]] || agent=$(tail -n1 <<<"$bins")
    fi
    [[ -x $agent && -x $nestor_static ]] || die2 "no static nestor-agent and nestor (images/build-agent.sh)"
}

find_agent_initrd() {
    [[ -z $initrd ]] || return 0
    find_static_bins
    initrd=$("$repo/images/build-initramfs.sh" --agent "$agent" --nestor "$nestor_static" "$@" | tail -n1)
    [[ -r $initrd ]] || die2 "no agent initramfs (images/build-initramfs.sh)"
}

find_client() {
    local c
    for c in "$agent" "$tdir/release/nestor-agent" "$tdir/debug/nestor-agent"; do
        [[ -n $c && -x $c ]] && { client=$c; return 0; }
    done
    die2 "no nestor-agent for the host side (cargo build --release -p nestor-guest-agent, or --agent)"
}

rerun_where_kvm_is() {
    [[ ${NESTOR_TESTHOST:-} == inside || $direct == 1 ]] && return 0
    local paths=() v
    for v in kernel initrd vmm nestor agent; do
        [[ -n ${!v} ]] && paths+=("--$v" "${!v}")
    done
    set +e
    "$repo/tests/testhost/kvm-exec" --timeout $((limit + 120)) -- "$0" --direct \
        "${prelude_args[@]}" "${paths[@]}" --timeout "$limit"
    exit $?
}

rerun_in_testhost_unless() {
    [[ ${NESTOR_TESTHOST:-} == inside || $direct == 1 ]] && return 0
    "$@" >/dev/null 2>&1 && return 0
    local paths=() v
    for v in kernel initrd vmm nestor agent; do
        [[ -n ${!v} ]] && paths+=("--$v" "${!v}")
    done
    set +e
    "$repo/tests/testhost/run" --timeout $((limit + 120)) -- "$0" --direct \
        "${prelude_args[@]}" "${paths[@]}" --timeout "$limit"
    exit $?
}

need_kvm() {
    [[ -c /dev/kvm ]] || die2 "no /dev/kvm"
}

prelude_exit=()
on_exit() {
    prelude_exit=("$*" "${prelude_exit[@]}")
}
make_work() {
    work=$(mktemp -d "${TMPDIR:-/tmp}/$test.XXXXXX")
    trap prelude_cleanup EXIT
}
prelude_cleanup() {
    local c
    for c in "${prelude_exit[@]}"; do
        eval "$c" >/dev/null 2>&1 || true
    done
    [[ -n ${work:-} ]] && rm -rf "$work"
}
