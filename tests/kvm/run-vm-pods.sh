#!/usr/bin/env bash
# Scenario 1, shared VMs, both nestings at once and the OCI command line: pods (two
# containers in one VM and one network namespace, exec into a pod container, pod rm
# refusing then forcing);
# `run --vm --jail` (exit code, the guest kernel, and the jailed VMM seen from the host:
# unprivileged uid, no capabilities, seccomp, a jail root; nothing left after rm -f);
# podman through `nestor-vm` (run with exit code and the guest kernel, -d, exec, stop, rm).
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=780
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

# Pods: containers share one VM (and, on no network, its loopback-only namespace: the
# network case is run-vm-net.sh's); pod rm powers it off.
n pod create p1 --network none >/dev/null
b1=$(n run --pod p1 --rm busybox cat /proc/sys/kernel/random/boot_id || true)
b2=$(n run --pod p1 --rm busybox cat /proc/sys/kernel/random/boot_id || true)
b3=$(n run --vm --rm busybox cat /proc/sys/kernel/random/boot_id || true)
[[ -n $b1 && $b1 == "$b2" && $b1 != "$b3" ]] && pass "pod: two containers share one VM, run --vm gets its own" ||
    bad "pod boot ids: '$b1' '$b2' own '$b3'"
n run --pod p1 -d --name inpod busybox sleep 600 >/dev/null
out=$(n exec inpod cat /proc/sys/kernel/random/boot_id || true)
expect "exec into a pod container" "$b1" "$out"
ns_in=$(n exec inpod readlink /proc/self/ns/net || true)
ns_run=$(n run --pod p1 --rm busybox readlink /proc/self/ns/net || true)
[[ $ns_in == net:* && $ns_in == "$ns_run" ]] && pass "pod: its containers share one network namespace" ||
    bad "pod containers' network namespaces: '$ns_in' and '$ns_run'"
n pod rm p1 >/dev/null 2>&1 && bad "pod rm with a running container succeeded" || pass "pod rm refuses while containers run"
n pod rm -f p1 >/dev/null
sleep 1
[[ -z $(n pod ls --json | python3 -c 'import json,sys; print(" ".join(p["name"] for p in json.load(sys.stdin)))') ]] &&
    ! pgrep -f "nestor-vmm.*$NESTOR_ROOT" >/dev/null && pass "pod rm -f: VM gone" || bad "pod rm -f left $(n pod ls) $(pgrep -af nestor-vmm)"
n rm -f inpod >/dev/null 2>&1 || true

# podman through `nestor-vm` (a symlink to nestor): run, exit code, the guest kernel,
# -d, exec, stop, rm, and -p on podman's own network.
guest=$(n run --vm --rm busybox uname -r || true)

# Both nestings at once: a container in a microVM whose VMM is jailed.
set +e
out=$(n run --vm --jail --rm busybox sh -c 'uname -r; exit 4' 2>"$work/jv.err")
rc=$?
set -e
[[ $rc == 4 && $out == "$guest" ]] && pass "run --vm --jail: exit 4, guest kernel" ||
    bad "run --vm --jail: rc $rc, out '$out': $(tail -n 5 "$work/jv.err")"
n run --vm --jail -d --name jv busybox sleep 600 >/dev/null 2>"$work/jv.err" || bad "run --vm --jail -d: $(tail -n 5 "$work/jv.err")"
vpid=$(n inspect jv | python3 -c 'import json,sys; print(json.load(sys.stdin)["VM"]["VmmPid"])' || echo 0)
st=$(grep -E '^(Uid|CapEff|Seccomp):' "/proc/$vpid/status" 2>/dev/null | awk '{print $1 $2}' | tr '\n' ' ')
expect "jailed VMM: uid, capabilities, seccomp" "Uid:200000 CapEff:0000000000000000 Seccomp:2 " "$st"
root=$(ls "/proc/$vpid/root" 2>/dev/null | tr '\n' ' ')
[[ -n $root && $root != *etc* && $root != *home* ]] && pass "jailed VMM's root holds only the jail ($root)" || bad "jailed VMM root: '$root'"
n rm -f jv >/dev/null
sleep 1
[[ -z $(ls /run/nestor-jail 2>/dev/null) ]] && ! kill -0 "$vpid" 2>/dev/null && pass "rm -f: jailed VMM and jail gone" ||
    bad "rm -f left: $(ls /run/nestor-jail 2>/dev/null) pid $vpid"

if command -v podman >/dev/null; then
    mkdir -p "$work/pm" "$work/rt"
    mount -t tmpfs tmpfs "$work/pm"
    # nestor as `nestor-vm` (a symlink), behind a wrapper that hands it this test's
    # kernel, initramfs and data root: podman does not pass its environment on to the
    # runtime, which would otherwise use what scripts/setup.sh installed.
    ln -sf "$bin/nestor" "$work/rt/nestor-vm"
    cat >"$work/rt/runtime" <<EOF
#!/bin/sh
export NESTOR_VM_KERNEL='$NESTOR_VM_KERNEL' NESTOR_VM_INITRD='$NESTOR_VM_INITRD'
export NESTOR_ROOT='$NESTOR_ROOT' NESTOR_STATE='$NESTOR_STATE' NESTOR_VM_TIMEOUT='$NESTOR_VM_TIMEOUT'
exec '$work/rt/nestor-vm' "\$@"
EOF
    chmod +x "$work/rt/runtime"
    pm() {
        timeout 300 podman --root "$work/pm/root" --runroot "$work/pm/run" --runtime "$work/rt/runtime" \
            --cgroup-manager cgroupfs --events-backend none "$@"
    }
    lim=(--ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network=none)
    # The sample image's base layer (busybox) as a podman image.
    layer=$(python3 - "$img" <<'PY'
import json, os, sys
d = sys.argv[1]
blob = lambda dg: os.path.join(d, "blobs", *dg.split(":"))
m = json.load(open(blob(json.load(open(os.path.join(d, "index.json")))["manifests"][0]["digest"])))
print(blob(max(m["layers"], key=lambda l: l["size"])["digest"]))
PY
)
    pm import -q "$layer" localhost/vmbox >/dev/null 2>"$work/pm.err" || bad "podman import: $(cat "$work/pm.err")"
    set +e
    out=$(pm run --rm "${lim[@]}" localhost/vmbox sh -c 'uname -r; exit 3' 2>"$work/pm.err")
    rc=$?
    set -e
    [[ $rc == 3 && $out == "$guest" ]] && pass "podman --runtime nestor-vm run: exit 3, guest kernel $out" ||
        bad "podman run: rc $rc, out '$out': $(tail -n 5 "$work/pm.err")"
    pm run -d --name pv "${lim[@]}" localhost/vmbox sleep 1000 >/dev/null 2>"$work/pm.err" || bad "podman run -d: $(tail -n 5 "$work/pm.err")"
    out=$(pm exec pv sh -c 'echo in-exec; uname -r' 2>"$work/pm.err" | tr '\n' ' ') || true
    expect "podman exec in the VM" "in-exec $guest " "$out$(tail -n 5 "$work/pm.err")"
    pm stop -t 1 pv >/dev/null 2>"$work/pm.err" && pm rm pv >/dev/null 2>>"$work/pm.err" && pass "podman stop, rm" ||
        bad "podman stop/rm: $(tail -n 5 "$work/pm.err")"
    # podman's own network: its namespace gets the VM's tap; a published port answers.
    port=$((20000 + RANDOM % 20000))
    if pm run -d --name pweb --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 \
        -p "127.0.0.1:$port:80" --hostname pwebhost localhost/vmbox httpd -f -p 80 -h /etc >/dev/null 2>"$work/pm.err"; then
        out=""
        for i in $(seq 1 60); do
            # busybox's wget crashes under the TCG test host's CPU: nc.
            out=$(printf 'GET /hostname HTTP/1.0\r\n\r\n' | busybox nc -w 3 127.0.0.1 "$port" 2>/dev/null | tail -n 1)
            [[ -n $out ]] && break
            sleep 0.5
        done
        expect "podman --runtime nestor-vm -p: the port answers" pwebhost "$out"
        # podman's /etc/hosts and /etc/resolv.conf reach the container in the guest.
        get() { printf 'GET /%s HTTP/1.0\r\n\r\n' "$1" | busybox nc -w 5 127.0.0.1 "$port" 2>/dev/null; }
        hosts=$(get hosts)
        [[ $hosts == *pwebhost* ]] && pass "podman's /etc/hosts in the guest (names pwebhost)" ||
            bad "podman's /etc/hosts in the guest: $hosts"
        resolv=$(get resolv.conf)
        [[ $resolv == *nameserver* ]] && pass "podman's /etc/resolv.conf in the guest" ||
            bad "podman's /etc/resolv.conf in the guest: $resolv"
    else
        bad "podman run -p in VM mode: $(tail -n 5 "$work/pm.err")"
    fi
    pm rm -f -a >/dev/null 2>&1 || true
    umount -l "$work/pm" 2>/dev/null || true
else
    echo "skip podman: not installed"
fi
finish
