#!/usr/bin/env python3
"""Fleet bench: N boxes, one sshd, and the server restarts. When is the fleet back?

usage: python3 bench/bench_fleet.py [--boxes 50] [--interval 5] [--ticks 20]
           [--max-startups 10:30:100] [--scale K] [--check-timeout 2]
           [--ctunnel PATH] [--base-port 26000] [--json FILE] [--keep]
       python3 bench/bench_fleet.py --single [--rounds 3] [--check-timeout 2]
           [--ctunnel PATH] [--json FILE] [--keep]

Each simulated box has a config, a state_dir, a key and a service of its own
(on 127.0.0.1, it greets with "SSH-2.0-bNNN"), and one tunnel with one
reverse forward to a server port of its own, below the ephemeral range. All
boxes log in, as one throwaway non-root user, to ONE real OpenSSH sshd on
127.0.0.1 (tests/harness.py's) with sshd's default MaxStartups 10:30:100. A
box's tick is one process, `python3 ctunnel.py -c BOX.conf`, in cron's
environment; every box's tick starts at the same instant, as cron does on
clocks that NTP keeps in step.

The scenario: bring every tunnel up (untimed) and prove that each carries
data; kill sshd with its sessions and start it again on the same port with
the same keys; then tick every --interval seconds until every box is back or
--ticks ticks have run. A box is back in tick K when, before tick K+1 begins,
a connection to its server port returns its service's greeting.

It prints the tick at which 50 / 90 / 100 % of the boxes were back; sshd's
drops ("drop connection #N ... past MaxStartups"); logins per box (sshd's
"Accepted publickey" lines, told apart by each box's key); the lines cron
would have mailed (each box tick's stdout and stderr), per box and distinct;
what ssh said in the box's NAME.log; how long ticks took, by what they came
to; and every failed launch whose login sshd had accepted (a wasted login).

Time scaling. A real fleet's boxes each run their tick on a CPU of their own
and reach the server within a fraction of a second. Here N Python ticks, N
ssh clients and sshd share 2 cores: 50 ticks reach sshd over 3-5 s, 100 over
10 s, and ticks that outlast the interval pile up. Two ways keep this
machine's CPU from deciding the result:
  --scale K       1/K of the boxes against MaxStartups' start and full divided
                  by K: --boxes 20 --scale 10 (MaxStartups 1:30:10) stands for
                  200 boxes against 10:30:100, and its connections arrive
                  close together, as a fleet's do
  --interval 30   ticks 30 s apart: a tick's stragglers are done before the
                  next tick begins, as within a real minute; it does not bring
                  a tick's connections closer together
The output says which was used and why it stands for the real thing, and
shows what sshd saw: over how long each tick's connections arrived and how
many were unauthenticated at once, how busy the CPU was, and how many ticks
of earlier ticks were still running.

--single: one box; each fault (its ssh killed, its ssh frozen, sshd
restarted) --rounds times, each followed by one tick: is the box back within
that tick, and how long did the tick take?

How long a run takes here (bring-up included): --single 10 s; 20 boxes 20 s;
50 boxes 15 s; 100 boxes 45 s; 200 boxes with --interval 30 about 2 minutes.

Needs root (useradd) and what the tests need (sshd, ssh, ssh-keygen). It
talks to 127.0.0.1 only. Everything it starts is ended by PID, also on
failure and Ctrl-C: the ticks, the boxes' ssh clients (found by their state
dirs in /proc/PID/cmdline), sshd and its sessions. Its user and temp dir are
removed (--keep keeps the dir, to read the boxes' files).
"""

import argparse
import base64
import concurrent.futures
import hashlib
import json
import math
import os
import pwd
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from harness import (CTUNNEL, SSHD, Service, SshServer, ThrowawayUser,  # noqa: E402
                     cmdline, connect_read, descendants, end_pids, pids_with_arg, wait_for)
from harness import free_ports as harness_free_ports  # noqa: E402

PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
DEFAULT_MAX_STARTUPS = "10:30:100"      # sshd's own default
PROBE_TIMEOUT = 2.0     # seconds a box's forward may take to return its greeting
PROBES_AT_ONCE = 64
TICK_TIMEOUT = 120.0    # a tick that runs longer is a hang: the bench ends it
SINGLE_FAULTS = ("kill", "freeze", "server restart")
NICE = os.getpriority(os.PRIO_PROCESS, 0)   # the niceness the bench began with
BENCH_NICE = -20        # added to the bench's own threads during the storm, see storm()

DROP_RE = re.compile(r"drop connection #\d+ from \S+ on \S+ past MaxStartups")
# a connection sshd counts against MaxStartups: from its arrival to its login or end
OPEN_RE = re.compile(r"^Connection from \S+ port (\d+) on ")
CLOSE_RE = re.compile(r"(?:Accepted \S+ for \S+ from|Connection (?:closed|reset) by|"
                      r"Disconnected from|Timeout before authentication for|banner exchange: "
                      r"Connection from|ssh_dispatch_run_fatal: Connection from|"
                      r"Unable to negotiate with|Read error from remote host)"
                      r"(?: authenticating user \S+| invalid user \S+)? \S+ port (\d+)")
LOGIN_RE = re.compile(r"Accepted publickey for \S+ from \S+ port \d+ ssh2: \S+ (SHA256:\S+)")
STAMP_RE = re.compile(r"^\d{4}/\d\d/\d\d \d\d:\d\d:\d\d ctunnel\[\d+\]: ")
SYSLOG_RE = re.compile(r"^<\d+>ctunnel\[(\d+)\]: (.*)")
FAILURE_RE = re.compile(r": (re)?start failed")
NUMBER_RE = re.compile(r"(?<![\d.])\d+(?![\d.])")     # not the digits of an address
# what a failed launch's line says, in the order they are looked for
FAILURE_KINDS = (("launch limit", "did not connect within"),
                 ("reset", "Connection reset"),
                 ("closed", "Connection closed"),
                 ("timeout", "timed out"),
                 ("port held", "remote port forwarding failed"))


# --- the pieces: sshd, syslog, boxes, ticks -----------------------------------

class StampedSshd:
    """sshd run from the fleet's config, each log line stamped with the moment it
    arrived (and copied to log with it): sshd -e writes no time, and a box's
    login is to be set against the moment its tick gave up."""

    def __init__(self, config, port, log):
        self.port = port
        self.lines = []         # (time.monotonic(), text); appended by the reader only
        self.log = open(log, "a")
        self.proc = subprocess.Popen(at_normal_priority([SSHD, "-D", "-e", "-f", config]),
                                     stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            wait_for(self._ready, what="sshd on port %d" % self.port)
        except BaseException:
            self.stop()
            raise

    def _read(self):
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace").rstrip()))
            self.log.write("%.3f %s\n" % self.lines[-1])
        self.log.close()

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("sshd exited %s: %s" % (
                self.proc.returncode, " / ".join(text for _, text in self.lines)))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def stop(self):
        """End sshd's sessions (its per-connection children), then sshd."""
        end_pids(descendants(self.proc.pid))
        self.proc.kill()
        self.proc.wait()
        self.reader.join(5)


class SyslogSink:
    """A datagram socket in place of /dev/log (ctunnel's CTUNNEL_SYSLOG): every
    event of every tick, stamped on arrival. Syslog hears every attempt, also
    those that cron mail is spared."""

    def __init__(self, path, log):
        self.path = path
        self.lines = []         # (time.monotonic(), ctunnel's PID, text)
        self.log = open(log, "a")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            if not data:        # shut down by close()
                return
            match = SYSLOG_RE.match(data.decode(errors="replace"))
            if match:
                self.lines.append((time.monotonic(), int(match.group(1)), match.group(2)))
                self.log.write("%.3f %d %s\n" % self.lines[-1])

    def close(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)    # wakes the reader
        except OSError:
            pass
        self.sock.close()
        self.log.close()


class Box:
    """One simulated box: its dir (config, key, state), its service, its server port."""

    def __init__(self, index, work, port):
        self.name = "b%03d" % index
        # short: the control socket's path must stay under ~104 bytes
        self.dir = os.path.join(work, self.name)
        os.mkdir(self.dir, 0o700)
        self.conf = os.path.join(self.dir, "box.conf")
        self.key = os.path.join(self.dir, "key")
        self.log = os.path.join(self.dir, self.name + ".log")   # what its ssh said
        self.port = port
        self.greeting = ("SSH-2.0-%s\r\n" % self.name).encode()
        self.service = Service(self.greeting)
        self.fingerprint = None
        self.log_mark = 0       # NAME.log's size when the server was restarted

    def write_config(self, server, check_timeout):
        with open(self.conf, "w") as f:
            f.write("[%s]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                    "ssh_config = %s\nstate_dir = %s\ncheck_timeout = %g\n"
                    "remote_forward = %d:127.0.0.1:%d\n"
                    % (self.name, server.port, server.user, self.key, server.ssh_config,
                       self.dir, check_timeout, self.port, self.service.port))

    def read_fingerprint(self):
        """The key's name in sshd's "Accepted publickey" lines: SHA256 of its blob."""
        with open(self.key + ".pub") as f:
            blob = base64.b64decode(f.read().split()[1])
        digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
        self.fingerprint = "SHA256:" + digest

    def carries_data(self):
        """Does a connection to its server port come back with its greeting?"""
        try:
            return connect_read(self.port, PROBE_TIMEOUT) == self.greeting
        except OSError:
            return False

    def ssh_pids(self):
        return [p for p in pids_with_arg(self.dir + "/")
                if os.path.basename(cmdline(p)[0]) == "ssh"]

    def ssh_said(self):
        """NAME.log since the server was restarted (all of it, if ctunnel cut it)."""
        try:
            with open(self.log, "rb") as f:
                if os.fstat(f.fileno()).st_size >= self.log_mark:
                    f.seek(self.log_mark)
                return f.read().decode(errors="replace").splitlines()
        except OSError:
            return []


class Run:
    """One box's tick: a ctunnel process, when it began and ended, what it printed.

    It is armed first: a shell that waits for a line on a pipe, then execs
    (same PID) `python3 ctunnel.py -c BOX.conf`. Forking N processes takes
    this busy machine seconds; releasing N armed ones takes a millisecond.
    So every box's tick begins at the same instant, as under cron with NTP.
    """

    GATE = 'read go && exec "$@" </dev/null'    # EOF (the bench is gone): no tick

    def __init__(self, box, tick, out, env, ctunnel):
        self.box, self.tick, self.out = box, tick, out
        self.start = self.end = self.rc = self._mailed = None
        with open(out, "wb") as f:      # cron mails stdout and stderr alike
            self.proc = subprocess.Popen(
                ["/bin/sh", "-c", self.GATE, "tick"] + at_normal_priority(
                    [PYTHON, ctunnel, "-c", box.conf]),
                stdin=subprocess.PIPE, stdout=f, stderr=subprocess.STDOUT, env=env)

    def release(self):
        self.start = time.monotonic()
        try:
            self.proc.stdin.write(b"\n")
            self.proc.stdin.close()
        except OSError:
            pass        # it is gone already: its reaper will say so
        # a thread that waits for it notes its end to the millisecond, however
        # busy the bench is meanwhile (arming the next tick, probing)
        threading.Thread(target=self._reap, daemon=True).start()

    def _reap(self):
        self.rc = self.proc.wait()
        self.end = time.monotonic()

    def done(self):
        return self.end is not None

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.end = self.end or time.monotonic()

    def mailed(self):
        """Its output lines (read once, after it ended)."""
        if self._mailed is not None:
            return self._mailed
        with open(self.out, errors="replace") as f:
            lines = f.read().splitlines()
        if self.done():
            self._mailed = lines
        return lines


# --- the fleet ------------------------------------------------------------------

class Fleet:
    """A server, its login user and N boxes. close() ends and removes all of it."""

    def __init__(self, ctunnel, keep=False):
        self.ctunnel, self.keep = ctunnel, keep
        self.work = tempfile.mkdtemp(prefix="fl-", dir="/tmp")
        # sshd reads authorized_keys as the login user: it must get through
        os.chmod(self.work, 0o755)
        self.outs = os.path.join(self.work, "out")
        os.mkdir(self.outs)
        self.boxes, self.runs = [], []
        self.account = self.server = self.sshd = self.syslog = None

    def setup(self, count, max_startups, check_timeout, base_port):
        self.syslog = SyslogSink(os.path.join(self.work, "syslog"),
                                 os.path.join(self.work, "syslog.log"))
        self.env = cron_env(self.syslog.path)
        self.account = ThrowawayUser(os.path.join(self.work, "home"))
        os.mkdir(os.path.join(self.work, "sshd"))
        # the harness's server makes the keys and the config, and starts an sshd
        # that the bench replaces at once with its own, with MaxStartups its way
        self.server = SshServer(os.path.join(self.work, "sshd"), user=self.account.name)
        self.server.stop()
        self.config = fleet_sshd_config(self.server, max_startups)
        self.sshd = self._start_sshd()
        for index, port in enumerate(free_ports(base_port, count), 1):
            self.boxes.append(Box(index, self.work, port))
        make_keys(self.boxes)
        self._authorize()
        for box in self.boxes:
            box.write_config(self.server, check_timeout)

    def _authorize(self):
        """Every box's key, in the file that the harness's sshd_config names as the
        second AuthorizedKeysFile (its first holds the harness's own key)."""
        dot_ssh = os.path.join(self.server.dir, ".ssh")
        os.mkdir(dot_ssh, 0o755)
        path = os.path.join(dot_ssh, "authorized_keys")
        with open(path, "w") as out:
            for box in self.boxes:
                with open(box.key + ".pub") as f:
                    out.write(f.read())
        os.chmod(path, 0o644)

    def arm(self, boxes, tick):
        """Make the tick of every box given ready to start; return their Runs."""
        runs = []
        for box in boxes:
            out = os.path.join(self.outs, "%s-%05d" % (box.name, len(self.runs)))
            runs.append(Run(box, tick, out, self.env, self.ctunnel))
            self.runs.append(runs[-1])
        return runs

    def disarm(self, runs):
        """End armed runs that are not to start after all."""
        for run in runs:
            run.kill()
            self.runs.remove(run)

    def tick(self, boxes, tick):
        """Start the tick of every box given, all at once; return their Runs."""
        runs = self.arm(boxes, tick)
        for run in runs:
            run.release()
        return runs

    def wait(self, runs, until):
        """Wait until every run has ended or the monotonic time until."""
        while not all(run.done() for run in runs) and time.monotonic() < until:
            time.sleep(0.05)

    def carrying(self, boxes):
        """Those of the boxes whose forward carries data now."""
        with concurrent.futures.ThreadPoolExecutor(PROBES_AT_ONCE) as pool:
            ok = list(pool.map(Box.carries_data, boxes))
        return [box for box, good in zip(boxes, ok) if good]

    def bring_up(self, batch):
        """Start every tunnel, batch boxes at a time (fewer than MaxStartups' start,
        so that sshd drops none of them), until each carries data. Untimed."""
        todo = list(self.boxes)
        for _ in range(3):
            for i in range(0, len(todo), batch):
                runs = self.tick(todo[i:i + batch], 0)
                self.wait(runs, time.monotonic() + TICK_TIMEOUT)
            up = self.carrying(todo)
            todo = [box for box in todo if box not in up]
            if not todo:
                return
            time.sleep(2)     # e.g. a port that a session of the last try still held
        # all it said: under cron, ctunnel does not repeat an unchanged failure
        said = [line for r in self.runs if r.box is todo[0] for line in r.mailed()]
        raise SystemExit("bench: %d boxes did not come up (%s's port %d: taken meanwhile by "
                         "another program? see --base-port); %s said: %s"
                         % (len(todo), todo[0].name, todo[0].port, todo[0].name,
                            " / ".join(said) or "nothing"))

    def restart_server(self):
        """Kill sshd and its sessions, start it again on the same port with the same
        keys and config. Returns (the moment of the kill, seconds until the new sshd
        answered, seconds until every box's ssh had exited)."""
        for box in self.boxes:
            try:
                box.log_mark = os.path.getsize(box.log)
            except OSError:
                box.log_mark = 0
        killed = time.monotonic()
        self.sshd.stop()
        self.sshd = None
        self.sshd = self._start_sshd()
        answered = time.monotonic() - killed
        wait_for(lambda: not pids_with_arg(self.work + "/b"), 20,
                 "the boxes' ssh clients to notice the restart")
        return killed, answered, time.monotonic() - killed

    def _start_sshd(self):
        for _ in range(20):
            try:
                return StampedSshd(self.config, self.server.port,
                                   os.path.join(self.work, "sshd", "stamped.log"))
            except (RuntimeError, AssertionError):
                time.sleep(0.5)     # the last listener's port is not free yet
        raise SystemExit("bench: sshd did not start on port %d" % self.server.port)

    def close(self):
        """End every process the bench started, by PID; remove its user and files."""
        for run in self.runs:
            run.kill()
        # the boxes' ssh clients: their state dirs (WORK/bNNN/) are in their argv
        end_pids(pids_with_arg(self.work + "/b"))
        if self.sshd:
            self.sshd.stop()
        for box in self.boxes:
            box.service.close()
        if self.syslog:
            self.syslog.close()
        if self.account:
            try:
                self.account.remove()
            except AssertionError as e:
                print("bench: %s" % e, file=sys.stderr)
        if self.keep:
            print("bench: kept %s" % self.work, file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def at_normal_priority(argv):
    """argv, to run at the niceness the bench began with. A child inherits the
    niceness of the thread that forked it: raised during the storm, it is put
    back by nice(1), which then execs argv (same PID)."""
    raised = NICE - os.getpriority(os.PRIO_PROCESS, 0)
    return ["/usr/bin/nice", "-n", str(raised)] + argv if raised > 0 else argv


def cron_env(syslog_path):
    """The environment Debian's cron gives a job, and the bench's syslog socket."""
    me = pwd.getpwuid(os.getuid())
    return {"HOME": me.pw_dir, "LOGNAME": me.pw_name, "PATH": "/usr/bin:/bin",
            "SHELL": "/bin/sh", "CTUNNEL_SYSLOG": syslog_path}


def openssh_version():
    said = subprocess.run(["ssh", "-V"], capture_output=True, text=True).stderr.strip()
    match = re.match(r"OpenSSH_(\d+)\.(\d+)", said)
    return said, (tuple(map(int, match.groups())) if match else (0, 0))


def fleet_sshd_config(server, max_startups):
    """The harness server's sshd_config with MaxStartups set to max_startups;
    returns its path. sshd takes the first value of most keywords but the LAST
    of MaxStartups (OpenSSH 9.2's servconf.c), so the harness's own line
    (MaxStartups 100) would win over one passed in its extra: the bench
    writes a copy without it, and asks sshd -T what it made of the copy."""
    with open(server.config) as f:
        lines = [l for l in f.read().splitlines() if not l.startswith("MaxStartups")]
    lines.insert(0, "MaxStartups %s" % max_startups)
    if openssh_version()[1] >= (9, 8):
        # every box connects from 127.0.0.1: sshd 9.8+ would penalize that one
        # address for all of them, where a real fleet has an address per box
        lines.insert(0, "PerSourcePenalties no")
    path = os.path.join(server.dir, "fleet_sshd_config")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    effective = subprocess.run([SSHD, "-T", "-f", path], capture_output=True, text=True)
    if "maxstartups %s\n" % max_startups not in effective.stdout:
        raise SystemExit("bench: sshd would not take MaxStartups %s: %s" % (
            max_startups, effective.stderr.strip() or [l for l in effective.stdout.splitlines()
                                                      if l.startswith("maxstartups")]))
    return path


def free_ports(base, count):
    """count ports from base up that nothing holds now, all below the ephemeral
    range: a client's source port must never take a box's server port."""
    ports = harness_free_ports(range(base, 32768), count)
    if len(ports) < count:
        raise SystemExit("bench: not %d free ports from %d below 32768" % (count, base))
    return ports


def make_keys(boxes, at_once=16):
    for i in range(0, len(boxes), at_once):
        procs = [subprocess.Popen(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                                   box.name, "-f", box.key], stdin=subprocess.DEVNULL)
                 for box in boxes[i:i + at_once]]
        if any(p.wait() for p in procs):
            raise SystemExit("bench: ssh-keygen failed")
    for box in boxes:
        box.read_fingerprint()


def cpu_times():
    """(all, idle) jiffies of the machine, from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    return sum(fields), fields[3] + fields[4]


def busy_percent(before, after):
    total, idle = after[0] - before[0], after[1] - before[1]
    return round(100.0 * (total - idle) / total) if total else 0


# --- the storm ------------------------------------------------------------------

def storm(fleet, interval, max_ticks):
    """Restart the server, then tick until every box is back. Returns the raw record.

    The bench's own threads run at a raised priority meanwhile (the niceness
    is a thread's own on Linux; those that exist, the boxes' services, keep
    theirs). Among N ticks that keep both cores busy, the bench would get a
    1/N share: ticks would start seconds late, and ends be noted late.
    Everything it starts runs at the normal priority (at_normal_priority).
    """
    os.setpriority(os.PRIO_PROCESS, 0, NICE + BENCH_NICE)
    try:
        return _storm(fleet, interval, max_ticks)
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, NICE)


def _storm(fleet, interval, max_ticks):
    killed, answered, noticed = fleet.restart_server()
    print("server restarted: sshd answered %.1f s after the kill; every box's ssh had "
          "exited after %.1f s" % (answered, noticed), flush=True)
    prober = Prober(fleet.boxes)
    ticks, armed = [], fleet.arm(fleet.boxes, 1)
    first = time.monotonic()
    try:
        for k in range(1, max_ticks + 1):
            if prober.wait_all(first + (k - 1) * interval):
                break       # every box is back: no more ticks
            earlier = sum(1 for r in fleet.runs if r.start and not r.done())
            ticks.append({"tick": k, "start": time.monotonic(), "cpu": cpu_times(),
                          "running_from_before": earlier})
            for run in armed:
                run.release()
            print("tick %d at +%.1f s (%d of earlier ticks still running); %d/%d boxes "
                  "back before it" % (k, ticks[-1]["start"] - killed, earlier,
                                      len(prober.back), len(fleet.boxes)), flush=True)
            # the next tick is armed now: forking N shells takes this busy machine long
            armed = fleet.arm(fleet.boxes, k + 1) if k < max_ticks else []
        else:
            prober.wait_all(time.monotonic() + interval)    # the last tick's own interval
        ended, cpu_end = time.monotonic(), cpu_times()
    finally:
        fleet.disarm(armed)
        prober.stop()
    print("%d/%d boxes back, the last %.1f s after the kill"
          % (len(prober.back), len(fleet.boxes),
             max(prober.back.values(), default=killed) - killed), flush=True)
    fleet.wait(fleet.runs, time.monotonic() + TICK_TIMEOUT)
    killed_by_bench = sum(1 for r in fleet.runs if not r.done())
    for run in fleet.runs:
        run.kill()
    still = len(fleet.carrying([b for b in fleet.boxes if b.name in prober.back]))
    return {"killed": killed, "answered": answered, "noticed": noticed, "ended": ended,
            "cpu_end": cpu_end,
            "back": prober.back, "ticks": ticks, "still_back": still,
            "killed_by_bench": killed_by_bench,
            "runs": [r for r in fleet.runs if r.tick >= 1]}


class Prober:
    """From the restart on, probes every box that is not back yet, again and again,
    and notes when its forward first carried data: the tick it is back in is the
    one during which that happened. Ticks need not wait for it."""

    PAUSE = 0.2         # seconds between rounds

    def __init__(self, boxes):
        self.boxes = boxes
        self.back = {}          # box name -> time.monotonic() of its first greeting
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        def probe(box):
            return time.monotonic() if box.carries_data() else None
        with concurrent.futures.ThreadPoolExecutor(PROBES_AT_ONCE) as pool:
            while not self.stopping.is_set():
                pending = [box for box in self.boxes if box.name not in self.back]
                for box, when in zip(pending, pool.map(probe, pending)):
                    if when:
                        self.back[box.name] = when
                self.stopping.wait(self.PAUSE)

    def wait_all(self, until):
        """Wait until the monotonic time until; True (at once) when every box is back."""
        while len(self.back) < len(self.boxes):
            if time.monotonic() >= until:
                return False
            time.sleep(0.05)
        return True

    def stop(self):
        self.stopping.set()
        self.thread.join()


def analyze(fleet, raw):
    """Turn the storm's raw record (and sshd's and syslog's lines) into figures."""
    boxes, runs, killed = fleet.boxes, raw["runs"], raw["killed"]
    starts = [t["start"] for t in raw["ticks"]]
    sshd = [(t, text) for t, text in fleet.sshd.lines]
    drops = [t for t, text in sshd if DROP_RE.search(text)]
    by_key = {box.fingerprint: box.name for box in boxes}
    logins = [(t, by_key.get(m.group(1), "?"))
              for t, m in ((t, LOGIN_RE.search(text)) for t, text in sshd) if m]
    ends = starts[1:] + [raw["ended"]]
    cpus = [t["cpu"] for t in raw["ticks"]] + [raw["cpu_end"]]
    rows = []
    for i, (tick, profile) in enumerate(zip(raw["ticks"], arrivals(sshd, starts))):
        start, end = starts[i], ends[i]
        row = {"tick": tick["tick"], "start_s": round(start - killed, 2),
               "running_from_before": tick["running_from_before"],
               "cpu_busy_pct": busy_percent(cpus[i], cpus[i + 1])}
        row.update(profile)
        row["drops"] = sum(1 for t in drops if start <= t < end)
        row["logins"] = sum(1 for t, _ in logins if start <= t < end)
        row["back"] = sum(1 for t in raw["back"].values() if t < end)
        row["mailed_lines"] = sum(len(r.mailed()) for r in runs if r.tick == row["tick"])
        rows.append(row)
    syslog = {}
    for t, pid, text in fleet.syslog.lines:
        if t >= killed:
            syslog.setdefault(pid, []).append((t, text))
    count = len(boxes)
    return {
        "ticks": rows,
        "back_in_tick": {str(p): back_at(rows, count, p) for p in (50, 90, 100)},
        "all_back_after_s": round(max(raw["back"].values()) - killed, 2)
        if len(raw["back"]) == count else None,
        "back_after_s": {name: round(t - killed, 2) for name, t in sorted(raw["back"].items())},
        "still_back_at_end": raw["still_back"],
        "ticks_killed_by_bench": raw["killed_by_bench"],
        "drops": len(drops),
        "drops_at_s": [round(t - killed, 3) for t in drops],
        "logins_per_box": {box.name: sum(1 for _, n in logins if n == box.name)
                           for box in boxes},
        "mailed_per_box": {box.name: [line for r in runs if r.box is box for line in r.mailed()]
                           for box in boxes},
        # cron sends one mail per job run that printed anything
        "mails_per_box": {box.name: sum(1 for r in runs if r.box is box and r.mailed())
                          for box in boxes},
        "mailed_distinct": distinct((line, r.box.name) for r in runs for line in r.mailed()),
        "syslog_per_box": {box.name: sum(len(syslog.get(r.proc.pid, ())) for r in runs
                                         if r.box is box) for box in boxes},
        "ssh_said_distinct": distinct((line, box.name) for box in boxes
                                      for line in box.ssh_said()),
        "tick_seconds": tick_seconds(runs, syslog),
        "given_up_after_login": given_up_after_login(runs, syslog, logins, killed),
        "runs": [{"box": r.box.name, "tick": r.tick, "pid": r.proc.pid, "rc": r.rc,
                  "start_s": round(r.start - killed, 3), "end_s": round(r.end - killed, 3),
                  "said": [text for _, text in syslog.get(r.proc.pid, ())]} for r in runs],
    }


def arrivals(sshd, starts):
    """sshd's view of each tick: the connections that arrived (dropped ones too),
    the seconds from the first to the last, and the most that were
    unauthenticated at once (what MaxStartups counts; from sshd's own lines)."""
    profiles = [{"arrivals": 0, "first": None, "last": None, "peak_unauthenticated": 0}
                for _ in starts]
    unauthenticated = set()
    for t, text in sshd:
        tick = sum(1 for start in starts if start <= t) - 1
        opened, closed = OPEN_RE.match(text), CLOSE_RE.search(text)
        if closed:
            unauthenticated.discard(closed.group(1))
        if tick < 0 or not (opened or DROP_RE.search(text)):
            continue
        profile = profiles[tick]
        profile["arrivals"] += 1
        profile["first"] = profile["first"] or t
        profile["last"] = t
        if opened:
            unauthenticated.add(opened.group(1))
            profile["peak_unauthenticated"] = max(profile["peak_unauthenticated"],
                                                  len(unauthenticated))
    for profile in profiles:
        first, last = profile.pop("first"), profile.pop("last")
        profile["arrivals_over_s"] = round(last - first, 2) if first else 0.0
    return profiles


def back_at(rows, count, percent):
    """The first tick by whose end percent % of the boxes were back, or None."""
    need = math.ceil(count * percent / 100.0)
    return next((row["tick"] for row in rows if row["back"] >= need), None)


def normalized(line, name):
    """A line without its time, PID, box name and numbers: lines that differ only
    in those say the same."""
    return NUMBER_RE.sub("N", STAMP_RE.sub("", line).replace(name, "BOX"))


def distinct(lines):
    """[{count, line, example}] of (line, box name) pairs, most frequent first."""
    seen = {}
    for line, name in lines:
        entry = seen.setdefault(normalized(line, name), {"count": 0, "example": line})
        entry["count"] += 1
    return [dict(line=key, **value) for key, value in
            sorted(seen.items(), key=lambda item: -item[1]["count"])]


def failure_kind(lines):
    """What a tick's failed launch came to, from its lines; None if none failed."""
    failed = [line for line in lines if FAILURE_RE.search(line)]
    if not failed:
        return None
    return next((kind for kind, needle in FAILURE_KINDS if needle in failed[-1]), "other")


def tick_lines(run, syslog):
    """Everything a tick said: syslog has every event, stderr may leave some out."""
    return [text for _, text in syslog.get(run.proc.pid, ())] or run.mailed()


def tick_seconds(runs, syslog):
    """Wall seconds of the storm's ticks, by what they came to."""
    groups = {}
    for run in runs:
        if run.rc is None or run.rc < 0:     # ended by the bench
            continue
        lines = tick_lines(run, syslog)
        kind = failure_kind(lines)
        if kind:
            kind = "failed: " + kind
        elif any("started" in line for line in lines):
            kind = "(re)started"
        else:
            kind = "nothing to do (healthy, or another tick on it)"
        groups.setdefault(kind, []).append(run.end - run.start)
    return {kind: {"count": len(s), "median_s": round(statistics.median(s), 2),
                   "max_s": round(max(s), 2)} for kind, s in sorted(groups.items())}


def given_up_after_login(runs, syslog, logins, killed):
    """Failed launches that sshd had accepted the login of: a login wasted in the
    middle of the storm (issue 18 saw ctunnel's launch limit end one 2.6 s after
    it). The time is that of the failure's line in syslog."""
    found = []
    for run in runs:
        lines = tick_lines(run, syslog)
        kind = failure_kind(lines)
        if run.rc is None or run.rc < 0 or not kind:
            continue
        said = [t for t, text in syslog.get(run.proc.pid, ()) if FAILURE_RE.search(text)]
        gave_up = said[-1] if said else run.end
        accepted = [t for t, name in logins if name == run.box.name and run.start <= t <= gave_up]
        if accepted:
            found.append({"box": run.box.name, "tick": run.tick, "kind": kind,
                          "accepted_s": round(accepted[-1] - killed, 2),
                          "gave_up_s": round(gave_up - killed, 2),
                          "after_login_s": round(gave_up - accepted[-1], 2),
                          "line": [l for l in lines if FAILURE_RE.search(l)][-1]})
    return found


# --- the single box ---------------------------------------------------------------

def single(fleet, rounds):
    """Each fault, rounds times, then one tick: back within it? How long did it take?"""
    box = fleet.boxes[0]
    results = {fault: [] for fault in SINGLE_FAULTS}
    for fault in SINGLE_FAULTS:
        for _ in range(rounds):
            if not box.carries_data():
                fleet.bring_up(1)
            inject(fleet, box, fault)
            run = fleet.tick([box], 1)[0]
            fleet.wait([run], time.monotonic() + TICK_TIMEOUT)
            run.kill()
            results[fault].append({"back": box.carries_data(), "rc": run.rc,
                                   "tick_s": round(run.end - run.start, 2),
                                   "mailed": run.mailed()})
            print("%s: back %s, tick %.2f s" % (fault, results[fault][-1]["back"],
                                               results[fault][-1]["tick_s"]), flush=True)
    return results


def inject(fleet, box, fault):
    if fault == "server restart":
        fleet.restart_server()
        return
    pids = box.ssh_pids()
    assert len(pids) == 1, "%s: expected one ssh, found %s" % (box.name, pids)
    if fault == "kill":
        os.kill(pids[0], signal.SIGKILL)
        wait_for(lambda: not box.ssh_pids(), 5, "the killed ssh to be gone")
    else:       # frozen: alive, its socket open, but it answers nothing
        os.kill(pids[0], signal.SIGSTOP)


# --- the report ---------------------------------------------------------------------

def scaling_note(args, max_startups, first):
    """Which time scaling the run used, why it stands for the real thing, and how
    far this machine's CPU spread the first tick's connections anyway."""
    if args.scale > 1:
        note = ("--scale %d: %d boxes against MaxStartups %s stand for %d boxes against %s. "
                "sshd drops a new connection while start or more are unauthenticated, with "
                "a chance that grows from rate %% to 100 %% at full. A real fleet's boxes "
                "each run their tick on a CPU of their own and connect within a fraction of "
                "a second, so most of them are unauthenticated at once: their odds depend "
                "on boxes/start and boxes/full, which dividing all three by %d keeps. What "
                "does not divide is this machine: %d Python ticks on its 2 cores would start "
                "one after another over seconds, and sshd would see fewer at once than a "
                "real server does; 1/%d of them connect close together."
                % (args.scale, args.boxes, max_startups, args.boxes * args.scale,
                   args.max_startups, args.scale, args.boxes * args.scale, args.scale))
    else:
        note = ("no --scale: %d boxes against MaxStartups %s, ticks %g s apart. The "
                "interval stands for cron's minute: each tick's stragglers are to be done "
                "before the next tick begins, as within a real minute (\"running\" below; "
                "200 boxes on 2 cores take --interval 30). It does not bring a tick's "
                "connections closer together." % (args.boxes, max_startups, args.interval))
    note += (" Tick 1's %d connections reached sshd over %.1f s, at most %d of them "
             "unauthenticated at once (MaxStartups starts dropping at %s)."
             % (first["arrivals"], first["arrivals_over_s"], first["peak_unauthenticated"],
                max_startups.split(":")[0]))
    if first["arrivals_over_s"] > 1.0:
        note += (" That spread is this machine's CPU, not cron's: a real fleet's "
                 "connections arrive closer together, so this run understates the storm; "
                 "--scale keeps them together.")
    return note


def print_fleet(result):
    setup, figures = result["setup"], result["figures"]
    print("\n" + textwrap.fill(result["scaling"], 100))
    print("\nstart: after the kill; running: ticks of earlier ticks still running at its "
          "start; sshd's view:\nconnections that arrived, over how long, the most "
          "unauthenticated at once, drops and logins;\nback: boxes back by the tick's end, "
          "in all; mailed: lines of this tick's ticks\n")
    print("%4s %7s %7s %5s %8s %6s %6s %6s %6s %5s %6s"
          % ("tick", "start", "running", "CPU%", "arrived", "over", "peak", "drops", "logins",
             "back", "mailed"))
    for t in figures["ticks"]:
        print("%4d %6.1fs %7d %5d %8d %5.1fs %6d %6d %6d %5d %6d"
              % (t["tick"], t["start_s"], t["running_from_before"], t["cpu_busy_pct"],
                 t["arrivals"], t["arrivals_over_s"], t["peak_unauthenticated"], t["drops"],
                 t["logins"], t["back"], t["mailed_lines"]))
    back = figures["back_in_tick"]
    print("\nback: 50 %% in tick %s, 90 %% in tick %s, 100 %% in tick %s (%d boxes, ticks "
          "%g s apart; all back %s after the kill; %d still carried data at the end)"
          % (back["50"], back["90"], back["100"], setup["boxes"], setup["interval_s"],
             "%.1f s" % figures["all_back_after_s"] if figures["all_back_after_s"] else "never",
             figures["still_back_at_end"]))
    print("sshd: %d connections dropped past MaxStartups %s"
          % (figures["drops"], setup["max_startups"]))
    print("logins per box after the restart: %s" % histogram(figures["logins_per_box"]))
    mailed = {name: len(lines) for name, lines in figures["mailed_per_box"].items()}
    print("lines cron would have mailed: %d; per box: %s"
          % (sum(mailed.values()), histogram(mailed)))
    print(textwrap.fill(" ".join("%s:%d" % item for item in sorted(mailed.items())), 100,
                        initial_indent="  ", subsequent_indent="  "))
    print("mails cron would have sent (ticks that printed): %d; per box: %s"
          % (sum(figures["mails_per_box"].values()), histogram(figures["mails_per_box"])))
    print("lines syslog got (every attempt): %d; per box: %s"
          % (sum(figures["syslog_per_box"].values()), histogram(figures["syslog_per_box"])))
    print_distinct("distinct mailed lines", figures["mailed_distinct"])
    print_distinct("what ssh said (NAME.log, since the restart)", figures["ssh_said_distinct"])
    print("tick wall time, by what the tick came to:")
    for kind, s in figures["tick_seconds"].items():
        print("  %-48s %5d ticks, median %.2f s, max %.2f s"
              % (kind, s["count"], s["median_s"], s["max_s"]))
    given_up = figures["given_up_after_login"]
    print("failed launches whose login sshd had accepted: %d (by ctunnel's launch limit: %d)"
          % (len(given_up), sum(1 for g in given_up if g["kind"] == "launch limit")))
    for g in given_up[:10]:
        print("  %s tick %d: Accepted publickey at +%.2f s, failed at +%.2f s (%.2f s "
              "later): %s" % (g["box"], g["tick"], g["accepted_s"], g["gave_up_s"],
                              g["after_login_s"], g["line"]))


def histogram(per_box):
    """"1: 40 boxes, 2: 10 boxes" from {box: count}."""
    counts = {}
    for value in per_box.values():
        counts[value] = counts.get(value, 0) + 1
    return ", ".join("%d: %d box%s" % (v, n, "es" if n > 1 else "")
                     for v, n in sorted(counts.items()))


def print_distinct(title, entries, limit=12):
    print("%s (%d distinct):" % (title, len(entries)))
    for e in entries[:limit]:
        print("  %5d x %s\n          e.g. %s" % (e["count"], e["line"], e["example"]))


def print_single(result):
    print("\nsingle box, %d rounds per fault, check_timeout %g s:"
          % (result["setup"]["rounds"], result["setup"]["check_timeout_s"]))
    for fault, rounds in result["single"].items():
        walls = [r["tick_s"] for r in rounds]
        lines = sorted({normalized(l, "b001") for r in rounds for l in r["mailed"]})
        print("  %-15s back within the tick: %d/%d; tick median %.2f s, max %.2f s; "
              "mailed per tick: %s"
              % (fault, sum(r["back"] for r in rounds), len(rounds),
                 statistics.median(walls), max(walls), [len(r["mailed"]) for r in rounds]))
        for line in lines:
            print("      %s" % line)


# --- main ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--boxes", type=int, default=50)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between ticks")
    parser.add_argument("--ticks", type=int, default=20, help="ticks at most after the restart")
    parser.add_argument("--max-startups", default=DEFAULT_MAX_STARTUPS,
                        help="sshd's MaxStartups start:rate:full (before --scale)")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide MaxStartups' start and full by K (the boxes stand for K "
                             "times as many)")
    parser.add_argument("--check-timeout", type=float, default=2.0,
                        help="each box's check_timeout (ctunnel's launch limit is 4 times "
                             "it; 2 gives the 8 s of issue 18)")
    parser.add_argument("--base-port", type=int, default=26000,
                        help="the boxes' server ports start here")
    parser.add_argument("--single", action="store_true",
                        help="the single-box fault check instead of the fleet")
    parser.add_argument("--rounds", type=int, default=3, help="--single: rounds per fault")
    parser.add_argument("--ctunnel", default=CTUNNEL,
                        help="the ctunnel.py to run (default: this checkout's); another "
                             "commit's: mkdir /tmp/old && git archive COMMIT | tar -x -C "
                             "/tmp/old, then --ctunnel /tmp/old/ctunnel.py")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = parser.parse_args(argv)
    if args.single:
        args.boxes, args.scale = 1, 1
    return args, scaled(parser, args.max_startups, args.scale)


def scaled(parser, max_startups, scale):
    """MaxStartups with start and full divided by scale (both must divide)."""
    try:
        start, rate, full = (int(x) for x in max_startups.split(":"))
    except ValueError:
        parser.error("--max-startups takes start:rate:full, e.g. 10:30:100")
    if scale < 1 or start % scale or full % scale:
        parser.error("--scale %d must divide MaxStartups' start and full (%d, %d)"
                     % (scale, start, full))
    return "%d:%d:%d" % (start // scale, rate, full // scale)


def main(argv=None):
    args, max_startups = parse_args(argv)
    if os.geteuid() != 0:
        raise SystemExit("bench: run as root (it makes a throwaway user)")
    # a kill ends the run as Ctrl-C does: through the cleanup below
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    setup = {"boxes": args.boxes, "interval_s": args.interval, "max_startups": max_startups,
             "scale": args.scale, "stands_for_boxes": args.boxes * args.scale,
             "check_timeout_s": args.check_timeout, "tick_limit": args.ticks,
             "rounds": args.rounds, "openssh": openssh_version()[0],
             "python": subprocess.run([PYTHON, "-V"], capture_output=True,
                                      text=True).stdout.strip(),
             "cpus": os.cpu_count(), "ctunnel": os.path.abspath(args.ctunnel)}
    began = time.monotonic()
    fleet = Fleet(args.ctunnel, args.keep)
    try:
        fleet.setup(args.boxes, max_startups, args.check_timeout, args.base_port)
        print("%d box%s running %s (%s), sshd %s with MaxStartups %s"
              % (args.boxes, "es" if args.boxes > 1 else "", setup["ctunnel"],
                 setup["python"], setup["openssh"], max_startups), flush=True)
        fleet.bring_up(max(1, int(max_startups.split(":")[0]) - 1))
        setup["bring_up_s"] = round(time.monotonic() - began, 1)
        print("all %d tunnels up and carrying data after %.1f s (untimed)"
              % (args.boxes, setup["bring_up_s"]), flush=True)
        if args.single:
            result = {"setup": setup, "single": single(fleet, args.rounds)}
        else:
            raw = storm(fleet, args.interval, args.ticks)
            setup.update(sshd_answered_s=round(raw["answered"], 2),
                         clients_exited_s=round(raw["noticed"], 2))
            figures = analyze(fleet, raw)
            result = {"setup": setup, "figures": figures,
                      "scaling": scaling_note(args, max_startups, figures["ticks"][0])}
    except KeyboardInterrupt:
        print("bench: interrupted", file=sys.stderr)
        return 130
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):     # nothing may stop the cleanup
            signal.signal(sig, signal.SIG_IGN)
        fleet.close()
    result["setup"]["run_s"] = round(time.monotonic() - began, 1)
    (print_single if args.single else print_fleet)(result)
    print("\nthe whole run took %.0f s" % result["setup"]["run_s"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
