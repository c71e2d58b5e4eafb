"""The kernel's TCP sockets: which connections and listeners exist, and whose they are.

A check asks for a few sockets, never for all of them: the kernel's socket
diagnostics (netlink sock_diag, what `ss` uses) filter by state and port
inside the kernel, so a tick's cost does not grow with the box's sockets.
Where the kernel has no inet_diag (a small OpenWrt build), /proc/net/tcp and
tcp6 are read instead, and one read is shared by every check that waits.
"""

import _socket       # the C module: socket.py spends milliseconds building enums at import
import struct
import sys
import time

from .model import record

TcpSocket = record("TcpSocket", "inode local_addr local_port remote_addr remote_port state")
# What the kernel knows of a connection's progress (struct tcp_info): milliseconds
# since data and since an acknowledgement last came in, bytes sent and not yet
# acknowledged (in packets: unacked), retransmissions of the oldest one, the
# round trip (microseconds). retransmits alone where /proc/net/tcp is all there is.
TcpProgress = record("TcpProgress", "since_data since_ack unacked retransmits rtt",
                     defaults=(None, None, None, 0, None))

# TCP states, as the kernel numbers them
TCP_ESTABLISHED, TCP_SYN_SENT, TCP_LISTEN = 0x01, 0x02, 0x0A
CONNECTING_OR_CONNECTED = (1 << TCP_ESTABLISHED) | (1 << TCP_SYN_SENT)
FAMILIES = (_socket.AF_INET, _socket.AF_INET6)
TCP_TABLE_MAX = 4 << 20     # bytes read of /proc/net/tcp{,6} at most

# netlink sock_diag (linux/sock_diag.h, linux/inet_diag.h)
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
INET_DIAG_REQ_BYTECODE = 1
INET_DIAG_INFO = 2                  # the attribute (and, as 1 << (2 - 1), its request)
BC_JMP, BC_S_GE, BC_S_LE, BC_D_GE, BC_D_LE = 1, 2, 3, 4, 5
IPPROTO_TCP = 6
DIAG_MSG = struct.Struct("=BBBB2s2s16s16sIQIIIII")     # struct inet_diag_msg, 72 bytes
NLMSG_HEADER = struct.Struct("=IHHII")


def families_of(host):
    """The address families a connection to host may use (both for a name)."""
    host = host.strip("[]")
    for family in FAMILIES:
        try:
            _socket.inet_pton(family, host)
            return (family,)
        except OSError:
            pass
    return FAMILIES


class TcpTable:
    """The TCP sockets one tick asks about; a tick makes one and its checks share it.

    A check that saw a new socket in its ssh asks for a read that began after
    that moment (since); a read serves every check that asked before it began.
    """

    def __init__(self):
        self.lock = _thread_lock()
        self.ports = set()      # remote ports asked for so far: one filter serves them all
        self.reads = {}         # family -> (when the read began, its ports, {inode: TcpSocket})
        self.netlink = True     # until the kernel says it has no inet_diag

    def enter(self):
        """A tunnel's ladder begins (see SharedTcpTable)."""

    def leave(self):
        """A tunnel's ladder ends."""

    def connections(self, inodes, port, families, since):
        """Return the connections among inodes whose remote port is port.

        families: see families_of. Only from a read that began after since.
        """
        with self.lock:
            self.ports.add(port)
            if not self._fresh(families, port, since):
                self._read_connections(families)
            return self._found(inodes, families)

    def _fresh(self, families, port, since):
        """Is there a read of each family that began after since and asked for port?"""
        for family in families:
            began, ports, _ = self.reads.get(family, (-1.0, (), {}))
            if began < since or port not in ports:
                return False
        return True

    def _found(self, inodes, families):
        return [sockets[i] for family in families
                for sockets in (self.reads[family][2],) for i in inodes if i in sockets]

    def _read_connections(self, families):
        """Read the connections of families to every port asked for so far."""
        began, ports = time.monotonic(), frozenset(self.ports)
        for family in families:
            self.reads[family] = (began, ports, {s.inode: s for s in self._read(
                family, CONNECTING_OR_CONNECTED, ports, local=False)})

    def listeners(self, port):
        """Return every socket listening on local port port (any address, any owner)."""
        with self.lock:
            return [s for family in FAMILIES
                    for s in self._read(family, 1 << TCP_LISTEN, (port,), local=True)]

    def progress(self, inodes, remote_port=None):
        """The TcpProgress of the established connection among inodes (the one to
        remote_port if given, else the only one), or None if there is none."""
        with self.lock:
            if self.netlink:
                try:
                    found = [p for family in FAMILIES
                             for p in diag_progress(family, inodes, remote_port)]
                    return found[0] if len(found) == 1 else None
                except OSError:
                    self.netlink = False
            found = [p for family in FAMILIES for p in proc_progress(family, inodes,
                                                                      remote_port)]
            return found[0] if len(found) == 1 else None

    def _read(self, family, states, ports, local):
        if self.netlink:
            try:
                return diag_dump(family, states, ports, local)
            except OSError:
                self.netlink = False        # no inet_diag here: /proc from now on
        return proc_sockets(family, states, ports, local)


class SharedTcpTable(TcpTable):
    """The TcpTable of a tick that checks tunnels side by side (threads).

    The kernel walks its whole table of connections for each read (a few
    milliseconds on a machine with much memory, whatever it finds), so a
    check that needs a read waits up to WINDOW seconds for the others running
    to ask too, and one read serves them all.
    """

    WINDOW = 0.04

    def __init__(self):
        TcpTable.__init__(self)
        import threading
        self.ready = threading.Condition(self.lock)
        self.active = self.asking = 0
        self.reading = False

    def enter(self):
        with self.lock:
            self.active += 1

    def leave(self):
        with self.ready:
            self.active -= 1
            self.ready.notify_all()         # one fewer to wait for

    def connections(self, inodes, port, families, since):
        with self.ready:
            self.ports.add(port)
            self.asking += 1
            until = time.monotonic() + self.WINDOW
            try:
                while not self._fresh(families, port, since):
                    left = until - time.monotonic()
                    if self.reading or (self.asking < self.active and left > 0):
                        self.ready.wait(None if self.reading else left)
                        continue
                    self.reading = True     # the others wait for this read, unlocked
                    self.lock.release()
                    try:
                        reads = {}
                        began, ports = time.monotonic(), frozenset(self.ports)
                        for family in families:
                            reads[family] = (began, ports, {s.inode: s for s in self._read(
                                family, CONNECTING_OR_CONNECTED, ports, local=False)})
                    finally:
                        self.lock.acquire()
                        self.reading = False
                        self.ready.notify_all()
                    self.reads.update(reads)
            finally:
                self.asking -= 1
            return self._found(inodes, families)


def _thread_lock():
    import _thread
    return _thread.allocate_lock()


# ---------------------------------------------------------------------------
# netlink sock_diag
# ---------------------------------------------------------------------------

def diag_dump(family, states, ports, local, info=False):
    """Ask the kernel for the TCP sockets of family in states whose port is in ports.

    local: compare the local (source) port, else the remote one. The port
    filter runs in the kernel (inet_diag bytecode). info: each socket comes
    with its tcp_info, as (TcpSocket, TcpProgress) pairs. Raises OSError when
    the kernel cannot answer.
    """
    code = port_filter(ports, local)
    ext = 1 << (INET_DIAG_INFO - 1) if info else 0
    request = struct.pack("=BBBxI48x", family, IPPROTO_TCP, ext, states)
    if code:
        request += struct.pack("=HH", 4 + len(code), INET_DIAG_REQ_BYTECODE) + code
    header = NLMSG_HEADER.pack(16 + len(request), SOCK_DIAG_BY_FAMILY,
                               NLM_F_REQUEST | NLM_F_DUMP, 1, 0)
    sock = _socket.socket(_socket.AF_NETLINK, _socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        sock.settimeout(2.0)
        sock.send(header + request)
        found = []
        while True:
            data = sock.recv(65536)
            at = 0
            while at + 16 <= len(data):
                size, kind = NLMSG_HEADER.unpack_from(data, at)[:2]
                if kind == NLMSG_DONE:
                    return found
                if kind == NLMSG_ERROR:
                    error = -struct.unpack_from("=i", data, at + 16)[0]
                    raise OSError(error, "sock_diag: error %d" % error)
                found_socket = _diag_socket(data, at + 16)
                found.append((found_socket, _diag_progress(data, at + 16 + 72, at + size))
                             if info else found_socket)
                at += (size + 3) & ~3
            if not data:
                raise OSError("sock_diag: no answer")
    finally:
        sock.close()


def _diag_socket(data, at):
    (family, state, _, _, sport, dport, src, dst,
     _, _, _, _, _, _, inode) = DIAG_MSG.unpack_from(data, at)
    size = 4 if family == _socket.AF_INET else 16
    return TcpSocket(inode, _address(src[:size]), int.from_bytes(sport, "big"),
                     _address(dst[:size]), int.from_bytes(dport, "big"), state)


def _diag_progress(data, at, end):
    """The TcpProgress in a message's INET_DIAG_INFO attribute (from at to end), or None."""
    while at + 4 <= end:
        size, kind = struct.unpack_from("=HH", data, at)
        if size < 4:
            break
        if kind == INET_DIAG_INFO and size >= 4 + 72:
            retransmits, = struct.unpack_from("=B", data, at + 4 + 2)
            rtt, = struct.unpack_from("=I", data, at + 4 + 68)
            unacked, = struct.unpack_from("=I", data, at + 4 + 24)
            since_data, since_ack = struct.unpack_from("=II", data, at + 4 + 52)
            return TcpProgress(since_data, since_ack, unacked, retransmits, rtt)
        at += (size + 3) & ~3
    return None


def diag_progress(family, inodes, remote_port=None):
    """The TcpProgress of each established connection of family among inodes."""
    ports = (remote_port,) if remote_port else ()
    return [progress for sock, progress in diag_dump(family, 1 << TCP_ESTABLISHED, ports,
                                                     False, info=True)
            if sock.inode in inodes and progress]


def port_filter(ports, local):
    """inet_diag bytecode that accepts a socket whose port is any of ports.

    Each port is "port >= P and port <= P"; a failed test jumps to the next
    port's test, the last one's to "reject" (past the end). The JMP between
    them is never taken "yes" at run time, but puts every test on the chain of
    "yes" jumps that the kernel's audit of the bytecode walks (as ss does).
    """
    ge, le = (BC_S_GE, BC_S_LE) if local else (BC_D_GE, BC_D_LE)
    ports = sorted(ports)
    total = 20 * len(ports) - 4 if ports else 0
    code = b""
    for i, port in enumerate(ports):
        left = total - 20 * i                       # bytes from this test to the end
        if i < len(ports) - 1:
            code += struct.pack("=BBHBBHBBHBBHBBH", ge, 8, 20, 0, 0, port,
                                le, 8, 12, 0, 0, port, BC_JMP, 4, left - 16)
        else:
            code += struct.pack("=BBHBBHBBHBBH", ge, 8, 20, 0, 0, port, le, 8, 12, 0, 0, port)
    return code


def _address(raw):
    """Packed address bytes as text; an IPv4 client of a dual-stack socket as IPv4."""
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]
    return _socket.inet_ntop(_socket.AF_INET if len(raw) == 4 else _socket.AF_INET6, raw)


# ---------------------------------------------------------------------------
# /proc/net/tcp, where the kernel has no inet_diag
# ---------------------------------------------------------------------------

PROC_FILES = {_socket.AF_INET: "/proc/net/tcp", _socket.AF_INET6: "/proc/net/tcp6"}


def proc_sockets(family, states, ports, local):
    """The same answer as diag_dump, from /proc/net/tcp (or tcp6)."""
    found = []
    for fields in _proc_lines(family):
        sock = proc_socket(fields)
        if (1 << sock.state) & states and \
                (sock.local_port if local else sock.remote_port) in ports:
            found.append(sock)
    return found


def proc_progress(family, inodes, remote_port=None):
    """What /proc/net/tcp tells of the progress of established connections among
    inodes: only how often the oldest unacknowledged segment was sent again."""
    return [TcpProgress(retransmits=int(fields[6], 16)) for fields in _proc_lines(family)
            if int(fields[9]) in inodes and fields[3] == b"01" and
            (remote_port is None or int(fields[2].split(b":")[1], 16) == remote_port)]


def _proc_lines(family):
    """The fields of each socket's line of /proc/net/tcp (or tcp6); [] if unreadable."""
    try:
        with open(PROC_FILES[family], "rb") as f:
            text = f.read(TCP_TABLE_MAX)
    except OSError:
        return []
    return [fields for fields in (line.split() for line in text.splitlines()[1:])
            if len(fields) > 9]


def proc_socket(fields):
    """Decode the fields of one line of /proc/net/tcp into a TcpSocket."""
    local, remote = fields[1].split(b":"), fields[2].split(b":")
    return TcpSocket(int(fields[9]), proc_address(local[0]), int(local[1], 16),
                     proc_address(remote[0]), int(remote[1], 16), int(fields[3], 16))


def proc_address(text):
    """Decode /proc/net/tcp's hex address: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text.decode("ascii"))
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return _address(raw)
