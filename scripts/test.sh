#!/usr/bin/env bash
# The whole test suite: installs what is missing, builds what the tests need (release
# binaries, the static guest binaries, the guest kernel and initramfs; all cached),
# then runs every test: unit and integration tests as root with real namespaces,
# cgroups and podman; the KVM test host's self-test; and the KVM tests, in the KVM test
# host unless this host has hardware KVM.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --tests
if [ "$(id -u)" != 0 ]; then
  echo "test: the tests need root (namespaces, cgroups, mounts)" >&2
  exit 1
fi
# Podman and the containers it runs need these on this kind of machine.
ulimit -n 20000 2>/dev/null || true

# Guard rails first: they fail fast. clippy runs in the release profile, the one of the
# cargo builds and tests below: its check build compiles no crate the release build could reuse
# (check artifacts are metadata only), but build scripts and proc-macros are shared
# between the two, so in this profile they are built once for the whole script.
echo "test: cargo fmt --check, cargo clippy -D warnings" >&2
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --release --quiet -- -D warnings

echo "test: building (release)" >&2
cargo build --release --workspace 2>&1 | tail -n 3 >&2
echo "test: building the guest's static binaries, kernel and initramfs (cached)" >&2
bins=$(images/build-agent.sh)
nestor_static=$(tail -n2 <<<"$bins" | head -n1)
agent_static=$(tail -n1 <<<"$bins")
guest-kernel/build.sh >/dev/null
images/build-initramfs.sh >/dev/null
images/build-initramfs.sh --agent "$agent_static" --nestor "$nestor_static" --test-rootfs >/dev/null
images/build-initramfs.sh --agent "$agent_static" --nestor "$nestor_static" >/dev/null

echo "test: cargo test --workspace (tests/stress.rs included, at CI sizes)" >&2
cargo test --workspace --release 2>&1

echo "test: fuzz smoke run (8 s per target over the committed seeds)" >&2
scripts/fuzz.sh --smoke 8

echo "test: KVM test host self-test" >&2
tests/testhost/selftest.sh
echo "test: KVM tests (in the KVM test host unless this host has hardware KVM)" >&2
# A test that fails gets two more runs in fresh boots, each reported (tests/testhost/README.md:
# the nested guests of the TCG test host die now and then). Two test hosts at once where
# there are two cores: each has one vCPU.
tests/testhost/batch --jobs "$(($(nproc) < 2 ? 1 : 2))" --retry-failed --retries 2 --batch-size 1 --per-test-timeout 420 tests/kvm
