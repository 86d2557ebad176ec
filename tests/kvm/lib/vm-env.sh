# Sourced by the tests/kvm/run-vm*.sh scripts: builds what `nestor run --vm` needs on
# this host (nothing compiles under TCG), re-runs the calling script in the KVM test
# host unless this host has hardware KVM, and inside sets up a private nestor (data root
# on a tmpfs, the busybox sample image imported) plus the check helpers.
# Expects: $here, $repo, $direct (1 = already inside), the script's own args in "$@".
bin=${NESTOR_BIN_DIR:-$repo/target/release}
if [[ ${NESTOR_TESTHOST:-} != inside && $direct == 0 ]]; then
    # Build everything here: nothing compiles under TCG.
    export NESTOR_VM_KERNEL NESTOR_VM_INITRD
    NESTOR_VM_KERNEL=$("$repo/guest-kernel/build.sh" 2>/dev/null | tail -n1)
    bins=$("$repo/images/build-agent.sh" 2>/dev/null)
    NESTOR_VM_INITRD=$("$repo/images/build-initramfs.sh" --agent "$(tail -n1 <<<"$bins")" \
        --nestor "$(tail -n2 <<<"$bins" | head -n1)" 2>/dev/null | tail -n1)
    "$repo/images/build-busybox-image.sh" >/dev/null 2>&1
    "$repo/tests/testhost/kvm-exec" --timeout 900 -- "$0" --direct "$@"
    exit
fi
: "${NESTOR_VM_KERNEL:=$("$repo/guest-kernel/build.sh" 2>/dev/null | tail -n1)}"
if [[ -z ${NESTOR_VM_INITRD:-} ]]; then
    # The static binaries scripts/test.sh built (cargo under TCG would take minutes).
    static=${CARGO_TARGET_DIR:-$repo/target}/x86_64-unknown-linux-gnu/release
    if [[ -x $static/nestor && -x $static/nestor-agent ]]; then
        bins=$(printf '%s\n%s\n' "$static/nestor" "$static/nestor-agent")
    else
        bins=$("$repo/images/build-agent.sh" 2>/dev/null)
    fi
    NESTOR_VM_INITRD=$("$repo/images/build-initramfs.sh" --agent "$(tail -n1 <<<"$bins")" \
        --nestor "$(tail -n2 <<<"$bins" | head -n1)" 2>/dev/null | tail -n1)
fi
export NESTOR_VM_KERNEL NESTOR_VM_INITRD
[[ -c /dev/kvm ]] || { echo "$(basename "$0"): no /dev/kvm" >&2; exit 1; }
label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside TCG test host; compare only within this run)"
export NESTOR_VM_TIMEOUT=${NESTOR_VM_TIMEOUT:-120}

work=$(mktemp -d "${TMPDIR:-/tmp}/run-vm.XXXXXX")
# A tmpfs of its own: image layers hold whiteouts, which the test host's overlay root
# refuses to create.
mount -t tmpfs -o size=2g tmpfs "$work"
export NESTOR_ROOT=$work/root NESTOR_STATE=$work/state
if [[ ${NESTOR_TESTHOST:-} == inside ]]; then
    # The test host reads the checkout over 9p, which keeps no page cache: every exec
    # would page the binaries in again, as no real host does. Run them from tmpfs.
    mkdir "$work/bin"
    cp "$bin/nestor" "$bin/nestor-vmm" "$work/bin/"
    bin=$work/bin
fi
n() { timeout --kill-after=5 240 "$bin/nestor" "$@"; }
cleanup() {
    for id in $("$bin/nestor" ps -a -q 2>/dev/null); do "$bin/nestor" rm -f "$id" >/dev/null 2>&1 || true; done
    "$bin/nestor" gc >/dev/null 2>&1 || true
    umount -l "$work/pm" 2>/dev/null || true
    umount -l "$work" 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT
img=$("$repo/images/build-busybox-image.sh" 2>/dev/null | tail -n1)
"$bin/nestor" image import "$img" >/dev/null


fail=0
pass() { echo "ok   $*"; }
bad() { echo "FAIL $*" >&2; fail=1; }
# expect NAME WANT GOT
expect() { if [[ $3 == "$2" ]]; then pass "$1"; else bad "$1: want '$2', got '$3'"; fi; }
