#!/usr/bin/env bash
# Scenario 1 end to end with QEMU as the VMM: boots nestor's guest kernel with an
# initramfs whose /init is nestor-agent and /bin/nestor the static runtime, under QEMU
# -M microvm with a vhost-vsock device, then drives the agent from the host over AF_VSOCK
# (the protocol of crates/agent-protocol): ping; attach stdout and stderr; run a busybox
# container (spec from `nestor spec`, rootfs /rootfs/busybox in the initramfs); read its
# output straight from the vsock streams; wait for its exit code; stats; shutdown, after
# which QEMU must exit by itself. Checks that the container sees the guest's kernel, not
# the host's. Prints the phase times (launch -> agent answers -> container exited -> VM
# gone), labelled when inside the TCG test host. Exit 0 on success.
#   agent-vsock.sh [--timeout SECS]
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
limit=180
direct=0 kernel= initrd= nestor=
while (($#)); do
    case $1 in
    --timeout) limit=$2; shift 2 ;;
    --direct) direct=1; shift ;;
    --kernel) kernel=$2; shift 2 ;;
    --initrd) initrd=$2; shift 2 ;;
    --nestor) nestor=$2; shift 2 ;;
    *) echo "agent-vsock.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
if [[ -z $initrd || -z $nestor ]]; then
    bins=$("$repo/images/build-agent.sh")
    nestor=$(tail -n2 <<<"$bins" | head -n1)
    agent=$(tail -n1 <<<"$bins")
    initrd=$("$repo/images/build-initramfs.sh" --agent "$agent" --nestor "$nestor" --test-rootfs | tail -n1)
fi
[[ -n $kernel ]] || kernel=$("$repo/guest-kernel/build.sh" | tail -n1)
if [[ ${NESTOR_TESTHOST:-} != inside && $direct == 0 ]]; then
    exec "$repo/tests/testhost/kvm-exec" --timeout $((limit + 120)) -- "$here/agent-vsock.sh" \
        --direct --timeout "$limit" --kernel "$kernel" --initrd "$initrd" --nestor "$nestor"
fi
[[ -c /dev/kvm ]] || { echo "agent-vsock.sh: no /dev/kvm" >&2; exit 1; }
[[ -c /dev/vhost-vsock ]] || modprobe vhost_vsock 2>/dev/null || true
[[ -c /dev/vhost-vsock ]] || { echo "agent-vsock.sh: no /dev/vhost-vsock (modprobe vhost_vsock failed)" >&2; exit 1; }

work=$(mktemp -d "${TMPDIR:-/tmp}/agent-vsock.XXXXXX")
qpid=
cleanup() {
    [[ -n $qpid ]] && kill "$qpid" 2>/dev/null && wait "$qpid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
"$nestor" spec --bundle "$work" >/dev/null
cid=$((1000 + RANDOM % 30000))

t0=$(date +%s%N)
timeout --kill-after=5 "$limit" qemu-system-x86_64 -M microvm,rtc=off,acpi=off -enable-kvm -cpu host \
    -m 512 -smp 2 -nodefaults -no-user-config -display none -no-reboot \
    -serial "file:$work/console" -kernel "$kernel" -initrd "$initrd" \
    -device "vhost-vsock-device,guest-cid=$cid" \
    -append "console=ttyS0 reboot=t panic=-1 quiet nestor.reboot=1" \
    </dev/null >"$work/qemu.log" 2>&1 &
qpid=$!

set +e
python3 - "$cid" "$work/config.json" "$t0" "$(uname -r)" "$limit" "$qpid" <<'PY'
import json, os, socket, struct, sys, time

cid, spec_path, t0, host_kernel, limit, qpid = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5]), int(sys.argv[6])
cid = int(cid)
ms = lambda: (time.time_ns() - t0) // 1_000_000
deadline = time.time() + limit

def fail(msg):
    print(f"agent-vsock: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)

def connect():
    s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    s.settimeout(max(1.0, deadline - time.time()))
    s.connect((cid, 1024))
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

# The agent listens once the guest has booted: retry until then.
while True:
    try:
        ctl = connect()
        pong = call(ctl, {"type": "ping"})
        break
    except (ConnectionError, OSError) as e:
        if time.time() > deadline:
            fail(f"agent never answered on vsock cid {cid} port 1024: {e}")
        try:
            os.kill(qpid, 0)
        except ProcessLookupError:
            fail("QEMU exited before the agent answered")
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
spec["process"]["args"] = ["sh", "-c", "echo hello-from-container; uname -r; echo oops >&2; exit 7"]
r = call(ctl, {"type": "run", "container": "c1",
               "bundle": {"spec": {"spec": spec, "rootfs": "/rootfs/busybox"}}})
if r.get("type") != "started":
    fail(f"run: {r}")
t_started = ms()

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
    fail(f"wait: {r} (stdout {out!r}, stderr {err!r})")
lines = out.splitlines()
if len(lines) != 2 or lines[0] != "hello-from-container":
    fail(f"container stdout {out!r}")
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
print(f"agent-vsock: container saw kernel {lines[1]} (host: {host_kernel}); guest {st['guest']['mem_total_kib']} KiB")
print(f"agent-vsock: times from launch: agent answered {t_ready} ms, container started {t_started} ms, exited {t_exited} ms")
PY
prc=$?
wait "$qpid"
qrc=$?
qpid=
set -e
t1=$(date +%s%N)
label=""
[[ ${NESTOR_TESTHOST:-} == inside ]] && label=" (inside TCG test host; compare only within this run)"
if ((prc != 0 || qrc != 0)); then
    echo "agent-vsock.sh: client status $prc, QEMU status $qrc (124: time limit); console and QEMU output:" >&2
    tail -n 40 "$work/console" "$work/qemu.log" >&2
    exit 1
fi
echo "agent-vsock: VM gone $(( (t1 - t0) / 1000000 )) ms after launch$label"
