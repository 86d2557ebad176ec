#!/usr/bin/env bash
# Host directories and named volumes in a jailed microVM (`nestor run --vm --jail -v
# DIR:/dst[:ro]`, `-v NAME:/dst`): each virtiofsd runs in a jail of its own (user
# namespace mapping 0..65535 to a host id block of its own, mount/pid/ipc/uts/net/cgroup
# namespaces, the directory bound in through an idmapped mount), its socket bound into
# the VMM's jail. Two VM boots:
#  1. `:ro`: the guest reads, a write gets EROFS, the host file is untouched; after the
#     run no virtiofsd, jail or staging mount is left;
#  2. read-write, while the container waits: the guest's files on the host with their
#     content and the owners an unjailed run gives (root's files root's, a guest user's
#     its uid's, a chown in the guest the same uid:gid on the host); a binary on the
#     share runs (exec, mmap); the virtiofsd runs as a non-root uid, in another mount
#     and user namespace than the host; then kill -9 of nestor and `nestor gc`: no
#     virtiofsd, socket, jail or staging mount is left.
# And a named volume (its data root is a tmpfs here): served the same way where the
# kernel can idmap tmpfs (Linux 6.3+), else refused with one line naming why, before
# any VM boots; 3. without --jail (jailed by default), the same volume is served by an
# unjailed virtiofsd to the jailed VMM, with one warning, where it cannot be idmapped.
# The shared directory is on an ext4 loop file: the test host's Linux 6.1 idmaps
# ext4 but not tmpfs.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=600
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

truncate -s 64M "$work/ext4.img"
mkfs.ext4 -q -F "$work/ext4.img"
mkdir "$work/ext"
modprobe loop 2>/dev/null || true # without the module, mount -o loop fails with EPERM
mount -o loop "$work/ext4.img" "$work/ext"
on_exit umount -l '"$work/ext"'
host=$work/ext/shared
mkdir -p "$host"
echo host-file >"$host/h"
jails=${NESTOR_JAILS:-/run/nestor-jail}

# Nothing of a jailed file server is left: no virtiofsd, jail directory, staging mount,
# or vhost-user socket.
nothing_left() {
    local what=$1 left
    left="$(pgrep -af '^/virtiofsd' || true)$(ls "$jails" 2>/dev/null)$(ls "$jails/.idmap" 2>/dev/null)"
    left+=$(find /run/nestor-vm "$jails" -name '*.sock' 2>/dev/null || true)
    left+=$(grep " $jails/" /proc/self/mountinfo || true)
    [[ -z $left ]] && pass "$what: no virtiofsd, jail, staging mount or socket left" ||
        bad "$what left: $left"
}

# 1. Read-only.
set +e
out=$(n run --vm --jail --rm -v "$host:/h:ro" busybox sh -c 'cat /h/h; echo changed >/h/h' 2>"$work/ro.err")
rc=$?
set -e
[[ $rc != 0 && $out == host-file && $(cat "$work/ro.err") == *"can't create /h/h: Read-only file system"* ]] &&
    pass "--jail -v DIR:ro: the guest reads, a write gets EROFS" ||
    bad "--jail :ro: exit $rc, output $out, errors $(tail -n 5 "$work/ro.err")"
expect "--jail :ro: host file untouched" host-file "$(cat "$host/h")"
nothing_left "--jail :ro run's end"

# 2. Read-write, seen from the host while the container waits; then kill -9 and gc.
script='
set -e
cat /h/h >/h/copy
echo from-jailed-vm >/h/new
mkdir /h/dir
echo p >/h/dir/perm
chmod 640 /h/dir/perm
chown 1234:5678 /h/dir/perm
mkdir -m 777 /h/u
echo "u:x:4321:4321::/:/bin/sh" >>/etc/passwd
su u -c "echo u >/h/u/byuser"
cp /bin/busybox /h/busybox
/h/busybox echo mapped >/h/mapped
rm /h/busybox
echo up >/h/up
sleep 300
'
"$bin/nestor" run --vm --jail --rm -v "$host:/h" busybox sh -c "$script" >"$work/rw.out" 2>"$work/rw.err" &
npid=$!
for _ in $(seq 1800); do [[ -e $host/up ]] && break; kill -0 $npid 2>/dev/null || break; sleep 0.1; done
if [[ -e $host/up ]]; then
    expect "the guest's copy of a host file, on the host" host-file "$(cat "$host/copy" 2>&1)"
    expect "the guest's new file, on the host" from-jailed-vm "$(cat "$host/new" 2>&1)"
    expect "owners as an unjailed run gives: root's file and directory are root's" "0:0 0:0" \
        "$(stat -c '%u:%g' "$host/new" "$host/dir" 2>&1 | tr '\n' ' ' | sed 's/ $//')"
    expect "mode and owner set in the guest, seen on the host" "640 1234:5678" \
        "$(stat -c '%a %u:%g' "$host/dir/perm" 2>&1)"
    expect "exec (mmap) of a binary on the share" mapped "$(cat "$host/mapped" 2>&1)"
    expect "a file made by guest user 4321 is the host's uid 4321" "4321:4321" "$(stat -c '%u:%g' "$host/u/byuser" 2>&1)"
    fpid=$(pgrep -f '^/virtiofsd' | head -n1 || true)
    if [[ -n $fpid ]]; then
        uid=$(awk '/^Uid:/ {print $2}' "/proc/$fpid/status")
        [[ $uid =~ ^[0-9]+$ && $uid != 0 ]] && pass "the jailed virtiofsd runs as host uid $uid, not root" ||
            bad "jailed virtiofsd uid '$uid'"
        [[ $(readlink "/proc/$fpid/ns/mnt") != "$(readlink /proc/self/ns/mnt)" ]] &&
            pass "the jailed virtiofsd has a mount namespace of its own" || bad "virtiofsd in the host's mount namespace"
        [[ $(readlink "/proc/$fpid/ns/user") != "$(readlink /proc/self/ns/user)" ]] &&
            pass "the jailed virtiofsd has a user namespace of its own" || bad "virtiofsd in the host's user namespace"
        root=$(ls "/proc/$fpid/root" 2>/dev/null | tr '\n' ' ')
        [[ -n $root && $root != *etc* && $root != *home* && $root == *shared* ]] &&
            pass "the jailed virtiofsd's root holds only the jail ($root)" || bad "virtiofsd root: '$root'"
        # Its cgroup (v2 in the test host) bounds its memory (page cache included) and CPU.
        cg=/sys/fs/cgroup$(sed -n 's/^0:://p' "/proc/$fpid/cgroup")
        expect "the jailed virtiofsd's cgroup: memory.max 256 MiB" 268435456 "$(cat "$cg/memory.max" 2>&1)"
        quota=$(cat "$cg/cpu.max" 2>&1)
        [[ $quota =~ ^[0-9]+\ [0-9]+$ ]] && pass "the jailed virtiofsd's cgroup: a CPU quota ($quota)" ||
            bad "the jailed virtiofsd's cpu.max: '$quota'"
    else
        bad "no virtiofsd process while the jailed VM runs"
    fi
else
    bad "the read-write run never got going: $(tail -n 5 "$work/rw.err")"
fi
kill -9 $npid 2>/dev/null || true
wait $npid 2>/dev/null || true
n gc >/dev/null
sleep 1
nothing_left "kill -9 of nestor, then gc"

# A named volume: its data root is on a tmpfs.
vol=fsjvol-$$
n volume create "$vol" >/dev/null
set +e
out=$(n run --vm --jail --rm -v "$vol:/v" busybox sh -c 'echo in-vol >/v/f; cat /v/f' 2>&1)
rc=$?
set -e
if [[ $rc == 0 ]]; then
    expect "--jail -v NAME: the guest's write in the volume, on the host" in-vol \
        "$(cat "$NESTOR_ROOT/volumes/$vol/_data/f" 2>&1)"
else
    [[ $(wc -l <<<"$out") == 1 && $out == "error: "*"does not support idmapped mounts"* ]] &&
        pass "--jail -v NAME on a tmpfs this kernel cannot idmap: one line ($out)" ||
        bad "--jail -v NAME: exit $rc: $out"
fi
nothing_left "--jail -v NAME"
jailed_rc=$rc

# 3. The same volume without --jail (run --vm is jailed by default): where the jail
# cannot idmap it, the VMM stays jailed and the volume gets an unjailed virtiofsd, with
# one warning line.
set +e
out=$(n run --vm --rm -v "$vol:/v" busybox sh -c 'echo by-default >/v/g; cat /v/g' 2>"$work/def.err")
rc=$?
set -e
expect "run --vm -v NAME (jailed by default): the guest's write" by-default "$out"
expect "run --vm -v NAME (jailed by default): exit code" 0 "$rc"
expect "run --vm -v NAME (jailed by default): the write on the host" by-default \
    "$(cat "$NESTOR_ROOT/volumes/$vol/_data/g" 2>&1)"
if [[ $jailed_rc != 0 ]]; then
    [[ $(wc -l <"$work/def.err") == 1 ]] && grep -q "^warning: .*file server runs unjailed" "$work/def.err" &&
        pass "run --vm -v NAME on a tmpfs this kernel cannot idmap: one warning ($(cat "$work/def.err"))" ||
        bad "run --vm -v NAME fallback: stderr $(cat "$work/def.err")"
else
    [[ ! -s $work/def.err ]] && pass "run --vm -v NAME jailed by default: no warning" ||
        bad "run --vm -v NAME: stderr $(cat "$work/def.err")"
fi
left=$(pgrep -af 'virtiofsd' || true)
[[ -z $left ]] && pass "run --vm -v NAME: no virtiofsd left" || bad "virtiofsd left: $left"
nothing_left "run --vm -v NAME"
n volume rm "$vol" >/dev/null
finish
