#!/usr/bin/env bash
# Warm starts: `run --vm --vm-warm` restores the container's microVM from a template
# (a snapshot of a booted, idle agent VM of the same shape) instead of booting one. The
# first warm run makes the template, later ones reuse it; each clone is its own: fresh
# random bytes, the host's time, a MAC of its own on the network (two clones reach each
# other), jailed by default; a warm clone is checkpointed and restored like any VM
# container; a damaged template is refused in one line and made again; two first runs
# of a shape at once make one template; volumes fall back to a boot with a warning; gc
# removes the template of an image that is gone.
# Runs in the KVM test host unless this host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=720
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

templates=$NESTOR_ROOT/vm-templates
count_templates() { find "$templates" -mindepth 1 -maxdepth 1 -not -name '.*' 2>/dev/null | wc -l; }

# 1. The first warm run makes the template (no network: one shape), and runs.
set +e
out=$(n run --vm --vm-warm --no-jail --network none --rm busybox sh -c 'echo hi; exit 3' 2>"$work/err1")
rc=$?
set -e
expect "first warm run: exit code" 3 "$rc"
expect "first warm run: stdout" hi "$out"
grep -q "making the warm-start template" "$work/err1" && pass "first warm run made the template" ||
    bad "first warm run: no template made: $(cat "$work/err1")"
expect "one template" 1 "$(count_templates)"

# 2. Clones of one template: the same boot (boot_id), made their own.
sleep 4 # a clone's clock would lag at least this much if it kept the template's
# A clone's kernel command line is its template's (hostname "nestor"); a boot's names
# the container.
probe='grep -c "nestor.hostname=nestor " /proc/cmdline; head -c 16 /dev/urandom | od -An -tx1 | tr -d " \n"; echo; date +%s; cat /proc/sys/kernel/random/boot_id'
c1=$(n run --vm --vm-warm --no-jail --network none --rm busybox sh -c "$probe" 2>"$work/err2")
host_now=$(date +%s)
c2=$(n run --vm --vm-warm --no-jail --network none --rm busybox sh -c "$probe" 2>>"$work/err2")
grep -q "making the warm-start template" "$work/err2" && bad "a later warm run made the template again" ||
    pass "later warm runs reuse the template"
cold=$(n run --vm --no-jail --network none --rm busybox grep -c "nestor.hostname=nestor " /proc/cmdline || true)
expect "warm runs are clones of the template, a cold run boots (cmdline)" "1 1 0" \
    "$(sed -n 1p <<<"$c1") $(sed -n 1p <<<"$c2") $cold"
b1=$(sed -n 4p <<<"$c1") b2=$(sed -n 4p <<<"$c2")
[[ -n $b1 && $b1 != "$b2" ]] && pass "clones have boot ids of their own" || bad "boot ids of two clones: '$b1' '$b2'"
r1=$(sed -n 2p <<<"$c1") r2=$(sed -n 2p <<<"$c2")
[[ ${#r1} == 32 && $r1 != "$r2" ]] && pass "clones read different random bytes ($r1, $r2)" ||
    bad "random bytes of two clones: '$r1' '$r2'"
t1=$(sed -n 3p <<<"$c1")
skew=$((host_now - t1))
((skew >= -2 && skew <= 2)) && pass "a clone's clock is the host's (${skew} s apart)" ||
    bad "a clone's clock is ${skew} s off the host's (guest $t1, host $host_now)"

# 3. Networked and jailed (the defaults): two clones at once, each with a MAC of its
# own, reach each other; a third shape, made once.
if [[ -x /usr/lib/cni/bridge ]]; then
    n run --vm --vm-warm -d --name wa busybox sleep 300 >/dev/null 2>"$work/wa.err" ||
        bad "warm -d wa: $(tail -n 3 "$work/wa.err")"
    n run --vm --vm-warm -d --name wb busybox sleep 300 >/dev/null 2>"$work/wb.err" ||
        bad "warm -d wb: $(tail -n 3 "$work/wb.err")"
    grep -q "making the warm-start template" "$work/wb.err" && bad "the second networked clone made a template" || true
    mac_a=$(n exec wa cat /sys/class/net/eth0/address 2>&1 || true)
    mac_b=$(n exec wb cat /sys/class/net/eth0/address 2>&1 || true)
    [[ $mac_a =~ ^02(:[0-9a-f]{2}){5}$ && $mac_b =~ ^02(:[0-9a-f]{2}){5}$ && $mac_a != "$mac_b" && $mac_a != 02:6e:73:74:70:6c ]] &&
        pass "clones have MACs of their own ($mac_a, $mac_b)" || bad "clone MACs: '$mac_a' '$mac_b'"
    ip_b=$(n exec wb ip -4 -o addr show eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1 || true)
    n exec wa ping -c 1 -W 5 "$ip_b" >/dev/null 2>&1 && pass "one clone reaches the other ($ip_b)" ||
        bad "clone wa cannot reach wb at '$ip_b'"
    # Jailed: its VMM runs as a jail's uid.
    vmm_pid=$(n inspect wa | python3 -c 'import json,sys; print(json.load(sys.stdin)["VM"]["VmmPid"])' 2>/dev/null || echo 0)
    vmm_uid=$(awk '/^Uid:/ {print $2}' "/proc/$vmm_pid/status" 2>/dev/null || echo "?")
    [[ $vmm_uid =~ ^[0-9]+$ ]] && ((vmm_uid >= 200000)) && pass "a warm clone's VMM is jailed by default (uid $vmm_uid)" ||
        bad "a warm clone's VMM (pid $vmm_pid) runs as uid '$vmm_uid'"
    # A warm clone moves as any VM container: checkpointed and restored, its interface
    # keeps its MAC and address.
    if n checkpoint wb "$work/ck-wb" >/dev/null 2>"$work/ck.err" && n restore "$work/ck-wb" >/dev/null 2>>"$work/ck.err"; then
        mac_r=$(n exec wb cat /sys/class/net/eth0/address 2>&1 || true)
        expect "a restored warm clone keeps its MAC" "$mac_b" "$mac_r"
        n exec wa ping -c 1 -W 5 "$ip_b" >/dev/null 2>&1 && pass "the restored clone is reached again" ||
            bad "the restored clone wb is not reached at $ip_b"
    else
        bad "checkpoint and restore of a warm clone: $(tail -n 3 "$work/ck.err")"
    fi
    n rm -f wa wb >/dev/null 2>&1 || true
    expect "templates: no network, network" 2 "$(count_templates)"
    # The networked one was made by a jailed VMM: its files are root's now, read-only
    # to others.
    tpl=$(grep -l '"net": true' "$templates"/*/template.json | head -n 1)
    expect "a jailed VMM's template is root's, 0644" "root 644" "$(stat -c '%U %a' "${tpl%/template.json}/vm/memory" 2>&1)"
else
    echo "skip: networked clones (containernetworking-plugins is not installed)"
fi

# 4. A damaged template is refused in one line, removed, and made again by the next run.
tpl=$(grep -l '"net": false' "$templates"/*/template.json | head -n 1)
tpl=${tpl%/template.json}
for f in "$tpl"/vm/*; do
    [[ $(basename "$f") == memory ]] || printf 'garbage' >"$f"
done
set +e
n run --vm --vm-warm --no-jail --network none --rm busybox true >"$work/bad" 2>&1
rc=$?
set -e
[[ $rc == 1 && $(grep -c . "$work/bad") -ge 1 ]] && grep -q -- "--vm-warm: the template did not restore" "$work/bad" && [[ ! -e $tpl ]] &&
    pass "a damaged template: one clear line, removed ($(grep -- --vm-warm "$work/bad" | head -c 160))" ||
    bad "damaged template: rc $rc, $(cat "$work/bad"), left: $(ls "$tpl" 2>&1 | head -n 3)"
out=$(n run --vm --vm-warm --no-jail --network none --rm busybox echo again 2>"$work/again")
expect "the next warm run makes it again and runs" again "$out"

# 5. Two first runs of a new shape at once: one template is made, both run.
before=$(count_templates)
n run --vm --vm-warm --no-jail --network none --vm-mem 192 --rm busybox echo one >"$work/c1" 2>"$work/c1.err" &
p1=$!
n run --vm --vm-warm --no-jail --network none --vm-mem 192 --rm busybox echo two >"$work/c2" 2>"$work/c2.err" &
p2=$!
r1=0 r2=0
wait $p1 || r1=$?
wait $p2 || r2=$?
expect "two concurrent first runs of a shape" "0 0 one two" "$r1 $r2 $(cat "$work/c1") $(cat "$work/c2")"
expect "they made one template" "$((before + 1)) 1" \
    "$(count_templates) $(cat "$work/c1.err" "$work/c2.err" | grep -c "making the warm-start template")"

# 6. Volumes: the VM boots, with a warning saying why.
mkdir -p "$work/share"
echo shared >"$work/share/f"
out=$(n run --vm --vm-warm --no-jail --network none --rm -v "$work/share:/s" busybox cat /s/f 2>"$work/vol.err")
expect "warm with a volume runs (booted)" shared "$out"
grep -q -- "--vm-warm: the VM boots: volumes" "$work/vol.err" && pass "warm with a volume says it boots" ||
    bad "no warning for a volume: $(cat "$work/vol.err")"

# 7. Nothing of a run is left; gc keeps the templates while their image is there, and
# removes them once it is gone.
[[ -z $(n ps -a -q) ]] && ! pgrep -x nestor-vmm >/dev/null && pass "no container or VMM left" ||
    bad "left: $(n ps -a) $(pgrep -a nestor-vmm)"
before=$(count_templates)
n gc >/dev/null
expect "gc keeps the templates" "$before" "$(count_templates)"
n image rm busybox >/dev/null
n gc >/dev/null
expect "gc removes the templates of a removed image" 0 "$(count_templates)"
finish
