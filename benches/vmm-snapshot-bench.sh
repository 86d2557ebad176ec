#!/usr/bin/env bash
# nestor-vmm diff snapshots against full ones, on this host's /dev/kvm with a tiny
# guest (crates/microvm/tests/snapshot.rs, diff_vs_full_figures): a 256 MiB guest
# holding 128 MiB of data; each round a diff (the pages written since the last
# snapshot) and then a full snapshot of the same state, so the two are paired.
# Usage: benches/vmm-snapshot-bench.sh [ROUNDS]   (prints one line per round)
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS="${1:-3}" nice -n 19 cargo test --release -q -p nestor-microvm --test snapshot \
    -- --ignored --nocapture --exact diff_vs_full_figures 2>&1 |
    grep -E '^(full-base|round|restore|skipped)'
