#!/usr/bin/env bash
# Shared directories compared: `nestor bench --sections fs --modes
# process,container,vm-container` where KVM boots a Linux guest (here with hardware KVM,
# else inside the KVM test host), on a private data root with the sample image. One
# directory on a tmpfs the bench mounts, read and written by a host process, a native
# container (bind mount), a container in a microVM over virtio-fs (cache auto and
# always) and, for reference, an ext4 image on the same tmpfs as a virtio-blk volume;
# each row between two host-process runs on the same directory, its ratio to their mean. The
# workloads are nestor's own `workload disk` and `workload meta` (see ARCHITECTURE.md,
# "nestor bench"). Any other argument goes to `nestor bench`:
#   fs-bench.sh [--quick] [--workload-secs S] [--json FILE] [--svg DIR]
# In the test host only the checkout and $NESTOR_CACHE are writable from outside: give
# --json and --svg paths under the checkout. A benchmark, not a test (4 VM boots).
set -euo pipefail
# Two test-host vCPUs (where the bench runs in the test host): a VM's file server runs
# beside its vCPU, as on any host with more than one core; with one vCPU the guest's
# copy and the file server's take turns, which caps a virtio-fs read near half the
# host's. The VMs boot one at a time (two vCPUs faulted guests booting side by side:
# tests/testhost/README.md). NESTOR_TESTHOST_SMP=1 measures the one-vCPU way.
export NESTOR_TESTHOST_SMP=${NESTOR_TESTHOST_SMP:-2}
bench_args=()
script_opt() {
    bench_args+=("$1")
    return 1
}
limit=900
source "$(dirname "${BASH_SOURCE[0]}")/../tests/kvm/lib/prelude.sh"
source "$repo/tests/kvm/lib/vm-env.sh"
# The static nestor for the units (built on this side by vm-env's lookups; found again
# by path where the script re-ran).
find_static_bins

"$bin/nestor" bench --sections fs --modes process,container,vm-container \
    --kernel "$kernel" --workload-bin "$nestor_static" "${bench_args[@]}"
