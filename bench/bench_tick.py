#!/usr/bin/env python3
"""Measure what a healthy ctunnel tick costs: time, CPU, programs, bytes.

usage: python3 bench/bench_tick.py [--ticks N] [--tunnels K] [--json FILE]

Starts its own sshd on 127.0.0.1 (the test harness's), K tunnels with one
reverse forward each, and a byte-counting relay between the ssh clients and
sshd. Then it runs N healthy ticks and reports, per tick:

  wall      elapsed time of `ctunnel.py` (median and max)
  cpu       user+system CPU of ctunnel and every process it ran (mean)
  bytes     bytes that crossed the network (both directions, through the relay)
  programs  programs the tick ran on the box, itself included (strace -f)

CPU is the box's side only: the server's work is sshd's, not the tick's.

For comparison it also measures the check ctunnel does NOT do: a fresh ssh
connection per remote check (`ssh host nc -z ...`), which proves only that the
server is reachable, not that this tunnel works.

Figures depend on the machine; a Pi Zero is roughly 10-20x slower per CPU-ms.
"""

import argparse
import json
import os
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from conftest import (CTUNNEL, Service, SshServer, end_pids, free_port,  # noqa: E402
                      pids_with_arg)


class CountingRelay:
    """TCP relay 127.0.0.1:port -> target that counts every byte it carries."""

    def __init__(self, target_port):
        self.target = target_port
        self.bytes = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst):
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                with self.lock:
                    self.bytes += len(data)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def read(self):
        with self.lock:
            return self.bytes


def count_programs(argv):
    """Programs argv runs on this side (successful execve in its own tree).

    Counted with strace -f, in a run of its own that is not timed. The server's
    processes are not in the tree: they are sshd's, not the tick's.
    """
    if not shutil.which("strace"):
        return None
    with tempfile.NamedTemporaryFile("r") as trace:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-o", trace.name] + argv,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return sum(1 for line in trace if "execve(" in line and "= 0" in line)


def timed(argv, must_be_silent):
    """Run argv; return (wall s, cpu s of it and its children)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    if proc.returncode != 0 or (must_be_silent and proc.stderr):
        raise SystemExit("bench: %s failed (exit %d): %s"
                         % (argv[-1], proc.returncode, proc.stderr))
    return wall, cpu


def measure(argv, ticks, relay, must_be_silent=True):
    """Run argv ticks times; return its median/max wall, mean CPU, procs, bytes."""
    walls, cpus = [], []
    bytes_before = relay.read()
    for _ in range(ticks):
        wall, cpu = timed(argv, must_be_silent)
        walls.append(wall)
        cpus.append(cpu)
    time.sleep(0.2)   # let the relay threads count the last replies
    return {
        "wall_ms_median": round(statistics.median(walls) * 1000, 1),
        "wall_ms_max": round(max(walls) * 1000, 1),
        "cpu_ms_mean": round(statistics.mean(cpus) * 1000, 1),
        "bytes_per_run": round((relay.read() - bytes_before) / ticks),
        "programs_per_run": count_programs(argv),
    }


def write_config(path, server, relay, service, tunnels, state_dir):
    """K tunnels through the relay; return the first tunnel's remote port."""
    ports = [free_port() for _ in range(tunnels)]
    with open(path, "w") as f:
        f.write("[DEFAULT]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                "ssh_config = %s\nstate_dir = %s\n\n"
                % (relay.port, server.user, server.user_key, server.ssh_config, state_dir))
        for i, port in enumerate(ports):
            f.write("[t%d]\nremote_forward = %d:127.0.0.1:%d\n" % (i, port, service.port))
    # the relay's port needs its line in known_hosts too
    with open(server.known_hosts) as f:
        key = f.read().split(None, 1)[1]
    with open(server.known_hosts, "a") as f:
        f.write("[127.0.0.1]:%d %s" % (relay.port, key))
    return ports[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=30)
    parser.add_argument("--tunnels", type=int, default=1)
    parser.add_argument("--idle", type=float, default=0,
                        help="also count keepalive bytes over this many idle seconds")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)

    work = tempfile.mkdtemp(prefix="ctb", dir="/tmp")
    os.makedirs(os.path.join(work, "sshd"))
    server = SshServer(os.path.join(work, "sshd"))
    relay = CountingRelay(server.port)
    service = Service(b"hi\n")
    conf = os.path.join(work, "rstunnel.conf")
    try:
        remote = write_config(conf, server, relay, service, args.tunnels,
                              os.path.join(work, "st"))
        first = subprocess.run([sys.executable, CTUNNEL, "-c", conf], capture_output=True,
                               text=True)
        if first.returncode != 0:
            raise SystemExit("bench: tunnels did not come up: " + first.stderr)
        fresh = ["ssh", "-F", server.ssh_config, "-p", str(relay.port), "-l", server.user,
                 "-i", server.user_key, "-o", "BatchMode=yes", "127.0.0.1",
                 "nc", "-z", "-w", "4", "127.0.0.1", str(remote)]
        results = {
            "tunnels": args.tunnels, "ticks": args.ticks,
            "healthy_tick": measure([sys.executable, CTUNNEL, "-c", conf], args.ticks, relay),
            "python_startup_only": measure([sys.executable, "-c", "pass"], args.ticks, relay),
            "fresh_connection_check": measure(fresh, args.ticks, relay, must_be_silent=False),
            "python": sys.version.split()[0],
            "ssh": subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip(),
        }
        if args.idle:
            before = relay.read()
            time.sleep(args.idle)
            results["idle_keepalive"] = {
                "seconds": args.idle, "server_alive_interval": 10,
                "bytes": relay.read() - before,
                "bytes_per_day": round((relay.read() - before) * 86400 / args.idle)}
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    finally:
        end_pids(pids_with_arg(work))
        server.stop()
        service.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
