#!/usr/bin/env bash
# tests/kvm/vmm-agent.sh [--kernel VMLINUX] [--initrd INITRD] [--nestor STATIC-NESTOR] [--vmm PATH] [--timeout SECS]
#
# Scenario 1's path with nestor-vmm as the VMM (tests/kvm/agent-vsock.sh does the same
# with QEMU and vhost-vsock): boots nestor's guest kernel with an initramfs whose /init
# is nestor-agent and /bin/nestor the static runtime, under nestor-vmm --vsock, then
# drives the agent from the host through the vsock Unix socket (`CONNECT 1024` /
# `OK <port>`, then the protocol of crates/agent-protocol on each stream): ping;
# attach stdout and stderr; run a busybox container; read its output from the vsock
# streams; wait for its exit code; stats; delete; shutdown, after which nestor-vmm must
# exit 0 by itself and leave no socket behind. Prints the phase times (launch -> agent
# answers -> container exited -> VM gone), labelled when inside the TCG test host.
#
# Meant for a host with hardware KVM or the KVM test host:
#   tests/testhost/run -- tests/kvm/vmm-agent.sh
# Exit status 0 when every check passes, 1 when one fails, 2 on bad usage/missing parts.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
repo=$(cd "$here/../.." && pwd -P)
limit=180 kernel= initrd= nestor= vmm=
while (($#)); do
    case $1 in
    --timeout) limit=$2; shift 2 ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --nestor) nestor=$2; shift 2 ;;
    --vmm) vmm=$2; shift 2 ;;
    -h | --help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0"; exit 0 ;;
    *) echo "vmm-agent.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [[ -z $vmm ]]; then
    for c in "${CARGO_TARGET_DIR:-$repo/target}/release/nestor-vmm" "${CARGO_TARGET_DIR:-$repo/target}/debug/nestor-vmm"; do
        [[ -x $c ]] && { vmm=$c; break; }
    done
fi
[[ -x $vmm ]] || { echo "vmm-agent.sh: no nestor-vmm binary (cargo build --release -p nestor-microvm)" >&2; exit 2; }
if [[ -z $initrd || -z $nestor ]]; then
    bins=$("$repo/images/build-agent.sh")
    nestor=$(tail -n2 <<<"$bins" | head -n1)
    agent=$(tail -n1 <<<"$bins")
    initrd=$("$repo/images/build-initramfs.sh" --agent "$agent" --nestor "$nestor" --test-rootfs | tail -n1)
fi
[[ -n $kernel ]] || kernel=$("$repo/guest-kernel/build.sh" | tail -n1)
[[ -c /dev/kvm ]] || { echo "vmm-agent.sh: no /dev/kvm" >&2; exit 2; }
command -v python3 >/dev/null || { echo "vmm-agent.sh: python3 is needed" >&2; exit 2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/vmm-agent.XXXXXX")
vpid=
cleanup() {
    [[ -n $vpid ]] && kill "$vpid" 2>/dev/null && wait "$vpid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
"$nestor" spec --bundle "$work" >/dev/null
sock=$work/v.sock

t0=$(date +%s%N)
timeout --kill-after=5 "$limit" "$vmm" --kernel "$kernel" --initrd "$initrd" --mem 512 --vcpus 2 \
    --vsock "$sock" --console "$work/console" --cmdline "console=ttyS0 panic=-1 quiet" \
    </dev/null >"$work/vmm.log" 2>&1 &
vpid=$!

set +e
python3 - "$sock" "$work/config.json" "$t0" "$(uname -r)" "$limit" "$vpid" <<'PY'
import json, os, socket, struct, sys, time

sock, spec_path, t0, host_kernel, limit, vpid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
ms = lambda: (time.time_ns() - t0) // 1_000_000
deadline = time.time() + limit

def fail(msg):
    print(f"vmm-agent: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

def connect():
    """A stream to the agent's vsock port 1024 through nestor-vmm's hybrid socket."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(max(1.0, deadline - time.time()))
    s.connect(sock)
    s.sendall(b"CONNECT 1024\n")
    line = b""
    while not line.endswith(b"\n"):
        c = s.recv(1)
        if not c:
            raise ConnectionError("refused (nothing listens on guest port 1024 yet)")
        line += c
    if not line.startswith(b"OK "):
        fail(f"bad reply to CONNECT: {line!r}")
    return s

def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            fail("agent closed the connection mid-reply")
        b += c
    return b

ids = iter(range(1, 1 << 30))
def call(s, req):
    i = next(ids)
    body = json.dumps({"id": i, "request": req}).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    n = struct.unpack(">I", recv_exact(s, 4))[0]
    rep = json.loads(recv_exact(s, n))
    if rep["id"] != i:
        fail(f"reply id {rep['id']} != {i}")
    return rep["response"]

# The socket exists once nestor-vmm runs; the agent listens once the guest has booted.
while True:
    try:
        ctl = connect()
        pong = call(ctl, {"type": "ping"})
        break
    except (ConnectionError, OSError) as e:
        if time.time() > deadline:
            fail(f"agent never answered through {sock}: {e}")
        try:
            os.kill(vpid, 0)
        except ProcessLookupError:
            fail("nestor-vmm exited before the agent answered")
        time.sleep(0.05)
t_ready = ms()
if pong != {"type": "pong", "version": 1, "pid1": True}:
    fail(f"unexpected pong {pong}")

streams = {}
for name in ["stdout", "stderr"]:
    s = connect()
    r = call(s, {"type": "attach", "container": "c1", "stream": name})
    if r != {"type": "ok"}:
        fail(f"attach {name}: {r}")
    streams[name] = s

spec = json.load(open(spec_path))
# Enough output to need several RX buffers and credit updates on the way out.
spec["process"]["args"] = ["sh", "-c", "echo hello-from-container; uname -r; seq 1 20000; echo oops >&2; exit 7"]
r = call(ctl, {"type": "run", "container": "c1",
               "bundle": {"spec": {"spec": spec, "rootfs": "/rootfs/busybox"}}})
if r.get("type") != "started":
    fail(f"run: {r}")

def drain(s):
    out = b""
    while True:
        c = s.recv(65536)
        if not c:
            return out.decode(errors="replace")
        out += c
out, err = drain(streams["stdout"]), drain(streams["stderr"])
r = call(ctl, {"type": "wait", "container": "c1"})
t_exited = ms()
if r != {"type": "exited", "code": 7}:
    fail(f"wait: {r} (stdout {out[:200]!r}, stderr {err!r})")
lines = out.splitlines()
if len(lines) != 20002 or lines[0] != "hello-from-container" or lines[2:] != [str(i) for i in range(1, 20001)]:
    fail(f"container stdout: {len(lines)} lines, starting {out[:100]!r}")
if lines[1] == host_kernel:
    fail(f"the container sees the host's kernel {host_kernel}")
if "oops" not in err:
    fail(f"container stderr {err!r}")
st = call(ctl, {"type": "stats"})
if st.get("type") != "stats" or st["guest"]["mem_total_kib"] <= 0:
    fail(f"stats: {st}")
r = call(ctl, {"type": "delete", "container": "c1"})
if r != {"type": "ok"}:
    fail(f"delete: {r}")
r = call(ctl, {"type": "shutdown"})
if r != {"type": "ok"}:
    fail(f"shutdown: {r}")
ctl.close()
print(f"vmm-agent: container saw kernel {lines[1]} (host: {host_kernel}), {len(out)} bytes of stdout; guest {st['guest']['mem_total_kib']} KiB")
print(f"vmm-agent: times from launch: agent answered {t_ready} ms, container exited {t_exited} ms")
PY
prc=$?
wait "$vpid"
vrc=$?
vpid=
set -e
t1=$(date +%s%N)
label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside TCG test host; compare only within this run)"
if ((prc != 0 || vrc != 0)); then
    echo "vmm-agent.sh: client status $prc, nestor-vmm status $vrc (124: time limit); console and nestor-vmm output:" >&2
    tail -n 40 "$work/console" "$work/vmm.log" >&2
    exit 1
fi
if [[ -e $sock ]]; then
    echo "vmm-agent.sh: FAIL: vsock socket left behind" >&2
    exit 1
fi
echo "vmm-agent: nestor-vmm: $(grep -o 'guest init reached after [0-9]* ms' "$work/vmm.log" || echo 'no boot marker')"
echo "vmm-agent: nestor-vmm exited 0 by itself, $(( (t1 - t0) / 1000000 )) ms after launch$label"
