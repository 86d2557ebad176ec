#!/usr/bin/env bash
# tests/kvm/vmm-devices.sh [--kernel VMLINUX] [--initrd INITRD] [--agent NESTOR-AGENT] [--vmm PATH]
#
# Boots nestor's guest kernel under nestor-vmm with virtio-vsock (--vsock) and
# virtio-net (--net on a uniquely named tap with a host address) and checks, in one
# boot, with nestor-agent as the guest's init running a test command (nestor.cmd):
#   - vsock guest -> host: the guest connects to CID 2 port 6000 (`nestor-agent
#     vsock-cat connect 2 6000`), which reaches the host's Unix socket <vsock>_6000;
#     bytes go both ways; then 1.3 MB go to <vsock>_6001 and are echoed back intact
#     (credit flow control under load);
#   - vsock host -> guest: the host connects to the vsock socket, writes
#     `CONNECT 5000`, gets `OK <port>`, and exchanges bytes with `vsock-cat listen 5000`
#     in the guest;
#   - the network: the guest sets eth0 up (busybox ip), pings the host's tap address
#     and sends a line over TCP to a host listener;
#   - the guest's MAC is the one given with --net TAP,mac=...;
#   - nestor-vmm reports the guest's boot marker and exits 0 on the guest's power-off,
#     leaving no vsock socket behind;
#   - the balloon (--balloon): two more VMs at once, with and without it, each filling
#     and freeing 96 MiB; with it, the freed memory is given back to the host (the
#     API's metrics), and memory used again afterwards holds what the guest writes;
#     both offer their memory to KSM (--mem-merge), which shares their identical pages.
# The tap is created here and deleted on every path.
#
# Runs in the KVM test host unless this host has hardware KVM. Without --kernel it uses
# guest-kernel/build.sh's (cached) vmlinux; without --agent the static nestor-agent
# (images/build-agent.sh). The launch runs under `timeout 120`.
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail
limit=300
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
find_vmm
find_kernel
[[ -n $initrd ]] || { find_static_bins; initrd=$("$repo/images/build-initramfs.sh" --agent "$agent" | tail -n1); }
rerun_where_kvm_is
need_kvm
[[ -c /dev/net/tun ]] || modprobe tun 2>/dev/null || true
[[ -c /dev/net/tun ]] || die2 "no /dev/net/tun"
command -v python3 >/dev/null || die2 "python3 is needed"

make_work
tap="nvd$$x$((RANDOM % 1000))"
tap=${tap:0:15}
on_exit ip link del '"$tap"'
net="10.$((RANDOM % 200 + 20)).$((RANDOM % 250))"
hip=$net.1 gip=$net.2
mac=06:00:ac:$(printf '%02x:%02x:%02x' $((RANDOM % 256)) $((RANDOM % 256)) $((RANDOM % 256)))
tag=t$$r$RANDOM
tcp_port=$((20000 + RANDOM % 20000))
bulk_n=200000 # seq 1 N: 1.3 MB each way, far past the credit and socket buffers
ip tuntap add dev "$tap" mode tap
ip addr add "$hip/24" dev "$tap"
ip link set "$tap" up
sock=$work/v.sock

# The guest's part: results go to the console as "vd: ..." lines.
guest=$(cat <<G
r() { echo "vd: \$*"; }
echo g2h-$tag | /init vsock-cat connect 2 6000 >/tmp/a 2>/tmp/ae; r "g2h rc=\$? got=\$(cat /tmp/a) \$(cat /tmp/ae)"
t0=\$(date +%s); seq 1 $bulk_n | /init vsock-cat connect 2 6001 | md5sum >/tmp/m; r "bulk rc=\$? md5=\$(cut -d' ' -f1 /tmp/m) secs=\$((\$(date +%s) - t0))"
echo h2g-reply-$tag | timeout 60 /init vsock-cat listen 5000 >/tmp/b 2>/tmp/be; r "h2g rc=\$? got=\$(cat /tmp/b) \$(cat /tmp/be)"
r "mac \$(cat /sys/class/net/eth0/address)"
ip link set eth0 up; ip addr add $gip/24 dev eth0
ping -c 3 -W 5 $hip >/tmp/p 2>&1; r "ping rc=\$? \$(grep -o '[0-9]* packets received' /tmp/p)"
echo tcp-$tag | timeout 20 nc $hip $tcp_port; r "tcp rc=\$?"
G
)
b64=$(printf '%s' "$guest" | base64 -w0)
cmdline="console=ttyS0 quiet panic=-1 nestor.cmd=$b64"
((${#cmdline} < 2000)) || { echo "vmm-devices.sh: command line too long (${#cmdline})" >&2; exit 2; }

echo "kernel $kernel; initrd $initrd; vmm $vmm; tap $tap ($hip, guest $gip, $mac)" >&2
# The host's part, in the background: guest-initiated listener, TCP listener, then the
# host-initiated connection (retried until the guest listens).
python3 - "$sock" "$tag" "$hip" "$tcp_port" >"$work/host.out" 2>&1 <<'PY' &
import os, socket, sys, threading, time
sock, tag, hip, tcp_port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
deadline = time.time() + 100
def say(*a): print(*a, flush=True)

def read_all(s):
    out = b""
    while True:
        c = s.recv(65536)
        if not c:
            return out
        out += c

g2h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
g2h.bind(sock + "_6000"); g2h.listen(1); g2h.settimeout(100)
tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
tcp.bind((hip, tcp_port)); tcp.listen(1); tcp.settimeout(100)
def tcp_server():
    try:
        c, _ = tcp.accept(); c.settimeout(30)
        line = b""
        while not line.endswith(b"\n"):
            ch = c.recv(1)
            if not ch:
                break
            line += ch
        c.close()
        say("tcp got", line.decode().strip())
    except Exception as e:
        say("tcp error", e)
threading.Thread(target=tcp_server, daemon=True).start()
bulk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
bulk.bind(sock + "_6001"); bulk.listen(1); bulk.settimeout(100)
def bulk_echo():
    import hashlib
    try:
        c, _ = bulk.accept(); c.settimeout(60)
        h, n = hashlib.md5(), 0
        while True:
            b = c.recv(65536)
            if not b:
                break
            h.update(b); n += len(b)
            c.sendall(b)
        c.shutdown(socket.SHUT_WR)
        say("bulk got", n, h.hexdigest())
        c.close()
    except Exception as e:
        say("bulk error", e)
threading.Thread(target=bulk_echo, daemon=True).start()
say("ready")
try:
    c, _ = g2h.accept(); c.settimeout(30)
    c.sendall(("g2h-reply-" + tag + "\n").encode())
    c.shutdown(socket.SHUT_WR)
    say("g2h got", read_all(c).decode().strip())
    c.close()
except Exception as e:
    say("g2h error", e)
ok = False
while time.time() < deadline and not ok:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM); s.settimeout(30)
        s.connect(sock)
        s.sendall(b"CONNECT 5000\n")
        line = b""
        while not line.endswith(b"\n"):
            ch = s.recv(1)
            if not ch:
                break
            line += ch
        if not line.startswith(b"OK "):
            s.close(); time.sleep(0.2); continue
        say("h2g ok line", line.decode().strip())
        s.sendall(("h2g-" + tag + "\n").encode())
        s.shutdown(socket.SHUT_WR)
        say("h2g got", read_all(s).decode().strip())
        ok = True
    except Exception as e:
        say("h2g error", e); time.sleep(0.2)
time.sleep(30)
PY
hpid=$!
for _ in $(seq 100); do grep -q ready "$work/host.out" 2>/dev/null && break; sleep 0.1; done

set +e
timeout --kill-after=5 120 "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 \
    --vsock "$sock" --net "$tap,mac=$mac" --cmdline "$cmdline" \
    </dev/null >"$work/console" 2>"$work/err"
rc=$?
set -e
kill "$hpid" 2>/dev/null; wait "$hpid" 2>/dev/null || true

con() { tr -d '\r' <"$work/console" | grep -o "vd: $1.*" | head -n1; }
host() { grep "^$1" "$work/host.out" | head -n1; }
[[ $rc == 0 ]] && pass "nestor-vmm exited 0 on the guest's power-off" || bad "nestor-vmm exit status $rc"
[[ ! -e $sock ]] && pass "vsock socket removed at exit" || bad "vsock socket $sock left behind"
grep -q "guest init reached after" "$work/err" && pass "boot marker: $(grep -o 'guest init reached after [0-9]* ms' "$work/err")" ||
    bad "no boot-marker line from nestor-vmm"
[[ $(con g2h) == "vd: g2h rc=0 got=g2h-reply-$tag "* ]] && [[ $(host "g2h got") == "g2h got g2h-$tag" ]] &&
    pass "vsock guest -> host (${sock##*/}_6000): both ways" ||
    bad "vsock guest -> host: guest '$(con g2h)', host '$(host g2h)'"
[[ $(host "h2g ok line") == "h2g ok line OK "* ]] && [[ $(con h2g) == "vd: h2g rc=0 got=h2g-$tag "* ]] &&
    [[ $(host "h2g got") == "h2g got h2g-reply-$tag" ]] &&
    pass "vsock host -> guest (CONNECT 5000, $(host 'h2g ok line' | cut -d' ' -f4-)): both ways" ||
    bad "vsock host -> guest: guest '$(con h2g)', host '$(host 'h2g')'"
want_md5=$(seq 1 "$bulk_n" | md5sum | cut -d' ' -f1)
want_len=$(seq 1 "$bulk_n" | wc -c)
[[ $(host "bulk got") == "bulk got $want_len $want_md5" ]] && [[ $(con bulk) == "vd: bulk rc=0 md5=$want_md5 "* ]] &&
    pass "vsock bulk: $want_len bytes guest -> host and echoed back intact ($(con bulk | grep -o 'secs=[0-9]*') in the guest)$label" ||
    bad "vsock bulk: guest '$(con bulk)', host '$(host bulk)', want $want_len bytes md5 $want_md5"
[[ $(con mac) == "vd: mac $mac" ]] && pass "virtio-net MAC $mac" || bad "guest MAC: '$(con mac)', want $mac"
[[ $(con ping) == "vd: ping rc=0 3 packets received" ]] && pass "net: guest pinged the host's tap address $hip" ||
    bad "net ping: '$(con ping)'"
[[ $(host "tcp got") == "tcp got tcp-$tag" ]] && [[ $(con tcp) == "vd: tcp rc=0" ]] && pass "net: TCP from the guest reached the host" ||
    bad "net TCP: guest '$(con tcp)', host '$(host tcp)'"
if ((fail)); then
    echo "--- console (last 30 lines)" >&2; tail -n 30 "$work/console" >&2
    echo "--- nestor-vmm stderr" >&2; tail -n 20 "$work/err" >&2
    echo "--- host side" >&2; cat "$work/host.out" >&2
fi

# The balloon (--balloon, free page reporting), against the same guest without one,
# both at once: the guest fills 96 MiB of its tmpfs, deletes it and idles; the host
# then reads how much guest memory is resident (the API's metrics). With the balloon
# the freed memory must have gone back to the host; then the guest writes 96 MiB
# again and reads it back intact (given-back pages fault in again as fresh ones).
bguest=$(cat <<'G'
r() { echo "vd: $*"; }
dd if=/dev/zero of=/tmp/f bs=1M count=96 2>/dev/null; sync; rm /tmp/f
r "filled and freed"
sleep 10
dd if=/dev/urandom of=/tmp/blk bs=1M count=1 2>/dev/null
for i in $(seq 96); do cat /tmp/blk; done >/tmp/g
a=$(md5sum </tmp/g | cut -d' ' -f1); b=$(for i in $(seq 96); do cat /tmp/blk; done | md5sum | cut -d' ' -f1)
[ "$a" = "$b" ] && r "reuse ok $a" || r "reuse differs $a $b"
G
)
bcmd="console=ttyS0 quiet panic=-1 nestor.cmd=$(printf '%s' "$bguest" | base64 -w0)"
# Both offer their memory to KSM (--mem-merge), running meanwhile with a quick scan
# (the settings found are put back): identical pages of the two guests (the same
# kernel and initramfs) must end up shared.
ksm=/sys/kernel/mm/ksm
if [[ -w $ksm/run ]]; then
    for f in run pages_to_scan sleep_millisecs; do
        on_exit "echo $(cat $ksm/$f) >$ksm/$f"
    done
    echo 4000 >$ksm/pages_to_scan; echo 20 >$ksm/sleep_millisecs; echo 1 >$ksm/run
fi
for b in on off; do
    flag=(--mem-merge); [[ $b == on ]] && flag+=(--balloon)
    timeout --kill-after=5 150 "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 256 \
        --api "$work/api-$b" --cmdline "$bcmd" "${flag[@]}" \
        </dev/null >"$work/console-$b" 2>"$work/err-$b" &
    echo $! >"$work/pid-$b"
done
# Metrics of each once its guest has freed the memory and idled 6 s (the guest reports
# 2 s after it frees).
for b in on off; do
    for _ in $(seq 1200); do
        grep -q "vd: filled and freed" "$work/console-$b" 2>/dev/null && break
        kill -0 "$(cat "$work/pid-$b")" 2>/dev/null || break
        sleep 0.1
    done
done
sleep 6
for b in on off; do
    "$vmm" --api "$work/api-$b" --call '{"action":"metrics"}' >"$work/metrics-$b" 2>&1 || true
done
sharing=$(cat $ksm/pages_sharing 2>/dev/null || echo 0)
for b in on off; do wait "$(cat "$work/pid-$b")" 2>/dev/null; echo $? >"$work/rc-$b"; done
metric() { python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); print(d.get("metrics", d).get(sys.argv[2], -1))' "$work/metrics-$1" "$2" 2>/dev/null || echo -1; }
on_res=$(metric on guest_resident_kib) off_res=$(metric off guest_resident_kib)
given=$(metric on balloon_given_back_kib)
label="resident guest memory after freeing 96 MiB: $((on_res / 1024)) MiB with the balloon, $((off_res / 1024)) MiB without; given back $((given / 1024)) MiB"
((on_res > 0 && off_res > 0 && given >= 98304 && on_res + 65536 < off_res)) &&
    pass "balloon: $label" || bad "balloon: $label ($(cat "$work/metrics-on"))"
if [[ -w $ksm/run ]]; then
    ((sharing > 1024)) && pass "KSM (--mem-merge): $((sharing * 4 / 1024)) MiB of the two guests' pages shared" ||
        bad "KSM (--mem-merge): pages_sharing $sharing after both guests idled"
else
    echo "SKIP KSM (--mem-merge): $ksm/run is not writable here (a kernel without KSM)"
fi
for b in on off; do
    rcb=$(cat "$work/rc-$b")
    reuse=$(tr -d '\r' <"$work/console-$b" | grep -o "vd: reuse.*" | head -n1)
    [[ $rcb == 0 && $reuse == "vd: reuse ok "* ]] && pass "balloon $b: the guest wrote 96 MiB again and read it back intact, exit 0" ||
        { bad "balloon $b: exit $rcb, '$reuse'"; tail -n 20 "$work/console-$b" "$work/err-$b" >&2; }
done
finish
