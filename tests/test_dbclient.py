"""Dropbear's dbclient as the box's client (stock OpenWrt), against a real OpenSSH sshd.

The box runs as a throwaway user whose home is a temp dir: dbclient reads
~/.ssh/known_hosts from there, never from the real HOME.
"""

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import pytest

from harness import (BOX_PYTHON, Knocker, shared_install, SshServer, as_user, client_port, ThrowawayUser, connect_read, descendants, end_pids,
                      free_port, pid_alive, pids_with_arg, run_ctunnel, run_recording_modules,
                      wait_for)

DBCLIENT = shutil.which("dbclient") or "/usr/bin/dbclient"


class Box:
    """A box user with a Dropbear-format key, known_hosts in dbclient's form and a config."""

    def __init__(self, server, known=True):
        self.server = server
        self.top = tempfile.mkdtemp(prefix="ctd", dir="/tmp")
        os.chmod(self.top, 0o755)
        self.user = ThrowawayUser(os.path.join(self.top, "h"))
        self.home = self.user.home
        self.dot_ssh = os.path.join(self.home, ".ssh")
        os.makedirs(self.dot_ssh, mode=0o700)
        self.key = os.path.join(self.dot_ssh, "id_dropbear")
        subprocess.run(["dropbearconvert", "openssh", "dropbear", server.user_key, self.key],
                       check=True, capture_output=True, stdin=subprocess.DEVNULL)
        if known:
            self.know(server)
        self.conf = os.path.join(self.home, "c.conf")
        self.remote = free_port()

    def know(self, server, key_data=None):
        with open(server.host_key + ".pub") as f:
            key_type, data = f.read().split()[:2]
        with open(os.path.join(self.dot_ssh, "known_hosts"), "w") as f:
            f.write("127.0.0.1 %s %s\n" % (key_type, key_data or data))
        self.chown()

    def chown(self):
        for top, dirs, files in os.walk(self.home):
            for name in [top] + [os.path.join(top, n) for n in dirs + files]:
                os.lchown(name, self.user.uid, self.user.gid)

    def write_config(self, target_port, ssh=DBCLIENT, check_timeout=3, **keys):
        lines = ["[pi]", "host = 127.0.0.1", "port = %d" % self.server.port,
                 "user = %s" % self.server.user, "identity_file = ~/.ssh/id_dropbear",
                 "ssh = %s" % ssh, "check_timeout = %s" % check_timeout,
                 "remote_forward = %d:127.0.0.1:%d" % (self.remote, target_port)]
        lines += ["%s = %s" % kv for kv in keys.items()]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.chown()

    def env(self, home=None):
        return {"HOME": home or self.home, "PATH": "/usr/bin:/bin"}

    def run(self, *args, home=None, timeout=60):
        return run_ctunnel("-c", self.conf, *args, user=self.user, env=self.env(home),
                           timeout=timeout)

    def state(self, suffix):
        return os.path.join(self.home, ".local", "state", "ctunnel", "pi." + suffix)

    def pid(self):
        with open(self.state("pid")) as f:
            return int(f.readline())     # the first line; then what was launched

    def clients(self):
        """Live dbclient processes of this box (their argv names its key)."""
        return [p for p in pids_with_arg(self.home) if p != os.getpid()]

    def remove(self):
        end_pids(self.clients())
        self.user.remove()
        shutil.rmtree(self.top, ignore_errors=True)


@pytest.fixture
def make_box():
    boxes = []

    def make(server, **kw):
        boxes.append(Box(server, **kw))
        return boxes[-1]
    yield make
    for box in boxes:
        box.remove()


@pytest.fixture
def box(sshd, make_box):
    return make_box(sshd)


def test_first_tick_brings_a_dbclient_tunnel_up_and_proves_the_loop(box, service):
    box.write_config(service.port)
    tick = box.run()
    assert (tick.returncode, tick.stderr.count("\n")) == (0, 1), tick.stderr
    assert "pi: started (pid %d)" % box.pid() in tick.stderr
    assert connect_read(box.remote) == service.greeting
    with open("/proc/%d/cmdline" % box.pid(), "rb") as f:
        argv = f.read().split(b"\0")
    assert os.path.realpath(argv[0]) == os.path.realpath(DBCLIENT).encode() and b"-S" not in argv
    verbose = box.run("-v")
    assert verbose.returncode == 0
    assert "connection UP (pid %d running)" % box.pid() in verbose.stderr
    assert "remote forward %d UP (data path 127.0.0.1:%d -> box 127.0.0.1:%d proven" % (
        box.remote, box.remote, service.port) in verbose.stderr
    assert box.run().stderr == ""               # healthy: silent
    status = box.run("status")
    assert status.returncode == 0 and "pi: healthy, pid %d" % box.pid() in status.stdout
    stop = box.run("stop")
    assert stop.returncode == 0 and "pi: stopped" in stop.stderr
    assert box.clients() == []


def test_a_healthy_dbclient_tick_loads_neither_the_mux_client_nor_openssh(box, service):
    box.write_config(service.port)
    assert box.run().returncode == 0
    tick, loaded = run_recording_modules("-c", box.conf, user=box.user, env=box.env())
    assert tick.returncode == 0, tick.stderr
    assert {"ctunnellib.tick", "ctunnellib.clients.dbclient", "ctunnellib.probes"} <= loaded
    assert not loaded & {"ctunnellib.mux", "ctunnellib.clients.openssh", "ctunnellib.repair",
                         "subprocess", "json", "re", "socket", "collections"}, sorted(loaded)


def test_a_local_forward_through_dbclient_is_up_and_a_taken_one_is_one_line(box, service):
    local = free_port()
    box.write_config(service.port, local_forward="%d:127.0.0.1:%d" % (local, service.port))
    tick = box.run("-v")
    assert tick.returncode == 0, tick.stderr
    assert "local forward %d UP (listening on 127.0.0.1:%d (dbclient: the far end is not " \
        "checked))" % (local, local) in tick.stderr
    assert connect_read(local) == service.greeting       # box -> server -> service
    assert box.run("stop").returncode == 0
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", local))
    squatter.listen()
    try:
        tick = box.run()
        assert tick.returncode == 1 and tick.stderr.count("\n") == 1, tick.stderr
        assert "Failed local port forward 127.0.0.1:%d" % local in tick.stderr
        assert "started" not in tick.stderr and box.clients() == []
    finally:
        squatter.close()


def test_killed_dbclient_is_restarted(box, service):
    box.write_config(service.port)
    assert box.run().returncode == 0
    old = box.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="dbclient to die")
    tick = box.run()
    assert tick.returncode == 0, tick.stderr
    assert "pi: restarted (process %d gone" % old in tick.stderr
    assert box.pid() != old and connect_read(box.remote) == service.greeting


def test_frozen_dbclient_is_repaired_within_two_ticks(box, service):
    box.write_config(service.port)
    assert box.run().returncode == 0
    frozen = box.pid()
    os.kill(frozen, signal.SIGSTOP)
    ticks = [box.run()]
    if ticks[0].returncode != 0:
        ticks.append(box.run())
    assert ticks[-1].returncode == 0, [t.stderr for t in ticks]
    assert "frozen" in ticks[0].stderr and "restarted" in ticks[-1].stderr
    assert not pid_alive(frozen) and box.pid() != frozen
    assert connect_read(box.remote) == service.greeting


@pytest.mark.parametrize("remote_check", ["auto", "none"])
def test_port_taken_on_the_server_is_one_clear_line_and_never_started(box, service,
                                                                      remote_check):
    """Also with remote_check = none: the launch still waits for the loopback."""
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", box.remote))
    squatter.listen()
    try:
        box.write_config(service.port, remote_check=remote_check)
        tick = box.run()
        assert tick.returncode == 1
        assert tick.stderr.count("\n") == 1 and "started" not in tick.stderr, tick.stderr
        assert "pi: start failed: " in tick.stderr
        assert "Remote TCP forward request failed (port %d" % box.remote in tick.stderr
        # the server was asked who holds it: not a session of this login
        assert "port %d on the server is held by another program" % box.remote in tick.stderr
        assert box.clients() == []
    finally:
        squatter.close()


def test_a_port_another_box_of_the_login_holds_is_named_held_never_policy(make_user_server,
                                                                          make_box, service):
    """dbclient -B probes the port with its input held open: a listener keeps it, so a
    port held by a live tunnel of the same (ordinary) login is held, not the policy's."""
    server = make_user_server()
    first, second = make_box(server), make_box(server)
    second.remote = first.remote
    first.write_config(service.port)
    second.write_config(service.port)
    assert first.run().returncode == 0
    keeper = first.pid()
    tick = second.run()
    assert tick.returncode == 1
    assert "Remote TCP forward request failed (port %d" % first.remote in tick.stderr
    assert "held by another client of this login" in tick.stderr, tick.stderr
    assert "policy" not in tick.stderr
    assert first.pid() == keeper and pid_alive(keeper) and second.clients() == []


def test_unknown_host_key_is_one_line_and_nothing_runs(sshd, make_box, service):
    box = make_box(sshd, known=False)
    box.write_config(service.port)
    began = time.monotonic()
    tick = box.run(timeout=30)
    assert time.monotonic() - began < 30
    assert tick.returncode == 1 and tick.stderr.count("\n") == 1, tick.stderr
    assert "host key is not in %s/.ssh/known_hosts" % box.home in tick.stderr
    assert box.clients() == [] and not os.path.exists(box.state("pid"))


def test_a_changed_host_key_is_loud_and_nothing_runs(box, service):
    box.know(box.server, key_data="AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0"
                                  "dh2l9GKJl")
    box.write_config(service.port)
    tick = box.run(timeout=30)
    assert tick.returncode == 1 and tick.stderr.count("\n") == 1, tick.stderr
    assert "host key has CHANGED" in tick.stderr and "may be an attack" in tick.stderr
    assert box.clients() == []


def test_a_host_key_of_another_type_is_answered_no_at_once(box, service):
    """dbclient asks when known_hosts has the host with another key type; with stdin on
    /dev/null it would spin until killed. Its stdin says no: it exits, naming the key."""
    with open(os.path.join(box.dot_ssh, "known_hosts"), "w") as f:
        f.write("127.0.0.1 ecdsa-sha2-nistp256 AAAAE2VjZHNhLXNoYTItbmlzdHAyNTYAAAAIbmlzdHAyNTYAAA"
                "BBBEmKSENjQEezOmxkZMy7opKgwFB9nkt5YRrYMjNuG5N87uRgg6CLrbo5wpdT/jeGh2xdqY="
                "\n")
    box.chown()
    box.write_config(service.port)
    began = time.monotonic()
    tick = box.run(timeout=30)
    assert time.monotonic() - began < 6, tick.stderr        # the launch limit is 12 s
    assert tick.returncode == 1 and tick.stderr.count("\n") == 1, tick.stderr
    assert "dbclient does not trust the server's ssh-ed25519 host key (SHA256:" in tick.stderr
    assert box.clients() == []


def test_a_lost_pidfile_is_found_again_by_the_token(box, service):
    box.write_config(service.port)
    assert box.run().returncode == 0
    pid = box.pid()
    os.unlink(box.state("pid"))
    tick = box.run("-v")
    assert tick.returncode == 0 and "adopted" in tick.stderr, tick.stderr
    assert box.pid() == pid and box.clients() == [pid]


def test_a_dbclient_without_the_token_is_never_signalled(box, service):
    """The user's own dbclient, named in the pidfile, is left alone."""
    box.write_config(service.port)
    own = subprocess.Popen(as_user(box.user) + [DBCLIENT, "-J", "sleep 600", "-i", box.key,
                            "127.0.0.1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL,
                           env={"HOME": box.home, "PATH": "/usr/bin:/bin"})
    try:
        wait_for(lambda: os.path.realpath("/proc/%d/exe" % own.pid) ==
                 os.path.realpath(DBCLIENT), what="the look-alike to exec")
        os.makedirs(os.path.dirname(box.state("pid")), exist_ok=True)
        with open(box.state("pid"), "w") as f:
            f.write("%d\n" % own.pid)
        box.chown()
        tick = box.run()
        assert tick.returncode == 0, tick.stderr
        assert "pidfile names PID %d, which is not this tunnel's ssh" % own.pid in tick.stderr
        assert box.run("stop").returncode == 0
        assert own.poll() is None and pid_alive(own.pid)
    finally:
        end_pids(descendants(own.pid) + [own.pid])     # its proxy command (sleep) too
        own.wait()


def test_wrong_key_against_a_password_server_fails_clearly(tmp_path, make_box, service):
    server = SshServer(str(tmp_path), extra=["PasswordAuthentication yes"])
    try:
        box = make_box(server)
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", box.key + ".new"], check=True,
                       capture_output=True)
        os.replace(box.key + ".new", box.key)
        box.chown()
        box.write_config(service.port)
        began = time.monotonic()
        tick = box.run(timeout=30)
        assert time.monotonic() - began < 15
        assert tick.returncode == 1 and "started" not in tick.stderr, tick.stderr
        assert "refused the key for %s@127.0.0.1 and asked for a password" % server.user \
            in tick.stderr
        assert box.clients() == []
        with open(server.log) as f:
            log = f.read()
        assert "Failed publickey" in log and "Failed password" not in log   # none was sent
    finally:
        server.stop()


def test_an_openssh_format_key_says_how_to_convert_it(box, service):
    shutil.copy(box.server.user_key, box.key)
    box.chown()
    box.write_config(service.port)
    tick = box.run()
    assert tick.returncode == 1 and "dropbearconvert openssh dropbear" in tick.stderr
    assert box.clients() == []


def test_a_symlink_named_ssh_is_told_to_be_dbclient(box, service):
    """OpenWrt's /usr/bin/ssh is a symlink to Dropbear."""
    bin_dir = os.path.join(box.home, "bin")
    os.makedirs(bin_dir)
    os.symlink(DBCLIENT, os.path.join(bin_dir, "ssh"))
    box.write_config(service.port, ssh="~/bin/ssh")
    dry = box.run("-n")
    assert dry.returncode == 0, dry.stderr
    launch = dry.stdout.splitlines()[-1].split()
    assert launch[0] == os.path.join(bin_dir, "ssh") and "-S" not in launch
    assert launch[-1] == "127.0.0.1" and "ExitOnForwardFailure=yes" in launch
    assert "-L" in launch and "127.0.0.1:C1:127.0.0.1:%d" % box.remote in launch
    assert "dbclient" in dry.stdout
    tick = box.run()
    assert tick.returncode == 0 and "started" in tick.stderr, tick.stderr
    assert connect_read(box.remote) == service.greeting


def test_boot_time_HOME_and_cron_HOME_share_one_dbclient_tunnel(box, service):
    box.write_config(service.port)
    boot = box.run(home="/")
    assert boot.returncode == 0 and "started" in boot.stderr, boot.stderr
    later = box.run()
    assert (later.returncode, later.stderr) == (0, "")
    stop = box.run("stop", home="/")
    assert "pi: stopped" in stop.stderr and box.clients() == []


def test_a_dead_target_is_TARGET_DOWN_said_once_and_never_restarted(box):
    dead = free_port()
    box.write_config(dead)
    first = box.run()
    assert first.returncode == 0, first.stderr
    assert "pi: started" in first.stderr
    assert "nothing listens on 127.0.0.1:%d on the box (not restarting)" % dead in first.stderr
    pid = box.pid()
    assert (box.run().stderr, box.pid()) == ("", pid)


# the wizard runs its ticks with its own interpreter: one a box user may run


@pytest.mark.parametrize("client", ["ssh", "dbclient"])
def test_the_wizard_sets_up_a_tunnel_to_a_dropbear_server(client, service):
    """The whole wizard, as a box user, to a Dropbear server: host key, a key made (for
    dbclient in Dropbear's format), installed through the user's agent, login proven, the
    first tick up; then its key line applied on the server, and the tunnel up again."""
    from harness import DropbearServer
    top = tempfile.mkdtemp(prefix="ctw", dir="/tmp")
    os.chmod(top, 0o755)
    server = DropbearServer(os.path.join(top, "srv"))
    box = Box.__new__(Box)
    box.top, box.server = top, server
    box.user = ThrowawayUser(os.path.join(top, "h"))
    box.home, box.dot_ssh = box.user.home, os.path.join(box.user.home, ".ssh")
    agent = None
    try:
        os.makedirs(box.dot_ssh, mode=0o700)
        login = os.path.join(box.dot_ssh, "login")
        shutil.copy(server.user_key, login)
        box.chown()
        os.chmod(login, 0o600)
        as_box = as_user(box.user)
        sock = os.path.join(box.home, "agent.sock")
        env = {"HOME": box.home, "PATH": "/usr/bin:/bin", "SSH_AUTH_SOCK": sock}
        agent = subprocess.Popen(as_box + ["ssh-agent", "-D", "-a", sock],
                                 stdout=subprocess.DEVNULL, env=env)
        wait_for(lambda: os.path.exists(sock), what="ssh-agent")
        subprocess.run(as_box + ["ssh-add", "-q", login], env=env, check=True,
                       stderr=subprocess.DEVNULL)
        remote = free_port()
        box.conf = os.path.join(box.home, "c.conf")
        wizard = subprocess.run(
            as_box + [BOX_PYTHON, os.path.join(shared_install(), "install.py"), "--yes",
                      "--host", "127.0.0.1", "--port",
                      str(server.port), "--user", server.user, "--name", "cam",
                      "--remote-forward", "%d:127.0.0.1:%d" % (remote, service.port),
                      "--accept-host-key", "--install-key", "--no-cron", "--config",
                      box.conf, "--ssh", client],
            env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
        assert wizard.returncode == 0, wizard.stdout + wizard.stderr
        assert "cam: started" in wizard.stderr and "Login with the key works" in wizard.stdout
        key = os.path.join(box.dot_ssh, "ctunnel_cam_ed25519")
        with open(key, "rb") as f:
            openssh_format = f.read(64).startswith(b"-----BEGIN OPENSSH")
        assert openssh_format == (client == "ssh")
        with open(box.conf) as f:
            assert ("ssh = /usr/bin/dbclient" in f.read()) == (client == "dbclient")
        assert connect_read(remote) == service.greeting
        line = next(l.strip() for l in wizard.stdout.splitlines()
                    if l.strip().startswith("no-pty"))
        keys = os.path.join(server.account.home, ".ssh", "authorized_keys")
        with open(keys, "w") as f:          # the login key goes; the advised line stays
            f.write(line + "\n")

        def ctunnel_py(*args):
            return run_ctunnel("-c", box.conf, *args, user=box.user, env=env)
        assert ctunnel_py("stop").returncode == 0
        tick = ctunnel_py("-v")
        assert tick.returncode == 0, tick.stderr
        assert "cam: started" in tick.stderr and "data path" in tick.stderr
        assert connect_read(remote) == service.greeting
    finally:
        end_pids(pids_with_arg(box.home))
        if agent:
            agent.kill()
            agent.wait()
        server.stop()
        box.user.remove()
        shutil.rmtree(top, ignore_errors=True)


def test_a_renamed_copy_of_dbclient_is_named_as_such(box, service):
    """Told by its name, a copy called otherwise is taken for OpenSSH: the failed launch
    asks it -V and says what to set."""
    copy = os.path.join(box.home, "sshclient")
    shutil.copy(DBCLIENT, copy)
    box.write_config(service.port, ssh=copy)
    tick = box.run()
    assert tick.returncode == 1 and tick.stderr.count("\n") == 1, tick.stderr
    assert "%s is Dropbear's dbclient under another name" % copy in tick.stderr
    assert box.clients() == []


def test_a_stale_session_of_a_dbclient_tunnel_is_reclaimed(tmp_path, make_box, service):
    """Power cut on the box: the server keeps the old session and its port (a user keeps
    it busy). dbclient's keepalive gives up; the next tick asks the server through
    dbclient, ends that stale session and starts the tunnel in the same tick."""
    server = SshServer(str(tmp_path))
    rule, knocker = None, None
    try:
        box = make_box(server)
        box.write_config(service.port, check_timeout=2, server_alive_interval=1)
        assert box.run().returncode == 0
        old = box.pid()
        stale = [p for p in descendants(server.proc.pid) if pid_alive(p)]
        rule = ["-i", "lo", "-p", "tcp", "-s", "127.0.0.1", "--sport",
                str(client_port(old, server.port)), "-d", "127.0.0.1", "--dport",
                str(server.port), "-m", "comment", "--comment",
                "ctunnel-test-%d" % os.getpid(), "-j", "DROP"]
        subprocess.run(["iptables", "-w", "-I", "INPUT"] + rule, check=True)
        knocker = Knocker(box.remote)
        wait_for(lambda: not pid_alive(old), what="dbclient's keepalive to give up")
        tick = box.run()
        assert tick.returncode == 0, tick.stderr
        (line,) = tick.stderr.splitlines()
        m = re.search(r"pi: reclaimed port %d from a stale session \(server pid (\d+), up since "
                      r"\d\d:\d\d\), restarted \(process %d gone" % (box.remote, old), line)
        assert m, line
        assert int(m.group(1)) in stale
        knocker.stop()
        assert connect_read(box.remote) == service.greeting
    finally:
        if knocker:
            knocker.stop()
        if rule:
            subprocess.run(["iptables", "-w", "-D", "INPUT"] + rule)
        server.stop()


def test_a_forbidden_loopback_is_UNKNOWN_said_once_never_a_restart(tmp_path, make_box, service):
    """permitopen leaves out the reverse port: the server closes the loopback's channel at
    once, which dbclient cannot tell from "no listener". The launch still knows the forward
    was accepted (dbclient lives on); the ticks say UNKNOWN once and never restart."""
    server = SshServer(str(tmp_path), key_options='permitopen="127.0.0.1:1"')
    try:
        box = make_box(server)
        box.write_config(service.port)
        first = box.run()
        assert first.returncode == 0, first.stderr
        assert "pi: started" in first.stderr
        assert "forbids it (permitopen), nothing listens there" in first.stderr
        assert "(cannot tell; not restarting)" in first.stderr
        pid = box.pid()
        assert (box.run().stderr, box.pid()) == ("", pid)
        assert connect_read(box.remote) == service.greeting      # the tunnel itself works
    finally:
        server.stop()
