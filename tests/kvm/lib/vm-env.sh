# tests/kvm/lib/vm-env.sh: sourced by the run-vm*.sh tests right after prelude.sh. It
# looks up what `nestor run --vm` needs (the guest kernel, the agent initramfs, nestor
# and nestor-vmm) and the busybox sample image, all on this host (nothing compiles
# under TCG), re-runs the test where KVM is, and there sets up a private nestor: data
# root and state on a tmpfs of their own (NESTOR_ROOT, NESTOR_STATE), the sample image
# imported, NESTOR_VM_KERNEL/NESTOR_VM_INITRD/NESTOR_VM_TIMEOUT exported, and
#   n ARGS...   nestor under a 240 s time limit
#   $bin        the directory nestor and nestor-vmm run from (NESTOR_BIN_DIR, else
#               nestor's own; a copy on the tmpfs inside the test host)
#   $img        the sample image's OCI layout
# Every container and VM of the test is removed on exit.
find_kernel
find_agent_initrd
find_nestor
"$repo/images/build-busybox-image.sh" >/dev/null 2>&1
rerun_where_kvm_is
need_kvm
bin=${NESTOR_BIN_DIR:-$(dirname "$nestor")}
export NESTOR_VM_KERNEL=$kernel NESTOR_VM_INITRD=$initrd
export NESTOR_VM_TIMEOUT=${NESTOR_VM_TIMEOUT:-120}

make_work
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
on_exit umount -l '"$work"'
on_exit umount -l '"$work/pm"'
on_exit '"$bin/nestor"' gc
on_exit 'for id in $("$bin/nestor" ps -a -q 2>/dev/null); do "$bin/nestor" rm -f "$id"; done'
img=$("$repo/images/build-busybox-image.sh" 2>/dev/null | tail -n1)
"$bin/nestor" image import "$img" >/dev/null

