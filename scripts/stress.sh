#!/usr/bin/env bash
# scripts/stress.sh: the load and fault runs at their full sizes, by hand (scripts/test.sh
# runs the same tests at CI's sizes): 100 native containers at once, 1000 sequential
# `run --rm` with nothing left or grown, and kill -9 of nestor at 50 random moments in
# each of `run`, `run --vm` (the stand-in VMM), `pod create` and `image import`, each
# followed by `gc`. Prints the figures: started/removed times, per-100-run times, how
# many kills landed mid-way, and that nothing was left. NESTOR_STRESS_SEED=N reruns the
# random moments of an earlier run.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "stress: needs root (namespaces, cgroups, mounts)" >&2
  exit 1
fi
ulimit -n 20000 2>/dev/null || true
NESTOR_STRESS=full cargo test --release -p nestor --test stress -- --nocapture --test-threads 1 2>&1 |
  grep -E '^stress:|^test |panicked|left behind|^  '
