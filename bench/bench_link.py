#!/usr/bin/env python3
"""How tunnel keepers fare on bad links: ctunnel run from cron, against autossh.

usage: python3 bench/bench_link.py [--seconds N] [--links NAME,...] [--keepers NAME,...]
                                   [--tick S] [--seed N] [--ctunnel PATH] [--json FILE]

Run as root, with autossh (apt-get install autossh), iptables, iproute2 and
what the tests need. Everything happens in a network namespace the bench
makes for itself, which goes away with it: a real OpenSSH sshd on 127.0.0.1
logging in a throwaway user (the server, set as README advises:
ClientAliveInterval 10, ClientAliveCountMax 3), a service on the box that
greets like sshd and swallows what it is sent, and one keeper of one reverse
forward, server port P -> that service. linkemu.py shapes every packet to
and from sshd's port in user space (NFQUEUE): the line between box and server.

links (issue 16):
  cellular        RTT 600 ms, 2 % loss
  satellite       RTT 700 ms, 1 % loss, 256 kbit/s
  bad-cellular    RTT 1.2 s +- 0.6 s, 8 % loss
  flapping        an 8 s outage every 25 s, first at 15 s (RTT 50 ms between)
  satellite-bulk  satellite, while a user pushes data through P to the box
                  for the rest of the run, from 12 s on (when every keeper
                  has come up); a dropped connection is a cut

keepers:
  ctunnel         this ctunnel.py with its defaults, run as cron would
                  (`python3 ctunnel.py -c CONF`, cron's PATH, its output
                  captured: what cron would mail), one tick every --tick
                  seconds (5: cron's minute compressed 12 times)
  ctunnel-30      the same with check_timeout = 30
  autossh         autossh -M 0 -o ServerAliveInterval=10 -o ServerAliveCountMax=3
                  -o ExitOnForwardFailure=yes -N -R ... (AUTOSSH_GATETIME=0)

For each link it first proves what the emulator delivers (RTT, loss, rate,
outage: linkemu.measure). Then each keeper gets a run of --seconds from a
cold start, while a user probe connects to P every 2 s and reads the
service's greeting. Per run it prints: restarts (the keeper's ssh PIDs after
the first; for ctunnel also its "started"/"restarted"/"failed" lines, the
failures syslog heard, and how long its ticks took), when the tunnel first
carried data (first up), then available (the share of probes that got the
greeting within 5 s) and forward up (the share of time P listened on the
server), the recovery after each outage (from its end to the first greeting
after it), when the bulk transfer was cut (its connection dropped), and what
cron would have mailed (ctunnel's stderr and stdout; syslog's every line is
in --json). Then a table of it all. A full run, 5 links x 3 keepers at the
default 90 s, takes about 25 minutes; it uses little CPU (a few percent of
one core). --ctunnel runs another ctunnel.py, e.g. a commit's from
`git archive COMMIT ctunnel.py ctunnellib | tar -x -C DIR`, so that a baseline
holds still while the checkout is being edited.
"""

import argparse
import collections
import ctypes
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.dont_write_bytecode = True      # a bench run by hand leaves no bytecode in the checkout
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)
import linkemu  # noqa: E402
from harness import (CTUNNEL, Listener, SshServer, ThrowawayUser,  # noqa: E402
                     cmdline, descendants, end_pids, pid_alive, pids_with_arg)

GREETING = b"SSH-2.0-box\r\n"
PROBE_EVERY = 2.0       # seconds between user probes
PROBE_TIMEOUT = 5.0     # a probe that has no greeting by then failed
SAMPLE_EVERY = 0.5      # how often the keeper's ssh PID and the server's listener are read
BULK_START = 12.0       # the bulk user starts then: every keeper has had time to come up
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
PR_SET_CHILD_SUBREAPER = 36

Scenario = collections.namedtuple("Scenario", "link bulk")
SCENARIOS = collections.OrderedDict([
    ("cellular", Scenario(linkemu.LINKS["cellular"], False)),
    ("satellite", Scenario(linkemu.LINKS["satellite"], False)),
    ("bad-cellular", Scenario(linkemu.LINKS["bad-cellular"], False)),
    ("flapping", Scenario(linkemu.LINKS["flapping"], False)),
    ("satellite-bulk", Scenario(linkemu.LINKS["satellite"], True)),
])
KEEPERS = ("ctunnel", "ctunnel-30", "autossh")
KEEPER_TITLES = {"ctunnel": "ctunnel defaults", "ctunnel-30": "ctunnel check_timeout 30",
                 "autossh": "autossh"}


# --- the box's service and the users ----------------------------------------

class BoxService(Listener):
    """The service behind the forward: greets like sshd, then reads and counts
    whatever arrives until the client leaves (the bulk transfer's sink)."""

    backlog = 64

    def __init__(self):
        self.received = 0
        self.lock = threading.Lock()
        Listener.__init__(self)

    def handle(self, conn):
        threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn):
        with conn:
            try:
                conn.sendall(GREETING)
                while True:
                    data = conn.recv(65536)
                    if not data:
                        return
                    with self.lock:
                        self.received += len(data)
            except OSError:
                return


class Clock:
    """Seconds since a run's start (the emulator's epoch)."""

    def __init__(self, epoch):
        self.epoch = epoch

    def now(self):
        return time.monotonic() - self.epoch


def read_greeting(sock, deadline):
    """Read until the greeting's line ends; True if it came before the deadline."""
    got = b""
    while not got.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        data = sock.recv(256)
        if not data:
            return False
        got += data
    return got.startswith(b"SSH-")


class Prober:
    """A user who, every PROBE_EVERY seconds, connects to P on the server and
    reads the greeting: [(started, arrival or None)]."""

    def __init__(self, port, clock, until):
        self.port, self.clock, self.until = port, clock, until
        self.results = []
        self.threads = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while self.clock.now() < self.until:
            t = threading.Thread(target=self._probe, daemon=True)
            t.start()
            self.threads.append(t)
            n += 1
            time.sleep(max(0.0, n * PROBE_EVERY - self.clock.now()))

    def _probe(self):
        began = self.clock.now()
        deadline = time.monotonic() + PROBE_TIMEOUT
        arrived = None
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=PROBE_TIMEOUT) as s:
                if read_greeting(s, deadline):
                    arrived = self.clock.now()
        except OSError:
            pass
        self.results.append((began, arrived))

    def join(self):
        self.thread.join()
        for t in self.threads:
            t.join()


class BulkUser:
    """A user who, from `start` on, pushes data through P as fast as it goes; a
    connection that got the greeting and then dropped is a cut. Reconnects
    after a second, as a user would."""

    CHUNK = b"x" * 65536

    def __init__(self, port, clock, start):
        self.port, self.clock, self.start = port, clock, start
        self.cuts = []              # (when, what the user saw)
        self.connections = []       # when each got the greeting
        self.sock = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping and self.clock.now() < self.start:
            time.sleep(0.1)
        while not self.stopping:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=30) as s:
                    self.sock = s
                    if read_greeting(s, time.monotonic() + 30):
                        self.connections.append(self.clock.now())
                        self._push()
            except OSError:
                pass        # no tunnel (yet): a user tries again
            time.sleep(1)

    def _push(self):
        self.sock.settimeout(None)
        try:
            while True:
                self.sock.sendall(self.CHUNK)
        except OSError as e:
            if not self.stopping:
                self.cuts.append((self.clock.now(), e.strerror or str(e)))

    def stop(self):
        self.stopping = True
        if self.sock:
            try:
                self.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.thread.join(timeout=5)


def listening(port):
    """Whether something listens on 127.0.0.1:port (the server's side of the forward)."""
    local = "0100007F:%04X" % port
    with open("/proc/net/tcp") as f:
        return any(fields[1] == local and fields[3] == "0A"
                   for fields in (line.split() for line in f))


class Sampler:
    """Every SAMPLE_EVERY seconds: the keeper's ssh PID, and whether P listens."""

    def __init__(self, keeper, port, clock):
        self.keeper, self.port, self.clock = keeper, port, clock
        self.samples = []           # (t, ssh pid or None, listening)
        self.stopping = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stopping:
            self.samples.append((self.clock.now(), self.keeper.ssh_pid(), listening(self.port)))
            reap_orphans()
            time.sleep(SAMPLE_EVERY)

    def stop(self):
        self.stopping = True
        self.thread.join()

    def pids(self):
        """The distinct ssh PIDs, in the order they appeared."""
        seen = []
        for _, pid, _ in self.samples:
            if pid and pid not in seen:
                seen.append(pid)
        return seen


# --- processes ----------------------------------------------------------------

def become_subreaper():
    """Adopt our orphans: the ssh that `ssh -f` leaves behind, once ended, would
    stay a zombie for good under an init that never reaps (as here)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def reap_orphans():
    """Reap our orphaned ssh and sshd children that have ended (never a tick's or
    autossh's: Popen waits for those, and they are not ssh)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % entry) as f:
                stat = f.read()
        except OSError:
            continue
        comm, rest = stat[stat.find("(") + 1:stat.rfind(")")], stat[stat.rfind(")") + 2:]
        state, ppid = rest.split()[:2]
        if comm in ("ssh", "sshd") and state == "Z" and int(ppid) == os.getpid():
            try:
                os.waitpid(int(entry), os.WNOHANG)
            except ChildProcessError:
                pass


def end_all(pids):
    """End these PIDs (harness.end_pids) and reap those that were our orphans."""
    end_pids(pids)
    reap_orphans()


# --- the keepers --------------------------------------------------------------

class SyslogSink:
    """A syslog socket of our own for ctunnel (CTUNNEL_SYSLOG): it hears every
    event, also the repeated failures that cron's mail is spared."""

    def __init__(self, path, clock):
        self.path, self.clock = path, clock
        self.lines = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self):
        try:
            while True:
                text = self.sock.recv(65536).decode(errors="replace")
                self.lines.append((self.clock.now(), text.split(": ", 1)[-1]))
        except OSError:
            return

    def close(self):
        self.sock.close()


class CtunnelKeeper:
    """ctunnel.py as cron runs it: a tick every `tick` seconds, whether the
    last one has finished or not, each with cron's environment and nothing
    on its input; what it prints is what cron would mail."""

    def __init__(self, script, run_dir, server, service_port, port, tick, check_timeout=None):
        self.script, self.run_dir, self.tick = script, run_dir, tick
        self.state_dir = os.path.join(run_dir, "state")
        self.conf = os.path.join(run_dir, "rstunnel.conf")
        keys = [("host", "127.0.0.1"), ("port", server.port), ("user", server.user),
                ("identity_file", server.user_key), ("ssh_config", server.ssh_config),
                ("remote_forward", "%d:127.0.0.1:%d" % (port, service_port)),
                ("state_dir", self.state_dir)]
        if check_timeout:
            keys.append(("check_timeout", check_timeout))
        with open(self.conf, "w") as f:
            f.write("[box]\n" + "".join("%s = %s\n" % kv for kv in keys))
        self.mail = []              # (tick's start, line it printed)
        self.ticks = []             # (start, wall seconds, exit status)
        self.running = {}           # pid -> Popen of a tick still running
        self.stopping = False
        self.lock = threading.Lock()

    def start(self, clock):
        self.clock = clock
        self.syslog = SyslogSink(os.path.join(self.run_dir, "syslog"), clock)
        self.env = {"PATH": "/usr/bin:/bin", "HOME": pwd.getpwuid(os.getuid()).pw_dir,
                    "LOGNAME": pwd.getpwuid(os.getuid()).pw_name, "SHELL": "/bin/sh",
                    "CTUNNEL_SYSLOG": self.syslog.path}
        self.thread = threading.Thread(target=self._cron, daemon=True)
        self.thread.start()

    def _cron(self):
        n = 0
        while not self.stopping:
            threading.Thread(target=self._one_tick, daemon=True).start()
            n += 1
            while not self.stopping and self.clock.now() < n * self.tick:
                time.sleep(0.05)

    def _one_tick(self):
        began = self.clock.now()
        proc = subprocess.Popen([PYTHON, self.script, "-c", self.conf], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env)
        with self.lock:
            self.running[proc.pid] = proc
        out, _ = proc.communicate()
        with self.lock:
            self.running.pop(proc.pid, None)
            self.ticks.append((began, self.clock.now() - began, proc.returncode))
            self.mail += [(began, line) for line in out.decode(errors="replace").splitlines()]

    def ssh_pid(self):
        """The PID in the tunnel's pidfile, if that ssh runs."""
        try:
            with open(os.path.join(self.state_dir, "box.pid")) as f:
                pid = int(f.readline())     # the first line; newer pidfiles say more
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def stop(self):
        """End the ticks still running (and what they started), then the tunnel's ssh."""
        self.stopping = True
        self.thread.join()
        with self.lock:
            ticks = list(self.running.values())
        for proc in ticks:
            end_all(descendants(proc.pid) + [proc.pid])
            proc.wait()
        end_all(pids_with_arg(self.state_dir))
        self.syslog.close()

    @property
    def refused(self):
        """What ctunnel said when a tick exited 2 (usage or config error), or None."""
        if any(rc == 2 for _, _, rc in self.ticks):
            return " / ".join(sorted(set(text for _, text in self.mail))[:3]) or "(silent)"
        return None

    def figures(self):
        lines = [text for _, text in self.mail]
        walls = [wall for _, wall, _ in self.ticks]
        failed = lambda text: "start failed" in text    # also "restart failed"  # noqa: E731
        return {
            "started_lines": sum("started (pid" in l for l in lines),
            "restarted_lines": sum("restarted (" in l for l in lines),
            "failed_lines": sum(failed(l) for l in lines),
            "failed_in_syslog": sum(failed(text) for _, text in self.syslog.lines),
            "ticks": len(self.ticks),
            "tick_wall_median": round(statistics.median(walls), 2) if walls else None,
            "tick_wall_max": round(max(walls), 2) if walls else None,
            "mail": ["t+%5.1f s  %s" % (t, line) for t, line in sorted(self.mail)],
            "syslog": ["t+%5.1f s  %s" % line for line in self.syslog.lines],
        }


class AutosshKeeper:
    """autossh -M 0 with ssh's keepalive: it restarts ssh whenever ssh exits."""

    def __init__(self, run_dir, server, service_port, port):
        self.log = os.path.join(run_dir, "autossh.log")
        self.forward = "127.0.0.1:%d:127.0.0.1:%d" % (port, service_port)
        self.argv = ["autossh", "-M", "0"] + server.ssh_argv(
            "-o", "ServerAliveInterval=10", "-o", "ServerAliveCountMax=3",
            "-o", "ExitOnForwardFailure=yes", "-N", "-R", self.forward, "127.0.0.1")[1:]
        self.proc = None

    def start(self, clock):
        env = dict(os.environ, AUTOSSH_GATETIME="0", AUTOSSH_LOGFILE=self.log)
        self.output = open(self.log + ".out", "w")
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=self.output,
                                     stderr=subprocess.STDOUT, env=env)

    def ssh_pid(self):
        """autossh's ssh child, if it runs (one that just ended has no argv)."""
        kids = [p for p in descendants(self.proc.pid)
                if os.path.basename((cmdline(p) or [""])[0]) == "ssh" and pid_alive(p)]
        return kids[0] if kids else None

    def stop(self):
        """autossh first: it would start a new ssh the moment its ssh ended.
        Then its ssh, also one it started meanwhile (found by the forward)."""
        if self.proc:
            kids = descendants(self.proc.pid)
            end_all([self.proc.pid])
            self.proc.wait()
            end_all(kids + pids_with_arg(self.forward))
            self.output.close()

    def figures(self):
        said = []
        for path in (self.log, self.log + ".out"):
            if os.path.exists(path):
                with open(path, errors="replace") as f:
                    said += [l.rstrip("\n") for l in f if l.strip()]
        return {"said": said, "ssh_starts": sum("starting ssh" in l for l in said)}


def make_keeper(name, run_dir, server, service, port, args):
    if name == "autossh":
        return AutosshKeeper(run_dir, server, service.port, port)
    return CtunnelKeeper(args.ctunnel, run_dir, server, service.port, port, args.tick,
                         check_timeout=30 if name == "ctunnel-30" else None)


# --- one run ----------------------------------------------------------------

def run(keeper_name, scenario, server, service, work, args):
    """One keeper on one link for args.seconds, from a cold start; its figures."""
    link = scenario.link
    port = linkemu.free_port()
    run_dir = tempfile.mkdtemp(prefix="run", dir=work)
    keeper = make_keeper(keeper_name, run_dir, server, service, port, args)
    received = service.received
    with linkemu.Emulator(link, [server.port], queue_number=0, seed=args.seed) as emu:
        clock = Clock(emu.epoch)
        sampler = bulk = None
        try:
            keeper.start(clock)
            sampler = Sampler(keeper, port, clock)
            prober = Prober(port, clock, until=args.seconds - PROBE_TIMEOUT)
            bulk = BulkUser(port, clock, BULK_START) if scenario.bulk else None
            while clock.now() < args.seconds and not emu.error:
                time.sleep(0.2)
            prober.join()
        finally:
            for part in (bulk, sampler, keeper):
                if part:
                    part.stop()
        stats = emu.stats()
    if emu.error:
        raise SystemExit("bench: the link emulator failed: %s" % emu.error)
    if getattr(keeper, "refused", None):
        raise SystemExit("bench: %s exits 2, a usage or config error, so this measures "
                         "nothing: %s" % (keeper.script, keeper.refused))
    out = summarize(link, args.seconds, prober.results, sampler, bulk)
    out.update(keeper.figures())
    out["link_stats"] = stats
    if bulk:
        out["bulk_kbit_s"] = round((service.received - received) * 8 / args.seconds / 1000, 1)
    return out


def summarize(link, seconds, probes, sampler, bulk):
    """Availability, restarts, forward up, first up, recovery after each outage, cuts.

    Availability and forward up count from the first probe that got the
    greeting: a login over a slow link takes 8-20 s for every keeper, and that
    is reported as "first up". A tunnel never up is 0 % available.
    """
    got = sorted(t for _, t in probes if t is not None)
    since = min((began for began, t in probes if t is not None), default=seconds)
    counted = [t for began, t in probes if began >= since]
    pids = sampler.pids()
    up = [listening for t, _, listening in sampler.samples if t >= since or not got]
    out = {
        "probes": len(counted),
        "available": round(sum(t is not None for t in counted) / len(counted), 3)
        if counted else 0.0,
        "available_from_cold": round(len(got) / len(probes), 3) if probes else None,
        "restarts": max(0, len(pids) - 1),
        "ssh_pids": pids,
        "forward_up": round(sum(up) / len(up), 3) if up else None,
        "first_up": round(got[0], 1) if got else None,
        "recovery": recoveries(link, seconds, got),
        "probe_log": [[round(began, 1), t if t is None else round(t, 1)]
                      for began, t in sorted(probes)],
    }
    if bulk:
        out["bulk_connections"] = [round(t, 1) for t in bulk.connections]
        out["bulk_cuts"] = [[round(t, 1), why] for t, why in bulk.cuts]
    return out


def recoveries(link, seconds, got):
    """Per outage that ended in the run: seconds from its end to the first greeting
    after it (None: none came before the next outage or the run's end)."""
    out = []
    windows = link.outages(seconds)
    for i, (start, end) in enumerate(windows):
        if end >= seconds - PROBE_TIMEOUT:
            break
        limit = windows[i + 1][0] if i + 1 < len(windows) else seconds
        after = [t for t in got if end <= t < limit]
        out.append(round(after[0] - end, 1) if after else None)
    return out


# --- printing -----------------------------------------------------------------

def pct(fraction):
    return "-" if fraction is None else "%d %%" % round(fraction * 100)


def run_line(name, r):
    """One line of a run's figures, then what its keeper said."""
    parts = ["%d restarts" % r["restarts"]]
    if "ssh_starts" in r:
        parts[0] += " (%d ssh starts)" % r["ssh_starts"]
    if "started_lines" in r:
        parts[0] += (" (lines: %d started, %d restarted, %d failed; syslog heard %d "
                     "failures; ticks took %s s median, %s s max)" % (
                         r["started_lines"], r["restarted_lines"], r["failed_lines"],
                         r["failed_in_syslog"], r["tick_wall_median"], r["tick_wall_max"]))
    parts += ["first up at %s" % _at(r["first_up"]),
              "then available %s of %d probes" % (pct(r["available"]), r["probes"]),
              "forward up %s" % pct(r["forward_up"])]
    if r["recovery"]:
        parts.append("recovery after each outage %s s" % _seconds_list(r["recovery"]))
    if "bulk_cuts" in r:
        cuts = r["bulk_cuts"]
        parts.append("bulk transfer %s (%.0f kbit/s)" % (
            "cut at " + ", ".join("%s s (%s)" % (t, why) for t, why in cuts) if cuts
            else "never cut", r["bulk_kbit_s"]))
    lines = ["  %-11s %s" % (name, "; ".join(parts))]
    said = r.get("mail", r.get("said", []))
    if said:
        what = "cron would have mailed" if "mail" in r else "autossh said"
        lines.append("              %s:" % what)
        lines += ["                %s" % line for line in said]
    return "\n".join(lines)


def _at(seconds):
    return "never" if seconds is None else "%s s" % seconds


def _seconds_list(values):
    return "[" + ", ".join("never" if v is None else "%.1f" % v for v in values) + "]"


def table(results, keepers):
    """The summary: one row per link, one column per keeper."""
    head = "| link | measured | " + " | ".join(KEEPER_TITLES[k] for k in keepers) + " |"
    rows = [head, "|" + " --- |" * (2 + len(keepers))]
    for name, entry in results.items():
        cells = [name, _measured_cell(entry["measured"])]
        for k in keepers:
            r = entry["runs"].get(k)
            cells.append(_cell(r) if r else "-")
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _measured_cell(m):
    text = "RTT %d ms, loss %s/%s" % (round(m["tcp_rtt_median"] * 1000), pct(m["loss_up"]),
                                       pct(m["loss_down"]))
    if m.get("rate_up"):
        text += ", %d kbit/s" % round(m["rate_up"] / 1000)
    if m["longest_gap"] and m["longest_gap"] > 1:
        text += ", gap %.1f s" % m["longest_gap"]
    return text


def _cell(r):
    text = "%d restarts, %s available, up %s, first up %s" % (
        r["restarts"], pct(r["available"]), pct(r["forward_up"]), _at(r["first_up"]))
    if r["recovery"]:
        text += ", back after %s s" % _seconds_list(r["recovery"])
    if "bulk_cuts" in r:
        text += ", bulk cut %dx" % len(r["bulk_cuts"]) if r["bulk_cuts"] else ", never cut"
    return text


# --- main -------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each run")
    parser.add_argument("--links", default=",".join(SCENARIOS),
                        help="links to run, comma-separated (default: all)")
    parser.add_argument("--keepers", default=",".join(KEEPERS),
                        help="keepers to run, comma-separated (default: all)")
    parser.add_argument("--tick", type=float, default=5.0,
                        help="seconds between ctunnel's ticks (cron: 60)")
    parser.add_argument("--seed", type=int, default=1, help="the link emulator's random seed")
    parser.add_argument("--ctunnel", default=CTUNNEL,
                        help="the ctunnel.py to run (default: this checkout's); e.g. one "
                             "from `git archive` while the checkout is being edited")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    args.ctunnel = os.path.abspath(args.ctunnel)
    for value, known, what in ((args.links, SCENARIOS, "link"), (args.keepers, KEEPERS, "keeper")):
        unknown = [v for v in value.split(",") if v not in known]
        if unknown:
            parser.error("unknown %s %s (known: %s)" % (what, ", ".join(unknown),
                                                       ", ".join(known)))
    if os.geteuid() != 0:
        parser.error("run as root: it makes a network namespace, iptables rules and a user")
    needed = ["sshd", "ssh", "iptables", "ip"] + (["autossh"] if "autossh" in args.keepers
                                                  else [])
    missing = [tool for tool in needed if not shutil.which(tool, path=os.environ.get(
        "PATH", "") + ":/usr/sbin:/sbin")]
    if missing:
        parser.error("missing %s (apt-get install autossh iptables iproute2 openssh-server)"
                     % ", ".join(missing))
    if any(k.startswith("ctunnel") for k in args.keepers.split(",")):
        done = subprocess.run([PYTHON, args.ctunnel, "--version"], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        if done.returncode != 0:
            parser.error("%s does not run: %s" % (args.ctunnel, (done.stderr or
                                                                 done.stdout).strip()))
    return args


def _terminate(signum, frame):
    raise KeyboardInterrupt     # SIGTERM and SIGHUP clean up as Ctrl-C does


def bench_link(name, keepers, server, service, work, args):
    """Measure one link, then run each keeper on it; print as it goes."""
    scenario = SCENARIOS[name]
    print("\n== %s: %s%s" % (name, scenario.link.describe(),
                              "; a user's bulk transfer through P" if scenario.bulk else ""))
    measured = linkemu.measure(scenario.link, seed=args.seed)
    print("   " + linkemu.format_measurement(measured), flush=True)
    entry = {"asked": scenario.link.describe(), "bulk": scenario.bulk,
             "measured": measured, "runs": {}}
    for keeper in keepers:
        entry["runs"][keeper] = run(keeper, scenario, server, service, work, args)
        print(run_line(keeper, entry["runs"][keeper]), flush=True)
    return entry


def main(argv=None):
    args = parse_args(argv)
    links, keepers = args.links.split(","), args.keepers.split(",")
    linkemu.enter_new_netns()       # first: before any thread, so that all inherit it
    become_subreaper()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _terminate)
    began = time.monotonic()
    lost, late = linkemu.prove_nfqueue()
    print("link bench: ctunnel ticks %g s apart (cron's 60 s compressed), runs of %g s, "
          "probe every %g s (greeting within %g s)" % (args.tick, args.seconds,
                                                       PROBE_EVERY, PROBE_TIMEOUT))
    print("ctunnel: %s" % args.ctunnel)
    print("nfqueue: a packet queued with no reader %s; one held 300 ms arrived after %d ms"
          % ("was lost" if lost else "PASSED", round(late * 1000)), flush=True)
    if not lost or late < 0.25:
        raise SystemExit("bench: NFQUEUE does not hold packets here: the links would be "
                         "unshaped")
    work = tempfile.mkdtemp(prefix="ctlink", dir="/tmp")
    os.chmod(work, 0o755)
    account = server = service = None
    try:
        account = ThrowawayUser(os.path.join(work, "home"))
        os.makedirs(os.path.join(work, "sshd"))
        server = SshServer(os.path.join(work, "sshd"), user=account.name,
                           extra=["ClientAliveInterval 10", "ClientAliveCountMax 3"])
        service = BoxService()
        results = collections.OrderedDict()
        for name in links:
            results[name] = bench_link(name, keepers, server, service, work, args)
        print("\n" + table(results, keepers))
        print("\n(%d s in all)" % (time.monotonic() - began))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"tick": args.tick, "seconds": args.seconds, "seed": args.seed,
                           "ctunnel": args.ctunnel, "links": results}, f, indent=1)
        return 0
    except KeyboardInterrupt:
        print("bench: interrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        clean_up(work, service, server, account)


def clean_up(work, service, server, account):
    """Undo the bench's world: sshd first (it reaps its sessions, so that the
    throwaway user has no process left), then anything else naming the work
    dir, the user, the dir. The namespace and its rules go with our exit."""
    if service:
        service.close()
    if server:
        server.stop()
    end_all(pids_with_arg(work))
    if account:
        account.remove()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
