#!/usr/bin/env bash
# Host directories and named volumes in a microVM over virtio-fs (`nestor run --vm -v
# DIR:/dst` and `-v NAME:/dst`: one virtiofsd per directory, nestor-vmm's vhost-user-fs
# device, the guest mounts -t virtiofs by tag), with an unjailed VMM and file servers
# (`--no-jail`: run-vm-fs-jail.sh covers the jailed ones, run --vm's default). Five VM boots:
#  1. native -> VM -> host round trip through a named volume; a file written in the guest
#     whose sha256 matches on the host; many small files; rename and unlink of an
#     open file; exec (mmap) of a binary on the share; modes and owners set in the guest
#     as the host sees them, and a file made by a non-root container user;
#  2. `:ro`: a write in the guest gets EROFS and the host file is untouched;
#  3. `volume rm` of a volume a running VM container mounts is refused in one line; kill
#     -9 of nestor mid-run, then gc: no virtiofsd, no socket, no sandbox left; and
#     kill -9 of the file server mid-run: the container's reads fail (EIO) instead of
#     hanging, the VM runs on, and nestor names the dead file server;
#  4. podman --runtime nestor-vm -v DIR: the directory reaches the guest over virtio-fs;
#  5. a pod (`pod create -v`): its containers share its volume and directory, one
#     container's write is the next one's read, `run --pod -v` mounts a shared source
#     elsewhere, and the pod's file servers go with it.
# Sizes: 128 MiB and 1,500 files by default (CI's; virtio-fs makes about 25 files/s in
# the TCG test host); NESTOR_FS_TEST_FULL=1 makes them 1 GiB and 10,000 files (4 min 40 s
# there when last run), and NESTOR_FS_TEST_MIB / NESTOR_FS_TEST_FILES set either.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
full=${NESTOR_FS_TEST_FULL:-0}
limit=$([[ $full == 1 ]] && echo 1800 || echo 600)
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

mib=${NESTOR_FS_TEST_MIB:-$([[ $full == 1 ]] && echo 1024 || echo 128)}
files=${NESTOR_FS_TEST_FILES:-$([[ $full == 1 ]] && echo 10000 || echo 1500)}
host=$work/shared
mkdir -p "$host"
vol=fsvol-$$

# 1. Round trip: native writes the volume, the VM reads it and writes back, native reads.
n run --rm -v "$vol:/v" busybox sh -c 'echo from-native >/v/n' >/dev/null
echo host-file >"$host/h"
script='
set -e
cat /v/n
cat /h/h
echo from-vm >/v/vm
dd if=/dev/urandom of=/h/big bs=1M count='$mib' 2>/dev/null
sha256sum /h/big | cut -d" " -f1
mkdir /h/many
i=0; while [ $i -lt '$files' ]; do echo $i >/h/many/f$i; i=$((i+1)); done
ls /h/many | wc -l
echo keep >/h/open
exec 3</h/open
mv /h/open /h/moved
rm /h/moved
cat <&3
ls /h/open /h/moved 2>/dev/null | wc -l
grep -c " virtiofs " /proc/mounts
cp /bin/busybox /h/busybox
/h/busybox echo mapped
echo p >/h/perm
chmod 640 /h/perm
chown 1234:5678 /h/perm
rm /h/busybox
'
t0=$(date +%s)
out=$(n run --vm --no-jail --rm -v "$vol:/v" -v "$host:/h" busybox sh -c "$script" 2>"$work/err1") ||
    bad "VM run 1: $(cat "$work/err1")"
secs=$(($(date +%s) - t0))
mapfile -t o <<<"$out"
expect "native -> VM through a named volume" from-native "${o[0]:-}"
expect "host directory read in the VM" host-file "${o[1]:-}"
expect "VM -> host: the volume's file" from-vm "$(cat "$NESTOR_ROOT/volumes/$vol/_data/vm" 2>&1)"
expect "VM -> native: the volume's file" from-vm "$(n run --rm -v "$vol:/v" busybox cat /v/vm 2>&1)"
hsum=$(sha256sum "$host/big" | cut -d' ' -f1)
[[ -n ${o[2]:-} && ${o[2]} == "$hsum" ]] &&
    pass "$mib MiB written in the guest: sha256 matches on the host (run took ${secs}s$label)" ||
    bad "sha256: guest '${o[2]:-}', host '$hsum'"
expect "$files small files (guest count)" "$files" "$(tr -d ' ' <<<"${o[3]:-}")"
expect "$files small files (host count)" "$files" "$(find "$host/many" -type f | wc -l)"
expect "small file content" 321 "$(cat "$host/many/f321" 2>&1)"
expect "an open file read after rename + unlink" keep "${o[4]:-}"
expect "renamed + unlinked file gone" 0 "$(tr -d ' ' <<<"${o[5]:-}")"
[[ ! -e $host/open && ! -e $host/moved ]] && pass "rename + unlink reached the host" ||
    bad "host still has $(ls "$host")"
expect "two virtiofs mounts in the container" 2 "${o[6]:-}"
expect "exec (mmap) of a binary on the share" mapped "${o[7]:-}"
expect "mode and owner set in the guest, seen on the host" "640 1234:5678" "$(stat -c '%a %u:%g' "$host/perm" 2>&1)"
rm -rf "$host/many" "$host/big"
mkdir -m 777 "$host/u"
n run --vm --no-jail --rm --user 4321:4321 -v "$host:/h" busybox sh -c 'echo u >/h/u/byuser' >/dev/null 2>"$work/err1b" ||
    bad "VM run as --user 4321: $(cat "$work/err1b")"
expect "a file made by container user 4321 is the host's uid 4321" "4321:4321" "$(stat -c '%u:%g' "$host/u/byuser" 2>&1)"
pgrep -f "virtiofsd.*$host" >/dev/null && bad "virtiofsd outlived the VM" ||
    pass "no virtiofsd after the run"

# 2. Read-only.
set +e
out=$(n run --vm --no-jail --rm -v "$host:/h:ro" busybox sh -c 'cat /h/h; echo changed >/h/h' 2>&1)
rc=$?
set -e
[[ $rc != 0 && $out == *"Read-only file system"* && $out == host-file* ]] &&
    pass ":ro: the guest reads, a write gets EROFS" || bad ":ro: exit $rc, output $out"
expect ":ro: host file untouched" host-file "$(cat "$host/h")"

# 3. kill -9 of nestor mid-run, then gc. While it runs, its volume cannot be removed.
"$bin/nestor" run --vm --no-jail --rm -v "$vol:/v" -v "$host:/h" busybox sh -c 'echo up >/h/up; sleep 300' >/dev/null 2>&1 &
npid=$!
for _ in $(seq 1200); do [[ -e $host/up ]] && break; sleep 0.1; done
[[ -e $host/up ]] || bad "the killed run never started"
# Its guest RAM (memfd, as the VM has shares) is on huge pages where the host gives
# shared memory huge pages on request (the test host and scripts/setup.sh set advise).
thp=/sys/kernel/mm/transparent_hugepage/shmem_enabled
vmm_pid=$(pgrep -P "$npid" -x nestor-vmm | head -n1 || true)
if ! grep -qE '\[(advise|always|within_size|force)\]' "$thp" 2>/dev/null; then
    echo "skip huge pages for shared guest RAM: $thp is $(cat "$thp" 2>/dev/null || echo absent)"
elif [[ -z $vmm_pid ]]; then
    bad "huge pages: no nestor-vmm child of nestor ($npid)"
else
    pmd=$(awk '/^ShmemPmdMapped:/ {print $2}' "/proc/$vmm_pid/smaps_rollup" 2>/dev/null || true)
    ((${pmd:-0} > 0)) && pass "shared guest RAM on huge pages (ShmemPmdMapped $pmd kB)" ||
        bad "shared guest RAM has no huge pages (ShmemPmdMapped '${pmd:-}' kB, $thp: $(cat "$thp"))"
fi
set +e
out=$(n volume rm "$vol" 2>&1)
rc=$?
set -e
[[ $rc != 0 && $(wc -l <<<"$out") == 1 && $out == *"in use"* && -d $NESTOR_ROOT/volumes/$vol/_data ]] &&
    pass "volume rm of a volume a running VM container mounts: refused in one line, kept" ||
    bad "volume rm of a volume in use: exit $rc, output $out"
kill -9 $npid
wait $npid 2>/dev/null || true
n gc >/dev/null
sleep 1
left=$(pgrep -af "virtiofsd.*$host" || true)
socks=$(find /run/nestor-vm -name 'fs-*.sock' 2>/dev/null || true)
[[ -z $left && -z $socks && -z $(n ps -a -q) ]] &&
    pass "kill -9 then gc: no virtiofsd, socket or container left" ||
    bad "kill -9 then gc left: $left $socks $(n ps -a)"

# 3b. The file server dies mid-run: EIO in the guest, not a hang; nestor says why.
rm -f "$host/up2"
"$bin/nestor" run --vm --no-jail --rm -v "$host:/h" busybox sh -c \
    'echo up >/h/up2; while cat /h/h >/dev/null; do sleep 0.2; done; echo read-failed; ls /h >/dev/null 2>&1 || echo ls-failed' \
    >"$work/die.out" 2>"$work/die.err" &
npid=$!
for _ in $(seq 1200); do [[ -e $host/up2 ]] && break; sleep 0.1; done
[[ -e $host/up2 ]] || bad "the file-server run never started: $(cat "$work/die.err")"
pkill -9 -f "virtiofsd.*--shared-dir[= ]$host( |$)" || bad "no virtiofsd to kill for $host"
for _ in $(seq 120); do kill -0 $npid 2>/dev/null || break; sleep 1; done
if kill -0 $npid 2>/dev/null; then
    bad "a dead file server hung the container for 120 s"
    kill -9 $npid
fi
wait $npid 2>/dev/null || true
expect "virtiofsd killed mid-run: the guest's reads and listing fail (EIO), no hang" \
    "read-failed ls-failed" "$(tr '\n' ' ' <<<"$(cat "$work/die.out")" | sed 's/ $//')"
grep -q "file server of $host died" "$work/die.err" && pass "nestor names the dead file server" ||
    bad "no word of the dead file server: $(cat "$work/die.err")"
grep -q "Input/output error" "$work/die.err" "$work/die.out" && pass "the container saw EIO" ||
    bad "no EIO seen: $(cat "$work/die.out" "$work/die.err")"
[[ -z $(n ps -a -q) ]] || bad "the run left $(n ps -a)"

# 4. podman through nestor-vm: its -v DIR reaches the guest over virtio-fs.
if command -v podman >/dev/null; then
    mkdir -p "$work/pm" "$work/rt"
    mount -t tmpfs tmpfs "$work/pm"
    on_exit umount -l '"$work/pm"'
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
    layer=$(python3 - "$img" <<'PY'
import json, os, sys
d = sys.argv[1]
blob = lambda dg: os.path.join(d, "blobs", *dg.split(":"))
m = json.load(open(blob(json.load(open(os.path.join(d, "index.json")))["manifests"][0]["digest"])))
print(blob(max(m["layers"], key=lambda l: l["size"])["digest"]))
PY
)
    pm import -q "$layer" localhost/vmbox >/dev/null 2>"$work/pm.err" || bad "podman import: $(cat "$work/pm.err")"
    out=$(pm run --rm --ulimit nofile=20000:20000 --ulimit nproc=32768:32768 --network=none \
        -v "$host:/h" localhost/vmbox sh -c 'cat /h/h; echo from-podman-vm >/h/pm; grep -c " virtiofs " /proc/mounts' \
        2>"$work/pm.err") || bad "podman run -v: $(tail -n 5 "$work/pm.err")"
    expect "podman --runtime nestor-vm -v DIR: read in the guest, one virtiofs mount" "host-file 1" \
        "$(tr '\n' ' ' <<<"$out" | sed 's/ $//')"
    expect "podman --runtime nestor-vm -v DIR: the guest's write on the host" from-podman-vm "$(cat "$host/pm" 2>&1)"
else
    echo "skip podman: not installed"
fi

# 5. A pod shares a volume and a directory with its containers.
pod=fspod-$$
if n pod create "$pod" --network none -v "$vol:/data" -v "$host:/src:ro" >/dev/null 2>"$work/pod.err"; then
    on_exit "$bin/nestor" pod rm -f "$pod"
    out=$(n run --pod "$pod" --rm busybox sh -c \
        'echo from-pod >/data/p; cat /src/h; echo x 2>/dev/null >/src/nope || echo ro-refused' 2>&1) ||
        bad "pod run 1: $out"
    expect "pod: the first container reads the pod's directory, its write there is refused (:ro)" \
        "host-file ro-refused" "$(tr '\n' ' ' <<<"$out" | sed 's/ $//')"
    expect "pod: the first container's write to the pod's volume, on the host" from-pod \
        "$(cat "$NESTOR_ROOT/volumes/$vol/_data/p" 2>&1)"
    out=$(n run --pod "$pod" --rm -v "$host:/again" busybox sh -c 'cat /data/p /again/h' 2>&1) ||
        bad "pod run 2: $out"
    expect "pod: a second container reads the first one's write, and the directory elsewhere" \
        "from-pod host-file" "$(tr '\n' ' ' <<<"$out" | sed 's/ $//')"
    sandbox=$(n pod ls --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["sandbox"])')
    n pod rm -f "$pod" >/dev/null
    left=$(pgrep -af "virtiofsd.*$sandbox" || true)
    [[ -z $left && ! -e $sandbox ]] && pass "pod rm: its file servers and sandbox are gone" ||
        bad "pod rm left: $left $(ls "$sandbox" 2>&1)"
else
    bad "pod create -v: $(cat "$work/pod.err")"
fi

n volume rm "$vol" >/dev/null
finish
