#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds what the tests need (release
# binaries, the static guest binaries, the guest kernel and initramfs; all cached),
# then runs every test: unit and integration tests as root with real namespaces,
# cgroups and podman; the KVM test host's self-test; and the KVM tests, in the KVM test
# host unless this host has hardware KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
t0=$(date +%s)
phase() { echo "test: [$(($(date +%s) - t0)) s] $*" >&2; }
scripts/setup.sh --tests
if [ "$(id -u)" != 0 ]; then
  echo "test: the tests need root (namespaces, cgroups, mounts)" >&2
  exit 1
fi
# Podman and the containers it runs need these on this kind of machine.
ulimit -n 20000 2>/dev/null || true

# The guest kernel builds beside the Rust builds below (scripts/lib/kernel-bg.sh). Only
# the initramfs and the KVM tests need it; it is waited for before the cargo tests run,
# so that none of them runs beside a kernel build.
phase "building the guest kernel in the background (cached)"
source scripts/lib/kernel-bg.sh
kernel_bg_start

# Guard rails first: they fail fast. clippy runs in the release profile, the one of the
# cargo builds and tests below: its check build compiles no crate the release build could reuse
# (check artifacts are metadata only), but build scripts and proc-macros are shared
# between the two, so in this profile they are built once for the whole script.
phase "cargo fmt --check, cargo clippy -D warnings"
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings

phase "building (release)"
cargo build --release --workspace 2>&1 | tail -n 3 >&2
# The static build scripts/setup.sh makes (--host: nestor-vmm too, no cross-crate LTO), so
# that a machine set up for the main job builds nothing more here, and one build serves.
phase "building the guest's static binaries (cached by cargo)"
bins=$(images/build-agent.sh --host --quiet)
nestor_static=$(tail -n2 <<<"$bins" | head -n1)
agent_static=$(tail -n1 <<<"$bins")
phase "building the cargo tests"
cargo test --workspace --release --no-run --quiet 2>&1 | tail -n 20 >&2
phase "waiting for the guest kernel"
kernel_bg_wait phase
phase "building the initramfs images (cached)"
images/build-initramfs.sh >/dev/null
images/build-initramfs.sh --agent "$agent_static" --nestor "$nestor_static" --test-rootfs >/dev/null
images/build-initramfs.sh --agent "$agent_static" --nestor "$nestor_static" >/dev/null

phase "cargo test --workspace (tests/stress.rs included, at CI sizes)"
cargo test --workspace --release 2>&1

phase "fuzz smoke run (8 s per target over the committed seeds)"
scripts/fuzz.sh --smoke 8

phase "KVM test host self-test"
tests/testhost/selftest.sh
phase "KVM tests (in the KVM test host unless this host has hardware KVM)"
# A test that fails gets two more runs in fresh boots, each reported (tests/testhost/README.md:
# the nested guests of the TCG test host die now and then). Two test hosts at once where
# there are two cores: each has one vCPU.
tests/testhost/batch --jobs "$(($(nproc) < 2 ? 1 : 2))" --retry-failed --retries 2 --batch-size 1 --per-test-timeout 420 tests/kvm
phase "done"
