#!/usr/bin/env bash
# Scenario 1, shared VMs and the OCI command line: pods (two containers in one VM, exec
# into a pod container, pod rm refusing then forcing) and podman through `nestor-vm`
# (run with exit code and the guest kernel, -d, exec, stop, rm).
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
direct=0
[[ ${1:-} == --direct ]] && direct=1
source "$here/lib/vm-env.sh"

# Pods: containers share one VM; pod rm powers it off.
n pod create p1 >/dev/null
b1=$(n run --pod p1 --rm busybox cat /proc/sys/kernel/random/boot_id || true)
b2=$(n run --pod p1 --rm busybox cat /proc/sys/kernel/random/boot_id || true)
b3=$(n run --vm --rm busybox cat /proc/sys/kernel/random/boot_id || true)
[[ -n $b1 && $b1 == "$b2" && $b1 != "$b3" ]] && pass "pod: two containers share one VM, run --vm gets its own" ||
    bad "pod boot ids: '$b1' '$b2' own '$b3'"
n run --pod p1 -d --name inpod busybox sleep 600 >/dev/null
out=$(n exec inpod cat /proc/sys/kernel/random/boot_id || true)
expect "exec into a pod container" "$b1" "$out"
n pod rm p1 >/dev/null 2>&1 && bad "pod rm with a running container succeeded" || pass "pod rm refuses while containers run"
n pod rm -f p1 >/dev/null
sleep 1
[[ -z $(n pod ls --json | python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)))') ]] &&
    ! pgrep -f "nestor-vmm.*$NESTOR_ROOT" >/dev/null && pass "pod rm -f: VM gone" || bad "pod rm -f left $(n pod ls) $(pgrep -af nestor-vmm)"
n rm -f inpod >/dev/null 2>&1 || true

# podman through `nestor-vm` (a symlink to nestor): run, exit code, the guest kernel,
# -d, exec, stop, rm.
guest=$(n run --vm --rm busybox uname -r || true)
if command -v podman >/dev/null; then
    mkdir -p "$work/pm" "$work/bin"
    mount -t tmpfs tmpfs "$work/pm"
    ln -sf "$bin/nestor" "$work/bin/nestor-vm"
    pm() {
        timeout 300 podman --root "$work/pm/root" --runroot "$work/pm/run" --runtime "$work/bin/nestor-vm" \
            --cgroup-manager cgroupfs --events-backend none "$@"
    }
    lim=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network=none)
    pm pull -q "oci:$img" >/dev/null 2>"$work/pm.err" && pm tag "$(pm images -q | head -n1)" localhost/vmbox >/dev/null ||
        bad "podman pull: $(cat "$work/pm.err")"
    set +e
    out=$(pm run --rm "${lim[@]}" localhost/vmbox sh -c 'uname -r; exit 3' 2>"$work/pm.err")
    rc=$?
    set -e
    [[ $rc == 3 && $out == "$guest" ]] && pass "podman --runtime nestor-vm run: exit 3, guest kernel $out" ||
        bad "podman run: rc $rc, out '$out': $(tail -n 5 "$work/pm.err")"
    pm run -d --name pv "${lim[@]}" localhost/vmbox sleep 1000 >/dev/null 2>"$work/pm.err" || bad "podman run -d: $(tail -n 5 "$work/pm.err")"
    out=$(pm exec pv sh -c 'echo in-exec; uname -r' 2>"$work/pm.err" | tr '\n' ' ')
    expect "podman exec in the VM" "in-exec $guest " "$out"
    pm stop -t 1 pv >/dev/null 2>"$work/pm.err" && pm rm pv >/dev/null 2>>"$work/pm.err" && pass "podman stop, rm" ||
        bad "podman stop/rm: $(tail -n 5 "$work/pm.err")"
    pm rm -f -a >/dev/null 2>&1 || true
    umount -l "$work/pm" 2>/dev/null || true
else
    echo "skip podman: not installed"
fi
exit $fail
