"""What a tick says and remembers across ticks, end to end against a real sshd.

An outage is one story from the DOWN to the launch that ends it; "ssh said"
quotes only the client that died; what was launched (the client kind, the
settings) is recorded, and the config that changed since is a reason of its
own; Ctrl-C ends a tick in one line.
"""

import json
import os
import shutil
import signal
import subprocess
import tempfile
import time

from harness import (BOX_PYTHON, Service, ThrowawayUser, as_user, connect_read, ctunnel_argv,
                     descendants, free_port, install_copy, pid_alive, pids_with_arg,
                     run_ctunnel, wait_for)

from ctunnellib.procfs import socket_inodes


def private_known_hosts(rig):
    """A known_hosts of the rig's own (through its own ssh_config): (file, its text)."""
    known = os.path.join(rig.state_dir, "known_hosts")
    shutil.copy(rig.server.known_hosts, known)
    config = os.path.join(rig.state_dir, "ssh_config")
    with open(config, "w") as f:
        f.write("Host *\n  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n" % known)
    return known, config


def test_ssh_said_quotes_only_the_ssh_that_died(rig, service):
    """An earlier launch failed with a host-key error; the tunnel came up; its ssh is
    then SIGKILLed and says nothing: the restart line quotes nobody."""
    known, config = private_known_hosts(rig)
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                     ssh_config=config)
    good = open(known).read()
    open(known, "w").close()
    failed = rig.run()
    assert failed.returncode == 1 and "Host key verification failed" in failed.stderr
    with open(known, "w") as f:
        f.write(good)
    assert rig.run().returncode == 0
    old = rig.pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="ssh to die")
    tick = rig.run()
    assert tick.returncode == 0, tick.stderr
    assert tick.stderr.rstrip().endswith("pi: restarted (process %d gone)" % old), tick.stderr
    assert "said" not in tick.stderr


def test_an_outage_is_one_story_until_the_tunnel_is_back(rig, service, firewall):
    """The ssh dies while the server cannot be reached: every failed relaunch is still
    the restart, for the reason it went down, and the restart is counted once."""
    drop, lift = firewall
    remote, _ = rig.start_reverse(service, check_timeout=2)
    old = rig.pid()
    rule = drop("--dport", str(rig.server.port))
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: not pid_alive(old), what="ssh to die")
    first, second = rig.run(), rig.run()
    reason = "process %d gone" % old
    assert first.returncode == second.returncode == 1
    assert "pi: restart failed (%s): " % reason in first.stderr, first.stderr
    assert second.stderr == ""                      # the same failure: not news for cron
    state = json.load(open(rig.path("pi", "state")))
    assert (state["last_reason"], state["failures"], state.get("restarts", 0)) == \
        (reason, 2, 0)
    status = rig.run("status")
    assert "last restart" in status.stdout and reason in status.stdout, status.stdout
    lift(rule)
    back = rig.run()
    assert back.returncode == 0, back.stderr
    assert back.stderr.rstrip().endswith("pi: restarted (%s) after 2 failed attempts" % reason)
    state = json.load(open(rig.path("pi", "state")))
    assert (state["restarts"], state["last_reason"]) == (1, reason)
    assert "outage" not in state and connect_read(remote) == service.greeting


def test_a_forward_edited_between_ticks_is_applied_and_said(rig, service):
    """Only the -R target changes: the tunnel is restarted for it, and carries it."""
    remote, _ = rig.start_reverse(service)
    other = Service(b"the other service\n")
    try:
        rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, other.port))
        tick = rig.run()
        assert tick.returncode == 0, tick.stderr
        (line,) = tick.stderr.splitlines()
        assert line.endswith("pi: restarted (config changed (remote_forward))"), line
        assert connect_read(remote) == other.greeting
        assert rig.run().stderr == ""
    finally:
        other.close()


def test_stop_with_another_ssh_first_on_PATH_stops_the_tunnel_it_launched(sshd, service):
    """The config says ssh = ssh; PATH at the stop finds Dropbear's dbclient first. The
    client kind recorded at launch decides which process is the tunnel's."""
    top = tempfile.mkdtemp(prefix="ctp", dir="/tmp")
    os.chmod(top, 0o755)
    user = ThrowawayUser(os.path.join(top, "home"))
    try:
        dot_ssh = os.path.join(user.home, ".ssh")
        os.makedirs(dot_ssh, mode=0o700)
        shutil.copy(sshd.user_key, os.path.join(dot_ssh, "tunnel"))
        with open(sshd.known_hosts) as f, open(os.path.join(dot_ssh, "known_hosts"), "w") as k:
            k.write(f.read())
        bin_dir = os.path.join(top, "bin")
        os.makedirs(bin_dir)
        os.symlink(shutil.which("dbclient"), os.path.join(bin_dir, "ssh"))
        remote = free_port()
        conf = os.path.join(user.home, "c.conf")
        with open(conf, "w") as f:
            f.write("[pi]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = "
                    "~/.ssh/tunnel\nremote_forward = %d:127.0.0.1:%d\n"
                    % (sshd.port, sshd.user, remote, service.port))
        subprocess.run(["chown", "-R", "%d:%d" % (user.uid, user.gid), user.home], check=True)
        os.chmod(os.path.join(dot_ssh, "tunnel"), 0o600)
        cron = {"HOME": user.home, "PATH": "/usr/bin:/bin"}
        tick = run_ctunnel("-c", conf, user=user, env=cron)
        assert tick.returncode == 0, tick.stderr
        (ssh,) = pids_with_arg(user.home)
        assert os.path.realpath("/proc/%d/exe" % ssh) == os.path.realpath("/usr/bin/ssh")
        dropbear_first = dict(cron, PATH=bin_dir + ":/usr/bin:/bin")
        stop = run_ctunnel("-c", conf, "stop", user=user, env=dropbear_first)
        assert stop.returncode == 0, stop.stderr
        assert "pi: stopped (pid %d)" % ssh in stop.stderr
        wait_for(lambda: not pid_alive(ssh), what="the OpenSSH tunnel to end")
        status = run_ctunnel("-c", conf, "status", user=user, env=cron)
        assert "stopped by `ctunnel.py stop`" in status.stdout
    finally:
        for pid in pids_with_arg(user.home):
            os.kill(pid, signal.SIGKILL)
        user.remove()
        shutil.rmtree(top, ignore_errors=True)


def test_ctrl_c_while_the_server_is_frozen_is_one_line(make_rig, service, make_user_server):
    """Two tunnels (checked in threads) to a server whose sessions are stopped: SIGINT
    in the middle of the checks ends the tick with one line and exit status 1."""
    server = make_user_server()
    rig = make_rig(server)
    ports = [free_port(), free_port()]
    with open(rig.conf, "w") as f:
        f.write("[DEFAULT]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                "ssh_config = %s\nstate_dir = %s\ncheck_timeout = 10\n"
                % (server.port, server.user, server.user_key, server.ssh_config,
                   os.path.join(rig.state_dir, "state")))
        for n, port in enumerate(ports):
            f.write("[t%d]\nremote_forward = %d:127.0.0.1:%d\n" % (n, port, service.port))
    assert rig.run().returncode == 0
    clients = sorted(rig.ssh_pids())
    sessions = descendants(server.proc.pid)
    for pid in sessions:
        os.kill(pid, signal.SIGSTOP)
    tick = subprocess.Popen(ctunnel_argv("-c", rig.conf), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        # in the checks: the tick holds a connection to a control socket
        wait_for(lambda: len(socket_inodes(tick.pid)) >= 2, what="the tick to be checking")
        began = time.monotonic()
        tick.send_signal(signal.SIGINT)
        out, err = tick.communicate(timeout=20)
        assert time.monotonic() - began < 5
        assert (tick.returncode, out) == (1, "")
        assert err.splitlines() == ["ctunnel: interrupted"], err
        # the tunnels' own clients run on, recorded: the next tick finds them
        assert sorted(rig.ssh_pids()) == clients
    finally:
        for pid in sessions:
            os.kill(pid, signal.SIGCONT)
        if tick.poll() is None:
            tick.kill()
            tick.communicate()
    assert rig.run().returncode == 0


def test_a_held_port_with_a_dbclient_box_user_is_never_called_policy(make_user_server, service):
    """dbclient -B holds its input open while it tells: a port another box of the same
    login holds is named as held; the server's real policy is named as policy."""
    server = make_user_server(key_options='permitlisten="127.0.0.1:1"')
    top = tempfile.mkdtemp(prefix="ctb", dir="/tmp")
    os.chmod(top, 0o755)
    box = ThrowawayUser(os.path.join(top, "home"))
    try:
        dot_ssh = os.path.join(box.home, ".ssh")
        os.makedirs(dot_ssh, mode=0o700)
        key = os.path.join(dot_ssh, "id_dropbear")
        subprocess.run(["dropbearconvert", "openssh", "dropbear", server.user_key, key],
                       check=True, capture_output=True)
        with open(server.host_key + ".pub") as f:
            key_type, data = f.read().split()[:2]
        with open(os.path.join(dot_ssh, "known_hosts"), "w") as f:
            f.write("127.0.0.1 %s %s\n" % (key_type, data))
        conf = os.path.join(box.home, "c.conf")
        with open(conf, "w") as f:
            f.write("[pi]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                    "ssh = %s\ncheck_timeout = 3\nremote_forward = %d:127.0.0.1:%d\n"
                    % (server.port, server.user, key, shutil.which("dbclient"), free_port(),
                       service.port))
        subprocess.run(["chown", "-R", "%d:%d" % (box.uid, box.gid), box.home], check=True)
        tick = run_ctunnel("-c", conf, user=box, env={"HOME": box.home,
                                                      "PATH": "/usr/bin:/bin"})
        assert tick.returncode == 1
        assert "the server's policy refuses the port" in tick.stderr, tick.stderr
    finally:
        for pid in pids_with_arg(box.home):
            os.kill(pid, signal.SIGKILL)
        box.remove()
        shutil.rmtree(top, ignore_errors=True)


def test_a_tunnel_gone_from_the_config_whose_ssh_runs_is_said_once_and_stop_ends_it(
        rig, service):
    ports = [free_port(), free_port()]
    sections = ["[%s]\nremote_forward = %d:127.0.0.1:%d\n" % (name, port, service.port)
                for name, port in zip(("a", "b"), ports)]
    rig.write_config(name="DEFAULT")
    with open(rig.conf, "a") as f:
        f.write("".join(sections))
    assert rig.run().returncode == 0
    orphan = rig.pid("b")
    with open(rig.conf) as f:
        text = f.read()
    with open(rig.conf, "w") as f:
        f.write(text.replace(sections[1], ""))          # [b] deleted before any stop
    tick = rig.run()
    assert tick.returncode == 0
    assert tick.stderr.rstrip().endswith(
        "b: not in %s, but its ssh (pid %d) still runs: `ctunnel.py stop b` ends it"
        % (rig.conf, orphan)), tick.stderr
    assert rig.run().stderr == ""                        # said once (syslog: every tick)
    assert "b: not in %s, but its ssh (pid %d)" % (rig.conf, orphan) in rig.run("status").stdout
    stop = rig.run("stop", "b")
    assert stop.returncode == 0 and "b: stopped (pid %d)" % orphan in stop.stderr, stop.stderr
    wait_for(lambda: not pid_alive(orphan), what="the orphan's ssh to end")
    assert pid_alive(rig.pid("a")) and connect_read(ports[0]) == service.greeting


def test_two_configs_on_the_search_path_are_a_word_once_and_in_status_always(tmp_path):
    """rstunnel.conf beside ctunnel.py wins over ~/.config/ctunnel/rstunnel.conf: the
    tick says which it uses and which it ignores, once; status says it every time."""
    top = tempfile.mkdtemp(prefix="ctc", dir="/tmp")
    os.chmod(top, 0o755)
    user = ThrowawayUser(os.path.join(top, "home"))
    try:
        folder = os.path.join(top, "opt")
        os.mkdir(folder)
        script = install_copy(folder)
        beside = os.path.join(folder, "rstunnel.conf")
        home_conf = os.path.join(user.home, ".config", "ctunnel", "rstunnel.conf")
        os.makedirs(os.path.dirname(home_conf))
        for path, name in ((beside, "new"), (home_conf, "old")):
            with open(path, "w") as f:
                f.write("[%s]\nhost = 127.0.0.1\nport = 1\ncheck_timeout = 1\nremote_forward "
                        "= %d:127.0.0.1:22\nstate_dir = %s\n" % (name, free_port(),
                                                                  os.path.join(user.home, "st")))
        subprocess.run(["chown", "-R", "%d:%d" % (user.uid, user.gid), user.home], check=True)
        cron = {"HOME": user.home, "PATH": "/usr/bin:/bin"}

        def as_cron(*args):
            return subprocess.run(as_user(user) + [BOX_PYTHON, script] + list(args), env=cron,
                                  capture_output=True, text=True, timeout=60)
        said = "ctunnel: using %s; %s also exists, and it is ignored" % (beside, home_conf)
        first, second = as_cron(), as_cron()
        assert said in first.stderr and "new: start failed" in first.stderr, first.stderr
        assert said not in second.stderr
        assert said[len("ctunnel: "):] in as_cron("status").stdout
        assert "old" not in as_cron("status").stdout.replace(home_conf, "")
    finally:
        user.remove()
        shutil.rmtree(top, ignore_errors=True)
