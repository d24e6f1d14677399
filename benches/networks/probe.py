#!/usr/bin/env python3
"""benches/networks/probe.py - the timing-critical parts of benches/networks/run.sh.

run.sh does the set-up (lab, network, resident containers) and the report; this helper does
what needs several clocks at once:

  spread   ADD on node A (the real shoal-cni binary, called as a runtime calls it), then, from
           the moment the plugin process exits, watch every other node until it reaches the
           new endpoint: `--mode inspect` polls each node's agent with the request `shoal
           network inspect NET` sends (`{"network_inspect":{"network":NET}}` on its socket)
           every --interval seconds; `--mode ping` runs `ping -i 0.01` from a container on
           each other node (a packet every 10 ms, on through errors) and stops it at its first
           reply (`ping -c 1` would stop at the first error, `-w` at the first few);
           `--mode pingfloor` does the same towards an endpoint every node already knows (the
           cost of the method itself). Then DEL, and wait until every other node has dropped
           the endpoint (timed too). One JSON line per sample.
  stats    p50/p99/max of numbers (nearest rank), for the report.
  sampler  once a second, the CPU time taken by processes that are not ours (not in our
           process group, not in our namespaces, not kernel threads): other work on a shared
           machine. `foreign-note` turns two snapshots into one line.

It creates only container namespaces named PREFIX... (listed in WORK/ns.list for run.sh's
EXIT trap), and kills nothing it did not start. Every wait is bounded.
"""

import argparse
import json
import math
import os
import socket
import struct
import subprocess
import sys
import threading
import time


# ------------------------------------------------------------------------ the agent's socket
def request(sock_path, req, timeout=2.0):
    """One request on the agent's local API (4-byte big-endian length, then JSON)."""
    body = json.dumps(req).encode()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(sock_path)
        s.sendall(struct.pack(">I", len(body)) + body)
        head = b""
        while len(head) < 4:
            chunk = s.recv(4 - len(head))
            if not chunk:
                raise ConnectionError("the agent closed the connection")
            head += chunk
        (n,) = struct.unpack(">I", head)
        data = bytearray()
        while len(data) < n:
            chunk = s.recv(min(65536, n - len(data)))
            if not chunk:
                raise ConnectionError("short reply")
            data += chunk
    return json.loads(data)


def endpoint_ips(sock_path, net):
    """The endpoint addresses `shoal network inspect NET` lists on that node."""
    reply = request(sock_path, {"network_inspect": {"network": net}})
    if "Ok" not in reply:
        raise RuntimeError(str(reply))
    network = reply["Ok"].get("network", {})
    return {e["ip"].split("/")[0] for e in network.get("endpoints") or []}


# ------------------------------------------------------------------------------ the plugin
def cni(cni_bin, command, sock_path, net, cid=None, netns=None):
    """Runs shoal-cni as a runtime does; (ok, parsed stdout, wall ms, exit monotonic time)."""
    conf = {
        "cniVersion": "1.1.0",
        "name": net,
        "type": "shoal-cni",
        "network": net,
        "socket": sock_path,
    }
    env = {"CNI_COMMAND": command, "CNI_PATH": "/opt/cni/bin", "PATH": os.environ.get("PATH", "")}
    if cid:
        env.update(CNI_CONTAINERID=cid, CNI_IFNAME="eth0")
    if netns:
        env["CNI_NETNS"] = netns
    t0 = time.monotonic()
    p = subprocess.run([cni_bin], input=json.dumps(conf).encode(), env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=40)
    t1 = time.monotonic()
    try:
        out = json.loads(p.stdout.decode().strip() or "null")
    except ValueError:
        out = p.stdout.decode()
    return p.returncode == 0, out, (t1 - t0) * 1000, t1


def ip(*args):
    return subprocess.run(["ip", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          timeout=20)


def ping_all(pingers, target, start, timeout):
    """From each pinger namespace, `ping -n -i 0.01 TARGET` (one packet every 10 ms, going on
    through errors) until its first reply: ms from `start` per pinger key. Each ping process
    (ours) is stopped at its first reply, or after `timeout` seconds."""
    got = {}

    def one(key, ns):
        p = subprocess.Popen(["ip", "netns", "exec", ns, "ping", "-n", "-i", "0.01", target],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        timer = threading.Timer(timeout, p.terminate)
        timer.start()
        try:
            for line in p.stdout:
                if " bytes from " in line:
                    got[key] = round((time.monotonic() - start) * 1000, 2)
                    break
        finally:
            timer.cancel()
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    threads = [threading.Thread(target=one, args=kv, daemon=True) for kv in pingers.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 10)
    return got


# ----------------------------------------------------------------------------------- spread
def spread(a):
    socks = {i: f"/run/shoal/lab-{a.lab}/n{i}.sock" for i in range(1, a.nodes + 1)}
    pingers = a.pingers.split(",") if a.pingers else []
    pinger_ips = a.pinger_ips.split(",") if a.pinger_ips else []
    out = open(a.out, "a")
    failures = 0

    def wait_all(ip_addr, nodes, present, start, deadline_s):
        """Threads polling each node until `ip_addr` is (present) or is not listed: ms each."""
        got = {}
        go = threading.Event()

        def poll(i):
            go.wait()
            end = start[0] + deadline_s
            while time.monotonic() < end:
                try:
                    if (ip_addr in endpoint_ips(socks[i], a.net)) == present:
                        got[i] = round((time.monotonic() - start[0]) * 1000, 2)
                        return
                except (OSError, ValueError, RuntimeError):
                    pass
                time.sleep(a.interval)

        threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in nodes]
        for t in threads:
            t.start()
        return got, go, threads

    for s in range(a.samples):
        node = (s + a.offset) % a.nodes + 1
        others = [i for i in range(1, a.nodes + 1) if i != node]
        ns = f"{a.prefix}{ {'inspect': 'si', 'ping': 'sp', 'pingfloor': 'sf'}[a.mode] }{s}"
        cid = f"{ns}-0123456789abcdef"
        if ip("netns", "add", ns).returncode != 0:
            print(f"probe: could not create namespace {ns}", file=sys.stderr)
            failures += 1
            continue
        with open(a.ns_list, "a") as f:
            f.write(ns + "\n")
        rec = {"sample": s, "node": node, "mode": a.mode}
        try:
            for p in pingers:   # every sample starts without a neighbour entry
                ip("-n", p, "neigh", "flush", "dev", "eth0")
            if a.mode == "pingfloor":
                target = pinger_ips[node - 1]
            else:
                target = None
            start = [0.0]
            ok, res, add_ms, t_exit = cni(a.cni, "ADD", socks[node], a.net, cid, f"/run/netns/{ns}")
            rec["add_ms"] = round(add_ms, 2)
            if not ok:
                rec["error"] = f"ADD failed: {res}"
                failures += 1
                print(json.dumps(rec), file=out, flush=True)
                continue
            new_ip = res["ips"][0]["address"].split("/")[0]
            rec["ip"] = new_ip
            start[0] = t_exit
            reach = {}
            if a.mode == "inspect":
                got, go, threads = wait_all(new_ip, others, True, start, a.timeout)
                go.set()
                for t in threads:
                    t.join(a.timeout + 5)
                reach = got
            else:
                tgt = new_ip if a.mode == "ping" else target
                reach = ping_all({i: pingers[i - 1] for i in others}, tgt, start[0], a.timeout)
            rec["reach_ms"] = {str(i): reach.get(i) for i in others}
            missing = [i for i in others if i not in reach]
            if missing:
                rec["missed"] = missing
                failures += 1
            else:
                rec["max_ms"] = max(reach.values())
            # DEL, then wait until every other node has dropped the endpoint, so the next
            # sample (which may get the same address) starts clean
            ok, res, del_ms, t_exit = cni(a.cni, "DEL", socks[node], a.net, cid, f"/run/netns/{ns}")
            rec["del_ms"] = round(del_ms, 2)
            if not ok:
                rec["error"] = f"DEL failed: {res}"
                failures += 1
            start[0] = t_exit
            gone, go, threads = wait_all(new_ip, others, False, start, a.timeout)
            go.set()
            for t in threads:
                t.join(a.timeout + 5)
            if len(gone) == len(others):
                rec["del_spread_ms"] = max(gone.values())
            else:
                rec["del_spread_missed"] = [i for i in others if i not in gone]
        finally:
            ip("netns", "del", ns)
        print(json.dumps(rec), file=out, flush=True)
        time.sleep(a.pause)
    out.close()
    return 1 if failures else 0


# ------------------------------------------------------------------------------------ stats
def nearest_rank(sorted_v, q):
    return sorted_v[max(0, math.ceil(q * len(sorted_v)) - 1)]


def stats(a):
    vals = sorted(float(x) for x in sys.stdin.read().split() if x not in ("", "null", "None"))
    if not vals:
        print("- - - - 0")
        return 0
    print("%.1f %.1f %.1f %.1f %d" % (nearest_rank(vals, 0.5), nearest_rank(vals, 0.99),
                                      vals[-1], vals[0], len(vals)))
    return 0


# ---------------------------------------------------------------------- load on the machine
def sampler(a):
    hz, me = os.sysconf("SC_CLK_TCK"), os.getpid()
    seen, total, by_comm, first = {}, 0.0, {}, True
    end = time.time() + 4 * 3600
    while time.time() < end and os.path.isdir(a.work):
        ours = set()
        for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
            if name.startswith(a.prefix):
                try:
                    ours.add(os.stat("/run/netns/" + name).st_ino)
                except OSError:
                    pass
        now = {}
        for d in os.listdir("/proc"):
            if not d.isdigit() or int(d) == me:
                continue
            try:
                stat = open("/proc/%s/stat" % d).read()
                comm = stat[stat.index("(") + 1:stat.rindex(")")].replace(" ", "_")
                f = stat[stat.rindex(")") + 2:].split()
                if int(d) == 2 or f[1] == "2" or int(f[2]) == a.pgid:
                    continue
                if os.stat("/proc/%s/ns/net" % d).st_ino in ours:
                    continue
                key, cpu = (d, f[19]), (int(f[11]) + int(f[12])) / hz
            except (OSError, ValueError, IndexError):
                continue
            now[key] = cpu
            if not first:
                delta = cpu - seen.get(key, 0.0)
                if delta > 0:
                    total += delta
                    by_comm[comm] = by_comm.get(comm, 0.0) + delta
        seen, first = now, False
        tmp = a.work + "/foreign.tmp"
        with open(tmp, "w") as out:
            out.write("TOTAL %.2f\n" % total)
            out.writelines("%s %.2f\n" % kv for kv in by_comm.items())
        os.replace(tmp, a.work + "/foreign.now")
        time.sleep(1)
    return 0


def foreign_note(a):
    def load(path):
        d = {}
        try:
            for line in open(path):
                k, v = line.split()
                d[k] = float(v)
        except (OSError, ValueError):
            pass
        return d

    s, e = load(a.start), load(a.end)
    d = {k: e[k] - s.get(k, 0.0) for k in e}
    ncpu = os.cpu_count() or 1
    pct = 100 * d.get("TOTAL", 0.0) / (max(a.seconds, 1) * ncpu)
    top = sorted(((v, k) for k, v in d.items() if k != "TOTAL" and v > 0.5), reverse=True)[:3]
    note = "other work %.0f%% of %d cores" % (pct, ncpu)
    if top:
        note += " (" + ", ".join("%s %.0fs" % (k, v) for v, k in top) + ")"
    print(note)
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("spread")
    s.add_argument("--cni", required=True)
    s.add_argument("--lab", required=True)
    s.add_argument("--nodes", type=int, required=True)
    s.add_argument("--net", required=True)
    s.add_argument("--samples", type=int, required=True)
    s.add_argument("--mode", choices=["inspect", "ping", "pingfloor"], required=True)
    s.add_argument("--prefix", required=True, help="container namespace name prefix")
    s.add_argument("--ns-list", required=True, help="file listing the namespaces made")
    s.add_argument("--pingers", default="", help="node i's pinger namespace, comma-separated")
    s.add_argument("--pinger-ips", default="", help="their addresses, comma-separated")
    s.add_argument("--interval", type=float, default=0.005)
    s.add_argument("--timeout", type=float, default=5.0)
    s.add_argument("--pause", type=float, default=0.2)
    s.add_argument("--offset", type=int, default=0)
    s.add_argument("--out", required=True)
    sub.add_parser("stats")
    sm = sub.add_parser("sampler")
    sm.add_argument("--work", required=True)
    sm.add_argument("--prefix", required=True)
    sm.add_argument("--pgid", type=int, required=True)
    fn = sub.add_parser("foreign-note")
    fn.add_argument("start")
    fn.add_argument("end")
    fn.add_argument("seconds", type=float)
    a = p.parse_args()
    return {"spread": spread, "stats": stats, "sampler": sampler,
            "foreign-note": foreign_note}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
