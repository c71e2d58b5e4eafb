"""Stale sessions, black holes and held ports, against a real sshd.

The server's login is an ordinary throwaway user (make_user_server), as on
most VPSes: it cannot look into its other sshd sessions (OpenSSH makes them
undumpable), so ctunnel recognises its own by what it recorded when the
tunnel came up. Root, who sees every session, keeps tests of its own.

A black hole is an iptables DROP rule on loopback for exactly the tunnel's TCP
4-tuple (or the server's port): no reset reaches either side, as after a power
cut or a dropped DSL line. Every rule added is removed, also on failure.
"""

import json
import os
import re
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from harness import (Knocker, SshServer, Service, ThrowawayUser, client_port, connect_read,
                     descendants, free_port, pid_alive, port_accepts, wait_for)


def tick_both(first, second, ticks=3):
    """Tick the keeper (healthy and silent each time) and the second tunnel (down:
    exit 1) in turn; return what the second said each tick."""
    said = []
    for _ in range(ticks):
        a, b = first.run(), second.run()
        assert (a.returncode, a.stderr) == (0, "")
        assert b.returncode == 1
        said.append(b.stderr)
    return said


def test_a_stale_session_kept_busy_is_reclaimed_within_one_tick(make_rig, service,
                                                                 make_user_server, firewall):
    """The client's packets are dropped for good; a user keeps connecting. The
    server's ClientAlive never drops the session (each connection counts as life)."""
    drop, _ = firewall
    server = make_user_server()
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


@pytest.mark.parametrize("reclaim", ["yes", "no"])
def test_a_frozen_session_of_an_ordinary_login_is_reclaimed_within_one_tick(
        make_rig, service, make_user_server, reclaim):
    """The server's session stops (SIGSTOP): TCP stays up, nothing answers; the client's
    keepalive gives up, its FIN is never answered. Only the session that this tunnel
    recorded is ended, and only with reclaim = yes."""
    server = make_user_server()
    rig = make_rig(server)
    remote, _ = rig.start_reverse(service, server_alive_interval=1, server_alive_count_max=2,
                                  check_timeout=2, reclaim=reclaim)
    session = json.load(open(rig.path("pi", "state")))["session"]
    assert session["pid"] in descendants(server.proc.pid)
    assert session["uid"] == server.account.uid
    old = rig.pid()
    sessions = descendants(server.proc.pid)
    try:
        for pid in sessions:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: not pid_alive(old), what="ssh keepalive to give up")
        gone = "process %d gone; ssh said: Timeout, server 127.0.0.1 not responding." % old
        tick = rig.run()
        (line,) = tick.stderr.splitlines()
        if reclaim == "yes":
            assert tick.returncode == 0, line
            assert line.endswith("pi: reclaimed port %d from a stale session (server pid %d, up "
                                 "since %s), restarted (%s)" % (
                                     remote, session["pid"], time.strftime("%H:%M"), gone)) \
                or re.search(r"reclaimed port %d from a stale session \(server pid %d, up since "
                             r"\d\d:\d\d\), restarted" % (remote, session["pid"]), line), line
            wait_for(lambda: not pid_alive(session["pid"]), what="the stale session to end")
            assert connect_read(remote) == service.greeting
        else:
            assert tick.returncode == 1
            assert "a stale session holds port %d (server pid %d" % (remote, session["pid"]) \
                in line and "reclaim = no: waiting for the server to drop it" in line, line
            assert all(pid_alive(p) for p in sessions)
    finally:
        for pid in sessions:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass


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
        said = tick_both(first, second)
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


def test_a_second_box_of_an_ordinary_login_never_fights_for_the_port(make_user_server,
                                                                      make_rig):
    """A cloned SD card, against a login that cannot look into its sessions: the second
    box knows the port is not its own session's, says so once, and ends nothing."""
    server = make_user_server()
    first_service, second_service = Service(b"first box\n"), Service(b"second box\n")
    try:
        first, second = make_rig(server), make_rig(server)
        remote = free_port()
        for rig, svc in ((first, first_service), (second, second_service)):
            rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, svc.port),
                             check_timeout=2)
        assert first.run().returncode == 0
        keeper, sessions = first.pid(), descendants(server.proc.pid)
        said = tick_both(first, second)
        assert "remote port forwarding failed for listen port %d (port %d on the server is " \
            "held by another client of this login, or another program of this user (not by " \
            "this tunnel's own session" % (remote, remote) in said[0], said[0]
        assert "policy" not in said[0]
        assert said[1:] == ["", ""]                    # cron mail: once, then hourly
        assert first.pid() == keeper and second.ssh_pids() == []
        assert all(pid_alive(p) for p in sessions)
        assert connect_read(remote) == b"first box\n"
    finally:
        first_service.close()
        second_service.close()


def test_a_port_another_program_holds_is_named_so_to_an_ordinary_login(make_user_server,
                                                                      make_rig, service):
    remote = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", remote))
    squatter.listen(1)
    try:
        rig = make_rig(make_user_server())
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                         check_timeout=2)
        tick = rig.run()
        assert tick.returncode == 1
        assert "(port %d on the server is held by another program or another user (uid 0))" \
            % remote in tick.stderr, tick.stderr
    finally:
        squatter.close()


def test_a_port_below_1024_is_only_roots(make_user_server, make_rig, service):
    server = make_user_server()
    rig = make_rig(server)
    rig.write_config(remote_forward="922:127.0.0.1:%d" % service.port, check_timeout=2)
    tick = rig.run()
    assert tick.returncode == 1
    assert "remote port forwarding failed for listen port 922 (only root may listen below " \
        "1024 on the server, and this tunnel logs in as %s: use a port from 1024 up)" \
        % server.user in tick.stderr, tick.stderr


@pytest.mark.parametrize("gateway_ports", ["no", "clientspecified"])
def test_a_wide_bind_the_server_narrowed_to_loopback_is_a_warning_once(
        make_user_server, make_rig, service, gateway_ports):
    server = make_user_server(extra=["GatewayPorts %s" % gateway_ports])
    rig = make_rig(server)
    remote = free_port()
    rig.write_config(remote_forward="0.0.0.0:%d:127.0.0.1:%d" % (remote, service.port),
                     check_timeout=2)
    first = rig.run()
    assert first.returncode == 0, first.stderr
    note = ("pi: remote forward 0.0.0.0:%d:127.0.0.1:%d: the server bound it to its loopback "
            "only (127.0.0.1 and ::1): set GatewayPorts clientspecified in its sshd_config "
            "(not restarting)" % (remote, service.port))
    assert (note in first.stderr) == (gateway_ports == "no"), first.stderr
    again = rig.run()
    assert (again.returncode, again.stderr) == (0, "")
    status = rig.run("status")
    assert ("note: remote forward 0.0.0.0:%d" % remote in status.stdout) == \
        (gateway_ports == "no")


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


def test_another_users_stale_session_is_never_ended(make_rig, service, make_user_server,
                                                    firewall):
    """Another login on the server holds our port from a dead client: not ours to end."""
    drop, _ = firewall
    top = tempfile.mkdtemp(prefix="cto", dir="/tmp")
    os.chmod(top, 0o755)
    other = ThrowawayUser(os.path.join(top, "home"))
    server = make_user_server()
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
        assert "port %d on the server is held by another program or another user (uid %d)" \
            % (remote, other.uid) in tick.stderr, tick.stderr
        assert all(pid_alive(p) for p in session)
    finally:
        if theirs and theirs.poll() is None:
            theirs.kill()
            theirs.wait()
        server.stop()
        other.remove()
        subprocess.run(["rm", "-rf", top])
