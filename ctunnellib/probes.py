"""What both clients' checks prove from the box's side: the loop and the listeners.

The loop: while a connection from the server's end of a -R forward is open,
the tunnel's own client (the verified PID) holds a new connection to the
forward's target. Nothing else makes that connection, so it proves the whole
data path, whatever the service behind it says (or does not).
"""

import _socket
import select
import time

from .model import DOWN, SLOW, Verdict
from .procfs import socket_inodes
from .statefiles import log_since, log_size
from .tcp import TCP_SYN_SENT, families_of

# What came of a connection sent round the loop (await_loop)
LOOP = "loop"                       # it came back through this tunnel: UP
CONNECTING = "connecting"           # it came back, but the target does not answer
TARGET_REFUSED = "target refused"   # it came back, and the target refused it
CLOSED = "closed"                   # the far end hung up at once, no sign either way
SILENT = "silent"                   # nothing came back before the deadline


def deadline(tunnel):
    return time.monotonic() + tunnel.check_timeout


def ms(since):
    """Milliseconds since a monotonic time, as the user reads them."""
    return "%d ms" % max(1, round((time.monotonic() - since) * 1000))


def packed_ip(text):
    """Return text as packed IP address bytes, or None if it is a name."""
    for family in (_socket.AF_INET, _socket.AF_INET6):
        try:
            return _socket.inet_pton(family, text)
        except OSError:
            pass
    return None


def _is_target(sock, forward):
    """Is sock a connection to the forward's host:hostport (by port alone for a name)?"""
    wanted = packed_ip(forward.host.strip("[]"))
    return sock.remote_port == forward.hostport and \
        (wanted is None or wanted == packed_ip(sock.remote_addr))


def await_loop(tunnel, forward, pid, before, far_end, log_offset, until, table,
               own_port=None):
    """Watch the client pid while a connection to the forward's far end is open.

    It came back through this tunnel when pid holds a new connection to the
    forward's target, or its log says it could not make one. before: the
    sockets pid held already; far_end: our readable end of the connection
    (an empty read: hung up); own_port: a local port of pid's own that is no
    target connection (dbclient's loopback). Returns one of the outcomes above.
    """
    refused = "connect_to %s port %d: failed" % (forward.host.strip("[]"), forward.hostport)
    families = families_of(forward.host)
    seen, interval = None, 0.001
    while True:
        # a socket looked up once and found to be no target (a unix socket of
        # another mux client) is not looked up again; one still connecting is
        new = socket_inodes(pid) - before
        for sock in table.connections(new, forward.hostport, families,
                                      time.monotonic()) if new else ():
            if _is_target(sock, forward) and sock.local_port != own_port:
                if sock.state != TCP_SYN_SENT:
                    return LOOP
                seen = sock
        before |= new - ({seen.inode} if seen else set())
        if log_size(tunnel) > log_offset and refused in log_since(tunnel, log_offset):
            return TARGET_REFUSED
        left = until - time.monotonic()
        if far_end is None or left <= 0:
            return CONNECTING if seen else (CLOSED if far_end is None else SILENT)
        if select.select([far_end], [], [], min(interval, left))[0]:
            if not far_end.recv(4096):
                far_end = None      # hung up: one last look at the client, then decide
        interval = min(interval * 2, 0.02)


# How a client's connection to the server looks when a probe got no answer in time
DEAD = "dead"       # nothing from the server for the dead-peer time: restart
BUSY = "busy"       # alive, with data waiting or a long round trip: slow, not dead
IDLE = "idle"       # alive and quick: the silence is not the link's


def dead_peer_time(tunnel):
    """Seconds of silence after which the client itself gives the server up: the
    keepalive budget (ServerAliveInterval x ServerAliveCountMax)."""
    return tunnel.server_alive_interval * tunnel.server_alive_count_max


def link_state(tunnel, pid, table):
    """After a probe got no answer: is the client's connection to the server alive?

    Read from the kernel for that one socket: alive while the server's side
    sent something (data: ssh's own keepalive replies, or the user's bytes)
    within the dead-peer time. Returns DEAD, BUSY, IDLE, or None when there is
    no TCP connection to judge (a ProxyCommand: a pipe).
    """
    inodes = socket_inodes(pid)
    progress = None
    for port in (tunnel.port,) if tunnel.port else (22, None):
        progress = table.progress(inodes, port)
        if progress:
            break
    if progress is None:
        return None
    if progress.since_data is None:     # /proc/net/tcp only: retransmissions of one segment
        return DEAD if progress.retransmits >= 7 else BUSY       # about 25 s of backoff
    if progress.since_data >= dead_peer_time(tunnel) * 1000:
        return DEAD
    # busy: a segment sent again (loss, an outage under way), a queue of them in
    # flight (a transfer), or a round trip that takes a good part of check_timeout
    busy = progress.retransmits or progress.unacked > 2 or \
        (progress.rtt or 0) * 4 > tunnel.check_timeout * 1e6
    return BUSY if busy else IDLE


def launch_time(tunnel):
    """Seconds a launch may take before ctunnel looks whether it still makes progress:
    a slow link's handshake takes many round trips."""
    return max(4 * tunnel.check_timeout, dead_peer_time(tunnel))


def still_connecting(tunnel, pid, began):
    """May a launch (pid, the client still logging in) take longer? While its connection
    moves (the server sent something lately), up to twice the launch time."""
    from .tcp import TcpTable
    if time.monotonic() - began >= 2 * launch_time(tunnel):
        return False
    return link_state(tunnel, pid, TcpTable()) in (BUSY, IDLE)


def no_answer(name, tunnel, pid, table, what, idle=None):
    """The verdict of a probe that got no answer within check_timeout (what: which).

    DOWN only on proof: the connection heard nothing for the dead-peer time.
    Alive and busy (or slow) is SLOW: reported once, never a restart. idle:
    the verdict when the link is alive and quick (the silence is elsewhere);
    SLOW if not given. Without a TCP connection to judge, DOWN as before.
    """
    state = link_state(tunnel, pid, table)
    if state == DEAD:
        return Verdict(name, DOWN, "no answer within %gs, and nothing from the server for "
                       "%ds (the keepalive budget): the connection is dead"
                       % (tunnel.check_timeout, dead_peer_time(tunnel)))
    if state is None:
        return idle or Verdict(name, DOWN, "no answer within %gs: the connection is hung"
                               % tunnel.check_timeout)
    if state == IDLE and idle:
        return idle
    return Verdict(name, SLOW, "%s within %gs, through a connection that is alive (the "
                   "server still sends): slow, not dead" % (what, tunnel.check_timeout))


def check_listener(pid, table, address, port, program):
    """Does pid listen on address:port? Return None if it does, else what is wrong."""
    listening = [s for s in table.listeners(port)
                 if s.local_addr in (address, "0.0.0.0", "::")]
    if not listening:
        return "%s does not listen on %s:%d" % (program, address, port)
    if socket_inodes(pid) & {s.inode for s in listening}:
        return None
    return "%s:%d is held by another program" % (address, port)


def target_listens(forward, table):
    """For a target on the box itself: does anything listen there? (None: cannot tell)"""
    host = forward.host.strip("[]")
    if host not in ("localhost", "::1") and not host.startswith("127."):
        return None
    return bool(table.listeners(forward.hostport))
