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

from harness import make_tunnel

from ctunnellib import cli, config, ladder, model, mux, programs, repair, report, tcp, tick
from ctunnellib.clients import openssh

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
    verdict = openssh.check_remote_nc(tunnel, tunnel.forwards[0])
    assert verdict.state == state
    assert verdict.detail.startswith(detail), verdict.detail


def test_nc_check_that_hangs_is_down_after_check_timeout(fake_ssh):
    tunnel = fake_ssh(0, sleep=5)
    began = time.monotonic()
    verdict = openssh.check_remote_nc(tunnel, tunnel.forwards[0])
    assert (verdict.state, verdict.detail) == ("DOWN",
                                               "nc check hung for 1s: the connection is dead")
    assert time.monotonic() - began < 3


def test_a_server_that_talks_without_end_is_read_with_a_cap(tmp_path):
    talker = tmp_path / "talker"
    talker.write_text("#!/bin/sh\nhead -c 50000000 /dev/zero\nhead -c 50000000 /dev/zero >&2\n")
    talker.chmod(0o755)
    status, out, err = programs.run([str(talker)], 30)
    assert status == 0
    assert len(out) == len(err) == programs.OUTPUT_MAX


# --- the control-socket protocol --------------------------------------------

def test_packet_encoding():
    assert mux.mux_packet(mux.MUX_MSG_HELLO, 4) == bytes.fromhex(
        "00000008" "00000001" "00000004")
    assert mux.mux_packet(mux.MUX_C_NEW_STDIO_FWD, 7, "", "127.0.0.1", 1122) == \
        bytes.fromhex("0000001d" "10000008" "00000007" "00000000" "00000009") + \
        b"127.0.0.1" + bytes.fromhex("00000462")


def test_field_decoding():
    body = bytes.fromhex("00000007" "00000003") + b"abc" + b"extension bytes"
    assert mux.mux_fields(body, "Is") == [7, "abc"]
    for short in (b"", b"\0\0\0", bytes.fromhex("00000007" "00000009") + b"abc"):
        with pytest.raises(mux.MuxError):
            mux.mux_fields(short, "Is")


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


HELLO = mux.mux_packet(mux.MUX_MSG_HELLO, 4)


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
    return mux.mux_packet(mux.MUX_S_ALIVE, request_id, pid)


@pytest.mark.parametrize("script,state,detail", [
    ([HELLO, "packet", "packet", alive_reply(1, 4242)], "UP", "pid 4242"),
    ([HELLO, "packet", "packet", alive_reply(2, 4242)], "DOWN",
     "control socket: control master answered request 2, not 1"),
    ([HELLO, "packet", "packet", mux.mux_packet(mux.MUX_S_FAILURE, 1, "no")], "DOWN",
     "control socket: no"),
    ([HELLO, "packet", "packet", mux.mux_packet(mux.MUX_S_PERMISSION_DENIED, 1, "go away")],
     "DOWN", "control socket: go away"),
    ([HELLO, "packet", "packet", mux.mux_packet(mux.MUX_S_SESSION_OPENED, 1, 3)], "DOWN",
     "control socket: control master sent 0x80000006 to an alive check"),
    ([mux.mux_packet(mux.MUX_S_ALIVE, 1, 2)], "DOWN",
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
    pid, verdict = openssh.check_master(tunnel)
    assert time.monotonic() - began < 2.5
    assert (verdict.check, verdict.state, verdict.detail) == ("master", state, detail)
    assert pid == (4242 if state == "UP" else None)


def test_master_check_wants_the_pidfiles_pid(master):
    tunnel = master(HELLO, "packet", "packet", alive_reply(1, 4242))
    pid, verdict = openssh.check_master(tunnel, expected=4343)
    assert pid is None and verdict.detail == \
        "control socket answers for pid 4242, not the pidfile's 4343"


def test_no_control_socket(tmp_path):
    pid, verdict = openssh.check_master(make_tunnel(tmp_path))
    assert verdict.detail == "control socket: No such file or directory"


def test_an_older_protocol_falls_back_to_ssh_dash_o_check(tmp_path, fake_ssh):
    tunnel = fake_ssh(0, stderr="Master running (pid=4242)\n")
    FakeMaster(str(tmp_path / "pi.ctl"), [mux.mux_packet(mux.MUX_MSG_HELLO, 3)])
    pid, verdict = openssh.check_master(tunnel)
    assert (pid, verdict.state) == (4242, "UP")


def test_stdio_forward_request_passes_two_descriptors(tmp_path):
    tunnel = make_tunnel(tmp_path)
    fake = FakeMaster(str(tmp_path / "pi.ctl"), [
        HELLO, "packet", "packet", "fd", "fd",
        mux.mux_packet(mux.MUX_S_SESSION_OPENED, 1, 9)])
    try:
        with mux.MuxClient(model.state_path(tunnel, "ctl"), time.monotonic() + 2) as client:
            read_end, write_end = os.pipe()
            try:
                client.open_stdio("127.0.0.1", 1122, read_end, write_end)
            finally:
                os.close(read_end)
                os.close(write_end)
        fake.thread.join(5)
        assert fake.received == mux.mux_packet(mux.MUX_MSG_HELLO, 4)[4:] + \
            mux.mux_packet(mux.MUX_C_NEW_STDIO_FWD, 1, "", "127.0.0.1", 1122)[4:]
        assert len(fake.fds) == 2
    finally:
        fake.close()


def test_refused_channel_raises_with_the_masters_reason(master, tmp_path):
    master(HELLO, "packet", "packet", "fd", "fd",
           mux.mux_packet(mux.MUX_S_FAILURE, 1, "Session open refused by peer"))
    with mux.MuxClient(str(tmp_path / "pi.ctl"), time.monotonic() + 2) as client:
        with pytest.raises(mux.MuxRefused, match="Session open refused by peer"):
            client.open_stdio("127.0.0.1", 1122, 0, 1)


@pytest.mark.parametrize("said,hint", [
    ("root@vps: Permission denied (publickey).", "the server refused the key for pi: check "
     "user, and that the key's .pub line is in that user's ~/.ssh/authorized_keys"),
    ("Host key verification failed.", "not in known_hosts yet: check its fingerprint "
     "(ssh-keyscan -p 2222 vps | ssh-keygen -lf -), then accept it by logging in once by "
     "hand: ssh -p 2222 pi@vps"),
    ("ssh: Could not resolve hostname vps: Name or service not known", "check host"),
    # the server dropped the login early: sshd's MaxStartups, named (a fleet's storm)
    ("kex_exchange_identification: read: Connection reset by peer", "too many logins at once "
     "for its MaxStartups"),
    ("ssh: connect to host vps port 2222: Connection refused", None),
])
def test_launch_failures_get_a_hint(tmp_path, said, hint):
    tunnel = make_tunnel(tmp_path, user="pi", port=2222)
    text = openssh.explain_ssh_failure(tunnel, [said], 255)
    assert said in text
    assert (hint in text) if hint else text == said
    assert openssh.explain_ssh_failure(tunnel, [], 255) == "ssh exited 255 without a message"


def test_a_changed_host_key_is_its_own_loud_message(tmp_path):
    tunnel = make_tunnel(tmp_path, port=2222)
    lines = ["@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@",
             "@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @",
             "Host key for [vps]:2222 has changed and you have requested strict checking.",
             "Host key verification failed."]
    text = openssh.explain_ssh_failure(tunnel, lines, 255)
    assert "host key has CHANGED" in text and "may be an attack" in text
    assert "ssh-keygen -R '[vps]:2222'" in text
    assert "accept it by logging in" not in text


@pytest.mark.parametrize("passphrase,expected", [("", False), ("secret", True)])
def test_key_passphrase_is_read_from_the_key_file(tmp_path, passphrase, expected):
    import subprocess
    key = str(tmp_path / "k")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", passphrase, "-f", key],
                   check=True)
    assert openssh.key_has_passphrase(key) is expected
    assert openssh.key_has_passphrase(str(tmp_path / "missing")) is False


def test_a_program_that_is_not_ssh_is_named(tmp_path):
    tunnel = make_tunnel(tmp_path, ssh="/bin/ls")
    text = openssh.explain_ssh_failure(tunnel, ["/bin/ls: invalid option -- 'f'",
                                                "Try '/bin/ls --help' for more information."], 2)
    assert text.startswith("/bin/ls is not OpenSSH's ssh client (it exited 2: Try")


def test_a_tick_that_cannot_use_its_state_dir_says_so_in_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("")      # after loading, a file took the parent's name
    gone = make_tunnel(tmp_path / "file" / "state")
    reporter = report.Reporter(stream=sys.stderr, syslog_path=str(tmp_path / "nolog"))
    args = cli.parse_args([])
    assert tick.cmd_check([gone], args, reporter) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pi: [Errno 20] Not a directory" in err[0]


def test_an_older_protocol_checks_a_reverse_forward_with_nc_over_the_master(tmp_path, fake_ssh):
    """A master that does not speak version 4 cannot open our channel: nc is
    asked over the same master (the fake ssh stands for it), never a new connection."""
    tunnel = fake_ssh(0, stdout=nc_said("", 0))
    FakeMaster(str(tmp_path / "pi.ctl"), [mux.mux_packet(mux.MUX_MSG_HELLO, 3)])
    verdict = openssh.check_remote_forward(tunnel, tunnel.forwards[0], 4242, tcp.TcpTable())
    assert verdict.state == "UP"
    assert verdict.detail == ("listening on the server (nc), since the control master speaks "
                              "mux protocol 3, which cannot open a channel")
    assert "ProxyCommand=false" in openssh.build_mux_argv(tunnel, "x")


TCP_TABLE = (b"  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  "
             b"timeout inode\n"
             b"   0: 0100007F:0462 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0"
             b"        0 1234 1 0000000000000000 100 0 0 10 0\n"
             b"   1: 0100007F:D431 0100007F:0016 01 00000000:00000000 00:00000000 00000000     0"
             b"        0 12345 1 0000000000000000 20 4 30 10 -1\n")


@pytest.mark.skipif(sys.byteorder != "little", reason="the table is in the host's byte order")
def test_tcp_table_lines_are_decoded():
    listener, conn = (tcp.proc_socket(line.split()) for line in TCP_TABLE.splitlines()[1:])
    assert listener == tcp.TcpSocket(1234, "127.0.0.1", 1122, "0.0.0.0", 0, tcp.TCP_LISTEN)
    assert (conn.inode, conn.remote_addr, conn.remote_port, conn.state) == \
        (12345, "127.0.0.1", 22, tcp.TCP_ESTABLISHED)


@pytest.mark.skipif(sys.byteorder != "little", reason="the table is in the host's byte order")
@pytest.mark.parametrize("text,address", [
    (b"0100007F", "127.0.0.1"),
    (b"00000000000000000000000001000000", "::1"),
    (b"0000000000000000FFFF00000100007F", "127.0.0.1"),        # v4-mapped
    (b"B80D0120000000000000000001000000", "2001:db8::1"),
])
def test_proc_addresses(text, address):
    assert tcp.proc_address(text) == address


@pytest.mark.parametrize("source", ["netlink", "proc"])
def test_one_table_read_serves_every_check_that_waits_for_it(monkeypatch, source):
    reads = []
    for name in ("diag_dump", "proc_sockets"):
        real = getattr(tcp, name)
        monkeypatch.setattr(tcp, name, lambda *a, real=real: reads.append(a) or real(*a))
    table = tcp.TcpTable()
    table.netlink = source == "netlink"
    v4 = tcp.families_of("127.0.0.1")
    seen = time.monotonic()
    table.connections({1}, 22, v4, seen)
    table.connections({2}, 22, v4, seen)     # saw its socket before that read began
    assert len(reads) == 1
    table.connections({3}, 22, v4, time.monotonic())     # saw it after: needs a new read
    assert len(reads) == 2
    table.connections({4}, 80, v4, seen)     # a port the last read did not ask for
    assert len(reads) == 3 and reads[-1][2] == frozenset((22, 80))


def run_in_threads(count, target):
    """Start count threads running target(i); return them (and [what each raised])."""
    raised = [None] * count

    def run(i):
        try:
            target(i)
        except Exception as e:
            raised[i] = e
    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    return threads, raised


def joined(threads, timeout=10):
    """True when every thread ended within timeout (none waits forever)."""
    end = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0, end - time.monotonic()))
    return not any(thread.is_alive() for thread in threads)


def test_checks_side_by_side_share_one_read_of_the_table(monkeypatch):
    """Eight ladders running, each asking for a read that begins after it saw its
    socket: one read serves them all (each read walks the kernel's whole table)."""
    reads = []
    real = tcp.TcpTable._read
    monkeypatch.setattr(tcp.TcpTable, "_read",
                        lambda *a, **kw: reads.append(a) or real(*a, **kw))
    monkeypatch.setattr(tcp.SharedTcpTable, "WINDOW", 10.0)   # all eight ask well within it
    table, v4 = tcp.SharedTcpTable(), tcp.families_of("127.0.0.1")
    for _ in range(8):
        table.enter()
    asked = threading.Barrier(8)

    def ladder(i):
        try:
            asked.wait()
            table.connections({i}, 22, v4, time.monotonic())
        finally:
            table.leave()
    threads, raised = run_in_threads(8, ladder)
    assert joined(threads) and raised == [None] * 8
    assert len(reads) == 1 and table.active == 0


def test_a_ladder_that_never_asks_holds_the_others_only_for_the_window(monkeypatch):
    monkeypatch.setattr(tcp.SharedTcpTable, "WINDOW", 0.2)
    table, v4 = tcp.SharedTcpTable(), tcp.families_of("127.0.0.1")
    table.enter()                               # busy elsewhere (a silent server)
    table.enter()
    threads, raised = run_in_threads(1, lambda i: table.connections(
        {1}, 22, v4, time.monotonic()))
    assert joined(threads) and raised == [None]


def test_a_read_that_fails_fails_its_check_and_the_others_read_again(monkeypatch):
    real, calls = tcp.TcpTable._read, []

    def failing_once(*a, **kw):
        calls.append(a)
        if len(calls) == 1:
            raise OSError("netlink said no")
        return real(*a, **kw)
    monkeypatch.setattr(tcp.TcpTable, "_read", failing_once)
    monkeypatch.setattr(tcp.SharedTcpTable, "WINDOW", 10.0)
    table, v4 = tcp.SharedTcpTable(), tcp.families_of("127.0.0.1")
    table.enter()
    table.enter()
    asked = threading.Barrier(2)

    def ladder(i):
        try:
            asked.wait()
            table.connections({i}, 22, v4, time.monotonic())
        finally:
            table.leave()
    threads, raised = run_in_threads(2, ladder)
    assert joined(threads)
    assert sorted(str(e) for e in raised if e) == ["netlink said no"]
    assert len(calls) == 2


def test_the_pool_keeps_order_and_makes_room_beside_slow_tunnels(monkeypatch):
    """Both first threads are held by tunnels that wait for all the quick ones:
    those get done only by the threads the pool adds beside the slow ones."""
    monkeypatch.setattr(ladder, "FEW", 2)
    monkeypatch.setattr(ladder, "SLOW", 0.05)
    quick_done, done = threading.Event(), []

    def work(item):
        if item == "slow":
            return quick_done.wait(10)
        done.append(item)
        if len(done) == 5:
            quick_done.set()
        return item
    items = ["slow", "slow", 1, 2, 3, 4, 5]
    results = ladder.for_each(list(reversed(items)), work)      # the pool takes from the end
    assert results == list(reversed([True, True, 1, 2, 3, 4, 5]))


def test_the_pool_raises_what_a_check_raised_and_never_hangs():
    def work(item):
        if item == 3:
            raise ValueError("a bug")
        return item
    outcome = []

    def run(_):
        with pytest.raises(ValueError, match="a bug"):
            ladder.for_each(list(range(40)), work)
        outcome.append("raised")
    threads, raised = run_in_threads(1, run)
    assert joined(threads) and raised == [None] and outcome == ["raised"]


@pytest.fixture
def sockets():
    """A listener on 127.0.0.1 and ::1, and a connection to each: (port, their inodes)."""
    made = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    server6 = socket.socket(socket.AF_INET6)
    server6.bind(("::1", port))
    for listener, address in ((server, "127.0.0.1"), (server6, "::1")):
        listener.listen(4)
        made += [listener, socket.create_connection((address, port))]
    yield port, {os.fstat(s.fileno()).st_ino: s for s in made}
    for s in made:
        s.close()


def test_the_kernel_filters_by_port_and_netlink_and_proc_agree(sockets):
    """The bytecode port filter is accepted by this kernel and picks exactly the port."""
    port, inodes = sockets
    for family in tcp.FAMILIES:
        for states, local in ((1 << tcp.TCP_LISTEN, True), (tcp.CONNECTING_OR_CONNECTED, False)):
            for ports in ((port,), (1, port, 65535), (1, 65535)):
                netlink = tcp.diag_dump(family, states, ports, local)
                assert sorted(netlink) == sorted(tcp.proc_sockets(family, states, ports, local))
                assert {s.inode for s in netlink} & set(inodes) == \
                    ({s.inode for s in netlink} if port in ports else set())
                assert len(netlink) == (port in ports)      # ours: one of each family
    table = tcp.TcpTable()
    assert len(table.listeners(port)) == 2
    found = table.connections(set(inodes), port, tcp.FAMILIES, time.monotonic())
    assert {(s.local_addr, s.remote_port) for s in found} == {("127.0.0.1", port), ("::1", port)}


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
    """As after one launch again at once (a port free again is retried first)."""
    tunnel = fake_ssh(rc, stderr=stderr, sleep=sleep)
    said = "Error: remote port forwarding failed for listen port 1122"
    again, text = repair.explain_held_port(tunnel, said, retried=[repair.FREE_AGAIN])
    assert again is None
    assert text.startswith("%s (%s" % (said, why)), text


def test_a_refused_port_that_nothing_holds_is_launched_again_once(fake_ssh):
    """Released between ssh's refusal and ctunnel's look: no policy verdict yet."""
    tunnel = fake_ssh(255, stderr="channel 0: open failed: connect failed: Connection refused")
    said = "Error: remote port forwarding failed for listen port 1122"
    assert repair.explain_held_port(tunnel, said) == (repair.FREE_AGAIN, None)


@pytest.mark.parametrize("user,words", [("pi", "only root may listen below 1024 on the server, "
                                             "and this tunnel logs in as pi"),
                                        ("root", "the server's policy refuses the port")])
def test_a_port_below_1024_is_named_for_what_it_is(fake_ssh, user, words):
    tunnel = fake_ssh(255, stderr="connect failed: Connection refused")._replace(
        user=user, remote_forward=(config.parse_forward("922:127.0.0.1:22"),))
    said = "Error: remote port forwarding failed for listen port 922"
    again, text = repair.explain_held_port(tunnel, said, retried=[repair.FREE_AGAIN])
    assert again is None and words in text, text


def test_other_failures_are_not_taken_for_a_held_port(fake_ssh):
    tunnel = fake_ssh(0)
    assert repair.explain_held_port(tunnel, "Permission denied") == (None, "Permission denied")
    assert repair.explain_held_port(tunnel, None) == (None, None)
