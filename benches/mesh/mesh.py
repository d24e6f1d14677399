#!/usr/bin/env python3
"""benches/mesh/mesh.py - the connections-per-second halves of benches/mesh/run.sh.

  mesh.py server --name b1 --port 8080
      A tight accept-and-close loop: each connection gets one line, "NAME PEER_ADDRESS\\n"
      (the address the backend sees as its peer), and is closed. Runs until killed.

  mesh.py client --target 198.18.0.1 --port 8080 --count 2000 --par 4 --timeout 2
      COUNT short connections in PAR processes (COUNT/PAR each, sequential within a process):
      connect, read the line until EOF, close. Prints one JSON object: ok, failed, seconds (from
      the first worker's start to the last one's end), cps (ok / seconds), by_backend
      {name: count}, seen {address the backend saw: count}, errors {kind: count}.

Standard library only. Every socket operation has a timeout, and a worker stops after a
bounded number of failures in a row.
"""

import argparse
import json
import multiprocessing as mp
import socket
import sys
import time


def server(args):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((args.bind, args.port))
    s.listen(4096)
    name = args.name.encode()
    while True:
        try:
            c, peer = s.accept()
        except InterruptedError:
            continue
        try:
            c.sendall(name + b" " + peer[0].encode() + b"\n")
        except OSError:
            pass
        c.close()


def worker(target, port, count, timeout, out):
    by_backend, seen, errors = {}, {}, {}
    ok = failed = in_a_row = 0
    t0 = time.monotonic()
    for _ in range(count):
        c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(timeout)
        try:
            c.connect((target, port))
            buf = b""
            while True:
                chunk = c.recv(256)
                if not chunk:
                    break
                buf += chunk
            parts = buf.decode(errors="replace").split()
            if len(parts) != 2:
                raise ValueError("bad reply %r" % buf[:40])
            by_backend[parts[0]] = by_backend.get(parts[0], 0) + 1
            seen[parts[1]] = seen.get(parts[1], 0) + 1
            ok += 1
            in_a_row = 0
        except (OSError, ValueError) as e:
            kind = type(e).__name__
            errors[kind] = errors.get(kind, 0) + 1
            failed += 1
            in_a_row += 1
            if in_a_row >= 20:  # the path is down: stop, do not spin through the rest
                failed += count - ok - failed
                errors["gave_up"] = errors.get("gave_up", 0) + 1
                break
        finally:
            c.close()
    out.put({"ok": ok, "failed": failed, "t0": t0, "t1": time.monotonic(),
             "by_backend": by_backend, "seen": seen, "errors": errors})


def client(args):
    par = max(1, min(args.par, args.count))
    per = [args.count // par + (1 if i < args.count % par else 0) for i in range(par)]
    q = mp.Queue()
    procs = [mp.Process(target=worker, args=(args.target, args.port, n, args.timeout, q))
             for n in per]
    for p in procs:
        p.start()
    results = [q.get(timeout=args.timeout * args.count + 30) for _ in procs]
    for p in procs:
        p.join(5)
    total = {"ok": 0, "failed": 0, "by_backend": {}, "seen": {}, "errors": {}}
    for r in results:
        total["ok"] += r["ok"]
        total["failed"] += r["failed"]
        for k in ("by_backend", "seen", "errors"):
            for name, n in r[k].items():
                total[k][name] = total[k].get(name, 0) + n
    seconds = max(r["t1"] for r in results) - min(r["t0"] for r in results)
    total["seconds"] = round(seconds, 3)
    total["cps"] = round(total["ok"] / seconds) if seconds > 0 else 0
    total["par"] = par
    json.dump(total, sys.stdout, sort_keys=True)
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server")
    s.add_argument("--name", required=True)
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--bind", default="0.0.0.0")
    c = sub.add_parser("client")
    c.add_argument("--target", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--count", type=int, default=2000)
    c.add_argument("--par", type=int, default=4)
    c.add_argument("--timeout", type=float, default=2.0)
    args = ap.parse_args()
    if args.cmd == "server":
        server(args)
    else:
        client(args)


if __name__ == "__main__":
    main()
