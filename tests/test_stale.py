"""Stale sessions, black holes and refused ports, against a real sshd.

A black hole is an iptables DROP rule on loopback for exactly the tunnel's TCP
4-tuple (or the server's port): no reset reaches either side, as after a power
cut or a dropped DSL line. Every rule added is removed, also on failure.
"""

import os
import re
import socket
import subprocess
import tempfile
import threading
import time

import pytest

from harness import (SshServer, Service, ThrowawayUser, connect_read, descendants,
                      free_port, pid_alive, port_accepts, wait_for)

from ctunnellib import procfs, tcp


@pytest.fixture
def firewall():
    """drop(*match) adds an INPUT DROP rule on loopback; lift(rule) removes it."""
    rules = []

    def drop(*match):
        rule = ["-i", "lo", "-p", "tcp"] + list(match) + \
            ["-m", "comment", "--comment", "ctunnel-test-%d" % os.getpid(), "-j", "DROP"]
        subprocess.run(["iptables", "-w", "-I", "INPUT"] + rule, check=True)
        rules.append(rule)
        return rule

    def lift(rule):
        subprocess.run(["iptables", "-w", "-D", "INPUT"] + rule, check=True)
        rules.remove(rule)
    yield drop, lift
    for rule in rules:
        subprocess.run(["iptables", "-w", "-D", "INPUT"] + rule)


def client_port(pid, server_port):
    """The local port of pid's TCP connection to the server."""
    inodes = procfs.socket_inodes(pid)
    for sock in tcp.TcpTable().connections(inodes, server_port, tcp.FAMILIES, time.monotonic()):
        return sock.local_port
    raise AssertionError("pid %d has no connection to port %d" % (pid, server_port))


class Knocker:
    """A user's client retrying the reverse port every 0.5 s (keeps a stale session busy)."""

    def __init__(self, port):
        self.port, self.running = port, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.4).close()
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self):
        self.running = False
        self.thread.join()


def test_a_stale_session_kept_busy_is_reclaimed_within_one_tick(make_rig, service, tmp_path,
                                                                 firewall):
    """The client's packets are dropped for good; a user keeps connecting. The
    server's ClientAlive never drops the session (each connection counts as life)."""
    drop, _ = firewall
    server = SshServer(str(tmp_path))
    knocker = None
    try:
        rig = make_rig(server)
        remote, _ = rig.start_reverse(service, server_alive_interval=1,
                                  server_alive_count_max=2, check_timeout=2)
        old = rig.pid()
        stale = [p for p in descendants(server.proc.pid) if pid_alive(p)]
        drop("-s", "127.0.0.1", "--sport", str(client_port(old, server.port)),
             "-d", "127.0.0.1", "--dport", str(server.port))
        knocker = Knocker(remote)
        wait_for(lambda: not pid_alive(old), what="the client's keepalive to give up")
        gave_up = time.monotonic()
        tick = rig.run()
        took = time.monotonic() - gave_up
        assert tick.returncode == 0, tick.stderr
        (line,) = tick.stderr.splitlines()
        m = re.search(r"pi: reclaimed port %d from a stale session \(server pid (\d+), up since "
                      r"\d\d:\d\d\), restarted \(process %d gone" % (remote, old), line)
        assert m, line
        assert int(m.group(1)) in stale
        assert took < 4 * 2 + 2 * 2, "back %.1fs after the keepalive gave up" % took
        knocker.stop()
        assert connect_read(remote) == service.greeting
    finally:
        if knocker:
            knocker.stop()
        server.stop()


def test_a_line_black_holed_for_20s_is_back_one_tick_after_it_returns(make_rig, service,
                                                                       tmp_path, firewall):
    drop, lift = firewall
    server = SshServer(str(tmp_path))
    try:
        rig = make_rig(server)
        remote, _ = rig.start_reverse(service, server_alive_interval=1,
                                  server_alive_count_max=2, check_timeout=2)
        rules = [drop("--dport", str(server.port)), drop("--sport", str(server.port))]
        began = time.monotonic()
        while time.monotonic() - began < 20:          # cron ticks every 5 s meanwhile
            tick = rig.run()
            assert tick.returncode == 1 and "Traceback" not in tick.stderr
            time.sleep(max(0.0, 5 - (time.monotonic() - began) % 5))
        for rule in rules:
            lift(rule)
        tick = rig.run()                               # the first tick after it returns
        assert tick.returncode == 0, tick.stderr
        assert connect_read(remote) == service.greeting
    finally:
        server.stop()


def test_two_live_boxes_with_one_port_never_fight(sshd, make_rig):
    """A cloned SD card: the first keeps the port; the second says who holds it, once
    (then hourly), and exits 1. Six alternating ticks."""
    first_service, second_service = Service(b"first box\n"), Service(b"second box\n")
    try:
        first, second = make_rig(sshd), make_rig(sshd)
        remote = free_port()
        first.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, first_service.port),
                           check_timeout=2)
        second.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, second_service.port),
                            check_timeout=2)
        assert first.run().returncode == 0
        keeper = first.pid()
        said = []
        for _ in range(3):
            a, b = first.run(), second.run()
            assert (a.returncode, a.stderr) == (0, "")
            assert b.returncode == 1
            said.append(b.stderr)
        assert re.search(r"pi: start failed: Error: remote port forwarding failed for listen "
                         r"port %d \(port %d is held by another live client of this login "
                         r"\(server pid \d+, up since \d\d:\d\d, from 127\.0\.0\.1:\d+\): "
                         r"leaving it alone\)" % (remote, remote), said[0]), said[0]
        assert said[1:] == ["", ""]                    # cron mail: once, then hourly
        status = second.run("status")
        assert "held by another live client" in status.stdout
        assert first.pid() == keeper and second.ssh_pids() == []
        assert connect_read(remote) == b"first box\n"
    finally:
        first_service.close()
        second_service.close()


def test_a_forced_command_key_says_what_the_server_needs(make_rig, service, tmp_path):
    remote = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", remote))
    squatter.listen(1)
    server = SshServer(str(tmp_path), key_options='command="/bin/false"')
    try:
        rig = make_rig(server)
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                         check_timeout=2)
        tick = rig.run()
        assert tick.returncode == 1
        assert ("something on the server holds 127.0.0.1:%d, and ctunnel cannot look for a "
                "stale session there (a forced command on the key" % remote) in tick.stderr
        assert "set ClientAliveInterval 10" in tick.stderr
        again = rig.run()
        assert (again.returncode, again.stderr) == (1, "")   # said once, tried every tick
    finally:
        squatter.close()
        server.stop()


def test_another_users_stale_session_is_never_ended(make_rig, service, tmp_path, firewall):
    """Another login on the server holds our port from a dead client: not ours to end."""
    drop, _ = firewall
    top = tempfile.mkdtemp(prefix="cto", dir="/tmp")
    os.chmod(top, 0o755)
    other = ThrowawayUser(os.path.join(top, "home"))
    os.makedirs(os.path.join(top, "sshd"))       # sshd reads authorized_keys as that user
    server = SshServer(os.path.join(top, "sshd"))
    theirs = None
    try:
        remote = free_port()
        # ssh keeps the first -l it is given: not server.ssh_argv, which names ours
        theirs = subprocess.Popen(["ssh", "-F", server.ssh_config, "-p", str(server.port),
                                   "-l", other.name, "-i", server.user_key, "-o", "BatchMode=yes",
                                   "-o", "ExitOnForwardFailure=yes", "-N", "-R",
                                   "127.0.0.1:%d:127.0.0.1:%d" % (remote, service.port),
                                   "127.0.0.1"],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_accepts(remote), what="their forward")
        session = [p for p in descendants(server.proc.pid)
                   if os.stat("/proc/%d" % p).st_uid == other.uid]
        assert session, "no session of the other user"
        drop("-s", "127.0.0.1", "--sport", str(client_port(theirs.pid, server.port)),
             "-d", "127.0.0.1", "--dport", str(server.port))
        theirs.kill()                                  # its goodbye is dropped: stale
        theirs.wait()
        rig = make_rig(server)
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                         check_timeout=2)
        tick = rig.run()
        assert tick.returncode == 1
        assert "port %d on the server is held by another program or another user" % remote \
            in tick.stderr
        assert all(pid_alive(p) for p in session)
    finally:
        if theirs and theirs.poll() is None:
            theirs.kill()
            theirs.wait()
        server.stop()
        other.remove()
        subprocess.run(["rm", "-rf", top])
