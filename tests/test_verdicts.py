"""Pure logic: the control-socket protocol and the nc fallback's verdict table.

The protocol is spoken to a scripted fake master on a Unix socket (every
reply type, garbage, silence); the nc table uses a fake ssh. The real cases
are proven end to end against a real sshd in test_tick.py and test_datapath.py.
"""

import os
import socket
import stat
import sys
import threading
import time

import pytest

from test_config import ctunnel, make_tunnel

FAKE_SSH = """#!/bin/sh
# exits and speaks as told by the files beside it
[ -f "$0.sleep" ] && sleep "$(cat "$0.sleep")"
cat "$0.stdout"
cat "$0.stderr" >&2
exit "$(cat "$0.rc")"
"""


@pytest.fixture
def fake_ssh(tmp_path):
    path = tmp_path / "ssh"
    path.write_text(FAKE_SSH)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def behave(rc, stdout="", stderr="", sleep=None):
        (tmp_path / "ssh.rc").write_text(str(rc))
        (tmp_path / "ssh.stdout").write_text(stdout)
        (tmp_path / "ssh.stderr").write_text(stderr)
        if sleep:
            (tmp_path / "ssh.sleep").write_text(str(sleep))
        return make_tunnel(tmp_path, ssh=str(path), check_timeout=1.0)
    return behave


def nc_said(words, status):
    return "motd of a chatty shell\nctunnel-nc\n%sctunnel-nc=%d\n" % (words, status)


@pytest.mark.parametrize("rc,stdout,stderr,state,detail", [
    (0, nc_said("", 0), "", "UP", "listening on the server (nc)"),
    (0, nc_said("", 1), "", "DOWN", "no listener on the server (nc)"),
    (0, nc_said("sh: 1: nc: not found\n", 127), "", "UNKNOWN", "no nc on the server"),
    (0, nc_said("nc: Permission denied\n", 126), "", "UNKNOWN", "no nc on the server"),
    # BusyBox's nc has no -z: it prints its usage and exits 1, which is not "closed"
    (0, nc_said("nc: invalid option -- 'z'\nUsage: nc [OPTIONS] HOST PORT\n", 1), "",
     "UNKNOWN", "the server's nc cannot do nc -z (BusyBox?)"),
    (0, nc_said("", 2), "", "UNKNOWN", "nc on the server exited 2"),
    # a forced command ran instead of our line: its exit status means nothing
    (1, "", "", "UNKNOWN", "the server did not run nc (a forced command on the key?): exit 1"),
    (0, "hello from echo\n", "", "UNKNOWN", "the server did not run nc (a forced command on the "
     "key?): exit 0, said: hello from echo"),
    (255, "", "mux_client_request_session: session request failed", "DOWN",
     "ssh failed: mux_client_request_session: session request failed"),
    (255, "", "channel 1: open failed: administratively prohibited", "UNKNOWN",
     "cannot check: the server refuses command sessions (channel 1: open failed"),
    (255, "", "Control socket connect(/x/pi.ctl): Connection refused\n"
              "kex_exchange_identification: Connection closed by remote host", "DOWN",
     "ssh failed: Control socket connect(/x/pi.ctl): Connection refused"),
])
def test_nc_fallback_verdicts(fake_ssh, rc, stdout, stderr, state, detail):
    tunnel = fake_ssh(rc, stdout, stderr)
    verdict = ctunnel.check_remote_nc(tunnel, tunnel.forwards[0])
    assert verdict.state == state
    assert verdict.detail.startswith(detail), verdict.detail


def test_nc_check_that_hangs_is_down_after_check_timeout(fake_ssh):
    tunnel = fake_ssh(0, sleep=5)
    began = time.monotonic()
    verdict = ctunnel.check_remote_nc(tunnel, tunnel.forwards[0])
    assert (verdict.state, verdict.detail) == ("DOWN",
                                               "nc check hung for 1s: the connection is dead")
    assert time.monotonic() - began < 3


def test_a_server_that_talks_without_end_is_read_with_a_cap(tmp_path):
    talker = tmp_path / "talker"
    talker.write_text("#!/bin/sh\nhead -c 50000000 /dev/zero\nhead -c 50000000 /dev/zero >&2\n")
    talker.chmod(0o755)
    status, out, err = ctunnel._run([str(talker)], 30)
    assert status == 0
    assert len(out) == len(err) == ctunnel.OUTPUT_MAX


# --- the control-socket protocol --------------------------------------------

def test_packet_encoding():
    assert ctunnel.mux_packet(ctunnel.MUX_MSG_HELLO, 4) == bytes.fromhex(
        "00000008" "00000001" "00000004")
    assert ctunnel.mux_packet(ctunnel.MUX_C_NEW_STDIO_FWD, 7, "", "127.0.0.1", 1122) == \
        bytes.fromhex("0000001d" "10000008" "00000007" "00000000" "00000009") + \
        b"127.0.0.1" + bytes.fromhex("00000462")


def test_field_decoding():
    body = bytes.fromhex("00000007" "00000003") + b"abc" + b"extension bytes"
    assert ctunnel.mux_fields(body, "Is") == [7, "abc"]
    for short in (b"", b"\0\0\0", bytes.fromhex("00000007" "00000009") + b"abc"):
        with pytest.raises(ctunnel.MuxError):
            ctunnel.mux_fields(short, "Is")


class FakeMaster:
    """A control socket that answers by a script: a list of raw byte strings."""

    def __init__(self, path, script):
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.bind(path)
        self.sock.listen(4)
        self.script = script
        self.received = b""
        self.fds = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            for step in self.script:
                if step == "packet":             # one whole request
                    size = int.from_bytes(self._exactly(conn, 4), "big")
                    self.received += self._exactly(conn, size)
                elif step == "fd":               # one byte carrying a descriptor
                    data, ancdata, _, _ = conn.recvmsg(1, socket.CMSG_SPACE(4))
                    for _, _, raw in ancdata:
                        self.fds.append(int.from_bytes(raw[:4], sys.byteorder))
                        os.close(self.fds[-1])
                elif step == "hang":
                    time.sleep(5)
                elif step == "close":
                    return
                else:
                    conn.sendall(step)
            try:
                while conn.recv(4096):           # let the client finish: no reset
                    pass
            except OSError:                      # it gave up first
                pass

    @staticmethod
    def _exactly(conn, size):
        data = b""
        while len(data) < size:
            chunk = conn.recv(size - len(data))
            if not chunk:
                raise EOFError
            data += chunk
        return data

    def close(self):
        self.sock.close()


HELLO = ctunnel.mux_packet(ctunnel.MUX_MSG_HELLO, 4)


@pytest.fixture
def master(tmp_path):
    masters = []

    def make(*script):
        tunnel = make_tunnel(tmp_path, check_timeout=1.0)
        masters.append(FakeMaster(str(tmp_path / "pi.ctl"), script))
        return tunnel
    yield make
    for m in masters:
        m.close()


def alive_reply(request_id, pid):
    return ctunnel.mux_packet(ctunnel.MUX_S_ALIVE, request_id, pid)


@pytest.mark.parametrize("script,state,detail", [
    ([HELLO, "packet", "packet", alive_reply(1, 4242)], "UP", "pid 4242"),
    ([HELLO, "packet", "packet", alive_reply(2, 4242)], "DOWN",
     "control socket: control master answered request 2, not 1"),
    ([HELLO, "packet", "packet", ctunnel.mux_packet(ctunnel.MUX_S_FAILURE, 1, "no")], "DOWN",
     "control socket: no"),
    ([HELLO, "packet", "packet", ctunnel.mux_packet(ctunnel.MUX_S_PERMISSION_DENIED, 1, "go away")],
     "DOWN", "control socket: go away"),
    ([HELLO, "packet", "packet", ctunnel.mux_packet(ctunnel.MUX_S_SESSION_OPENED, 1, 3)], "DOWN",
     "control socket: control master sent 0x80000006 to an alive check"),
    ([ctunnel.mux_packet(ctunnel.MUX_S_ALIVE, 1, 2)], "DOWN",
     "control socket: control master sent message 0x80000005 instead of hello"),
    ([b"\xff\xff\xff\xff garbage"], "DOWN",
     "control socket: control master sent a packet of 4294967295 bytes"),
    ([b"\0\0\0\1x"], "DOWN", "control socket: control master sent a packet of 1 bytes"),
    ([HELLO, "packet", "packet", b"\0\0\0\x08\x80\0\0\x05", "close"], "DOWN",
     "control socket: control master closed the connection"),
    (["close"], "DOWN", "control socket: control master closed the connection"),
    (["hang"], "DOWN", "control master did not answer within 1s: hung"),
    ([HELLO, "packet", "packet", "hang"], "DOWN", "control master did not answer within 1s: hung"),
])
def test_master_check_reads_every_reply_correctly_and_in_bounded_time(master, script, state,
                                                                      detail):
    tunnel = master(*script)
    began = time.monotonic()
    pid, verdict = ctunnel.check_master(tunnel)
    assert time.monotonic() - began < 2.5
    assert (verdict.check, verdict.state, verdict.detail) == ("master", state, detail)
    assert pid == (4242 if state == "UP" else None)


def test_master_check_wants_the_pidfiles_pid(master):
    tunnel = master(HELLO, "packet", "packet", alive_reply(1, 4242))
    pid, verdict = ctunnel.check_master(tunnel, expected=4343)
    assert pid is None and verdict.detail == \
        "control socket answers for pid 4242, not the pidfile's 4343"


def test_no_control_socket(tmp_path):
    pid, verdict = ctunnel.check_master(make_tunnel(tmp_path))
    assert verdict.detail == "control socket: No such file or directory"


def test_an_older_protocol_falls_back_to_ssh_dash_o_check(tmp_path, fake_ssh):
    tunnel = fake_ssh(0, stderr="Master running (pid=4242)\n")
    FakeMaster(str(tmp_path / "pi.ctl"), [ctunnel.mux_packet(ctunnel.MUX_MSG_HELLO, 3)])
    pid, verdict = ctunnel.check_master(tunnel)
    assert (pid, verdict.state) == (4242, "UP")


def test_stdio_forward_request_passes_two_descriptors(tmp_path):
    tunnel = make_tunnel(tmp_path)
    fake = FakeMaster(str(tmp_path / "pi.ctl"), [
        HELLO, "packet", "packet", "fd", "fd",
        ctunnel.mux_packet(ctunnel.MUX_S_SESSION_OPENED, 1, 9)])
    try:
        with ctunnel.MuxClient(ctunnel.state_path(tunnel, "ctl"), time.monotonic() + 2) as mux:
            read_end, write_end = os.pipe()
            try:
                mux.open_stdio("127.0.0.1", 1122, read_end, write_end)
            finally:
                os.close(read_end)
                os.close(write_end)
        fake.thread.join(5)
        assert fake.received == ctunnel.mux_packet(ctunnel.MUX_MSG_HELLO, 4)[4:] + \
            ctunnel.mux_packet(ctunnel.MUX_C_NEW_STDIO_FWD, 1, "", "127.0.0.1", 1122)[4:]
        assert len(fake.fds) == 2
    finally:
        fake.close()


def test_refused_channel_raises_with_the_masters_reason(master, tmp_path):
    master(HELLO, "packet", "packet", "fd", "fd",
           ctunnel.mux_packet(ctunnel.MUX_S_FAILURE, 1, "Session open refused by peer"))
    with ctunnel.MuxClient(str(tmp_path / "pi.ctl"), time.monotonic() + 2) as mux:
        with pytest.raises(ctunnel.MuxRefused, match="Session open refused by peer"):
            mux.open_stdio("127.0.0.1", 1122, 0, 1)


@pytest.mark.parametrize("said,hint", [
    ("root@vps: Permission denied (publickey).", "the server refused the key for pi: check "
     "user, and that the key's .pub line is in that user's ~/.ssh/authorized_keys"),
    ("Host key verification failed.", "not in known_hosts yet: check its fingerprint "
     "(ssh-keyscan -p 2222 vps | ssh-keygen -lf -), then accept it by logging in once by "
     "hand: ssh -p 2222 pi@vps"),
    ("ssh: Could not resolve hostname vps: Name or service not known", "check host"),
    ("kex_exchange_identification: read: Connection reset by peer", None),
])
def test_launch_failures_get_a_hint(tmp_path, said, hint):
    tunnel = make_tunnel(tmp_path, user="pi", port=2222)
    text = ctunnel.explain_ssh_failure(tunnel, [said], 255)
    assert text.startswith(said)
    assert (hint in text) if hint else text == said
    assert ctunnel.explain_ssh_failure(tunnel, [], 255) == "ssh exited 255 without a message"


def test_a_changed_host_key_is_its_own_loud_message(tmp_path):
    tunnel = make_tunnel(tmp_path, port=2222)
    lines = ["@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
             "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
             "Host key for [vps]:2222 has changed and you have requested strict checking.",
             "Host key verification failed."]
    text = ctunnel.explain_ssh_failure(tunnel, lines, 255)
    assert "host key has CHANGED" in text and "may be an attack" in text
    assert "ssh-keygen -R '[vps]:2222'" in text
    assert "accept it by logging in" not in text


@pytest.mark.parametrize("passphrase,expected", [("", False), ("secret", True)])
def test_key_passphrase_is_read_from_the_key_file(tmp_path, passphrase, expected):
    import subprocess
    key = str(tmp_path / "k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", key],
                   check=True)
    assert ctunnel.key_has_passphrase(key) is expected
    assert ctunnel.key_has_passphrase(str(tmp_path / "missing")) is False


def test_a_program_that_is_not_ssh_is_named(tmp_path):
    tunnel = make_tunnel(tmp_path, ssh="/bin/ls")
    text = ctunnel.explain_ssh_failure(tunnel, ["/bin/ls: invalid option -- 'f'",
                                                "Try '/bin/ls --help' for more information."], 2)
    assert text.startswith("/bin/ls is not OpenSSH's ssh client (it exited 2: Try")


def test_a_tick_that_cannot_use_its_state_dir_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")      # after loading, a file took the parent's name
    gone = make_tunnel(tmp_path / "file" / "state")
    reporter = ctunnel.Reporter(stream=sys.stderr, syslog_path=str(tmp_path / "nolog"))
    args = ctunnel.parse_args([])
    assert ctunnel.cmd_check([gone], args, reporter) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pi: [Errno 20] Not a directory" in err[0]


def test_an_older_protocol_checks_a_reverse_forward_with_nc_over_the_master(tmp_path, fake_ssh):
    """A master that does not speak version 4 cannot open our channel: nc is
    asked over the same master (the fake ssh stands for it), never a new connection."""
    tunnel = fake_ssh(0, stdout=nc_said("", 0))
    FakeMaster(str(tmp_path / "pi.ctl"), [ctunnel.mux_packet(ctunnel.MUX_MSG_HELLO, 3)])
    verdict = ctunnel.check_remote_forward(tunnel, tunnel.forwards[0], 4242, ctunnel.TcpTable())
    assert verdict.state == "UP"
    assert verdict.detail == ("listening on the server (nc), since the control master speaks "
                              "mux protocol 3, which cannot open a channel")
    assert "ProxyCommand=false" in ctunnel.build_mux_argv(tunnel, "x")


TCP_TABLE = (b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
             b"timeout inode\n"
             b"   0: 0100007F:0462 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
             b"        0 1234 1 0000000000000000 100 0 0 10 0\n"
             b"   1: 0100007F:D431 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0"
             b"        0 12345 1 0000000000000000 20 4 30 10 -1\n")


def test_tcp_table_lines_are_found_by_inode_and_decoded():
    listener = ctunnel._find_inode(TCP_TABLE, 1234)
    assert listener == ctunnel.TcpSocket(1234, "127.0.0.1", 1122, "0.0.0.0", 0, ctunnel.TCP_LISTEN)
    conn = ctunnel._find_inode(TCP_TABLE, 12345)
    assert (conn.remote_addr, conn.remote_port, conn.state) == ("127.0.0.1", 22, 1)
    assert ctunnel._find_inode(TCP_TABLE, 0) is None          # "0" is in other fields
    assert ctunnel._find_inode(TCP_TABLE, 999) is None


@pytest.mark.skipif(sys.byteorder != "little", reason="the table is in the host's byte order")
@pytest.mark.parametrize("text,address", [
    (b"0100007F", "127.0.0.1"),
    (b"00000000000000000000000001000000", "::1"),
    (b"0000000000000000FFFF00000100007F", "127.0.0.1"),        # v4-mapped
    (b"B80D0120000000000000000001000000", "2001:db8::1"),
])
def test_proc_addresses(text, address):
    assert ctunnel._proc_address(text) == address


def test_one_table_read_serves_every_check_that_waits_for_it(monkeypatch):
    table = ctunnel.TcpTable()
    reads = []
    real_open = open

    def counting_open(path, *a, **k):
        reads.append(path)
        return real_open(path, *a, **k)
    monkeypatch.setattr("builtins.open", counting_open)
    seen = time.monotonic()
    table.sockets({1}, seen)
    table.sockets({2}, seen)                 # saw its socket before that read began
    assert reads.count("/proc/net/tcp") == 1
    table.sockets({3}, time.monotonic())     # saw it after: needs a new read
    assert reads.count("/proc/net/tcp") == 2


@pytest.mark.parametrize("rc,stderr,sleep,why", [
    (255, "channel 0: open failed: connect failed: Connection refused\nstdio forwarding failed",
     None, "nothing listens on 127.0.0.1:1122 there: the server's policy refuses the port"),
    # something answered (or held the channel open): the follow-up command is asked
    # who holds it; this fake ssh prints nothing, so the server "cannot be looked into"
    (0, "", 5, "something on the server holds 127.0.0.1:1122, and ctunnel cannot look"),
    (0, "", None, "something on the server holds 127.0.0.1:1122, and ctunnel cannot look"),
    (255, "ssh: connect to host vps port 22: Connection timed out", None,
     "the server still holds the port, or refuses it: ssh: connect to host vps port 22"),
])
def test_a_refused_remote_port_is_classified(fake_ssh, rc, stderr, sleep, why):
    tunnel = fake_ssh(rc, stderr=stderr, sleep=sleep)
    said = "Error: remote port forwarding failed for listen port 1122"
    reclaimed, text = ctunnel.explain_held_port(tunnel, said)
    assert reclaimed is None
    assert text.startswith("%s (%s" % (said, why)), text


def test_other_failures_are_not_taken_for_a_held_port(fake_ssh):
    tunnel = fake_ssh(0)
    assert ctunnel.explain_held_port(tunnel, "Permission denied") == (None, "Permission denied")
    assert ctunnel.explain_held_port(tunnel, None) == (None, None)
