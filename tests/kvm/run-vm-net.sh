#!/usr/bin/env bash
# Networking of containers in microVMs (jailed too): `run --vm --network` puts the VM's container on
# a CNI network (its namespace holds the VMM's tap, joined to the CNI interface by tc
# redirects), so a published port answers from the host as a native container's does,
# its connections out leave through NAT (masqueraded as the host),
# VM and native containers on one user network reach each other by name (every pair), and a pod's
# containers share the pod's network and published ports. Then
# nothing is left: no attachment, no namespace. Runs in the KVM test host unless this
# host has hardware KVM. Exit 0 when all pass.
set -euo pipefail
limit=780
source "$(dirname "${BASH_SOURCE[0]}")/lib/prelude.sh"
source "$here/lib/vm-env.sh"

if [[ ! -x /usr/lib/cni/bridge ]]; then
    echo "skip: containernetworking-plugins is not installed"
    exit 0
fi
# HTTP GET of /hostname with nc (busybox's wget crashes under the TCG test host's CPU),
# a few tries: the server may still be starting. The body is the last line.
get='for i in $(seq 1 40); do r=$(printf "GET /hostname HTTP/1.0\r\n\r\n" | nc -w 3 $HOST $PORT 2>/dev/null | tail -n 1); [ -n "$r" ] && { echo "$r"; exit 0; }; sleep 0.5; done; exit 1'
fetch_in() { n run --rm "$@" sh -c "$get"; }
fetch_host() { HOST=$1 PORT=$2 busybox sh -c "$get"; }

# 1. A published port of a VM container answers from the host.
port=$((20000 + RANDOM % 20000))
n run --vm -d --network bridge -p "127.0.0.1:$port:80" --name vweb --hostname vwebhost \
    busybox httpd -f -p 80 -h /etc >/dev/null 2>"$work/vweb.err" || bad "run --vm -p: $(tail -n 5 "$work/vweb.err")"
out=$(fetch_host 127.0.0.1 "$port" || true)
expect "published port of a VM container" vwebhost "$out"
expect "port" "80/tcp -> 127.0.0.1:$port" "$(n port vweb)"
# The VMM starts while CNI attaches: the guest's MAC, chosen first, is the one the
# interface took and the one inspect reports.
mac_in=$(n exec vweb cat /sys/class/net/eth0/address 2>&1 || true)
mac_rec=$(n inspect vweb | python3 -c 'import json,sys; print(*[n["MacAddress"] for n in json.load(sys.stdin)["NetworkSettings"]["Networks"].values()])' 2>&1 || true)
expect "guest MAC is the recorded one" "$mac_rec" "$mac_in"
[[ $mac_in =~ ^02(:[0-9a-f]{2}){5}$ ]] || bad "guest MAC '$mac_in' is not the locally administered one nestor chose"

# 1b. The same with the VMM jailed (both nestings): the jail joins the VM's namespace,
# where its tap belongs to the jail's uid.
jport=$((20000 + RANDOM % 20000))
n run --vm --jail -d --network bridge -p "127.0.0.1:$jport:80" --name jweb --hostname jwebhost \
    busybox httpd -f -p 80 -h /etc >/dev/null 2>"$work/jweb.err" || bad "run --vm --jail -p: $(tail -n 5 "$work/jweb.err")"
out=$(fetch_host 127.0.0.1 "$jport" || true)
expect "published port of a jailed VM container" jwebhost "$out"
n rm -f jweb >/dev/null 2>&1 || true

# 1c. Egress through NAT: an "outside" namespace behind a veth of the host (addresses of
# this machine outside the bridge); the VM container's connection reaches it with the
# host's address as its source (masquerade), through the tap, tc redirect and bridge.
ip netns add n3ext
ip link add n3vh type veth peer name n3vx
ip link set n3vx netns n3ext
ip addr add 198.51.100.1/30 dev n3vh
ip link set n3vh up
ip -n n3ext addr add 198.51.100.2/30 dev n3vx
ip -n n3ext link set n3vx up
ip -n n3ext link set lo up
ip -n n3ext route add default via 198.51.100.1
on_exit "ip link del n3vh 2>/dev/null; ip netns del n3ext 2>/dev/null"
ip netns exec n3ext python3 -c '
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("198.51.100.2", 9000)); s.listen(1); s.settimeout(240)
c, peer = s.accept(); c.sendall(b"outside\n"); c.close()
open(sys.argv[1], "w").write(peer[0])
' "$work/egress.peer" &
egress=$!
sleep 0.5
out=$(n run --vm --rm --network bridge busybox sh -c \
    'for i in $(seq 1 20); do r=$(nc -w 3 198.51.100.2 9000 2>/dev/null); [ -n "$r" ] && { echo "$r"; exit 0; }; sleep 0.5; done; exit 1' \
    2>"$work/egress.err" || true)
wait "$egress" 2>/dev/null || true
expect "egress of a VM container through NAT" "outside 198.51.100.1" "$out $(cat "$work/egress.peer" 2>/dev/null)"

# 2. VM and native containers on one user network, by name, both ways.
n network create vnet >/dev/null
n run -d --network vnet --name natweb --hostname nathost busybox httpd -f -p 80 -h /etc >/dev/null
n run --vm -d --network vnet --name vmweb --hostname vmhost busybox httpd -f -p 80 -h /etc >/dev/null 2>"$work/vmweb.err" ||
    bad "run --vm --network vnet: $(tail -n 5 "$work/vmweb.err")"
out=$(HOST=vmweb PORT=80 fetch_in -e HOST -e PORT --network vnet busybox || true)
expect "native -> VM by name" vmhost "$out"
out=$(HOST=natweb PORT=80 fetch_in -e HOST -e PORT --vm --network vnet busybox || true)
expect "VM -> native by name" nathost "$out"
out=$(HOST=vmweb PORT=80 fetch_in -e HOST -e PORT --vm --network vnet busybox || true)
expect "VM -> VM by name" vmhost "$out"

# 3. A pod on the network: its containers share the pod's address and ports.
pport=$((20000 + RANDOM % 20000))
n pod create pnet --network bridge -p "127.0.0.1:$pport:80" >/dev/null 2>"$work/pod.err" || bad "pod create --network: $(tail -n 5 "$work/pod.err")"
n run --pod pnet -d --name inpod busybox httpd -f -p 80 -h /etc >/dev/null 2>"$work/inpod.err" || bad "run --pod: $(tail -n 5 "$work/inpod.err")"
out=$(fetch_host 127.0.0.1 "$pport" || true)
expect "published port of a pod" pnet "$out"
n pod rm -f pnet >/dev/null
n rm -f inpod >/dev/null 2>&1 || true

# 4. Nothing left once they are gone.
n rm -f vweb vmweb natweb >/dev/null
n network rm vnet >/dev/null || bad "network rm vnet: still in use"
left=$(ls "$NESTOR_ROOT/networks/attachments" 2>/dev/null | wc -l)
expect "no attachment left" 0 "$left"
ns=$(find /run/nestor-net -path '*/netns/*' 2>/dev/null | wc -l)
expect "no network namespace left" 0 "$ns"
n network prune >/dev/null
finish
