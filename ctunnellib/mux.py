"""A client of OpenSSH's control socket: the multiplexing protocol (PROTOCOL.mux).

A packet is a uint32 length, then a uint32 type and its fields: uint32s and
strings (uint32 length + bytes). Both sides start with a hello; version 4
has been the protocol since OpenSSH 5.x. Since OpenSSH 6.7 the master
answers a stdio forward only once the server has opened or refused the
channel, so the reply itself tells a refused channel from an open one.
"""

import _socket       # the C module: socket.py spends milliseconds building enums at import
import os
import sys
import time

from .model import CtunnelError

MUX_MSG_HELLO = 0x00000001
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
MUX_VERSION = 4
MUX_MAX_PACKET = 16384      # a reply is a few dozen bytes; anything longer is garbage


class MuxError(CtunnelError):
    """The control master answered nothing we can use."""


class MuxTimeout(MuxError):
    """The control master did not answer in time."""


class MuxVersionError(MuxError):
    """The master speaks another protocol version (fall back to ssh -O)."""


class MuxRefused(MuxError):
    """The master (or the server behind it) refused the request."""


def mux_packet(msg_type, *fields):
    """Encode one packet: ints are uint32, str and bytes are strings."""
    body = [msg_type.to_bytes(4, "big")]
    for field in fields:
        if isinstance(field, int):
            body.append(field.to_bytes(4, "big"))
        else:
            data = field.encode("utf-8") if isinstance(field, str) else field
            body += [len(data).to_bytes(4, "big"), data]
    body = b"".join(body)
    return len(body).to_bytes(4, "big") + body


def mux_fields(body, layout):
    """Decode body by layout ("I" a uint32, "s" a string); extra bytes are allowed.

    Raises MuxError when the body is shorter than the layout says.
    """
    values, at = [], 0
    for kind in layout:
        if at + 4 > len(body):
            raise MuxError("short reply from the control master")
        number = int.from_bytes(body[at:at + 4], "big")
        at += 4
        if kind == "s":
            if at + number > len(body):
                raise MuxError("short reply from the control master")
            values.append(body[at:at + number].decode("utf-8", "replace"))
            at += number
        else:
            values.append(number)
    return values


class MuxClient:
    """One connection to a control socket; every read bounded by deadline."""

    def __init__(self, path, deadline):
        self.deadline = deadline
        self.request_id = 0
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            self._settimeout()
            try:
                self.sock.connect(path)
            except _socket.timeout:
                raise MuxTimeout("no answer")
            msg_type, body = self.read_packet()
            if msg_type != MUX_MSG_HELLO:
                raise MuxError("control master sent message 0x%08x instead of hello"
                               % msg_type)
            (version,) = mux_fields(body, "I")
            if version != MUX_VERSION:
                raise MuxVersionError("control master speaks mux protocol %d" % version)
            self.sock.sendall(mux_packet(MUX_MSG_HELLO, MUX_VERSION))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.sock.close()

    def _settimeout(self):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise MuxTimeout("no answer")
        self.sock.settimeout(left)

    def _recv_exact(self, size):
        # the timeout was set for the whole request (each set costs a system call)
        data = b""
        while len(data) < size:
            if time.monotonic() >= self.deadline:
                raise MuxTimeout("no answer")
            try:
                chunk = self.sock.recv(size - len(data))
            except _socket.timeout:
                raise MuxTimeout("no answer")
            if not chunk:
                raise MuxError("control master closed the connection")
            data += chunk
        return data

    def read_packet(self):
        """Return (type, rest of body) of the next packet."""
        size = int.from_bytes(self._recv_exact(4), "big")
        if not 4 <= size <= MUX_MAX_PACKET:
            raise MuxError("control master sent a packet of %d bytes" % size)
        body = self._recv_exact(size)
        return int.from_bytes(body[:4], "big"), body[4:]

    def request(self, msg_type, *fields, fds=()):
        """Send a request (and pass fds), return (type, body after the request id)."""
        self.request_id += 1
        self._settimeout()
        try:
            self.sock.sendall(mux_packet(msg_type, self.request_id, *fields))
            for fd in fds:      # one byte with each descriptor, as ssh's mm_send_fd does
                self.sock.sendmsg([b"\0"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS,
                                             fd.to_bytes(4, sys.byteorder))])
        except _socket.timeout:
            raise MuxTimeout("no answer")
        reply_type, body = self.read_packet()
        (reply_id,) = mux_fields(body, "I")
        if reply_id != self.request_id:
            raise MuxError("control master answered request %d, not %d"
                           % (reply_id, self.request_id))
        if reply_type in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
            raise MuxRefused(mux_fields(body[4:], "s")[0])
        return reply_type, body[4:]

    def alive(self):
        """Return the master's PID (MUX_C_ALIVE_CHECK)."""
        reply_type, body = self.request(MUX_C_ALIVE_CHECK)
        if reply_type != MUX_S_ALIVE:
            raise MuxError("control master sent 0x%08x to an alive check" % reply_type)
        return mux_fields(body, "I")[0]

    def open_stdio(self, host, port, rfd, wfd):
        """Ask the master for a channel to host:port from the server (ssh -W).

        The master reads what we write into rfd and writes what comes back to
        wfd. Returns once the server opened the channel; raises MuxRefused
        when it refused it.
        """
        reply_type, _ = self.request(MUX_C_NEW_STDIO_FWD, "", host, port, fds=(rfd, wfd))
        if reply_type != MUX_S_SESSION_OPENED:
            raise MuxError("control master sent 0x%08x to a channel request" % reply_type)


class Channel:
    """A channel from the server to host:port, opened by the master at path.

    We keep the write end of its input: while we hold it the server sees no
    end of input, and the connection at the far end stays open while we look.
    output: our end of what comes back (readable; empty read = hung up).
    """

    def __init__(self, path, deadline):
        self.mux = MuxClient(path, deadline)
        self.read_end, self.input = os.pipe()
        self.output, self.theirs = _socket.socketpair()
        # the master will hold this socket too: it is no sign of a new connection
        self.passed = {os.fstat(self.theirs.fileno()).st_ino}

    def open(self, host, port):
        """Ask for the channel; return once the server opened it (else raise)."""
        try:
            self.mux.open_stdio(host, port, self.read_end, self.theirs.fileno())
        finally:
            os.close(self.read_end)
            self.theirs.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for close in (self.output.close, self.theirs.close, lambda: os.close(self.input),
                      self.mux.close):
            try:
                close()
            except OSError:
                pass
