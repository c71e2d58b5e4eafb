"""install.py, driven as a person would: through a pseudo-terminal, against a real sshd.

The wizard authenticates for ssh-copy-id through an ssh-agent the test starts
(standing in for the user's password). Its known_hosts is a temp file (through
--ssh-config), its HOME a temp dir, and its crontab a fake `crontab` first on PATH.
The real ~/.ssh, /root/.ssh and crontab are never touched.
"""

import importlib.util
import os
import pty
import re
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import textwrap
import time

import pytest

from harness import (INSTALL, ROOT, SshServer, install_copy, connect_read, end_pids, free_port,
                      pids_with_arg, wait_for)

from ctunnellib import config

_spec = importlib.util.spec_from_file_location("install", INSTALL)
install = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(install)

FAKE_CRONTAB = """\
#!%s
# A stand-in for crontab(1): keeps "the crontab" in $FAKE_CRONTAB_FILE.
import os, sys
path = os.environ["FAKE_CRONTAB_FILE"]
if sys.argv[1:] == ["-l"]:
    if not os.path.exists(path):
        sys.stderr.write("no crontab for tester\\n")
        sys.exit(1)
    sys.stdout.write(open(path).read())
elif sys.argv[1:] == ["-"]:
    open(path, "w").write(sys.stdin.read())
else:
    sys.exit("fake crontab: unexpected %%r" %% sys.argv[1:])
""" % sys.executable


class Box:
    """A fresh box: a HOME of its own, a fake crontab, an agent, a server to reach."""

    def __init__(self, tmp, session_path=None, extra=()):
        self.tmp = tmp
        self.home = os.path.join(tmp, "home")
        self.server_home = os.path.join(tmp, "srvhome")
        os.makedirs(self.home)
        os.makedirs(os.path.join(self.server_home, ".ssh"))
        os.makedirs(os.path.join(tmp, "sshd"))
        self.server = SshServer(os.path.join(tmp, "sshd"), home=self.server_home,
                                session_path=session_path, extra=extra)
        # the wizard's own ssh settings: a known_hosts that starts empty
        self.known_hosts = os.path.join(tmp, "known_hosts")
        self.ssh_config = os.path.join(tmp, "ssh_config")
        with open(self.ssh_config, "w") as f:
            f.write("Host *\n  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n"
                    % self.known_hosts)
        bin_dir = os.path.join(tmp, "bin")
        os.makedirs(bin_dir)
        with open(os.path.join(bin_dir, "crontab"), "w") as f:
            f.write(FAKE_CRONTAB)
        os.chmod(os.path.join(bin_dir, "crontab"), 0o755)
        self.crontab = os.path.join(tmp, "crontab.txt")
        self.config = os.path.join(tmp, "conf", "rstunnel.conf")
        self.agent_sock = os.path.join(tmp, "agent.sock")
        self.agent = subprocess.Popen(["ssh-agent", "-D", "-a", self.agent_sock],
                                      stdout=subprocess.DEVNULL)
        wait_for(lambda: os.path.exists(self.agent_sock), what="ssh-agent")
        self.env = {"HOME": self.home, "PATH": bin_dir + os.pathsep + os.environ["PATH"],
                    "SSH_AUTH_SOCK": self.agent_sock, "FAKE_CRONTAB_FILE": self.crontab,
                    "LANG": "C.UTF-8", "TERM": "dumb"}
        # the user's own login to the server: their key, in their agent
        subprocess.run(["ssh-add", "-q", self.server.user_key], env=self.env, check=True,
                       stderr=subprocess.DEVNULL)

    def flags(self):
        return ["--ssh-config", self.ssh_config]

    def run(self, *args, timeout=90, install=INSTALL):
        """install.py without a terminal (the --yes path)."""
        return subprocess.run([sys.executable, install] + self.flags() + list(args),
                              env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=timeout)

    def prepare_config(self):
        """A config holding only [DEFAULT] state_dir, for a setup whose ticks run: ctunnel
        takes ~ from the password database, so HOME alone would not keep them in here."""
        os.makedirs(os.path.dirname(self.config), exist_ok=True)
        if not os.path.exists(self.config):
            with open(self.config, "w") as f:
                f.write("[DEFAULT]\nstate_dir = %s\n" % os.path.join(self.tmp, "state"))

    def authorized(self):
        path = os.path.join(self.server_home, ".ssh", "authorized_keys")
        return open(path).read() if os.path.exists(path) else ""

    def close(self):
        end_pids(pids_with_arg(self.home))     # the tunnels the wizard's ticks started
        self.agent.kill()
        self.agent.wait()
        self.server.stop()


@pytest.fixture
def box():
    b = Box(tempfile.mkdtemp(prefix="ctw", dir="/tmp"))
    yield b
    b.close()
    shutil.rmtree(b.tmp, ignore_errors=True)


class Terminal:
    """install.py on a pseudo-terminal: read what it shows, type answers."""

    def __init__(self, argv, env):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.execve(argv[0], argv, env)
        self.seen = ""
        self.pos = 0

    def expect(self, pattern, timeout=30):
        """Wait until pattern shows after what was matched last; return the match."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            m = regex.search(self.seen, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0 or not self._read(left):
                raise AssertionError("no %r on the terminal; it shows:\n%s"
                                     % (pattern, self.seen[self.pos:]))

    def _read(self, timeout):
        ready, _, _ = select.select([self.fd], [], [], min(timeout, 1.0))
        if not ready:
            return True
        try:
            data = os.read(self.fd, 4096)
        except OSError:
            return False          # the other side closed: the wizard ended
        self.seen += data.decode("utf-8", "replace").replace("\r\n", "\n")
        return bool(data)

    def answer(self, prompt, text):
        self.expect(prompt)
        os.write(self.fd, text.encode() + b"\r")

    def send(self, raw):
        os.write(self.fd, raw)

    def wait(self, timeout=90):
        """Read to the end; return the exit status. The wizard must end by the deadline
        (it is killed then, and the test fails): no wait here is without one."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self._read(deadline - time.monotonic()):
            pass
        pid, status = wait_for(lambda: [r for r in [os.waitpid(self.pid, os.WNOHANG)] if r[0]],
                               max(1.0, deadline - time.monotonic()) + 5,
                               what="the wizard to end",
                               cleanup=lambda: os.kill(self.pid, signal.SIGKILL))[0]
        os.close(self.fd)
        return os.waitstatus_to_exitcode(status)


def wizard(box, *flags):
    return Terminal([sys.executable, INSTALL] + box.flags() + list(flags), box.env)


def test_wizard_from_fresh_box_to_bytes_flowing(box, service):
    box.prepare_config()
    remote = free_port()
    t = wizard(box)
    t.answer(r"ssh server \(name, IP or ssh_config alias\): ", "127.0.0.1")
    t.answer(r"its ssh port \[22\]: ", "not-a-port")
    t.expect(r'"not-a-port" is not a port \(use 1-65535\); try again.')
    t.answer(r"its ssh port \[22\]: ", str(box.server.port))
    t.answer(r"login user on the server \[%s\]: " % re.escape(box.server.user), "")
    t.answer(r"name of this tunnel \[tunnel-127-0-0-1\]: ", "pi")
    t.answer(r"expose a port of this box on the server \(reverse forward\)\? \[Y/n\]: ", "")
    t.answer(r"port on the server \[1122\]: ", str(remote))
    t.answer(r"leads to host:port on this side \[127.0.0.1:22\]: ", "127.0.0.1:%d" % service.port)
    t.answer(r"another reverse forward .*\(empty: done\): ", "")
    t.answer(r"local forward .*\(empty: none\): ", "")
    t.expect(r"cron cannot\s+type one")
    t.answer(r"key file, existing or to be created \[~/.ssh/ctunnel_pi_ed25519\]: ", "")
    t.answer(r"write the config to \[.*\]: ", box.config)
    t.answer(r"add the crontab line .*\? \[Y/n\]: ", "y")
    t.expect(r"is not in known_hosts yet")
    t.expect(r"SHA256:")
    t.answer(r"is this the server's key\? \[y/N\]: ", "y")
    t.expect(r"Made a new key: ")
    t.answer(r"install the public key on the server now .*\? \[Y/n\]: ", "")
    t.expect(r"Login with the key works.")
    t.expect(r"Wrote \[pi\] to %s \(mode 600\)" % re.escape(box.config))
    t.expect(r"Added to your crontab: \* \* \* \* \* %s -c %s"
             % (re.escape(os.path.join(ROOT, "ctunnel.py")), re.escape(box.config)))
    t.expect(r"ClientAliveInterval 10")
    t.expect(r'restrict,port-forwarding,permitlisten="127.0.0.1:%d" ssh-ed25519 ' % remote)
    t.expect(r"pi: started \(pid \d+\)")
    t.expect(r"pi: healthy, pid \d+")
    assert t.wait() == 0, t.seen

    key = os.path.join(box.home, ".ssh", "ctunnel_pi_ed25519")
    assert open(key + ".pub").read().split()[1] in box.authorized()
    assert stat.S_IMODE(os.stat(box.config).st_mode) == 0o600
    (tunnel,) = config.load_config(box.config)
    assert (tunnel.name, tunnel.identity_file, tunnel.port) == ("pi", key, box.server.port)
    assert connect_read(remote) == service.greeting


def test_end_of_input_half_way_writes_nothing(box):
    t = wizard(box)
    t.answer(r"ssh server .*: ", "127.0.0.1")
    t.answer(r"its ssh port \[22\]: ", str(box.server.port))
    t.expect(r"login user on the server .*: ")
    t.send(b"\x04")                       # ^D: end of input
    status = t.wait()
    assert status == 1
    lines = t.seen[t.pos:].strip().splitlines()
    assert lines == ['install.py: end of input at "login user on the server"; '
                     'the config was not written']
    assert not os.path.exists(box.config)
    assert not os.path.exists(os.path.join(box.home, ".ssh"))


def test_ctrl_c_at_a_prompt_writes_nothing(box):
    t = wizard(box, "--config", box.config)
    t.answer(r"ssh server .*: ", "127.0.0.1")
    t.expect(r"its ssh port \[22\]: ")
    t.send(b"\x03")                       # ^C through the terminal
    assert t.wait() == 130
    assert t.seen[t.pos:].strip().splitlines()[-1] == \
        "install.py: interrupted; the config was not written"
    assert not os.path.exists(box.config)


def test_non_interactive_second_run_adds_a_tunnel_and_keeps_the_first(box, service):
    os.makedirs(os.path.dirname(box.config))
    first_section = textwrap.dedent("""\
        # my own notes about this box: keep them
        [DEFAULT]
        check_timeout = 4
        state_dir = %s

        [office]
        # the office printer, via the same server
        host = 127.0.0.1
        port = %d
        local_forward = %d:127.0.0.1:%d

        ; a comment that belongs to the next section
        [old]
        host = 127.0.0.1
        local_forward = %d:127.0.0.1:22
        """ % (os.path.join(box.tmp, "state"), box.server.port, free_port(), service.port,
               free_port()))
    with open(box.config, "w") as f:
        f.write(first_section)
    remote = free_port()
    args = ["--yes", "--host", "127.0.0.1", "--port", str(box.server.port), "--name", "cam",
            "--remote-forward", "%d:127.0.0.1:%d" % (remote, service.port),
            "--config", box.config, "--cron", "--accept-host-key"]
    result = box.run(*args)
    assert result.returncode == 0, result.stdout + result.stderr
    text = open(box.config).read()
    assert text.startswith(first_section)             # everything before is kept, as it was
    assert "[cam]\n# ssh server: name, IP or ssh_config alias\nhost = 127.0.0.1\n" in text
    assert [t.name for t in config.load_config(box.config)] == ["office", "old", "cam"]
    assert connect_read(remote) == service.greeting
    assert open(box.crontab).read().count("ctunnel.py") == 1

    # run again with a changed forward: [cam] is replaced only with --replace
    remote2 = free_port()
    args[args.index("--remote-forward") + 1] = "%d:127.0.0.1:%d" % (remote2, service.port)
    refused = box.run(*args)
    assert refused.returncode == 2
    assert ("[cam] is in %s already (127.0.0.1, -R %d:127.0.0.1:%d); give --replace to "
            "replace it, or another --name" % (box.config, remote, service.port)) \
        in refused.stderr
    assert "%d:127.0.0.1" % remote in open(box.config).read()
    again = box.run(*(args + ["--replace"]))
    assert "The crontab line is there already." in again.stdout
    text = open(box.config).read()
    assert text.startswith(first_section) and text.count("[cam]") == 1
    assert "%d:127.0.0.1" % remote2 in text and "%d:127.0.0.1" % remote not in text
    crontab = open(box.crontab).read()
    assert crontab.count("ctunnel.py") == 1 and crontab.count(install.CRON_COMMENT) == 1


def test_the_wizard_precompiles_the_package_so_that_no_tick_compiles_it(box, service):
    """cron runs ctunnel.py as a script; the modules it imports are cached by the wizard,
    also those a healthy tick never loads (the repair, the other client)."""
    folder = os.path.join(box.tmp, "opt")
    os.mkdir(folder)
    install_copy(folder)
    box.prepare_config()
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--remote-forward", "%d:127.0.0.1:%d" % (free_port(), service.port),
                     "--config", box.config, "--no-cron", "--accept-host-key",
                     install=os.path.join(folder, "install.py"))
    assert result.returncode == 0, result.stdout + result.stderr
    sources = [os.path.join(top, name) for top, _, names in
               os.walk(os.path.join(folder, "ctunnellib")) for name in names
               if name.endswith(".py")]
    assert len(sources) > 10
    missing = [path for path in sources if not os.path.exists(
        importlib.util.cache_from_source(path))]
    assert missing == []


@pytest.mark.parametrize("args,flag", [
    ([], "--host"),
    (["--host", "vps"], "--remote-forward or --local-forward"),
    (["--host", "vps", "--remote-forward", "1122-22"], "--remote-forward"),
    (["--host", "vps", "--local-forward", "1:h:2", "--name", "a b"], "--name"),
    (["--host", "vps", "--local-forward", "1:h:2", "--config", "/etc/hostname"],
     "--config: /etc/hostname: malformed config"),
])
def test_non_interactive_names_what_is_missing_or_bad(box, args, flag):
    if "--config" not in args:
        args = ["--config", box.config] + args
    result = box.run("--yes", *args)
    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and flag in lines[0], lines
    assert not os.path.exists(box.config)


def test_unknown_host_key_is_not_trusted_without_asking(box):
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--remote-forward", "%d:127.0.0.1:22" % free_port(),
                     "--config", box.config, "--no-cron")
    assert result.returncode == 1
    assert "host key not trusted" in result.stderr
    assert not os.path.exists(box.config)
    assert not os.path.exists(box.known_hosts)


def test_login_that_does_not_work_says_what_to_fix(box):
    """No agent, no password: the new key cannot be installed, so the login fails."""
    env_no_agent = dict(box.env)
    env_no_agent.pop("SSH_AUTH_SOCK")
    result = subprocess.run(
        [sys.executable, INSTALL] + box.flags() +
        ["--yes", "--host", "127.0.0.1", "--port", str(box.server.port), "--no-cron",
         "--remote-forward", "%d:127.0.0.1:22" % free_port(), "--config", box.config,
         "--accept-host-key"],
        env=env_no_agent, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("install.py: ssh-copy-id failed (exit 1): ")
    assert "Permission denied" in last
    assert not os.path.exists(box.config)


@pytest.mark.parametrize("before,expected", [
    ("", "[pi]\nhost = new\n"),
    ("[a]\nhost = x\n", "[a]\nhost = x\n\n[pi]\nhost = new\n"),
    ("# top\n[pi]\nhost = old\n# old note\n\n# about b\n[b]\nhost = y\n",
     "# top\n[pi]\nhost = new\n\n# about b\n[b]\nhost = y\n"),
    ("[a]\nhost = x\n[pi]\nhost = old\n", "[a]\nhost = x\n[pi]\nhost = new\n"),
])
def test_merge_section_replaces_only_that_section(before, expected):
    assert install.merge_section(before, "pi", "[pi]\nhost = new\n") == expected


def test_cron_line_needs_no_c_when_ctunnel_finds_the_config(tmp_path, monkeypatch):
    # ctunnel.py installed in a folder with a space, its config beside it
    folder = tmp_path / "my box"
    folder.mkdir()
    monkeypatch.setattr(install, "CTUNNEL_PY", str(folder / "ctunnel.py"))
    beside = folder / "rstunnel.conf"
    beside.write_text("")
    quoted = "'%s'" % (folder / "ctunnel.py")
    assert install.cron_line(str(beside)) == "* * * * * " + quoted
    assert install.cron_line(str(tmp_path / "x.conf")) == \
        "* * * * * %s -c %s" % (quoted, tmp_path / "x.conf")


def test_server_advice_is_tailored():
    class Plan:
        remote = ["0.0.0.0:8080:127.0.0.1:80", "1122:127.0.0.1:22"]
        local = ["1883:127.0.0.1:1883"]
        user = "pi"
        key = None
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as pub:
        pub.write("ssh-ed25519 AAAAC3 ctunnel pi@box\n")
        pub.flush()
        Plan.key = pub.name[:-4]
        text = install.server_advice(Plan)
    assert "GatewayPorts clientspecified" in text
    assert "0.0.0.0:8080:127.0.0.1:80 must listen on more than the server's loopback" in text
    assert ('restrict,port-forwarding,permitlisten="0.0.0.0:8080",permitlisten='
            '"127.0.0.1:1122",permitopen="127.0.0.1:1883",permitopen="127.0.0.1:8080",'
            'permitopen="127.0.0.1:1122" ssh-ed25519 AAAAC3') in text
    Plan.remote = ["1122:127.0.0.1:22"]
    Plan.local = []
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as pub:
        pub.write("ssh-ed25519 AAAAC3 c\n")
        pub.flush()
        Plan.key = pub.name[:-4]
        text = install.server_advice(Plan)
    assert "GatewayPorts" not in text and "does not limit connections opened" in text


def test_key_is_installed_over_ssh_when_there_is_no_ssh_copy_id(box, service):
    box.prepare_config()
    only = os.path.join(box.tmp, "only-ssh")
    os.makedirs(only)
    for tool in ("ssh", "ssh-keygen", "ssh-keyscan"):
        os.symlink(shutil.which(tool), os.path.join(only, tool))
    os.symlink(os.path.join(box.tmp, "bin", "crontab"), os.path.join(only, "crontab"))
    env = dict(box.env, PATH=only)
    remote = free_port()
    result = subprocess.run(
        [sys.executable, INSTALL] + box.flags() +
        ["--yes", "--host", "127.0.0.1", "--port", str(box.server.port), "--no-cron",
         "--remote-forward", "%d:127.0.0.1:%d" % (remote, service.port),
         "--config", box.config, "--accept-host-key"],
        env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    key = os.path.join(box.home, ".ssh", "ctunnel_tunnel-127-0-0-1_ed25519.pub")
    assert open(key).read().split()[1] in box.authorized()
    assert connect_read(remote) == service.greeting
    assert not os.path.exists(box.crontab)


def run_yes(box, remote, service):
    box.prepare_config()
    return box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                   "--remote-forward", "%d:127.0.0.1:%d" % (remote, service.port),
                   "--config", box.config, "--no-cron", "--accept-host-key")


def test_server_without_nc_needs_no_warning(service):
    """The data-path check runs no program on the server: no nc, no warning."""
    # the server's commands run with a PATH that has the shell's tools but no nc
    tools = tempfile.mkdtemp(prefix="ctt", dir="/tmp")
    os.symlink(shutil.which("cat"), os.path.join(tools, "cat"))
    os.symlink(shutil.which("mkdir"), os.path.join(tools, "mkdir"))
    os.symlink(shutil.which("sh"), os.path.join(tools, "sh"))
    b = Box(tempfile.mkdtemp(prefix="ctw", dir="/tmp"), session_path=tools)
    try:
        remote = free_port()
        result = run_yes(b, remote, service)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "Warning" not in result.stdout and "netcat" not in result.stdout
        assert " nc " not in result.stdout
        assert ": started (pid" in result.stderr and "cannot" not in result.stderr
        assert connect_read(remote) == service.greeting
    finally:
        b.close()
        shutil.rmtree(b.tmp, ignore_errors=True)
        shutil.rmtree(tools, ignore_errors=True)


def test_reverse_port_in_use_on_the_server_is_warned_about(box, service):
    import socket
    remote = free_port()
    squatters = []
    for family, address in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        squatter = socket.socket(family)
        squatter.bind((address, remote))
        squatter.listen(1)
        squatters.append(squatter)
    try:
        result = run_yes(box, remote, service)
    finally:
        for squatter in squatters:
            squatter.close()
    assert "Warning: port %d on the server is in use already" % remote in result.stdout
    assert result.returncode == 1                      # and the first tick says why
    assert "remote port forwarding failed for listen port %d" % remote in result.stderr
    assert os.path.exists(box.config)


def test_a_failing_tool_is_one_line_not_a_traceback(box):
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--remote-forward", "%d:127.0.0.1:22" % free_port(), "--no-cron",
                     "--config", box.config, "--accept-host-key",
                     "--identity-file", "/proc/no-such-dir/key")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("install.py: ") and "/proc/no-such-dir" in line
    assert line.endswith("; the config was not written")
    assert not os.path.exists(box.config)


def test_second_tunnel_through_the_wizard_never_replaces_silently(box, service):
    """A second run against the same server: the first one's server and port by default,
    a free default name and a key of its own; naming the first tunnel asks before
    replacing it. No crontab program: not asked, and said what keeps the tunnel instead
    (exit 3: nothing keeps it yet)."""
    first = free_port()
    result = run_yes(box, first, service)
    assert result.returncode == 0, result.stdout + result.stderr
    only = os.path.join(box.tmp, "no-crontab")
    os.makedirs(only)
    for tool in ("ssh", "ssh-keygen", "ssh-keyscan", "ssh-copy-id", "sh", "cat", "mkdir",
                 "mktemp", "rm", "grep", "sed", "tr", "head", "tail", "wc", "cut", "id",
                 "dirname", "basename", "printf", "ls", "chmod", "cp", "sort", "tee",
                 "awk", "expr", "mv"):
        if shutil.which(tool):
            os.symlink(shutil.which(tool), os.path.join(only, tool))
    env = dict(box.env, PATH=only)
    second = free_port()
    t = Terminal([sys.executable, INSTALL] + box.flags() + ["--config", box.config], env)
    t.answer(r"ssh server \(name, IP or ssh_config alias\) \[127.0.0.1\]: ", "")
    t.answer(r"its ssh port \[%d\]: " % box.server.port, "")
    t.answer(r"login user on the server .*: ", "")
    t.answer(r"name of this tunnel \[tunnel-127-0-0-1-2\]: ", "tunnel-127-0-0-1")   # the first's
    t.answer(r"\[tunnel-127-0-0-1\] is in %s already \(127.0.0.1, -R %d:127.0.0.1:%d\)\. "
             r"Replace it\? \[y/N\]: " % (re.escape(box.config), first, service.port), "")
    t.answer(r"name of this tunnel \[tunnel-127-0-0-1-2\]: ", "")
    t.answer(r"reverse forward\)\? \[Y/n\]: ", "")
    t.answer(r"port on the server \[1122\]: ", str(first))     # the first tunnel's port
    t.expect(r"port %d on 127.0.0.1 is \[tunnel-127-0-0-1\]'s already: choose another port; "
             r"try again." % first)
    t.answer(r"port on the server \[1122\]: ", str(second))
    t.answer(r"leads to host:port on this side \[127.0.0.1:22\]: ", "127.0.0.1:%d" % service.port)
    t.answer(r"another reverse forward .*: ", "")
    t.answer(r"local forward .*: ", "")
    t.answer(r"key file, existing or to be created \[~/.ssh/ctunnel_tunnel-127-0-0-1-2_ed25519\]"
             r": ", "")
    t.answer(r"install the public key on the server now .*\? \[Y/n\]: ", "")
    t.expect(r"Wrote \[tunnel-127-0-0-1-2\] to ")
    t.expect(r"Nothing keeps the tunnel up yet: there is no crontab program here\. To keep it, "
             r"on this box:")
    t.expect(r"add this line to your crontab by hand: \* \* \* \* \* ")
    t.expect(r"tunnel-127-0-0-1-2: started")
    t.expect(r"The tunnel is up, but nothing keeps it up yet: see above\.")
    assert t.wait() == 3, t.seen
    assert "add the crontab line" not in t.seen                  # not asked
    tunnels = config.load_config(box.config)
    assert [x.name for x in tunnels] == ["tunnel-127-0-0-1", "tunnel-127-0-0-1-2"]
    assert tunnels[0].identity_file != tunnels[1].identity_file        # a key each
    assert connect_read(first) == service.greeting
    assert connect_read(second) == service.greeting


def test_a_typo_in_the_host_or_a_closed_port_is_asked_again_at_once(box):
    closed = free_port()
    t = wizard(box, "--config", box.config)
    t.answer(r"ssh server .*: ", "127.0.0.1:%d" % box.server.port)
    t.expect(r'"127.0.0.1:%d" names a port: the port goes in a key of its own \(host = '
             r'127.0.0.1 and port = %d\); try again.' % (box.server.port, box.server.port))
    t.answer(r"ssh server .*: ", "127.0.0.1")
    t.answer(r"its ssh port \[22\]: ", str(closed))
    t.expect(r"127.0.0.1 refused a connection on port %d: nothing listens there; try again."
             % closed)
    t.answer(r"ssh server .*: ", "127.0.0.1")
    t.answer(r"its ssh port \[22\]: ", str(box.server.port))
    t.expect(r"login user on the server .*: ")
    t.send(b"\x04")
    assert t.wait() == 1
    assert "[" not in t.seen.replace("[22]", "").replace("[%s]" % box.server.user, "")


def test_a_shared_key_gets_advice_for_every_tunnel_it_serves(box, service):
    first, second = free_port(), free_port()
    assert run_yes(box, first, service).returncode == 0
    key = os.path.join(box.home, ".ssh", "ctunnel_tunnel-127-0-0-1_ed25519")
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--name", "cam", "--identity-file", key,
                     "--remote-forward", "%d:127.0.0.1:%d" % (second, service.port),
                     "--config", box.config, "--no-cron", "--accept-host-key")
    assert result.returncode == 0, result.stdout + result.stderr
    assert ('permitlisten="127.0.0.1:%d",permitlisten="127.0.0.1:%d"' % (second, first)) \
        in result.stdout
    assert "This key is also used by [tunnel-127-0-0-1]" in result.stdout


def test_a_bad_target_answer_is_shown_as_typed():
    with pytest.raises(ValueError) as e:
        install.parse_target("49731")
    assert str(e.value) == '"49731" is not host:port (e.g. 127.0.0.1:22)'


def test_a_dropbear_server_gets_advice_that_dropbear_accepts(service, make_rig, tmp_path):
    """The wizard reads the server's banner; its key line for Dropbear (no permitlisten,
    no restrict: Dropbear rejects or narrows them) is applied, and the tunnel comes up."""
    from harness import DropbearServer
    top = tempfile.mkdtemp(prefix="ctdb", dir="/tmp")
    os.chmod(top, 0o755)
    server = DropbearServer(top)
    try:
        local_target = free_port()

        class Plan:
            host, port, user, name = "127.0.0.1", server.port, server.user, "cam"
            ssh_config, key, config = server.ssh_config, server.user_key, None
            remote = ["%d:127.0.0.1:%d" % (free_port(), service.port)]
            local = ["%d:127.0.0.1:%d" % (local_target, service.port)]
        problem, banner = install.reach_server(Plan)
        assert problem is None and install.server_kind(banner) == "dropbear"
        Plan.server = "dropbear"
        advice = install.server_advice(Plan)
        line = next(l.strip() for l in advice.splitlines() if l.strip().startswith("no-pty"))
        assert "restrict" not in line and "permitlisten" not in line
        assert "cannot limit the ports" in advice and "dropbear -K 10" in advice
        keys = os.path.join(server.account.home, ".ssh", "authorized_keys")
        with open(keys, "w") as f:
            f.write(line + "\n")
        rig = make_rig(server)
        rig.write_config(remote_forward=Plan.remote, local_forward=Plan.local)
        tick = rig.run("-v")
        assert tick.returncode == 0, tick.stderr
        assert "data path" in tick.stderr and "the server reaches 127.0.0.1:%d" \
            % service.port in tick.stderr
        assert connect_read(int(Plan.remote[0].split(":")[0])) == service.greeting
    finally:
        server.stop()
        shutil.rmtree(top, ignore_errors=True)


def test_an_openssh_server_is_told_apart(box):
    class Plan:
        host, port, user, ssh_config = "127.0.0.1", box.server.port, "x", box.ssh_config
    problem, banner = install.reach_server(Plan)
    assert problem is None and install.server_kind(banner) == "openssh"


# --- the first sitting (issue 15) ------------------------------------------------------

def test_a_crontab_that_cannot_be_written_leaves_the_user_told_what_keeps_it(box, service):
    """The line could not be added: the tunnel is up, the wizard says what to do and
    exits 3, not 0 (nothing keeps the tunnel yet)."""
    with open(os.path.join(box.tmp, "bin", "crontab"), "w") as f:
        f.write("#!/bin/sh\n[ \"$1\" = -l ] && exit 0\necho 'crontab: /var/spool: read-only "
                "file system' >&2\nexit 1\n")
    box.prepare_config()
    remote = free_port()
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--remote-forward", "%d:127.0.0.1:%d" % (remote, service.port),
                     "--config", box.config, "--cron", "--accept-host-key")
    assert result.returncode == 3, result.stdout + result.stderr
    assert "Nothing keeps the tunnel up yet: crontab - failed: crontab: /var/spool: read-only " \
        "file system. To keep it, on this box:" in result.stdout
    assert "add this line to your crontab by hand: * * * * * " in result.stdout
    assert connect_read(remote) == service.greeting


def test_a_name_too_long_for_its_state_dir_is_refused_before_any_key_or_login(box):
    long_name = "x" * 90
    result = box.run("--yes", "--host", "127.0.0.1", "--port", str(box.server.port),
                     "--name", long_name, "--remote-forward", "1122:127.0.0.1:22",
                     "--config", box.config, "--no-cron", "--accept-host-key")
    assert result.returncode == 2
    assert ('--name: "%s" is too long for state_dir ' % long_name) in result.stderr
    assert "choose a shorter name" in result.stderr
    assert not os.path.exists(os.path.join(box.home, ".ssh"))     # no key was made
    assert "known_hosts" not in os.listdir(box.tmp)               # no server step


def test_a_refused_login_asks_for_the_user_again_and_keeps_the_other_answers(box, service):
    remote = free_port()
    box.prepare_config()
    t = wizard(box, "--config", box.config, "--host", "127.0.0.1", "--port",
               str(box.server.port), "--name", "cam", "--remote-forward",
               "%d:127.0.0.1:%d" % (remote, service.port), "--no-cron", "--accept-host-key",
               "--install-key")
    t.answer(r"login user on the server .*: ", "nosuchuser")
    t.answer(r"key file, existing or to be created .*: ", "")
    t.expect(r"failed")
    t.answer(r"login user on the server \(the other answers stand\) \[nosuchuser\]: ",
             box.server.user)
    t.expect(r"Login with the key works.")
    t.expect(r"cam: started")
    assert t.wait() == 0, t.seen
    assert connect_read(remote) == service.greeting


def test_ctrl_c_at_ssh_copy_ids_password_prompt_leaves_no_temp_files(service):
    """ssh-copy-id keeps a temp folder in ~/.ssh; interrupted at its prompt, it stays
    behind unless the wizard removes it."""
    b = Box(tempfile.mkdtemp(prefix="ctw", dir="/tmp"),
            extra=["PasswordAuthentication yes", "KbdInteractiveAuthentication yes"])
    try:
        env = dict(b.env)
        env.pop("SSH_AUTH_SOCK")                 # no key of the user's: a password prompt
        t = Terminal([sys.executable, INSTALL] + b.flags() + [
            "--config", b.config, "--host", "127.0.0.1", "--port", str(b.server.port),
            "--user", "nobody", "--name", "cam", "--remote-forward", "1122:127.0.0.1:22",
            "--no-cron", "--accept-host-key", "--install-key"], env)
        t.answer(r"key file, existing or to be created .*: ", "")
        t.expect(r"[Pp]assword:")
        t.send(b"\x03")
        assert t.wait() == 130, t.seen
        dot_ssh = os.path.join(b.home, ".ssh")
        assert [n for n in os.listdir(dot_ssh) if n.startswith("ssh-copy-id")] == []
        assert not os.path.exists(b.config)
    finally:
        b.close()
        shutil.rmtree(b.tmp, ignore_errors=True)


def test_a_target_port_out_of_range_is_named_as_such():
    with pytest.raises(ValueError, match=r'"99999" is not a port \(use 1-65535\)'):
        install.parse_target("127.0.0.1:99999")


@pytest.mark.parametrize("host,name", [("127.0.0.1", "tunnel-127-0-0-1"),
                                       ("vps.example.com", "vps"),
                                       ("[fe80::1]", "tunnel-fe80-1")])
def test_default_names_are_readable(host, name):
    assert install.default_name(host) == name
    assert install.default_name(host, taken={name}) == name + "-2"
