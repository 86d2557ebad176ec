#!/usr/bin/env bash
# Install what nestor needs on a Debian 12 host (only what is missing), build it,
# build the sample image and import it. Idempotent; a second run is fast.
#   scripts/setup.sh            install + build (release) + sample image
#   NESTOR_SETUP_NO_BUILD=1     only install packages
set -euo pipefail
cd "$(dirname "$0")/.."

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
# The fuzzers (scripts/fuzz.sh): a nightly toolchain and cargo-fuzz, both cached in
# ~/.rustup and ~/.cargo.
if command -v rustup >/dev/null 2>&1 && ! rustup toolchain list | grep -q '^nightly'; then
  echo "setup: installing the nightly Rust toolchain (for cargo fuzz)" >&2
  rustup toolchain install nightly --profile minimal >&2
fi
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "setup: installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --quiet >&2
fi
# virtiofsd (the file server of -v DIR with --vm), pinned, from crates.io, under the
# cache root (the KVM test host shares it at the same path).
VIRTIOFSD_VERSION=1.14.0
vfs_root="${NESTOR_CACHE:-${HOME:-/root}/.cache/nestor}/virtiofsd-$VIRTIOFSD_VERSION"
if [ ! -x "$vfs_root/bin/virtiofsd" ]; then
  echo "setup: installing virtiofsd $VIRTIOFSD_VERSION (cargo install --locked; a few minutes)" >&2
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
[ -n "${NESTOR_SETUP_NO_BUILD:-}" ] && exit 0

echo "setup: building nestor (release)" >&2
cargo build --release --workspace --quiet >&2
BIN="$(cd "${CARGO_TARGET_DIR:-$PWD/target}" && pwd)/release"
echo "setup: building the busybox sample image" >&2
img=$(images/build-busybox-image.sh | tail -n 1)
if ! "$BIN/nestor" images -q | grep -q .; then
  "$BIN/nestor" image import "$img" >/dev/null
fi
echo "setup: building the redis sample image" >&2
img=$(images/build-redis-image.sh | tail -n 1)
if ! "$BIN/nestor" images | grep -q '^localhost/redis '; then
  "$BIN/nestor" image import "$img" >/dev/null
fi
echo "setup: building the guest kernel and agent initramfs for --vm (cached; the first build takes minutes)" >&2
scripts/vm-assets.sh >/dev/null
echo "setup: done; binaries in $BIN" >&2
echo "$BIN"
