"""Test and bench harness: a real OpenSSH sshd and a Dropbear server on 127.0.0.1,
throwaway users, local services, and one way to run ctunnel. No pytest here:
bench/ uses it too.

Every process a test starts is ended by PID in teardown, also on failure:
sshd listeners with their per-connection children, and the ssh clients that
ctunnel launched (found by the test's own unique state directory in their argv).
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CTUNNEL = os.path.join(ROOT, "ctunnel.py")
INSTALL = os.path.join(ROOT, "install.py")
# the python a box has: the distribution's, not a developer's build in a home
BOX_PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)        # tests import the package's modules directly
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
DEADLINE = 20.0   # seconds any awaited condition may take before the test fails


# --- small helpers ----------------------------------------------------------

def wait_for(condition, timeout=DEADLINE, what="condition", cleanup=None):
    """Poll condition() until it returns something true; fail after timeout (having
    called cleanup, if given: e.g. end what was waited for)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            if cleanup:
                cleanup()
            raise AssertionError("timed out after %.0fs waiting for %s" % (timeout, what))
        time.sleep(0.05)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_ports(candidates, count):
    """count ports, taken in order from candidates, that nothing on 127.0.0.1 holds
    now; [] short of count when candidates run out. For benches' server ports:
    give candidates below the ephemeral range (32768), so that none of the many
    connections that come and go takes one of them as its own source port."""
    ports = []
    for port in candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == count:
            break
    return ports


def pid_alive(pid):
    """True if pid runs and is not a zombie (PID 1 here may never reap)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except OSError:
        return []


def pids_with_arg(text):
    """Live PIDs whose argv contains text (a path only this test made)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            if any(text in a for a in cmdline(int(entry))) and pid_alive(int(entry)):
                found.append(int(entry))
    return found


def descendants(pid):
    """PIDs of every process below pid (by PPid), deepest last."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def end_pids(pids):
    """SIGKILL (after SIGCONT) each PID and wait until it is gone."""
    for pid in pids:
        for sig in (signal.SIGCONT, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
    for pid in pids:
        wait_for(lambda: not pid_alive(pid), 5, "pid %d to end" % pid)


def connect_read(port, timeout=5.0):
    """Connect to 127.0.0.1:port and return what arrives up to a newline or EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        chunks = []
        while True:
            data = s.recv(4096)
            chunks.append(data)
            if not data or data.endswith(b"\n"):
                return b"".join(chunks)


def port_accepts(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def as_user(user):
    """The prefix that runs a command as user (a ThrowawayUser, or a uid that is also
    its gid), without supplementary groups."""
    uid, gid = (user, user) if isinstance(user, int) else (user.uid, user.gid)
    return ["setpriv", "--reuid=%d" % uid, "--regid=%d" % gid, "--clear-groups"]


_shared = {}


def shared_install():
    """A copy of the install that every user may read, made once per test run: what
    tests run as throwaway users run, wherever the clone is (under a 0700 home, say).
    Returns its folder; removed when the run ends."""
    if "folder" not in _shared:
        import atexit
        top = tempfile.mkdtemp(prefix="ctinst", dir="/tmp")
        os.chmod(top, 0o755)
        install_copy(top)
        # compiled once, as root: the users' ticks then load bytecode, as on a box
        subprocess.run([BOX_PYTHON, "-m", "compileall", "-q", os.path.join(top, "ctunnellib")],
                       check=True)
        for path in (top, os.path.join(top, "ctunnellib")):
            for name in os.listdir(path):
                os.chmod(os.path.join(path, name), 0o755 if os.path.isdir(
                    os.path.join(path, name)) else 0o644)
        atexit.register(shutil.rmtree, top, True)
        _shared["folder"] = top
    return _shared["folder"]


def ctunnel_argv(*args, user=None, python=None):
    """The argv that runs ctunnel.py; as user (see as_user): the shared install, with
    the box's python, which that user can read and run."""
    if user is None:
        return [python or sys.executable, CTUNNEL] + list(args)
    return as_user(user) + [python or BOX_PYTHON,
                            os.path.join(shared_install(), "ctunnel.py")] + list(args)


def install_copy(folder):
    """Copy what a box installs (ctunnel.py, install.py, ctunnellib/) into folder;
    return the copied ctunnel.py."""
    for name in ("ctunnel.py", "install.py"):
        shutil.copy2(os.path.join(ROOT, name), os.path.join(folder, name))
    shutil.copytree(os.path.join(ROOT, "ctunnellib"), os.path.join(folder, "ctunnellib"),
                    ignore=shutil.ignore_patterns("__pycache__"))
    return os.path.join(folder, "ctunnel.py")


def run_ctunnel(*args, user=None, env=None, cwd=None, timeout=60, python=None):
    """Run ctunnel.py as cron would, optionally as user; return the CompletedProcess."""
    return subprocess.run(ctunnel_argv(*args, user=user, python=python),
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=cwd)


# Runs the entry as cron does (as __main__), then lists the modules it loaded.
_RECORD = """
import atexit, sys
atexit.register(lambda: sys.stderr.write("MODULES %s\\n" % " ".join(sys.modules)))
path = sys.argv[1]
sys.argv = sys.argv[1:]
exec(compile(open(path).read(), path, "exec"), {"__name__": "__main__", "__file__": path})
"""


def run_recording_modules(*args, user=None, env=None):
    """Run ctunnel.py (as BOX_PYTHON, as cron would); return (the CompletedProcess,
    the modules it loaded beyond those the interpreter loads by itself)."""
    startup = subprocess.run([BOX_PYTHON, "-c", "import sys; print(' '.join(sys.modules))"],
                             capture_output=True, text=True, check=True).stdout.split()
    script = os.path.join(shared_install(), "ctunnel.py") if user else CTUNNEL
    result = subprocess.run((as_user(user) if user else []) +
                            [BOX_PYTHON, "-c", _RECORD, script] + list(args),
                            capture_output=True, text=True, stdin=subprocess.DEVNULL,
                            timeout=60, env=env)
    said = [line for line in result.stderr.splitlines() if line.startswith("MODULES ")]
    assert said, result.stderr
    return result, set(said[-1].split()[1:]) - set(startup)


def make_tunnel(state_dir, **over):
    """A Tunnel for tests of pure pieces (argv, verdicts), as the config would load it."""
    from ctunnellib.config import DEFAULTS, Tunnel, parse_forward
    base = dict(DEFAULTS, name="pi", host="vps", port=None, ssh_options=(), ssh="/usr/bin/ssh",
                remote_forward=(parse_forward("1122:127.0.0.1:22"),), local_forward=(),
                server_alive_interval=10, server_alive_count_max=3, check_timeout=5.0,
                reclaim=True, state_dir=str(state_dir), client="openssh")
    base.update(over)
    return Tunnel(**base)


def good_section(tmp_path, keyfile, **override):
    """A valid tunnel body; override replaces keys (None drops one)."""
    keys = {"host": "example.invalid", "remote_forward": "1122:127.0.0.1:22",
            "identity_file": keyfile, "state_dir": str(tmp_path / "st")}
    keys.update(override)
    return "".join("%s = %s\n" % kv for kv in keys.items() if kv[1] is not None)


def client_port(pid, server_port):
    """The local port of pid's TCP connection to the server."""
    from ctunnellib import procfs, tcp
    inodes = procfs.socket_inodes(pid)
    for sock in tcp.TcpTable().connections(inodes, server_port, tcp.FAMILIES, time.monotonic()):
        return sock.local_port
    raise AssertionError("pid %d has no connection to port %d" % (pid, server_port))


class Knocker:
    """A user's client retrying the reverse port every 0.5 s (keeps a stale session busy)."""

    def __init__(self, port):
        self.port, self.running = port, True
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while self.running:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.4).close()
            except OSError:
                pass
            time.sleep(0.5)

    def stop(self):
        self.running = False
        self.thread.join()


def fill(mount):
    fd = os.open(os.path.join(mount, "filler"), os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass                    # ENOSPC: full
    finally:
        os.close(fd)


# --- the ssh server ---------------------------------------------------------

class SshServer:
    """A real sshd on 127.0.0.1:<free port> with generated keys, in dir."""

    def __init__(self, directory, key_options="", home=None, session_path=None, extra=(),
                 user=None, wrap=()):
        """home: give sessions this HOME (ssh-copy-id writes to $HOME/.ssh there).
        session_path: the PATH commands run with on the server (e.g. one without nc).
        extra: more sshd_config lines. user: the login user (default: ours).
        wrap: a command sshd runs under (e.g. unshare into a pid namespace)."""
        self.dir = directory
        self.port = free_port()
        self.user = user or getpass.getuser()
        self.host_key = os.path.join(directory, "host_ed25519")
        self.user_key = os.path.join(directory, "user_ed25519")
        self.known_hosts = os.path.join(directory, "known_hosts")
        self.ssh_config = os.path.join(directory, "ssh_config")
        self.config = os.path.join(directory, "sshd_config")
        self.log = os.path.join(directory, "sshd.log")
        for key in (self.host_key, self.user_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", key],
                           check=True, stdin=subprocess.DEVNULL)
        with open(self.user_key + ".pub") as src, \
                open(os.path.join(directory, "authorized_keys"), "w") as dst:
            dst.write((key_options + " " if key_options else "") + src.read())
        with open(self.host_key + ".pub") as f:
            key_type, key_data = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (self.port, key_type, key_data))
        lines = [
            "ListenAddress 127.0.0.1:%d" % self.port,
            "HostKey %s" % self.host_key,
            "PidFile %s" % os.path.join(directory, "sshd.pid"),
            "AuthorizedKeysFile %s %s" % (os.path.join(directory, "authorized_keys"),
                                          os.path.join(home or directory, ".ssh",
                                                       "authorized_keys")),
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes", "ClientAliveInterval 5", "ClientAliveCountMax 2",
            "MaxStartups 100", "MaxSessions 100", "LogLevel VERBOSE",
        ]
        # an extra line replaces the harness's own of its keyword (sshd takes the first
        # value of most keywords, but the last of some, MaxStartups among them)
        given = {line.split()[0].lower() for line in extra}
        lines = list(extra) + [line for line in lines if line.split()[0].lower() not in given]
        if home or session_path:
            lines.append('ForceCommand %s%seval "$SSH_ORIGINAL_COMMAND"' % (
                "HOME=%s; export HOME; cd; " % home if home else "",
                "PATH=%s; " % session_path if session_path else ""))
        with open(self.config, "w") as f:
            f.write("\n".join(lines) + "\n")
        # The client side: everything a tunnel needs, through one -F file, so
        # the user's own ~/.ssh/config never leaks into a test.
        with open(self.ssh_config, "w") as f:
            f.write(textwrap.dedent("""\
                Host *
                  UserKnownHostsFile %s
                  GlobalKnownHostsFile /dev/null
                """ % self.known_hosts))
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", exist_ok=True)   # sshd's privsep directory
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(list(wrap) + [SSHD, "-D", "-e", "-f", self.config],
                                     stdin=subprocess.DEVNULL, stderr=self.log_file)
        wait_for(self._ready, what="sshd on port %d" % self.port)

    def _ready(self):
        if self.proc.poll() is not None:
            raise AssertionError("sshd exited %s: %s" % (self.proc.returncode,
                                                         open(self.log).read()))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                return s.recv(64).startswith(b"SSH-")
        except OSError:
            return False

    def ssh_argv(self, *args):
        """An ssh client argv for this server (for tests poking at a tunnel)."""
        return ["ssh", "-F", self.ssh_config, "-p", str(self.port), "-l", self.user,
                "-i", self.user_key, "-o", "BatchMode=yes"] + list(args)

    def stop(self):
        pids = descendants(self.proc.pid)
        end_pids(pids)
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()


class ThrowawayUser:
    """A system user made for one test, with its home in a temp dir; removed after."""

    def __init__(self, home):
        self.name = "ct%d%d" % (os.getpid() % 10000, int(time.monotonic() * 1000) % 100000)
        # password "*": no password login, yet not "locked" (sshd refuses locked accounts)
        subprocess.run(["useradd", "-M", "-p", "*", "-d", home, "-s", "/bin/sh", self.name], check=True,
                       stdin=subprocess.DEVNULL)
        os.makedirs(home, exist_ok=True)
        self.home = home
        import pwd
        entry = pwd.getpwnam(self.name)
        self.uid, self.gid = entry.pw_uid, entry.pw_gid
        os.chown(home, self.uid, self.gid)
        os.chmod(home, 0o755)

    def remove(self):
        """userdel refuses while a process of the user runs: a test that left one fails."""
        done = subprocess.run(["userdel", self.name], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True)
        assert done.returncode == 0, "userdel %s: %s" % (self.name, done.stderr.strip())


class DropbearServer:
    """A real Dropbear server on 127.0.0.1:<free port>; logins as a throwaway user."""

    def __init__(self, directory, extra=()):
        self.dir = directory
        self.port = free_port()
        self.account = ThrowawayUser(os.path.join(directory, "home"))
        self.user = self.account.name
        self.host_key = os.path.join(directory, "host_ed25519.dropbear")
        self.user_key = os.path.join(directory, "user_ed25519")
        self.known_hosts = os.path.join(directory, "known_hosts")
        self.ssh_config = os.path.join(directory, "ssh_config")
        self.log = os.path.join(directory, "dropbear.log")
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", self.host_key], check=True,
                       capture_output=True, stdin=subprocess.DEVNULL)
        public = subprocess.run(["dropbearkey", "-y", "-f", self.host_key], check=True,
                                capture_output=True, text=True).stdout
        key_line = next(l for l in public.splitlines() if l.startswith("ssh-"))
        with open(self.known_hosts, "w") as f:
            f.write("[127.0.0.1]:%d %s\n" % (self.port, " ".join(key_line.split()[:2])))
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", self.user_key],
                       check=True, stdin=subprocess.DEVNULL)
        dot_ssh = os.path.join(self.account.home, ".ssh")
        os.makedirs(dot_ssh, mode=0o700)
        with open(self.user_key + ".pub") as src, \
                open(os.path.join(dot_ssh, "authorized_keys"), "w") as dst:
            dst.write(src.read())
        for path in (dot_ssh, os.path.join(dot_ssh, "authorized_keys")):
            os.chown(path, self.account.uid, self.account.gid)
        with open(self.ssh_config, "w") as f:
            f.write("Host *\n  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n"
                    % self.known_hosts)
        self.log_file = open(self.log, "w")
        self.proc = subprocess.Popen(
            ["dropbear", "-F", "-E", "-s", "-p", "127.0.0.1:%d" % self.port, "-r", self.host_key,
             "-P", os.path.join(directory, "dropbear.pid")] + list(extra),
            stdin=subprocess.DEVNULL, stderr=self.log_file)
        wait_for(self._ready, what="dropbear on port %d" % self.port)

    _ready = SshServer._ready

    def stop(self):
        end_pids(descendants(self.proc.pid))
        self.proc.kill()
        self.proc.wait()
        self.log_file.close()
        self.account.remove()


# --- local services ---------------------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1:<free port>; a thread hands each connection to
    self.handle(conn). Services in tests and bench are its subclasses."""

    backlog = 16

    def __init__(self):
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(self.backlog)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.handle(conn)

    def handle(self, conn):
        raise NotImplementedError

    def close(self):
        self.sock.close()


class Service(Listener):
    """A TCP service on 127.0.0.1 that greets each client (or stays silent).

    Like sshd, it then keeps the connection until the client leaves (or
    hang_up: it closes at once after the greeting).
    """

    def __init__(self, greeting=None, hang_up=False):
        self.greeting = greeting
        self.hang_up = hang_up
        self.held = []
        Listener.__init__(self)

    def handle(self, conn):
        if self.greeting is not None:
            try:
                conn.sendall(self.greeting)
            except OSError:
                pass
        if self.hang_up:
            conn.close()
        else:
            self.held = [c for c in self.held if c.fileno() != -1][-64:] + [conn]

    def close(self):
        Listener.close(self)
        for conn in self.held:
            conn.close()


# --- a tunnel under test ----------------------------------------------------

class Rig:
    """One test's tunnel: its config, state dir and a way to run ctunnel."""

    def __init__(self, server, state_dir):
        self.server = server
        self.state_dir = state_dir
        self.conf = os.path.join(state_dir, "rstunnel.conf")

    def write_config(self, name="pi", check_timeout=3, **keys):
        """Write a config with one tunnel; keys go into its section."""
        base = {
            "host": "127.0.0.1",
            "port": str(self.server.port),
            "user": self.server.user,
            "identity_file": self.server.user_key,
            "ssh_config": self.server.ssh_config,
            "state_dir": os.path.join(self.state_dir, "state"),
            "check_timeout": str(check_timeout),
        }
        base.update(keys)
        with open(self.conf, "w") as f:
            f.write("[%s]\n" % name)
            for key, value in base.items():
                value = "\n    ".join(value) if isinstance(value, (list, tuple)) else value
                f.write("%s = %s\n" % (key, value))
        return self.conf

    def run(self, *args, env=None, timeout=60):
        """Run ctunnel.py with this config; return the CompletedProcess."""
        return run_ctunnel("-c", self.conf, *args, env=env, timeout=timeout)

    def start_reverse(self, service, **keys):
        """Write a config with one -R forward to service, run the first tick.

        Returns (the reverse port on the server, the first tick's result).
        """
        remote = free_port()
        self.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port), **keys)
        first = self.run()
        assert first.returncode == 0, first.stderr
        return remote, first

    def path(self, name, suffix):
        return os.path.join(self.state_dir, "state", "%s.%s" % (name, suffix))

    def pid(self, name="pi"):
        with open(self.path(name, "pid")) as f:
            return int(f.readline())     # the first line; then what was launched

    def ssh_pids(self):
        """Live ssh processes whose argv names this rig's state dir."""
        return [p for p in pids_with_arg(self.state_dir) if "ssh" in cmdline(p)[0]]
