#!/usr/bin/env bash
# The whole test suite: installs what is missing, then runs every test (unit,
# integration as root with real namespaces/cgroups/podman, and the KVM tests in the
# KVM test host where this machine has no hardware KVM).
set -euo pipefail
cd "$(dirname "$0")/.."
NESTOR_SETUP_NO_BUILD=1 scripts/setup.sh
if [ "$(id -u)" != 0 ]; then
  echo "test: the tests need root (namespaces, cgroups, mounts)" >&2
  exit 1
fi
# Podman and the containers it runs need these on this kind of machine.
ulimit -n 20000 2>/dev/null || true
echo "test: cargo test --workspace" >&2
cargo test --workspace --release 2>&1
echo "test: KVM test host self-test" >&2
tests/testhost/selftest.sh
if compgen -G "tests/kvm/*.sh" >/dev/null; then
  echo "test: KVM tests (in the KVM test host unless this host has hardware KVM)" >&2
  tests/testhost/batch tests/kvm
fi
