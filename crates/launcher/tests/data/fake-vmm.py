#!/usr/bin/env python3
"""A stand-in for nestor-vmm whose "guest agent" misbehaves, for the host's deadline
tests (no KVM needed). It takes nestor-vmm's arguments, listens on the --vsock Unix
socket, answers Firecracker's hybrid handshake ("CONNECT <port>" -> "OK <n>"), and then,
by FAKE_VMM_MODE:

  silent  sends no ready report and never answers a request;
  stuck   reports ready, answers Ping, Attach, Run and Create, then never answers
          anything else (Signal, Exec, Delete, Shutdown) and keeps every stdio stream
          open; Wait is answered "exited 3" after FAKE_VMM_WAIT seconds when that is
          set, else never.

A guest that behaves is nestor's own stand-in (`nestor-vmm-standin`,
crates/launcher/src/vm/standin.rs), an ELF that also runs in a jail.

Frames are the agent protocol's: a u32 big-endian length, then JSON.
"""
import json
import os
import socket
import struct
import sys
import threading
import time

VERSION = 1
mode = os.environ.get("FAKE_VMM_MODE", "silent")
args = sys.argv[1:]
vsock = args[args.index("--vsock") + 1]


def send(conn, msg):
    b = json.dumps(msg).encode()
    conn.sendall(struct.pack(">I", len(b)) + b)


def recv(conn):
    head = b""
    while len(head) < 4:
        c = conn.recv(4 - len(head))
        if not c:
            return None
        head += c
    (n,) = struct.unpack(">I", head)
    body = b""
    while len(body) < n:
        c = conn.recv(n - len(body))
        if not c:
            return None
        body += c
    return json.loads(body)


held = []


def serve(conn):
    line = b""
    while not line.endswith(b"\n"):
        c = conn.recv(1)
        if not c:
            return
        line += c
    conn.sendall(b"OK 1\n")
    if mode == "silent":
        held.append(conn)
        return
    while True:
        env = recv(conn)
        if env is None:
            return
        req = env.get("request", {})
        kind = req.get("type")
        if kind == "ping":
            send(conn, {"id": env["id"], "response": {"type": "pong", "version": VERSION, "pid1": True}})
        elif kind in ("attach",):
            send(conn, {"id": env["id"], "response": {"type": "ok"}})
            held.append(conn)  # a stdio stream: kept open, nothing written
            return
        elif kind in ("run", "create", "start"):
            send(conn, {"id": env["id"], "response": {"type": "started", "pid": 1}})
        elif kind == "network":
            send(conn, {"id": env["id"], "response": {"type": "ok"}})
        elif kind == "wait" and os.environ.get("FAKE_VMM_WAIT"):
            time.sleep(float(os.environ["FAKE_VMM_WAIT"]))
            send(conn, {"id": env["id"], "response": {"type": "exited", "code": 3}})
        else:
            held.append(conn)  # never answered
            return


srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(vsock)
srv.listen(64)
if mode == "stuck":
    for _ in range(100):
        try:
            r = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            r.connect(vsock + "_1023")
            send(r, {"id": 0, "response": {"type": "pong", "version": VERSION, "pid1": True}})
            r.close()
            break
        except OSError:
            time.sleep(0.05)
while True:
    c, _ = srv.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
