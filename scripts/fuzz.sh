#!/usr/bin/env bash
# scripts/fuzz.sh [--smoke] [SECONDS] [TARGET...]
#
# Runs nestor's coverage-guided fuzzers (cargo fuzz, libFuzzer, nightly Rust; the fuzz/
# crate, built with AddressSanitizer, overflow checks and debug assertions) for SECONDS
# each (default 300): virtio_mmio, layer_extract, agent_frames, oci_config,
# seccomp_libseccomp (nestor's seccomp compiler against libseccomp), or the
# TARGETs named. Each run starts from the committed seeds (fuzz/seeds/TARGET) and the
# corpus kept outside the repo ($NESTOR_FUZZ_CORPUS, default ~/.cache/nestor/fuzz-corpus),
# which grows from run to run. --smoke: a throw-away corpus (the seeds only), for the
# test suite. Prints one line per target: executions, corpus size, result; a crash
# leaves its input in fuzz/artifacts/TARGET/ and makes the exit status 1.
set -euo pipefail
cd "$(dirname "$0")/.."
smoke=0
if [[ ${1:-} == --smoke ]]; then
  smoke=1
  shift
fi
secs=300
if [[ ${1:-} =~ ^[0-9]+$ ]]; then
  secs=$1
  shift
fi
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(virtio_mmio layer_extract agent_frames oci_config seccomp_libseccomp)

if ! cargo +nightly --version >/dev/null 2>&1; then
  echo "fuzz: skipped: no nightly toolchain (scripts/setup.sh --tests installs it)" >&2
  exit 0
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "fuzz: skipped: cargo-fuzz is not installed (scripts/setup.sh --tests installs it)" >&2
  exit 0
fi
# The fuzz build is cached outside the checkout, as the guest kernel is (cargo rebuilds
# what changed), unless NESTOR_FUZZ_TARGET_DIR says otherwise: a fresh clone's smoke run
# then skips the cold build of the four targets (minutes on 2 cores).
export CARGO_TARGET_DIR=${NESTOR_FUZZ_TARGET_DIR:-${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/fuzz-target}
cd fuzz
echo "fuzz: building ${targets[*]} (nightly, ASan, overflow checks, debug assertions)" >&2
for t in "${targets[@]}"; do
  cargo +nightly fuzz build "$t" 2>&1 | tail -n 1 >&2
done

# Leaks inside libseccomp (the seccomp_libseccomp target's reference) are not reported.
export LSAN_OPTIONS="suppressions=$PWD/lsan.supp${LSAN_OPTIONS:+:$LSAN_OPTIONS}"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
store=${NESTOR_FUZZ_CORPUS:-$HOME/.cache/nestor/fuzz-corpus}
failed=0
for t in "${targets[@]}"; do
  if [[ $smoke == 1 ]]; then
    corpus=$tmp/$t
  else
    corpus=$store/$t
  fi
  mkdir -p "$corpus" "artifacts/$t"
  log=$tmp/$t.log
  rc=0
  cargo +nightly fuzz run "$t" "$corpus" "seeds/$t" -- \
    -max_total_time="$secs" -timeout=20 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log" 2>&1 || rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n1)
  per_s=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -n1)
  files=$(find "$corpus" -type f | wc -l)
  if [[ $rc == 0 ]]; then
    echo "fuzz: $t: ok, ${execs:-?} executions in ${secs} s (${per_s:-?}/s), corpus $files"
  else
    failed=1
    echo "fuzz: $t: FAILED after ${execs:-?} executions (status $rc); last lines:"
    grep -E "panicked|ERROR|SUMMARY|Test unit written|assert" "$log" | head -n 8 || tail -n 20 "$log"
  fi
done
# A fuzzer that crashed left its scratch directory behind (its exit handler did not run).
for d in "${TMPDIR:-/tmp}"/nestor-fuzz-virtio-*; do
  [[ -d $d ]] || continue
  kill -0 "${d##*-}" 2>/dev/null || rm -rf "$d"
done
exit "$failed"
