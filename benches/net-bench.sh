#!/usr/bin/env bash
# Network cost of a native container, the real path: TCP throughput (iperf3) and
# round-trip time (1-byte ping-pong over one connection) from the host to a server in
# a container through its published port (portmap DNAT, the bridge, the veth), against
# the same servers on the host's loopback. Interleaved rounds; medians; ratios.
# A benchmark run by hand, not a test:
#   benches/net-bench.sh [ROUNDS]     (default 5; needs root, iperf3, python3, the release build)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
rounds=${1:-5}
bin=${NESTOR_BIN_DIR:-$repo/target/release}/nestor
work=$(mktemp -d)
export NESTOR_ROOT=$work/root NESTOR_STATE=$work/state
n() { "$bin" "$@"; }
cleanup() {
    n rm -f nb-iperf nb-echo >/dev/null 2>&1 || true
    n network prune >/dev/null 2>&1 || true
    kill "${pids[@]}" 2>/dev/null || true
    rm -rf "$work"
}
pids=()
trap cleanup EXIT
log() { echo "net-bench: $*" >&2; }
n image import "$("$repo/images/build-busybox-image.sh" 2>/dev/null | tail -n1)" >/dev/null
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo_server='import socket,sys
l=socket.socket(); l.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1); l.bind(("0.0.0.0",int(sys.argv[1]))); l.listen(8)
while True:
    c,_=l.accept(); c.setsockopt(socket.IPPROTO_TCP,socket.TCP_NODELAY,1)
    while True:
        b=c.recv(64)
        if not b: break
        c.sendall(b)
    c.close()'
host_libs=(-v /usr:/usr:ro -v /lib:/lib:ro -v /lib64:/lib64:ro)
pi=$(free_port); pe=$(free_port); li=$(free_port); le=$(free_port)
log "servers: iperf3 and an echo server in containers (published on 127.0.0.1) and on the host"
n run -d --name nb-iperf -p "127.0.0.1:$pi:5201" "${host_libs[@]}" busybox /usr/bin/iperf3 -s >/dev/null
n run -d --name nb-echo -p "127.0.0.1:$pe:7" "${host_libs[@]}" busybox /usr/bin/python3 -c "$echo_server" 7 >/dev/null
iperf3 -s -p "$li" >/dev/null 2>&1 & pids+=($!)
python3 -c "$echo_server" "$le" & pids+=($!)
sleep 1
gbps() { iperf3 -c 127.0.0.1 -p "$1" -t 3 -J | python3 -c 'import json,sys; print(json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9)'; }
rtt_us() {
    python3 - "$1" <<'PY'
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
t = []
for _ in range(2000):
    a = time.perf_counter(); s.sendall(b"x"); s.recv(1); t.append(time.perf_counter() - a)
t.sort(); print(t[len(t) // 2] * 1e6)
PY
}
declare -a ct lt cr lr
for ((r = 1; r <= rounds; r++)); do
    log "round $r/$rounds"
    ct+=("$(gbps "$pi")"); lt+=("$(gbps "$li")")
    cr+=("$(rtt_us "$pe")"); lr+=("$(rtt_us "$le")")
done
python3 - "${ct[*]}" "${lt[*]}" "${cr[*]}" "${lr[*]}" <<'PY'
import statistics as st, sys
ct, lt, cr, lr = ([float(x) for x in a.split()] for a in sys.argv[1:5])
m = st.median
print(f"| path | TCP throughput | RTT (1 byte) |")
print(f"|---|---|---|")
print(f"| host loopback | {m(lt):.2f} Gbit/s | {m(lr):.1f} us |")
print(f"| native container, published port | {m(ct):.2f} Gbit/s ({m(ct)/m(lt):.2f}x) | {m(cr):.1f} us ({m(cr)/m(lr):.2f}x) |")
print(f"rounds: {len(ct)}; medians; ratios against loopback in the same run (goals: >= 0.8x throughput, <= 1.5x RTT)")
PY
