# tests/kvm/lib/containerd-env.sh: sourced after vm-env.sh by the tests and benches of
# containerd's shim in the KVM test host. Starts a containerd of its own (Debian's, from
# the host's root) on the work tmpfs (config, root, state, socket; CRI off) with the
# shim and nestor side by side on its PATH ($bin), imports the busybox sample image,
# and stops it (after killing and removing its tasks) on exit. Gives:
#   cx ARGS...  ctr on that containerd and the namespace $ns, under a 240 s limit
#   $image      the imported image's name
#   $ctrd       the containerd directory (containerd.log in it)
shim=$tdir/release/containerd-shim-nestor-v2
[[ -x $shim ]] || die2 "no $shim (cargo build --release -p nestor-shim)"
command -v containerd >/dev/null && command -v ctr >/dev/null ||
    die2 "containerd and ctr are not installed (scripts/setup.sh installs them)"
cp "$shim" "$bin/"
ctrd=$work/ctrd
mkdir -p "$ctrd"
cat >"$ctrd/config.toml" <<CFG
version = 2
root = "$ctrd/root"
state = "$ctrd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$ctrd/containerd.sock"
[plugins."io.containerd.internal.v1.opt"]
  path = "$ctrd/opt"
CFG
PATH=$bin:$PATH containerd --config "$ctrd/config.toml" >"$ctrd/containerd.log" 2>&1 &
ctrd_pid=$!
ns=nestor-shim-$$
cx() { timeout --kill-after=5 240 ctr -a "$ctrd/containerd.sock" -n "$ns" "$@"; }
stop_containerd() {
    local t
    for t in $(cx task ls -q); do
        cx task kill -s KILL "$t"
        sleep 1
        cx task rm -f "$t"
    done
    kill "$ctrd_pid"
    wait "$ctrd_pid"
}
on_exit stop_containerd
for _ in $(seq 200); do cx version >/dev/null 2>&1 && break; sleep 0.1; done
cx version >/dev/null || { cat "$ctrd/containerd.log" >&2; die2 "containerd did not start"; }
tar -C "$img" -cf "$work/busybox.tar" .
cx image import "$work/busybox.tar" >/dev/null
image=$(cx image ls -q | head -n1)
