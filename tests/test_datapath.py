"""End to end: the data-path check against real OpenSSH and Dropbear servers.

A -R forward is UP only when a channel from the server into its own reverse
listener came back through this tunnel's ssh to the box's target. Every case
here is one a user meets: a service that never speaks, one that waits for the
client, a service that is down, a port taken by another program, a server
that forbids channels or forces a command, Dropbear.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

import pytest

from harness import (DropbearServer, ctunnel_argv, Listener, SshServer, connect_read, free_port,
                      pid_alive, port_accepts, wait_for)


def checks(rig):
    """The status checks of the rig's tunnel: {check: (verdict, detail)}."""
    status = rig.run("status", "--json")
    record = json.loads(status.stdout)["tunnels"][0]
    return {c["check"]: (c["verdict"], c["detail"]) for c in record["checks"]}


class AskFirstService(Listener):
    """A service where the client speaks first (HTTP-like): it answers a request."""

    def handle(self, conn):
        with conn:
            conn.settimeout(10)
            try:
                if conn.recv(64).startswith(b"GET"):
                    conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhi")
            except OSError:
                pass


def test_healthy_tick_runs_no_program(rig, service):
    """strace: the only execve of a healthy tick is python itself."""
    remote, _ = rig.start_reverse(service)
    trace = os.path.join(rig.state_dir, "trace")
    result = subprocess.run(["strace", "-f", "-qq", "-e", "trace=execve", "-o", trace] +
                            ctunnel_argv("-c", rig.conf),
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stderr) == (0, "")
    execs = [l for l in open(trace) if "execve(" in l and "= 0" in l]
    assert len(execs) == 1 and "python" in execs[0], execs
    verdict, detail = checks(rig)["remote forward %d" % remote]
    assert verdict == "UP" and detail.startswith("data path 127.0.0.1:%d -> box" % remote)


@pytest.mark.parametrize("kind", ["silent", "client speaks first"])
def test_services_that_do_not_greet_are_up(rig, silent_service, kind):
    target = silent_service if kind == "silent" else AskFirstService()
    try:
        remote, _ = rig.start_reverse(target)
        pid = rig.pid()
        again = rig.run("-v")
        assert again.returncode == 0
        assert "remote forward %d UP (data path" % remote in again.stderr
        assert "restart" not in again.stderr and rig.pid() == pid
        if kind != "silent":
            with socket.create_connection(("127.0.0.1", remote), timeout=5) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert s.recv(64).startswith(b"HTTP/1.0 200")
    finally:
        if kind != "silent":
            target.close()


def test_local_service_down_is_target_down_once_and_back_once(rig):
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = held.getsockname()[1]          # bound, not listening: connections are refused
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, port))
    first = rig.run()
    assert first.returncode == 0, first.stderr
    lines = first.stderr.splitlines()
    assert len(lines) == 2 and "started" in lines[0]
    assert lines[1].endswith("pi: remote forward %d: the tunnel works, but 127.0.0.1:%d on the "
                             "box refused the connection (not restarting)" % (remote, port))
    pid = rig.pid()
    second = rig.run()
    assert (second.returncode, second.stderr) == (0, "")        # said once, not every tick
    assert rig.pid() == pid
    assert checks(rig)["remote forward %d" % remote][0] == "TARGET_DOWN"

    held.listen(4)                                              # the service comes back
    back = rig.run()
    assert back.returncode == 0
    (line,) = back.stderr.splitlines()
    assert line.endswith("pi: remote forward %d: its target answers again" % remote)
    assert rig.run().stderr == "" and rig.pid() == pid
    held.close()


def test_local_port_taken_on_127_0_0_1_is_never_up(rig, service):
    local = free_port()
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", local))
    squatter.listen(1)
    try:
        rig.write_config(local_forward="%d:127.0.0.1:%d" % (local, service.port))
        tick = rig.run()
        assert tick.returncode == 1
        (line,) = tick.stderr.splitlines()
        assert "pi: start failed: Could not request local forwarding: bind " \
            "[127.0.0.1]:%d: Address already in use" % local in line
        assert rig.ssh_pids() == []
    finally:
        squatter.close()


def test_local_forward_must_be_owned_by_our_ssh(rig, service):
    local = free_port()
    rig.write_config(local_forward="%d:127.0.0.1:%d" % (local, service.port))
    assert rig.run().returncode == 0
    verdict, detail = checks(rig)["local forward %d" % local]
    assert verdict == "UP"
    assert re.match(r"listening on 127\.0\.0\.1:%d; the server reaches 127\.0\.0\.1:%d in \d+ ms$"
                    % (local, service.port), detail)
    # the listener goes away (cancelled), another program takes the port: never UP
    subprocess.run(rig.server.ssh_argv("-S", rig.path("pi", "ctl"), "-O", "cancel", "-L",
                                       "127.0.0.1:%d:127.0.0.1:%d" % (local, service.port),
                                       "127.0.0.1"), check=True, capture_output=True)
    wait_for(lambda: not port_accepts(local), what="the -L listener to close")
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", local))
    squatter.listen(1)
    try:
        tick = rig.run()
        assert tick.returncode == 1
        assert "restart failed (local forward %d: 127.0.0.1:%d is held by another program)" \
            % (local, local) in tick.stderr
    finally:
        squatter.close()


def test_remote_port_held_by_another_program_is_down(rig, service):
    """Our listener on the server is gone and another program took the port: a
    connection there does not come back through this tunnel."""
    remote, _ = rig.start_reverse(service, check_timeout=2)
    subprocess.run(rig.server.ssh_argv("-S", rig.path("pi", "ctl"), "-O", "cancel", "-R",
                                       "127.0.0.1:%d:127.0.0.1:%d" % (remote, service.port),
                                       "127.0.0.1"), check=True, capture_output=True)
    wait_for(lambda: not port_accepts(remote), what="the server to drop the listener")
    squatter = socket.socket()
    squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    squatter.bind(("127.0.0.1", remote))
    squatter.listen(1)
    try:
        began = time.monotonic()
        tick = rig.run()
        assert time.monotonic() - began < 2 * 2 + 8
        assert tick.returncode == 1
        assert ("restart failed (remote forward %d: port %d on the server is held by another "
                "program: a connection to 127.0.0.1:%d did not come back through this tunnel)"
                % (remote, remote, remote)) in tick.stderr
    finally:
        squatter.close()


def test_forced_command_key_is_up_through_the_channel(make_rig, service, tmp_path):
    """command="/bin/false" (common hardening) made the nc check fail every tick."""
    server = SshServer(str(tmp_path), key_options='command="/bin/false"')
    try:
        rig = make_rig(server)
        remote, first = rig.start_reverse(service)
        assert len(first.stderr.splitlines()) == 1
        pid = rig.pid()
        for _ in range(2):
            tick = rig.run()
            assert (tick.returncode, tick.stderr) == (0, "")
        assert rig.pid() == pid
        assert checks(rig)["remote forward %d" % remote][0] == "UP"
        assert connect_read(remote) == service.greeting
    finally:
        server.stop()


def nc_tools(nc):
    """A PATH for the server's commands: a shell, and nc as given (or none)."""
    tools = tempfile.mkdtemp(prefix="ctn", dir="/tmp")
    os.chmod(tools, 0o755)
    for name in ("sh", "cat"):
        os.symlink(shutil.which(name), os.path.join(tools, name))
    if nc:
        os.symlink(nc, os.path.join(tools, "nc"))
    return tools


@pytest.mark.parametrize("nc,verdict,words", [
    ("/bin/nc.openbsd", "UP", "listening on the server (nc), since the server forbids a channel"),
    (None, "UNKNOWN", "no nc on the server"),
    ("/bin/busybox", "UNKNOWN", "the server's nc cannot do nc -z (BusyBox?)"),
])
def test_server_forbidding_channels_falls_back_to_nc(make_rig, service, tmp_path, nc, verdict,
                                                     words):
    """AllowTcpForwarding remote: -R works, channels are "administratively prohibited"."""
    tools = nc_tools(nc)
    server = SshServer(str(tmp_path), extra=["AllowTcpForwarding remote"], session_path=tools)
    try:
        rig = make_rig(server)
        remote, first = rig.start_reverse(service)
        pid = rig.pid()
        state, detail = checks(rig)["remote forward %d" % remote]
        assert (state, words in detail) == (verdict, True), detail
        assert "AllowTcpForwarding" in detail
        if verdict == "UNKNOWN":                       # said once, and never a restart
            assert first.stderr.count("\n") == 2 and words in first.stderr
        again = rig.run()
        assert (again.returncode, again.stderr) == (0, "")
        assert rig.pid() == pid
        assert connect_read(remote) == service.greeting
    finally:
        server.stop()
        shutil.rmtree(tools, ignore_errors=True)


def test_remote_check_channel_never_runs_nc(make_rig, service, tmp_path):
    server = SshServer(str(tmp_path), extra=["AllowTcpForwarding remote"])
    try:
        rig = make_rig(server)
        remote, first = rig.start_reverse(service, remote_check="channel")
        state, detail = checks(rig)["remote forward %d" % remote]
        assert state == "UNKNOWN" and "and nc" not in detail
        assert "the server forbids a channel to 127.0.0.1:%d" % remote in first.stderr
    finally:
        server.stop()


def test_control_socket_that_says_nothing_is_bounded_and_one_line(rig, service):
    remote, _ = rig.start_reverse(service, check_timeout=2)
    old = rig.pid()
    ctl = rig.path("pi", "ctl")
    os.rename(ctl, ctl + ".real")
    mute = socket.socket(socket.AF_UNIX)
    mute.bind(ctl)
    mute.listen(4)                  # accepts (by the kernel) and never says hello
    try:
        began = time.monotonic()
        tick = rig.run()
        took = time.monotonic() - began
    finally:
        mute.close()
    assert tick.returncode == 0, tick.stderr
    (line,) = tick.stderr.splitlines()
    assert line.endswith("pi: restarted (control master did not answer within 2s: hung)")
    assert took < 2 + 2 + 8
    assert not pid_alive(old)          # found by its argv, verified, and stopped
    assert connect_read(remote) == service.greeting


@pytest.fixture
def dropbear():
    # not under pytest's 0700 tmp: Dropbear reads authorized_keys as the user
    top = tempfile.mkdtemp(prefix="ctdb", dir="/tmp")
    os.chmod(top, 0o755)
    server = DropbearServer(top)
    yield server
    server.stop()
    shutil.rmtree(top, ignore_errors=True)


def test_dropbear_server_is_proven_through_the_data_path(dropbear, make_rig, service):
    rig = make_rig(dropbear)
    remote, first = rig.start_reverse(service)
    assert len(first.stderr.splitlines()) == 1, first.stderr
    verdict, detail = checks(rig)["remote forward %d" % remote]
    assert verdict == "UP" and detail.startswith("data path"), detail
    assert rig.run().stderr == ""
    assert connect_read(remote) == service.greeting


def test_target_that_hangs_up_at_once_never_causes_a_restart(rig):
    """A service that greets and closes before the master's connection can be
    seen: the loop may go unproven (UNKNOWN, said once), but never DOWN."""
    from harness import Service
    quick = Service(b"bye\n", hang_up=True)
    try:
        remote, first = rig.start_reverse(quick)
        pid = rig.pid()
        for _ in range(3):
            tick = rig.run()
            # an UNKNOWN loop is said ("... not restarting"); a restart never is
            assert tick.returncode == 0, tick.stderr
            assert "restarted" not in tick.stderr and "restart failed" not in tick.stderr
        verdict, detail = checks(rig)["remote forward %d" % remote]
        assert verdict in ("UP", "UNKNOWN"), detail
        if verdict == "UNKNOWN":
            assert detail == ("127.0.0.1:%d on the server hung up at once; cannot tell "
                              "whether it is this tunnel's" % remote)
        assert rig.pid() == pid and connect_read(remote) == b"bye\n"
    finally:
        quick.close()
