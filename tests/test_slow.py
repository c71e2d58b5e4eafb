"""Slow is not dead: a tunnel on a narrow or busy path is not restarted, a dead one is.

The path is the tunnel's own connection on loopback, narrowed with iptables
(hashlimit: packets beyond a rate are dropped, as on a congested or lossy
link) or cut (DROP: a black hole). Every rule is removed, also on failure.
"""

import os
import socket
import subprocess
import threading
import time

import pytest

from harness import Listener, ctunnel_argv, free_port, pid_alive, wait_for

from ctunnellib.procfs import socket_inodes
from ctunnellib.tcp import FAMILIES, TCP_SYN_SENT, TcpTable

SLOW_LINE = "through a connection that is alive (the server still sends): slow, not dead"


class Bulk(Listener):
    """A service on the box that sends without end to whoever connects."""

    def handle(self, conn):
        def pump():
            try:
                while True:
                    conn.sendall(b"x" * 65536)
            except OSError:
                pass
        threading.Thread(target=pump, daemon=True).start()


class User:
    """Someone on the server reading the box's service through the tunnel."""

    def __init__(self, port):
        self.bytes, self.ended = 0, False
        self.sock = socket.create_connection(("127.0.0.1", port))
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        try:
            while self.sock.recv(65536):
                self.bytes += 65536
        except OSError:
            pass
        self.ended = True

    def close(self):
        self.sock.close()


@pytest.fixture
def narrow(firewall):
    """narrow(port, rate): drop the packets to and from port beyond rate (e.g. 20/sec)."""
    drop, _ = firewall

    def narrow(port, rate):
        for direction in ("--sport", "--dport"):
            drop(direction, str(port), "-m", "hashlimit", "--hashlimit-name",
                 "ct%d%s" % (os.getpid(), direction[2]), "--hashlimit-above", rate,
                 "--hashlimit-burst", "10")
    return narrow


def test_a_busy_tunnel_on_a_narrow_path_is_slow_never_restarted(rig, narrow):
    """A transfer fills the tunnel's connection; the check's channel waits behind it,
    longer than check_timeout. SLOW, said once; the transfer is never cut."""
    bulk = Bulk()
    try:
        remote, _ = rig.start_reverse(bulk, check_timeout=1)
        pid = rig.pid()
        narrow(rig.server.port, "20/sec")
        user = User(remote)
        wait_for(lambda: user.bytes > 1 << 20, what="the transfer to move")
        said = []
        for _ in range(3):
            before = user.bytes
            tick = rig.run()
            assert tick.returncode == 0, tick.stderr
            said.append(tick.stderr)
            assert rig.pid() == pid and not user.ended
            wait_for(lambda: user.bytes > before, what="the transfer to go on")
        assert SLOW_LINE in said[0] and "(not restarting)" in said[0], said[0]
        assert said[1:] == ["", ""]
        user.close()
    finally:
        bulk.close()


def test_a_connection_that_stops_moving_for_the_dead_peer_time_is_restarted(rig, service,
                                                                           firewall):
    """A black hole: within the keepalive budget (interval x count) it is slow; past
    it, dead, and the tunnel is restarted as soon as the line is back."""
    drop, lift = firewall
    remote, _ = rig.start_reverse(service, check_timeout=1, server_alive_interval=2,
                                  server_alive_count_max=3)
    old = rig.pid()
    rules = [drop("--dport", str(rig.server.port)), drop("--sport", str(rig.server.port))]
    began = time.monotonic()
    early = rig.run()
    assert time.monotonic() - began < 6
    assert early.returncode == 0 and SLOW_LINE in early.stderr, early.stderr
    assert rig.pid() == old
    while time.monotonic() - began < 2 * 3 + 1:        # past the dead-peer time
        time.sleep(0.2)
    late = rig.run()
    assert late.returncode == 1 and "restart failed (" in late.stderr, late.stderr
    for rule in rules:
        lift(rule)
    back = rig.run()
    assert back.returncode == 0 and "restarted (" in back.stderr, back.stderr
    assert not pid_alive(old)


def test_a_launch_over_a_slow_path_completes(rig, service, firewall):
    """The path loses the first SYNs for 1.5 s (a lossy link): ssh is given the time to
    send them again (with ConnectTimeout = check_timeout, 1 s here, it gave up)."""
    drop, lift = firewall
    rule = drop("--dport", str(rig.server.port), "--syn")
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port),
                     check_timeout=1)
    tick = subprocess.Popen(ctunnel_argv("-c", rig.conf), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: any(s.state == TCP_SYN_SENT for s in TcpTable().connections(
            {i for p in rig.ssh_pids() for i in socket_inodes(p)}, rig.server.port,
            FAMILIES, time.monotonic())), what="ssh to send its first SYN")
        lost_until = time.monotonic() + 1.5
        while time.monotonic() < lost_until:         # the emulated loss: not a wait
            time.sleep(0.1)
        lift(rule)
        out, err = tick.communicate(timeout=60)
    finally:
        if tick.poll() is None:
            tick.kill()
            tick.communicate()
    assert tick.returncode == 0, err
    assert "pi: started" in err
