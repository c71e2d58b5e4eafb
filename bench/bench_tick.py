#!/usr/bin/env python3
"""Measure what a healthy tick costs, against the checks it replaces.

usage: python3 bench/bench_tick.py [--ticks N] [--tunnels 1,10,100] [--json FILE]
                                  [--dbclient]

Starts its own sshd on 127.0.0.1 (the test harness's) in a PID namespace of
its own, logging in a throwaway user whose shell is plain /bin/sh, with K
tunnels of one reverse forward each, through a byte-counting relay. Then, for
each K, it runs N rounds; each round runs one healthy tick of each variant,
alternating:

  ctunnel      this ctunnel.py (root's, its bytecode cached as cron caches it)
  cron user    this ctunnel.py installed by root in a folder the cron user cannot
               write, precompiled (README's step), ticked by that user
  single file  ctunnel.py before it became a package (git): compiled every tick
  dbclient     this ctunnel.py driving Dropbear's dbclient (--dbclient): a box
               user's tick, through each tunnel's loopback -L (setpriv runs it)
  ctunnel-sh   a CTunnel-style bash tick: `ssh -S CTL host "echo test | timeout 3
               nc -v localhost PORT"` per forward, over the same masters
  python -c pass  the interpreter alone: the floor of any Python tick

PYTHONDONTWRITEBYTECODE is unset for every tick, as under cron.

and reports per tick: wall (median), CPU of the tick and every program it ran
(median), peak RSS, programs run on the box (strace -f, in a run of their
own), processes forked on the server (PIDs allocated in sshd's namespace) and
bytes on the wire (both ways, through the relay). Needs root (unshare,
useradd), strace, and what the tests need.
"""

import argparse
import compileall
import json
import os
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
from harness import (BOX_PYTHON, CTUNNEL, Listener, SshServer, ThrowawayUser,  # noqa: E402
                      as_user, descendants, end_pids, free_ports, install_copy, pids_with_arg)

SINGLE_FILE = "57ec3b9"   # the last commit whose ctunnel.py held all the code
NEXT_PORT = iter(range(20000, 32768))    # reverse ports, below the ephemeral range


class CountingRelay(Listener):
    """TCP relay 127.0.0.1:port -> target that counts every byte it carries."""

    backlog = 256

    def __init__(self, target_port):
        self.target = target_port
        self.bytes = 0
        self.lock = threading.Lock()
        Listener.__init__(self)

    def handle(self, client):
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
        time.sleep(0.05)          # let the relay threads count the last replies
        with self.lock:
            return self.bytes


class SshLikeService(Listener):
    """The box's sshd, as a target: greets, reads one line, hangs up on anything
    that is not an SSH banner (what a real sshd does with CTunnel's "test")."""

    backlog = 256

    def handle(self, conn):
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    @staticmethod
    def _serve(conn):
        with conn:
            try:
                conn.sendall(b"SSH-2.0-box\r\n")
                conn.recv(256)
            except OSError:
                pass


class PidCounter:
    """Counts PIDs allocated in sshd's namespace: a probe forked there reads its own PID."""

    def __init__(self, unshare_pid):
        self.init = None
        while self.init is None:
            kids = descendants(unshare_pid)
            self.init = kids[0] if kids else None

    def last(self):
        out = subprocess.run(["nsenter", "-t", str(self.init), "-p", "--", "/bin/sh", "-c",
                              "echo $$"], capture_output=True, text=True, check=True).stdout
        return int(out)

    def forked_by(self, run):
        before = self.last()
        run()
        time.sleep(0.05)
        return self.last() - before - 1      # the second probe's own PID


def peak_rss_mb(argv):
    """Peak RSS of argv and the programs it ran, in a run of its own.

    Under /usr/bin/time: a child forked from this (large) Python would carry
    our own high-water mark across exec, and wait4 would report that.
    """
    if not os.path.exists("/usr/bin/time"):
        return None
    with tempfile.NamedTemporaryFile("r") as out:
        subprocess.run(["/usr/bin/time", "-f", "%M", "-o", out.name] + argv,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return round(int(out.read().split()[-1]) / 1024, 1)


def timed(argv):
    """Run argv; return (wall s, cpu s), or fail loudly if it was not a healthy tick."""
    began = time.perf_counter()
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    # wait4 before reading output would block on a full pipe; these ticks print nothing
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - began
    err = proc.stderr.read().decode(errors="replace")
    out = proc.stdout.read().decode(errors="replace")
    proc.stdout.close()
    proc.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0 or err or "restart" in out:
        raise SystemExit("bench: %s was not a healthy tick: %s%s" % (argv, err, out))
    return wall, usage.ru_utime + usage.ru_stime


def count_programs(argv):
    """Programs argv runs on this side (successful execve in its own tree)."""
    with tempfile.NamedTemporaryFile("r") as trace:
        subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-o", trace.name] + argv,
                       stdin=subprocess.DEVNULL, capture_output=True)
        return sum(1 for line in trace if "execve(" in line and "= 0" in line)


def ctunnel_sh(path, server, relay, tunnels):
    """Write the CTunnel-style bash tick for these tunnels; return its argv."""
    lines = ["#!/bin/bash", "# one mux session per forward, as CTunnel does"]
    for ctl, port in tunnels:
        lines.append('ssh -S %s -F %s -p %d -l %s -o BatchMode=yes 127.0.0.1 '
                     '"echo test | timeout 3 nc -v localhost %d" >/dev/null 2>&1 '
                     '|| echo "restart %s"' % (ctl, server.ssh_config, relay.port, server.user,
                                               port, ctl))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return ["/bin/bash", path]


def write_config(path, server, relay, service, count, state_dir, client=None, key=None):
    """count tunnels through the relay; return [(control socket, remote port)].

    client: (dbclient path, its Dropbear-format key) for a dbclient config;
    key: (key, ssh_config) for a config of the cron user."""
    tunnels = []
    # NEXT_PORT: never a port of an earlier stage, whose sessions may linger
    ports = free_ports(NEXT_PORT, count)
    with open(path, "w") as f:
        f.write("[DEFAULT]\nhost = 127.0.0.1\nport = %d\nuser = %s\nstate_dir = %s\n"
                % (relay.port, server.user, state_dir))
        f.write("ssh = %s\nidentity_file = %s\n\n" % client if client else
                "identity_file = %s\nssh_config = %s\n\n" % (key or (server.user_key,
                                                                     server.ssh_config)))
        for i, port in enumerate(ports):
            f.write("[t%d]\nremote_forward = %d:127.0.0.1:%d\n" % (i, port, service.port))
            tunnels.append((os.path.join(state_dir, "t%d.ctl" % i), port))
    return tunnels


def summarize(samples, rss, programs, forked, wire):
    walls, cpus = zip(*samples)
    return {"wall_ms": round(statistics.median(walls) * 1000, 1),
            "cpu_ms": round(statistics.median(cpus) * 1000, 1),
            "peak_rss_mb": rss,
            "programs_on_box": programs,
            "server_processes": forked,
            "bytes_on_wire": wire}


def bring_up(argv):
    said = ""
    for _ in range(3):      # a port the last stage's server session still held comes free
        first = subprocess.run(argv, capture_output=True, text=True)
        if first.returncode == 0:
            return
        said += first.stderr        # a repeated failure is said once: keep the first
        time.sleep(2)
    raise SystemExit("bench: tunnels did not come up (%s): %s" % (argv[-1], said))


def bench(count, rounds, server, relay, counter, service, work, single_file, cron_user,
          box=None):
    """All variants for one tunnel count, alternating; return their figures.

    cron_user: (setpriv argv that runs as the cron user, the ctunnel.py it runs,
    its home, its key, its ssh_config). box: (setpriv argv that runs as the box
    user, dbclient, its key, its home) for the dbclient variant."""
    state = os.path.join(work, "st%d" % count)
    conf = os.path.join(work, "c%d.conf" % count)
    tunnels = write_config(conf, server, relay, service, count, state)
    python = BOX_PYTHON
    bring_up([sys.executable, CTUNNEL, "-c", conf])
    variants = {"ctunnel": [python, CTUNNEL, "-c", conf]}
    as_cron, script, home, key, ssh_config = cron_user
    user_conf = os.path.join(home, "c%d.conf" % count)
    write_config(user_conf, server, relay, service, count, os.path.join(home, "st%d" % count),
                 key=(key, ssh_config))
    variants["cron user"] = as_cron + [python, script, "-c", user_conf]
    bring_up(variants["cron user"])
    if box:
        as_box, dbclient, db_key, db_home = box
        db_conf = os.path.join(work, "d%d.conf" % count)
        write_config(db_conf, server, relay, service, count,
                     os.path.join(db_home, "sd%d" % count), (dbclient, db_key))
        variants["dbclient"] = as_box + [python, CTUNNEL, "-c", db_conf]
        bring_up(variants["dbclient"])
    variants.update({
        "single file": [python, single_file, "-c", conf],
        "ctunnel-sh": ctunnel_sh(os.path.join(work, "ct%d.sh" % count), server, relay, tunnels),
        "python -c pass": [python, "-c", "pass"],     # the floor of any Python tick
    })
    samples = {name: [] for name in variants}
    for _ in range(rounds):
        for name, argv in variants.items():
            samples[name].append(timed(argv))
    results = {}
    for name, argv in variants.items():
        before = relay.read()
        forked = counter.forked_by(lambda: timed(argv))
        wire = relay.read() - before
        results[name] = summarize(samples[name], peak_rss_mb(argv), count_programs(argv),
                                  forked, wire)
    subprocess.run([sys.executable, CTUNNEL, "-c", conf, "stop"], capture_output=True)
    subprocess.run(variants["cron user"] + ["stop"], capture_output=True)
    if box:
        subprocess.run(variants["dbclient"] + ["stop"], capture_output=True)
    return results


def install_for(account, server, work):
    """ctunnel installed by root where the cron user (account) cannot write, and
    precompiled as README says; the user's own copy of the key and ssh_config.

    Returns (setpriv argv for the user, the installed ctunnel.py, the user's home,
    the key, the ssh_config)."""
    folder = os.path.join(work, "opt")
    os.mkdir(folder)
    script = install_copy(folder)
    compileall.compile_dir(os.path.join(folder, "ctunnellib"), quiet=2)
    dot_ssh = os.path.join(account.home, ".ssh")
    os.makedirs(dot_ssh, mode=0o700, exist_ok=True)
    key = os.path.join(dot_ssh, "tunnel")
    shutil.copy(server.user_key, key)
    ssh_config = os.path.join(dot_ssh, "config")
    shutil.copy(server.ssh_config, ssh_config)
    subprocess.run(["chown", "-R", "%d:%d" % (account.uid, account.gid), account.home],
                   check=True)
    return as_user(account), script, account.home, key, ssh_config


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ticks", type=int, default=20, help="rounds per tunnel count")
    parser.add_argument("--tunnels", default="1,10,100", help="tunnel counts, comma-separated")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--dbclient", action="store_true",
                        help="also measure ticks that drive Dropbear's dbclient")
    args = parser.parse_args(argv)

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)     # cron does not set it
    work = tempfile.mkdtemp(prefix="ctb", dir="/tmp")
    os.chmod(work, 0o755)
    single_file = os.path.join(work, "ctunnel-single-file.py")
    with open(single_file, "wb") as f:
        f.write(subprocess.run(["git", "-C", os.path.join(HERE, ".."), "show",
                                SINGLE_FILE + ":ctunnel.py"], check=True,
                               capture_output=True).stdout)
    os.makedirs(os.path.join(work, "sshd"))
    account = ThrowawayUser(os.path.join(work, "home"))
    server = SshServer(os.path.join(work, "sshd"), user=account.name,
                       wrap=["unshare", "--pid", "--fork", "--mount-proc"])
    counter = PidCounter(server.proc.pid)
    relay = CountingRelay(server.port)
    with open(server.known_hosts) as f:
        key_line = f.read().split(None, 1)[1]
    with open(server.known_hosts, "a") as f:
        f.write("[127.0.0.1]:%d %s" % (relay.port, key_line))
    service = SshLikeService()
    cron_user = install_for(account, server, work)
    box = None
    if args.dbclient:       # the box user is the server's login user: one throwaway user
        home, uid, gid = account.home, account.uid, account.gid
        os.makedirs(os.path.join(home, ".ssh"), mode=0o700, exist_ok=True)
        key = os.path.join(home, ".ssh", "id_dropbear")
        subprocess.run(["dropbearconvert", "openssh", "dropbear", server.user_key, key],
                       check=True, capture_output=True)
        with open(os.path.join(home, ".ssh", "known_hosts"), "w") as f:
            f.write("127.0.0.1 %s" % key_line)
        subprocess.run(["chown", "-R", "%d:%d" % (uid, gid), home], check=True)
        box = (as_user(account), shutil.which("dbclient"), key, home)
    try:
        results = {"python": subprocess.run(["/usr/bin/python3", "-V"], capture_output=True,
                                            text=True).stdout.strip(),
                   "ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                         text=True).stderr.strip(),
                   "rounds": args.ticks, "by_tunnels": {}}
        for count in [int(c) for c in args.tunnels.split(",")]:
            figures = bench(count, args.ticks, server, relay, counter, service, work,
                            single_file, cron_user, box)
            for base in ("ctunnel-sh", "python -c pass"):
                figures["ratio_to_" + base] = {
                    name: round(figures[name]["cpu_ms"] / figures[base]["cpu_ms"], 2)
                    for name in ("ctunnel", "cron user")}
            results["by_tunnels"][count] = figures
            print(json.dumps({count: figures}, indent=1), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)
        return 0
    finally:
        end_pids(pids_with_arg(work))
        server.stop()
        account.remove()
        service.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
