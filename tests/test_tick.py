"""End to end: ctunnel.py ticks against a real sshd on 127.0.0.1.

"The server side" of a reverse forward is 127.0.0.1:R on this machine, where
the test sshd listens for it: bytes read there came through the tunnel.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

from harness import (SshServer, ctunnel_argv, install_copy, connect_read, descendants, free_port,
                      pid_alive, port_accepts, wait_for)


def test_first_tick_launches_and_bytes_flow_through_the_server(rig, service):
    remote, first = rig.start_reverse(service)
    assert "pi: started (pid %d)" % rig.pid() in first.stderr
    assert len(first.stderr.splitlines()) == 1
    assert connect_read(remote) == service.greeting
    assert rig.ssh_pids() == [rig.pid()]


def test_healthy_tick_is_silent_and_keeps_the_pid(rig, service):
    remote, _ = rig.start_reverse(service)
    pid = rig.pid()
    again = rig.run()
    assert (again.returncode, again.stdout, again.stderr) == (0, "", "")
    assert rig.pid() == pid and rig.ssh_pids() == [pid]
    assert connect_read(remote) == service.greeting


def test_killed_ssh_is_relaunched(rig, service):
    remote, _ = rig.start_reverse(service)
    old = rig.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="ssh to die")
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert "pi: restarted (process %d gone)" % old in tick.stderr
    assert rig.pid() != old
    assert connect_read(remote) == service.greeting


def test_hung_ssh_is_caught_within_the_timeout_and_replaced(rig, service):
    remote, _ = rig.start_reverse(service, check_timeout=2)
    old = rig.pid()
    os.kill(old, signal.SIGSTOP)
    began = time.monotonic()
    tick = rig.run()
    took = time.monotonic() - began
    assert tick.returncode == 0, tick.stderr
    assert "restarted (control master did not answer within 2s: hung)" in tick.stderr
    # one check_timeout for the verdict, a kill grace, and a launch on loopback
    assert took < 2 + 2 + 4, "tick took %.1fs" % took
    assert not pid_alive(old)
    assert rig.ssh_pids() == [rig.pid()]
    assert connect_read(remote) == service.greeting


def test_vanished_reverse_listener_is_caught_on_the_server(rig, service, sshd):
    remote, _ = rig.start_reverse(service)
    old = rig.pid()
    spec = "127.0.0.1:%d:127.0.0.1:%d" % (remote, service.port)   # as ctunnel sent it
    subprocess.run(sshd.ssh_argv("-S", rig.path("pi", "ctl"), "-O", "cancel",
                                 "-R", spec, "127.0.0.1"), check=True, capture_output=True)
    wait_for(lambda: not port_accepts(remote), what="the server to drop the listener")
    assert pid_alive(old)          # ssh lives on: only the remote check can tell
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert "restarted (remote forward %d: no listener on the server at 127.0.0.1:%d)" \
        % (remote, remote) in tick.stderr
    assert not pid_alive(old)
    assert connect_read(remote) == service.greeting


def test_local_forward_to_a_silent_service_counts_as_up(rig, silent_service):
    local = free_port()
    rig.write_config(local_forward="%d:127.0.0.1:%d" % (local, silent_service.port))
    assert rig.run().returncode == 0
    pid = rig.pid()
    # the far end accepts and never speaks: `timeout 3 nc` would exit 124 here
    with socket.create_connection(("127.0.0.1", local), timeout=3) as s:
        s.settimeout(1)
        try:
            assert s.recv(1) == b"", "silent service spoke"
        except socket.timeout:
            pass
    again = rig.run("-v")
    assert again.returncode == 0
    assert "local forward %d UP" % local in again.stderr
    assert "restart" not in again.stderr and rig.pid() == pid


def test_server_without_nc_is_checked_through_the_data_path(sshd_without_nc, make_rig,
                                                            service):
    rig = make_rig(sshd_without_nc)
    remote, first = rig.start_reverse(service)
    assert len(first.stderr.splitlines()) == 1 and "started" in first.stderr
    status = json.loads(rig.run("status", "--json").stdout)["tunnels"][0]
    assert status["checks"][-1]["verdict"] == "UP"
    assert re.match(r"data path 127\.0\.0\.1:%d -> box 127\.0\.0\.1:%d proven in \d+ ms$"
                    % (remote, service.port), status["checks"][-1]["detail"])
    assert connect_read(remote) == service.greeting


def test_pidfile_naming_an_unrelated_process_never_harms_it(rig, service):
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    os.makedirs(os.path.dirname(rig.path("pi", "pid")), exist_ok=True)
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        with open(rig.path("pi", "pid"), "w") as f:
            f.write("%d\n" % bystander.pid)
        tick = rig.run()
        assert tick.returncode == 0, tick.stderr
        assert "not this tunnel's ssh" in tick.stderr
        assert bystander.poll() is None and pid_alive(bystander.pid)
        assert rig.pid() != bystander.pid
        assert connect_read(remote) == service.greeting
    finally:
        bystander.kill()
        bystander.wait()


def test_simultaneous_ticks_launch_exactly_one_ssh(rig, service):
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    ticks = [subprocess.Popen(ctunnel_argv("-c", rig.conf),
                              stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(4)]
    results = [(t.wait(timeout=60), t.stderr.read()) for t in ticks]
    for t in ticks:
        t.stderr.close()
    assert [rc for rc, _ in results] == [0, 0, 0, 0], results
    assert sum(err.count("started") for _, err in results) == 1, results
    assert rig.ssh_pids() == [rig.pid()]
    assert connect_read(remote) == service.greeting


def test_stop_and_status_tell_the_truth(rig, service):
    remote = free_port()
    local = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                     local_forward="%d:127.0.0.1:%d" % (local, service.port))
    before = rig.run("status", "--json")
    assert before.returncode == 1
    record = json.loads(before.stdout)["tunnels"][0]
    assert (record["name"], record["healthy"], record["pid"]) == ("pi", False, None)
    assert record["checks"] == [{"check": "process", "verdict": "DOWN",
                                 "detail": "not running"}]

    assert rig.run().returncode == 0
    pid = rig.pid()
    up = rig.run("status", "--json")
    assert up.returncode == 0
    record = json.loads(up.stdout)["tunnels"][0]
    assert (record["healthy"], record["pid"]) == (True, pid)
    assert record["forwards"] == ["-R %d:127.0.0.1:%d" % (remote, service.port),
                                  "-L %d:127.0.0.1:%d" % (local, service.port)]
    assert [c["verdict"] for c in record["checks"]] == ["UP"] * 4
    assert isinstance(record["uptime"], int)
    human = rig.run("status")
    assert human.returncode == 0 and "pi: healthy, pid %d" % pid in human.stdout
    assert human.stdout.startswith("config %s\n" % rig.conf)
    assert "  state_dir %s\n" % os.path.join(rig.state_dir, "state") in human.stdout
    assert re.search(r"\n  started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d\n", human.stdout), human.stdout
    assert "not running" not in human.stdout

    stop = rig.run("stop")
    assert stop.returncode == 0
    assert "pi: stopped (pid %d)" % pid in stop.stderr
    wait_for(lambda: not pid_alive(pid), what="ssh to end")
    assert not os.path.exists(rig.path("pi", "pid"))
    assert not os.path.exists(rig.path("pi", "ctl"))
    assert not port_accepts(local)
    after = json.loads(rig.run("status", "--json").stdout)["tunnels"][0]
    assert (after["healthy"], after["pid"]) == (False, None)
    assert re.match(r"stopped by `ctunnel.py stop` at [-0-9: ]+; the next tick starts it again$",
                    after["checks"][0]["detail"]), after["checks"][0]
    assert rig.ssh_pids() == []
    restart = rig.run()
    assert "pi: started (pid" in restart.stderr
    assert "stopped by" not in rig.run("status").stdout


def test_tick_runs_under_crons_bare_environment(rig, service, tmp_path):
    """The crontab line: no arguments, no PATH but /usr/bin:/bin, config beside the script."""
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                     ssh="ssh")
    install = tmp_path / "opt"
    install.mkdir()
    script = install_copy(str(install))
    os.rename(rig.conf, str(install / "rstunnel.conf"))
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    tick = subprocess.run([str(script)], env=env, cwd=str(tmp_path), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert tick.returncode == 0, tick.stderr
    assert "pi: started" in tick.stderr
    assert connect_read(remote) == service.greeting
    again = subprocess.run([str(script)], env=env, capture_output=True, text=True,
                           stdin=subprocess.DEVNULL, timeout=60)
    assert (again.returncode, again.stderr) == (0, "")


def test_launch_failure_reports_sshs_own_reason_once_then_hourly(rig, service, tmp_path):
    # Another program holds the server's port, on both loopback addresses.
    remote = free_port()
    squatters = [socket.socket(family) for family in (socket.AF_INET, socket.AF_INET6)]
    for squatter, address in zip(squatters, ("127.0.0.1", "::1")):
        squatter.bind((address, remote))
        squatter.listen(1)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "log"))
    sink.settimeout(5)
    env = dict(os.environ, CTUNNEL_SYSLOG=str(tmp_path / "log"))
    try:
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
        tick = rig.run(env=env)
        assert tick.returncode == 1
        lines = tick.stderr.splitlines()
        assert len(lines) == 1, lines
        assert "pi: start failed: Error: remote port forwarding failed for listen port %d" \
            % remote in lines[0]
        assert "held by another program or another user" in lines[0]
        assert rig.ssh_pids() == []
        assert "start failed" in sink.recv(4096).decode()

        # the same failure a minute later: syslog hears it, cron does not mail it again
        again = rig.run(env=env)
        assert (again.returncode, again.stderr) == (1, "")
        assert sink.recv(4096).decode().endswith("(2 failed attempts)")
        # an hour on, it is said again
        state = json.load(open(rig.path("pi", "state")))
        state["failure_said"] -= 3600
        json.dump(state, open(rig.path("pi", "state"), "w"))
        hourly = rig.run(env=env)
        assert hourly.returncode == 1 and "(3 failed attempts)" in hourly.stderr
    finally:
        for squatter in squatters:
            squatter.close()
        sink.close()
    # once the port is free again, the next tick brings the tunnel up, and says so
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert re.search(r"pi: started \(pid \d+\) after 3 failed attempts$", tick.stderr.strip())
    assert connect_read(remote) == service.greeting
    assert "last_failure" not in json.load(open(rig.path("pi", "state")))


def test_refused_key_is_reported(rig, service, tmp_path):
    stranger = str(tmp_path / "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], check=True)
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port),
                     identity_file=stranger)
    tick = rig.run()
    assert tick.returncode == 1
    assert "Permission denied (publickey)" in tick.stderr
    assert len(tick.stderr.splitlines()) == 1


def test_events_reach_syslog(rig, service, tmp_path):
    log_path = str(tmp_path / "log")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(log_path)
    sink.settimeout(5)
    try:
        remote = free_port()
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
        env = dict(os.environ, CTUNNEL_SYSLOG=log_path)
        tick = rig.run(env=env)
        assert tick.returncode == 0
        message = sink.recv(4096).decode()
        assert message.startswith("<13>ctunnel[")       # user.notice
        assert message.endswith("pi: started (pid %d)" % rig.pid())
    finally:
        sink.close()


@pytest.mark.parametrize("reclaim", ["yes", "no"])
def test_server_gone_silent_without_rst(make_rig, service, tmp_path, reclaim):
    """The power cut of the seeds: no RST, and a stale session holds the port.

    Stopping the server's session process makes the server silent: TCP stays
    up, nothing answers. The client's keepalive gives up and its FIN is never
    answered; the server still holds the reverse port. With reclaim = yes the
    next tick ends that session and starts the tunnel; with no, it waits.
    """
    server = SshServer(str(tmp_path))
    try:
        rig = make_rig(server)
        remote, _ = rig.start_reverse(service, server_alive_interval=1,
                                  server_alive_count_max=2, check_timeout=2, reclaim=reclaim)
        old = rig.pid()
        sessions = descendants(server.proc.pid)
        for pid in sessions:
            os.kill(pid, signal.SIGSTOP)
        wait_for(lambda: not pid_alive(old), what="ssh keepalive to give up")
        assert port_accepts(remote)        # the stale session still listens

        tick = rig.run()
        (line,) = tick.stderr.splitlines()
        gone = "process %d gone; ssh said: Timeout, server 127.0.0.1 not responding." % old
        if reclaim == "yes":
            assert tick.returncode == 0, line
            m = re.search(r"pi: reclaimed port %d from a stale session \(server pid (\d+), up "
                          r"since \d\d:\d\d\), restarted \(%s\)$" % (remote, re.escape(gone)),
                          line)
            assert m, line
            assert int(m.group(1)) in sessions
            wait_for(lambda: not pid_alive(int(m.group(1))), what="the stale session to end")
            assert connect_read(remote) == service.greeting
            return
        assert tick.returncode == 1
        assert re.search(r"pi: restart failed \(%s\): Error: remote port forwarding failed for "
                         r"listen port %d \(a stale session holds port %d \(server pid \d+, "
                         r"up since \d\d:\d\d\); reclaim = no: waiting for the server to drop "
                         r"it\)" % (re.escape(gone), remote, remote), line), line
        assert all(pid_alive(p) for p in sessions)        # nothing was ended

        for pid in sessions:               # the server notices and drops it
            os.kill(pid, signal.SIGCONT)
        wait_for(lambda: not port_accepts(remote), what="the stale session to end")
        tick = rig.run()
        assert tick.returncode == 0, tick.stderr
        # one outage, one story: still the restart, for the reason it went down
        assert "pi: restarted (%s) after 1 failed attempt\n" % gone in tick.stderr
        state = json.load(open(rig.path("pi", "state")))
        assert (state["restarts"], state["last_reason"]) == (1, gone)
        assert connect_read(remote) == service.greeting
    finally:
        server.stop()


def test_lost_pidfile_is_adopted_not_doubled(rig, service):
    """A running master whose pidfile is gone (a full disk at launch, a cleaner) is
    found by its control socket and adopted: no second ssh fights for the port."""
    remote, _ = rig.start_reverse(service)
    old = rig.pid()
    os.unlink(rig.path("pi", "pid"))
    tick = rig.run("-v")
    assert tick.returncode == 0, tick.stderr
    assert "process UP (pid %d, adopted (it had no pidfile))" % old in tick.stderr
    assert rig.pid() == old and rig.ssh_pids() == [old]
    assert "restart" not in tick.stderr
    assert connect_read(remote) == service.greeting


def test_restricted_key_line_from_the_readme_allows_the_tunnel_and_its_check(
        make_rig, service, tmp_path):
    """restrict,port-forwarding,permitlisten=...: the tunnel and its check work,
    and a forward to any other port is refused."""
    remote = free_port()
    server = SshServer(str(tmp_path), key_options='restrict,port-forwarding,'
                       'permitlisten="127.0.0.1:%d"' % remote)
    try:
        rig = make_rig(server)
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
        tick = rig.run("-v")
        assert tick.returncode == 0, tick.stderr
        assert "remote forward %d UP (data path 127.0.0.1:%d" % (remote, remote) in tick.stderr
        assert connect_read(remote) == service.greeting

        other = free_port()
        rig.write_config(name="other",
                         remote_forward="%d:127.0.0.1:%d" % (other, service.port))
        refused = rig.run()
        assert refused.returncode == 1
        assert "remote port forwarding failed for listen port %d" % other in refused.stderr
    finally:
        server.stop()


def test_unreachable_servers_do_not_hold_up_the_others(rig, silent_service, service):
    """Three servers that accept TCP and never speak; one good one. ssh gives each the
    connect time (4 x check_timeout: a slow link needs it). In sequence the three would
    take three of those; checked at the same time, about one."""
    good = free_port()
    with open(rig.conf, "w") as f:
        f.write("[DEFAULT]\nhost = 127.0.0.1\nuser = %s\nidentity_file = %s\n"
                "ssh_config = %s\nstate_dir = %s\ncheck_timeout = 2\n\n"
                % (rig.server.user, rig.server.user_key, rig.server.ssh_config,
                   os.path.join(rig.state_dir, "state")))
        f.write("[good]\nport = %d\nremote_forward = %d:127.0.0.1:%d\n\n"
                % (rig.server.port, good, service.port))
        for name in ("dead1", "dead2", "dead3"):
            f.write("[%s]\nport = %d\nremote_forward = %d:127.0.0.1:22\n\n"
                    % (name, silent_service.port, free_port()))
    began = time.monotonic()
    tick = rig.run()
    took = time.monotonic() - began
    assert tick.returncode == 1
    lines = tick.stderr.splitlines()
    assert len(lines) == 4, lines
    assert sum("good: started" in l for l in lines) == 1
    for name in ("dead1", "dead2", "dead3"):
        assert any(re.search(r"%s: start failed: the server did not answer before the login "
                             r"\(Connection to 127.0.0.1 port \d+ timed out\)" % name, l)
                   for l in lines), lines
    assert took < 4 * 2 + 2.5, "tick took %.1fs: tunnels were not checked at the same time" \
        % took
    assert connect_read(good) == service.greeting


def test_server_refusing_command_sessions_is_still_proven(make_rig, service, tmp_path):
    """MaxSessions 0: no command may run (nc could not), but the channel still can."""
    server = SshServer(str(tmp_path), extra=["MaxSessions 0"])
    try:
        rig = make_rig(server)
        remote, first = rig.start_reverse(service)
        assert len(first.stderr.splitlines()) == 1
        pid = rig.pid()
        again = rig.run("-v")
        assert again.returncode == 0
        assert "remote forward %d UP (data path" % remote in again.stderr
        assert rig.pid() == pid
        assert connect_read(remote) == service.greeting
    finally:
        server.stop()


def test_quiet_hides_successes_but_never_failures(rig, service):
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    quiet = rig.run("-q")
    assert (quiet.returncode, quiet.stderr) == (0, "")
    assert connect_read(remote) == service.greeting
    assert rig.run("-q", "stop").stderr == ""
    stranger = os.path.join(rig.state_dir, "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], check=True)
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                     identity_file=stranger)
    broken = rig.run("-q")
    assert broken.returncode == 1
    assert "pi: start failed: " in broken.stderr and "Permission denied" in broken.stderr


def test_ssh_options_reach_ssh_and_an_unknown_host_key_is_explained(rig, service, tmp_path):
    """ssh_options come after ctunnel's own options but before ssh_config, so they
    win over it: an empty known_hosts makes the server's key unknown."""
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port),
                     ssh_options=["UserKnownHostsFile=%s" % empty, "Compression=yes"])
    tick = rig.run()
    assert tick.returncode == 1
    (line,) = tick.stderr.splitlines()
    assert "pi: start failed: Host key verification failed." in line
    assert "accept it by logging in once by hand: ssh -p %d %s@127.0.0.1" % (
        rig.server.port, rig.server.user) in line
    assert rig.ssh_pids() == []
    assert empty.read_text() == ""           # host-key checking was never turned off


def launch_failure(rig, service, **keys):
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port), **keys)
    tick = rig.run()
    assert tick.returncode == 1
    (line,) = tick.stderr.splitlines()
    assert rig.ssh_pids() == []
    return line


def test_a_key_others_can_read_is_named_with_the_fix(rig, service, tmp_path):
    key = str(tmp_path / "key")
    shutil.copy(rig.server.user_key, key)
    os.chmod(key, 0o644)
    line = launch_failure(rig, service, identity_file=key)
    assert "ssh ignores the key %s because others may read it: chmod 600 %s" % (key, key) \
        in line


def test_a_key_with_a_passphrase_is_named(rig, service, tmp_path):
    key = str(tmp_path / "key")
    shutil.copy(rig.server.user_key, key)
    subprocess.run(["ssh-keygen", "-q", "-p", "-P", "", "-N", "secret", "-f", key], check=True)
    line = launch_failure(rig, service, identity_file=key)
    assert "Permission denied" in line and "has a passphrase, which cron cannot type" in line


def test_a_wrong_user_is_named(rig, service):
    line = launch_failure(rig, service, user="nosuchuser")
    assert "the server refused the key for nosuchuser: check user" in line


def test_a_changed_host_key_is_loud_and_never_accepted(rig, service, tmp_path):
    other = str(tmp_path / "other_host_key")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", other], check=True)
    known = str(tmp_path / "known_hosts")
    with open(other + ".pub") as f:
        kind, data = f.read().split()[:2]
    with open(known, "w") as f:
        f.write("[127.0.0.1]:%d %s %s\n" % (rig.server.port, kind, data))
    line = launch_failure(rig, service, ssh_options=["UserKnownHostsFile=%s" % known])
    assert "host key has CHANGED since it was accepted: this may be an attack" in line
    assert "ssh-keygen -R '[127.0.0.1]:%d'" % rig.server.port in line
    with open(known) as f:
        assert f.read() == "[127.0.0.1]:%d %s %s\n" % (rig.server.port, kind, data)


def test_a_program_that_is_not_ssh_is_named(rig, service):
    line = launch_failure(rig, service, ssh="/bin/ls")
    assert "/bin/ls is not OpenSSH's ssh client" in line


def test_at_a_terminal_every_failure_is_printed(rig, service):
    """The hourly de-duplication is for cron mail; a person at a terminal sees each one."""
    import pty
    stranger = os.path.join(rig.state_dir, "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger], check=True)
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port),
                     identity_file=stranger)
    for attempt in (1, 2):
        master, slave = pty.openpty()
        try:
            tick = subprocess.run(ctunnel_argv("-c", rig.conf),
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=slave, timeout=60)
            os.close(slave)
            said = b""
            while True:
                try:
                    chunk = os.read(master, 4096)
                except OSError:
                    break
                if not chunk:
                    break
                said += chunk
        finally:
            os.close(master)
        assert tick.returncode == 1
        assert b"pi: start failed" in said and b"Permission denied" in said, (attempt, said)
    # without a terminal, the same failure again is not printed (cron mail)
    assert rig.run().stderr == ""


def test_a_bad_section_does_not_stop_the_good_tunnels(rig, service):
    """A typo in [new-one]: reported every tick with exit 2, while pi is still
    started, repaired and stoppable."""
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    with open(rig.conf, "a") as f:
        f.write("\n[new-one]\nhost = 127.0.0.1\nremote_forward = 1122-127.0.0.1-22\n")
    bad = '[new-one]: remote_forward "1122-127.0.0.1-22" is not [bind:]port:host:hostport'
    first = rig.run()
    assert first.returncode == 2
    lines = first.stderr.splitlines()
    assert len(lines) == 2 and lines[0] == "ctunnel: %s %s" % (rig.conf, bad)
    assert "pi: started" in lines[1]
    assert connect_read(remote) == service.greeting
    old = rig.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="ssh to die")
    again = rig.run()
    assert again.returncode == 2 and bad in again.stderr          # said every tick
    assert "pi: restarted (process %d gone" % old in again.stderr
    assert connect_read(remote) == service.greeting
    status = rig.run("status", "pi")
    assert status.returncode == 2 and "pi: healthy" in status.stdout
    assert rig.run("status", "new-one").stdout == ""
    stop = rig.run("stop", "pi")
    assert stop.returncode == 2 and "pi: stopped" in stop.stderr
    assert rig.ssh_pids() == []


@pytest.mark.parametrize("policy", ["permitlisten for another port", "AllowTcpForwarding local"])
def test_a_port_refused_by_policy_is_named_as_policy(make_rig, service, tmp_path, policy):
    remote = free_port()
    if policy.startswith("permitlisten"):
        server = SshServer(str(tmp_path), key_options='restrict,port-forwarding,'
                           'permitlisten="127.0.0.1:%d"' % free_port())
    else:
        server = SshServer(str(tmp_path), extra=["AllowTcpForwarding local"])
    try:
        rig = make_rig(server)
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
        tick = rig.run()
        assert tick.returncode == 1
        (line,) = tick.stderr.splitlines()
        assert ("remote port forwarding failed for listen port %d (nothing listens on "
                "127.0.0.1:%d there: the server's policy refuses the port" % (remote, remote)) \
            in line
        assert "this is not a stale session" in line and "reclaimed" not in line
        assert rig.ssh_pids() == []
    finally:
        server.stop()


def test_a_port_another_program_holds_is_named_as_held(rig, service):
    """A forward without a bind address is sent as 127.0.0.1, so a squatter there makes
    the forward fail (never UP, as when ssh quietly bound only ::1) and is named."""
    remote = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", remote))
    squatter.listen(1)
    try:
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                         check_timeout=2)
        began = time.monotonic()
        tick = rig.run("-v")
        assert time.monotonic() - began < 4 * 2 + 2 + 5
        assert tick.returncode == 1
        assert " UP " not in tick.stderr and rig.ssh_pids() == []
        # named for what it is: not a session of this login, and this is no Dropbear server
        assert "listen port %d (port %d on the server is held by another program or " \
            "another user (uid 0))" % (remote, remote) in tick.stderr
        assert pid_alive(os.getpid())
    finally:
        squatter.close()
