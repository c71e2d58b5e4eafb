"""Hardening: trust only what is ours, bound every read, one bad tunnel hurts only itself.

Each test fails when its defence is removed: the files planted here would be
written through, the look-alikes signalled, the memory spent, the tick stopped.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from harness import (CTUNNEL, SshServer, ThrowawayUser, as_user, connect_read, ctunnel_argv, fill,
                     free_port, good_section, pid_alive, pids_with_arg, run_ctunnel as run,
                     wait_for)

from ctunnellib import ladder, procfs, statefiles

PEAK_RSS = """
import os, runpy, sys
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as e:
    code = e.code
else:
    code = 0
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0].split()[1]
sys.stdout.write("peak-rss-kb %s\\n" % hwm)
sys.exit(code)
"""


def peak_rss_run(*args, timeout=120):
    """Run ctunnel; return (result, its own peak RSS in MB, from this exec's VmHWM)."""
    result = subprocess.run([sys.executable, "-c", PEAK_RSS, CTUNNEL] + list(args),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=timeout)
    kb = re.search(r"peak-rss-kb (\d+)", result.stdout)
    return result, int(kb.group(1)) / 1024


# --- trust: config and state_dir --------------------------------------------

@pytest.fixture
def stranger():
    home = tempfile.mkdtemp(prefix="cts", dir="/tmp")
    os.chmod(home, 0o755)
    user = ThrowawayUser(os.path.join(home, "home"))
    yield user
    user.remove()
    subprocess.run(["rm", "-rf", home])


def run_as(user, *args):
    return run(*args, user=user)


def test_a_config_others_may_write_is_refused_with_the_fix(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    conf.chmod(0o664)
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2
    assert result.stderr == "ctunnel: %s: group or others may write it (chmod go-w %s)\n" \
        % (conf, conf)


def test_a_config_of_another_user_is_refused_for_root_and_for_a_user(tmp_path, keyfile,
                                                                     stranger):
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    os.chown(str(conf), stranger.uid, stranger.gid)
    result = run("-c", str(conf), "-n")                     # root, a config of the stranger
    assert result.returncode == 2
    # whose it is, by name, and the advice that is meant: run ctunnel as that user
    assert "%s: it belongs to %s (uid %d), not to you (root): run ctunnel as %s, whose it is " \
        "(or, if it is yours to take, chown root %s)" % (conf, stranger.name, stranger.uid,
                                                         stranger.name, conf) in result.stderr

    top = tempfile.mkdtemp(prefix="ctu", dir="/tmp")        # the stranger, a config of nobody
    try:
        os.chmod(top, 0o755)
        theirs = os.path.join(top, "c.conf")
        with open(theirs, "w") as f:
            f.write("[pi]\nhost = h\nremote_forward = 1:a:2\nstate_dir = %s\n"
                    % os.path.join(top, "st"))
        os.chmod(theirs, 0o644)
        os.chown(theirs, 65534, 65534)
        result = run_as(stranger, "-c", theirs, "-n")
        assert result.returncode == 2
        assert "it belongs to nobody (uid 65534), not to you (%s): run ctunnel as nobody" \
            % stranger.name in result.stderr
        os.chown(theirs, 0, 0)                              # root's own: trusted
        os.chown(top, stranger.uid, stranger.gid)
        assert run_as(stranger, "-c", theirs, "-n").returncode == 0
    finally:
        subprocess.run(["rm", "-rf", top])


@pytest.mark.parametrize("how", ["world-writable", "another user's"])
def test_a_state_dir_others_control_is_refused(tmp_path, keyfile, stranger, how):
    state = tmp_path / "st"
    state.mkdir()
    if how == "world-writable":
        state.chmod(0o777)
    else:
        os.chown(str(state), stranger.uid, stranger.gid)
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile, state_dir=str(state)))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert 'state_dir "%s": ' % state in result.stderr
    assert ("chmod go-w %s)" % state if how == "world-writable" else
            "run ctunnel as %s" % stranger.name) in result.stderr


def test_a_shared_folder_as_state_dir_gets_advice_that_is_safe(tmp_path, keyfile):
    """/tmp: anyone may create files there. Not "chmod go-w /tmp": a folder of your own."""
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile, state_dir="/tmp"))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2
    assert result.stderr == ('ctunnel: %s [pi]: state_dir "/tmp": it is shared: every user may '
                             "create files there; use a folder of your own, e.g. "
                             "~/.local/state/ctunnel\n" % conf)


@pytest.mark.parametrize("source", ["fifo", "/dev/zero"])
def test_a_config_that_is_no_file_is_refused_at_once(tmp_path, source):
    path = str(tmp_path / "fifo")
    if source == "fifo":
        os.mkfifo(path)
    else:
        path = source
    began = time.monotonic()
    result = run("-c", path)
    assert time.monotonic() - began < 10
    assert (result.returncode, result.stderr) == (2, "ctunnel: %s: not a regular file\n" % path)


def test_a_config_over_a_megabyte_is_refused(tmp_path):
    conf = tmp_path / "big.conf"
    conf.write_text("# padding\n" * 200000)
    result = run("-c", str(conf))
    assert result.returncode == 2 and "is too big for a config" in result.stderr


# --- files in state_dir ------------------------------------------------------

def test_symlinks_planted_in_state_dir_are_never_followed(rig, service, tmp_path):
    """Every file a tick opens, and the temp names it used to use: the victims
    stay as they were."""
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    state = os.path.join(rig.state_dir, "state")
    os.makedirs(state, mode=0o700)
    victims = {}
    for name in ["pi.log", "pi.state", "pi.pid"] + ["pi.%s.tmp%d" % (kind, pid)
                                                     for kind in ("pid", "state")
                                                     for pid in range(os.getpid(),
                                                                      os.getpid() + 200)]:
        victim = str(tmp_path / ("victim-" + name))
        with open(victim, "w") as f:
            f.write("precious %s\n" % name)
        os.symlink(victim, os.path.join(state, name))
        victims[victim] = "precious %s\n" % name
    first = rig.run()
    assert "Traceback" not in first.stderr
    assert len(first.stderr.splitlines()) == 1, first.stderr
    assert "Too many levels of symbolic links" in first.stderr    # the log: refused, said
    os.unlink(os.path.join(state, "pi.log"))
    second = rig.run()
    assert second.returncode == 0, second.stderr
    assert "pi: started" in second.stderr
    for victim, text in victims.items():
        assert open(victim).read() == text, victim
    assert not os.path.islink(os.path.join(state, "pi.pid"))    # replaced, not followed
    assert connect_read(remote) == service.greeting


def test_a_planted_lock_symlink_is_refused(rig, service, tmp_path):
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port))
    state = os.path.join(rig.state_dir, "state")
    os.makedirs(state, mode=0o700)
    victim = tmp_path / "victim"
    os.symlink(str(victim), os.path.join(state, "pi.lock"))
    tick = rig.run()
    assert tick.returncode == 1 and "Too many levels of symbolic links" in tick.stderr
    assert not victim.exists()          # O_CREAT through the link would have made it
    assert rig.ssh_pids() == []


def test_state_files_are_0600(rig, service):
    rig.start_reverse(service)
    os.kill(rig.pid(), signal.SIGKILL)
    wait_for(lambda: not pid_alive(rig.pid()), what="ssh to die")
    assert rig.run().returncode == 0
    for suffix in ("pid", "state", "lock", "log"):
        assert os.stat(rig.path("pi", suffix)).st_mode & 0o777 == 0o600, suffix


# --- processes ---------------------------------------------------------------

def test_look_alikes_are_never_signalled(rig, service, stranger):
    """A same-user program that only calls itself ssh, and another user's real ssh,
    both naming our control socket: the repair leaves them alone."""
    remote, _ = rig.start_reverse(service)
    ctl = rig.path("pi", "ctl")
    not_ssh = subprocess.Popen(["/usr/bin/ssh", "-c", "import time; time.sleep(60)", "-S", ctl],
                               executable=sys.executable)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    theirs = subprocess.Popen(as_user(stranger) + ["/usr/bin/ssh", "-F", "/dev/null", "-o", "BatchMode=yes",
                               "-o", "ConnectTimeout=60", "-p", str(silent.getsockname()[1]),
                               "-S", ctl, "-M", "-N", "127.0.0.1"],
                              stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: "ssh" in os.readlink("/proc/%d/exe" % theirs.pid), what="their ssh")
        old = rig.pid()
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not pid_alive(old), what="our ssh to die")
        os.unlink(rig.path("pi", "pid"))            # so that the repair scans /proc
        tick = rig.run()
        assert tick.returncode == 0, tick.stderr
        assert pid_alive(not_ssh.pid) and pid_alive(theirs.pid)
        assert connect_read(remote) == service.greeting
    finally:
        for p in (not_ssh, theirs):
            p.kill()
            p.wait()
        silent.close()


def test_processes_that_ignore_sigterm_cost_one_grace_period_in_all():
    stubborn = [subprocess.Popen([sys.executable, "-c",
                                  "import signal, time; signal.signal(signal.SIGTERM, "
                                  "signal.SIG_IGN); print(1, flush=True); time.sleep(60)"],
                                 stdout=subprocess.PIPE) for _ in range(5)]
    for p in stubborn:
        p.stdout.readline()                 # SIG_IGN is in place
    began = time.monotonic()
    gone = procfs.kill_processes([p.pid for p in stubborn], grace=1.0)
    took = time.monotonic() - began
    for p in stubborn:
        p.wait()
        p.stdout.close()
    assert sorted(gone) == sorted(p.pid for p in stubborn)
    assert took < 2.5, "took %.1fs: each look-alike cost its own grace period" % took


def test_a_vanished_pid_never_raises():
    assert procfs.kill_processes([2 ** 22 + 12345], grace=0.1) == [2 ** 22 + 12345]


# --- bounded reads ------------------------------------------------------------

def test_a_server_that_talks_100_mb_costs_no_memory(make_rig, service, tmp_path):
    """The nc fallback's answer: 100 MB on stderr from a fake nc on the server."""
    tools = tempfile.mkdtemp(prefix="ctn", dir="/tmp")
    os.chmod(tools, 0o755)
    for name in ("sh", "head"):
        os.symlink("/bin/" + name if os.path.exists("/bin/" + name) else "/usr/bin/" + name,
                   os.path.join(tools, name))
    with open(os.path.join(tools, "nc"), "w") as f:
        f.write("#!/bin/sh\nhead -c 100000000 /dev/zero >&2\nexit 0\n")
    os.chmod(os.path.join(tools, "nc"), 0o755)
    server = SshServer(str(tmp_path), extra=["AllowTcpForwarding remote"], session_path=tools)
    try:
        rig = make_rig(server)
        rig.start_reverse(service, check_timeout=20)
        result, mb = peak_rss_run("-c", rig.conf)
        assert result.returncode == 0, result.stderr
        assert mb < 40, "peak RSS %.0f MB" % mb
    finally:
        server.stop()
        subprocess.run(["rm", "-rf", tools])


def test_a_100_mb_log_is_read_from_its_end_and_cut_back(rig, service):
    remote, _ = rig.start_reverse(service)
    with open(rig.path("pi", "log"), "ab") as f:
        f.write((b"x" * 99 + b"\n") * 1000000)
    result, mb = peak_rss_run("-c", rig.conf)
    assert result.returncode == 0, result.stderr
    assert mb < 40, "peak RSS %.0f MB" % mb
    assert os.path.getsize(rig.path("pi", "log")) <= statefiles.LOG_KEEP
    assert connect_read(remote) == service.greeting


def test_2000_sections_cost_bounded_threads_and_all_are_reported(tmp_path):
    state = tempfile.mkdtemp(prefix="ct2k", dir="/tmp")
    try:
        conf = tmp_path / "c.conf"
        conf.write_text("[DEFAULT]\nhost = 127.0.0.1\nssh = /bin/false\nstate_dir = %s\n"
                        % state + "".join("[t%d]\nremote_forward = %d:127.0.0.1:22\n"
                                          % (i, 20000 + i) for i in range(2000)))
        tick = subprocess.Popen(ctunnel_argv("-c", str(conf), "-q"),
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
        most = [0]

        def watch():
            while tick.poll() is None:
                try:
                    with open("/proc/%d/status" % tick.pid) as f:
                        threads = int(re.search(r"Threads:\s+(\d+)", f.read()).group(1))
                    most[0] = max(most[0], threads)
                except (OSError, AttributeError):
                    pass
                time.sleep(0.01)
        watcher = threading.Thread(target=watch)
        watcher.start()
        err = tick.communicate(timeout=300)[1]
        watcher.join()
        assert tick.returncode == 1
        assert "Traceback" not in err
        assert sorted(re.findall(r"(t\d+): start failed", err)) == \
            sorted("t%d" % i for i in range(2000))
        assert 1 < most[0] <= ladder.PARALLEL + 1
    finally:
        subprocess.run(["rm", "-rf", state])


# --- one bad tunnel, garbled files ----------------------------------------------

def test_a_nul_byte_in_one_section_is_one_line_and_the_others_run(rig, service):
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    with open(rig.conf, "a") as f:
        f.write("[bad]\nhost = 127.0.0.1\x00x\nremote_forward = 1:127.0.0.1:2\n")
    tick = rig.run()
    assert tick.returncode == 2
    lines = tick.stderr.splitlines()
    assert len(lines) == 2 and "[bad]: host contains a control character" in lines[0]
    assert "pi: started" in lines[1]
    assert connect_read(remote) == service.greeting


@pytest.mark.parametrize("garbage", ["\u0661\u0662\u0663", "9" * 5000, "-5", "12 34", ""])
def test_a_garbled_pidfile_is_treated_as_absent(rig, service, garbage):
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port))
    os.makedirs(os.path.dirname(rig.path("pi", "pid")), mode=0o700)
    with open(rig.path("pi", "pid"), "w") as f:
        f.write(garbage)
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert "pi: started (pid %d)" % rig.pid() in tick.stderr


@pytest.mark.parametrize("state", ['{"failures": "x", "restarts": []}', "[1, 2]", "\x00{",
                                   '{"warnings": 5}'])
def test_a_garbled_state_file_is_treated_as_absent(rig, service, state):
    remote, _ = rig.start_reverse(service)
    os.kill(rig.pid(), signal.SIGKILL)
    wait_for(lambda: not pid_alive(rig.pid()), what="ssh to die")
    with open(rig.path("pi", "state"), "w") as f:
        f.write(state)
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert "pi: restarted" in tick.stderr and "internal error" not in tick.stderr
    assert json.load(open(rig.path("pi", "state")))["restarts"] == 1
    assert rig.run("status").returncode == 0


def test_a_section_name_with_blanks_is_refused(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[ pi ]\n" + good_section(tmp_path, keyfile))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2 and 'tunnel name " pi " has blanks around it' in result.stderr


# --- a full disk -------------------------------------------------------------------

def test_a_full_disk_leaves_no_temp_files_and_no_relaunch_loop(rig, service, full_disk):
    mount, state = full_disk
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                     state_dir=state)
    fill(mount)
    first = rig.run()
    assert "Traceback" not in first.stderr
    assert "pi: start" in first.stderr
    assert connect_read(remote) == service.greeting          # ssh runs, unrecorded
    (ssh,) = pids_with_arg(state)
    for _ in range(2):
        again = rig.run()
        assert "Traceback" not in again.stderr
        assert "restart" not in again.stderr and "started" not in again.stderr, again.stderr
    assert [n for n in os.listdir(state) if ".tmp" in n or n.count(".") > 1] == []
    assert pids_with_arg(state) == [ssh]                     # adopted, never doubled
    assert connect_read(remote) == service.greeting
    # status shows what the tick adopted; stop ends it, and says at most what it
    # could not write
    status = rig.run("status")
    assert "pi: healthy, pid %d" % ssh in status.stdout, status.stdout
    stop = rig.run("stop")
    assert stop.returncode == 0, stop.stderr
    lines = stop.stderr.splitlines()
    assert "pi: stopped (pid %d)" % ssh in lines[0] and len(lines) <= 2, lines
    assert all("cannot write" in line for line in lines[1:]), lines
    wait_for(lambda: not pid_alive(ssh), what="the tunnel's ssh to end")


# --- output ----------------------------------------------------------------------------

def test_escape_sequences_from_the_server_are_escaped_everywhere(make_rig, service, tmp_path):
    """A server's nc that answers with terminal escapes and a forged log line."""
    tools = tempfile.mkdtemp(prefix="cte", dir="/tmp")
    os.chmod(tools, 0o755)
    os.symlink("/bin/sh", os.path.join(tools, "sh"))
    with open(os.path.join(tools, "nc"), "w") as f:
        f.write("#!/bin/sh\nprintf '\\033]0;owned\\007\\033[2J\\nctunnel[1]: pi: forged\\n'\n"
                "exit 3\n")
    os.chmod(os.path.join(tools, "nc"), 0o755)
    server = SshServer(str(tmp_path), extra=["AllowTcpForwarding remote"], session_path=tools)
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "log"))
    sink.settimeout(5)
    try:
        rig = make_rig(server)
        remote = free_port()
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
        tick = rig.run(env=dict(os.environ, CTUNNEL_SYSLOG=str(tmp_path / "log")))
        assert tick.returncode == 0, tick.stderr
        said = [sink.recv(4096).decode() for _ in range(2)]
        status = rig.run("status")
        as_json = rig.run("status", "--json")
        for text in [tick.stderr, status.stdout, as_json.stdout] + said:
            assert "\x1b" not in text and "\x07" not in text, text
        assert "\\x1b]0;owned\\x07" in tick.stderr
        assert len(tick.stderr.splitlines()) == 2              # no forged second line
        assert "\\u001b" in as_json.stdout
    finally:
        sink.close()
        server.stop()
        subprocess.run(["rm", "-rf", tools])


# --- a tunnel another tick holds -----------------------------------------------------

def test_a_locked_tunnel_counts_as_last_seen(rig, service):
    import fcntl
    stranger_key = os.path.join(rig.state_dir, "stranger")
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", stranger_key],
                   check=True)
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port),
                     identity_file=stranger_key)
    assert rig.run().returncode == 1                        # down, and recorded as such
    fd = os.open(rig.path("pi", "lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)                      # another tick is on it
        busy = rig.run("-v")
        assert busy.returncode == 1
        assert "pi: busy: another tick is checking it (last known: down)" in busy.stderr
    finally:
        os.close(fd)
