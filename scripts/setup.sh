#!/usr/bin/env bash
# Install what nestor needs on a Debian 12 host (only what is missing), build it,
# build the sample images and import them. Idempotent; a second run is fast.
#   scripts/setup.sh            install + build + sample images + the guest kernel and
#                               agent initramfs; the LAST line of stdout is the directory
#                               of the binaries
#   scripts/setup.sh --tests    only install, with what the tests alone need (the nightly
#                               toolchain and cargo-fuzz); builds nothing
#   NESTOR_SETUP_NO_BUILD=1     only install (without the tests' tools unless --tests)
# One cargo build serves the host and the guest: nestor, nestor-vmm and nestor-agent,
# release, statically linked (images/build-agent.sh --host), so the guest's nestor and
# agent are built once with the host's binaries, not a second time. The containerd
# shim is not among them (103 crates of its own; `cargo build --release --workspace`
# builds it, docs/kubernetes.md). The guest kernel
# (guest-kernel/build.sh, C only) builds beside it at a lower priority: it fills the
# cores cargo leaves idle (build scripts, the links) instead of coming after it.
set -euo pipefail
cd "$(dirname "$0")/.."
tests=0
case ${1:-} in
  --tests) tests=1 ;;
  "") ;;
  *) echo "setup: unknown argument '$1' (--tests, or none)" >&2; exit 2 ;;
esac
t0=$(date +%s)
step() { echo "setup: [$(($(date +%s) - t0)) s] $*" >&2; }

# libclang-dev: bindgen, which the userfaultfd crate (post-copy migration) runs at build.
PKGS=(podman crun runc busybox-static containernetworking-plugins iptables qemu-system-x86 hyperfine linux-source-6.1
      erofs-utils fio iperf3 iproute2 flex bison bc libelf-dev libssl-dev cpio kmod
      uidmap libseccomp-dev libcap-ng-dev pkg-config e2fsprogs xz-utils python3 strace procps binutils
      redis-server redis-tools docker-registry apache2-utils openssl containerd criu
      libclang-dev)
missing=()
for p in "${PKGS[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq "${missing[@]}" >&2
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo is not installed: install the Rust toolchain (rustup) first" >&2
  exit 1
fi
# The fuzzers (scripts/fuzz.sh, run by the tests): a nightly toolchain and cargo-fuzz,
# both cached in ~/.rustup and ~/.cargo.
if ((tests)); then
  if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q '^nightly'; then
    step "installing the nightly Rust toolchain (for cargo fuzz)"
    rustup toolchain install nightly --profile minimal >&2
  fi
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    step "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --quiet >&2
  fi
fi
# The guest kernel, beside the Rust builds below (it needs only the packages above).
source scripts/lib/kernel-bg.sh
if ((!tests)) && [ -z "${NESTOR_SETUP_NO_BUILD:-}" ]; then
  step "building the guest kernel in the background (cached; the first build takes minutes)"
  kernel_bg_start
fi
# virtiofsd (the file server of -v DIR with --vm), pinned, from crates.io, under the
# cache root (the KVM test host shares it at the same path).
VIRTIOFSD_VERSION=1.14.0
vfs_root="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/virtiofsd-$VIRTIOFSD_VERSION"
if [ ! -x "$vfs_root/bin/virtiofsd" ]; then
  step "installing virtiofsd $VIRTIOFSD_VERSION (cargo install --locked; a minute or more)"
  cargo install --quiet --locked virtiofsd --version "$VIRTIOFSD_VERSION" --root "$vfs_root" >&2
fi
# Huge pages for shared memory on request (Debian's default is never): nestor-vmm asks
# for them for the memfd guest RAM of a VM with a virtio-fs share, and gets them only
# with this (advise affects no mapping that does not ask). Not kept across a reboot:
# a run of this script sets it again.
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
if [ -w "$thp" ] && grep -q '\[never\]' "$thp"; then
  echo "setup: $thp: never -> advise (huge pages for virtio-fs VMs' shared guest RAM)" >&2
  echo advise >"$thp" 2>/dev/null || echo "setup: could not set $thp (left as it is)" >&2
fi
if ((tests)) || [ -n "${NESTOR_SETUP_NO_BUILD:-}" ]; then
  exit 0
fi

step "building nestor, nestor-vmm, nestor-agent: release, static (images/build-agent.sh --host)"
nestor_static=$(images/build-agent.sh --host --quiet | tail -n 2 | head -n 1)
BIN=$(dirname "$nestor_static")
step "building the busybox sample image"
img=$(images/build-busybox-image.sh | tail -n 1)
if ! "$BIN/nestor" images -q | grep -q .; then
  "$BIN/nestor" image import "$img" >/dev/null
fi
step "building the redis sample image"
img=$(images/build-redis-image.sh | tail -n 1)
if ! "$BIN/nestor" images | grep -q '^localhost/redis '; then
  "$BIN/nestor" image import "$img" >/dev/null
fi
step "waiting for the guest kernel"
kernel_bg_wait step
step "the agent initramfs for --vm, and installing both (scripts/vm-assets.sh)"
scripts/vm-assets.sh >/dev/null
step "done; binaries in $BIN"
echo "$BIN"
