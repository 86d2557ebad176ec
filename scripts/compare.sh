#!/usr/bin/env bash
# The main job: install what is missing, build, and run the comparison on the built-in
# sample image and guest kernel:
#   1. `nestor bench --quick` on this host (every mode; VM modes are measured when KVM
#      here boots a Linux guest, else reported skipped with the reason);
#   2. when KVM here cannot boot a guest (kvm-pvm: no VT-x/AMD-V), the same bench again
#      inside the KVM test host (tests/testhost/run), where every mode runs; its timings
#      are TCG timings, comparable only within that run.
# Both Markdown reports go to stdout; JSON and SVG plots into the output directory,
# whose absolute path is the LAST line of stdout. Progress on stderr.
#
#   scripts/compare.sh [nestor bench args...]     e.g. --modes process,container,vm
# Env: NESTOR_COMPARE_OUT (default <repo>/target/compare), NESTOR_COMPARE_TESTHOST=0 to
# skip step 2, NESTOR_COMPARE_TESTHOST_ARGS (default "--runs 3 --density-max 3").
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
log() { echo "compare: $*" >&2; }

BIN=$(scripts/setup.sh | tail -n 1)
log "guest kernel (guest-kernel/build.sh; cached after the first build)"
kernel=$(guest-kernel/build.sh | tail -n 1) || { log "no guest kernel: VM modes will be skipped"; kernel=; }
log "static nestor for the workloads (images/build-agent.sh)"
static=$(images/build-agent.sh | tail -n 2 | head -n 1) || { log "no static nestor: VM workloads will be skipped"; static=; }

out=${NESTOR_COMPARE_OUT:-$repo/target/compare}
mkdir -p "$out"
out=$(cd "$out" && pwd)
args=()
[[ -n $kernel ]] && args+=(--kernel "$kernel")
[[ -n $static ]] && args+=(--workload-bin "$static")

log "nestor bench --quick on this host"
"$BIN/nestor" bench --quick "${args[@]}" --json "$out/host.json" --svg "$out/host-svg" "$@" \
    >"$out/host.md"
cat "$out/host.md"

boots=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["header"]["kvm"]["guest_boot"])' "$out/host.json")
if [[ $boots == True ]]; then
    log "KVM here boots guests: the host report has every mode"
elif [[ ${NESTOR_COMPARE_TESTHOST:-1} == 0 ]]; then
    log "KVM here cannot boot guests; NESTOR_COMPARE_TESTHOST=0: no test-host run"
else
    log "KVM here cannot boot a Linux guest: every mode again inside the KVM test host (a few minutes)"
    read -r -a th_args <<<"${NESTOR_COMPARE_TESTHOST_ARGS:---runs 3 --density-max 3}"
    status=0
    # Inside, the store lives on the test host's tmpfs: its root is an overlay, on
    # which a container's overlay cannot be mounted. The sample images go in first;
    # `run --vm` boots the kernel and agent initramfs setup.sh installed.
    vm_dir=${NESTOR_ROOT:-/var/lib/nestor}/vm
    busybox_img=$(images/build-busybox-image.sh 2>/dev/null | tail -n 1)
    redis_img=$(images/build-redis-image.sh 2>/dev/null | tail -n 1)
    NESTOR_BIN_DIR="$BIN" tests/testhost/run --timeout "${NESTOR_COMPARE_TESTHOST_TIMEOUT:-1500}" -- \
        env NESTOR_ROOT=/run/nestor-compare NESTOR_STATE=/run/nestor-compare-state \
        NESTOR_VM_KERNEL="$vm_dir/vmlinux" NESTOR_VM_INITRD="$vm_dir/initramfs.cpio.gz" bash -c \
        'nestor=$1 busybox=$2 redis=$3; shift 3
         "$nestor" image import "$busybox" >/dev/null && "$nestor" image import "$redis" >/dev/null &&
         exec "$nestor" bench "$@"' \
        - "$BIN/nestor" "$busybox_img" "$redis_img" --quick "${args[@]}" "${th_args[@]}" \
        --json "$out/testhost.json" --svg "$out/testhost-svg" "$@" >"$out/testhost.md" || status=$?
    if ((status == 0)); then
        echo
        cat "$out/testhost.md"
    else
        log "the test-host run failed (status $status); the host report above stands"
    fi
fi
echo "$out"
