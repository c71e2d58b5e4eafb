#!/usr/bin/env python3
"""ctunnel - keep SSH tunnels up from cron, with nothing but python3 and ssh.

usage: ctunnel.py [-c CONF] [-n] [-v | -q] [check] [NAME ...]
       ctunnel.py [-c CONF] status [--json] [NAME ...]
       ctunnel.py [-c CONF] stop [NAME ...]

Each run ("tick") reads the config, checks every tunnel (or the NAMEs given)
and repairs what is broken:

  1. process  the pidfile names a live ssh that is this tunnel's own
  2. master   the ssh control master answers `ssh -O check`
  3. local    each -L listen port accepts a TCP connection
  4. remote   each -R port has a listener *on the server*, asked over the
              tunnel's own connection: `ssh -S CTL HOST nc -z 127.0.0.1 PORT`

The first check that fails ends the ladder: the tunnel's ssh is stopped and
relaunched with `ssh -f -M -o ExitOnForwardFailure=yes -o BatchMode=yes`.
A check that cannot tell (no nc on the server) never causes a restart.

A healthy tick prints nothing. Every event is one line on stderr and in syslog.

config: -c CONF, else $CTUNNEL_CONFIG, else the first that exists of
  rstunnel.conf beside this script, ~/.config/ctunnel/rstunnel.conf,
  /etc/ctunnel/rstunnel.conf

exit status:
  0  every tunnel is healthy at the end of the tick
  1  some tunnel is still down
  2  usage or config error

crontab:
  * * * * * /path/to/ctunnel.py
"""

import argparse
import configparser
import errno
import fcntl
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import namedtuple

__version__ = "0.1.0"


# ---------------------------------------------------------------------------
# Constants
# ---------------------------------------------------------------------------

DEFAULTS = {
    "user": "",
    "port": "",
    "identity_file": "",
    "ssh_config": "",
    "remote_forward": "",
    "local_forward": "",
    "ssh_options": "",
    "ssh": "ssh",
    "server_alive_interval": "10",
    "server_alive_count_max": "3",
    "check_timeout": "5",
    "state_dir": "~/.local/state/ctunnel",
}
KNOWN_KEYS = frozenset(DEFAULTS) | {"host"}

CONFIG_NAME = "rstunnel.conf"
CONFIG_ENV = "CTUNNEL_CONFIG"
SYSLOG_ENV = "CTUNNEL_SYSLOG"          # socket path, for tests; default /dev/log
SYSLOG_PATH = "/dev/log"

UP, DOWN, UNKNOWN = "UP", "DOWN", "UNKNOWN"
EXIT_OK, EXIT_DOWN, EXIT_USAGE = 0, 1, 2

KILL_GRACE = 2.0            # seconds between SIGTERM and SIGKILL
LAUNCH_TIMEOUT_FACTOR = 4   # ssh -f may take this many check_timeouts to connect
SOCKET_PATH_MAX = 104       # sun_path is 104-108 bytes depending on the OS
STOP_LOCK_WAIT = 30.0       # `stop` waits this long for a running tick
REPEAT_FAILURE_AFTER = 3600 # seconds before an unchanged failure is printed again

# syslog severities (RFC 5424), facility "user"
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO = 3, 4, 5, 6
LOG_USER = 1

# A forward spec: [bind:]port:host:hostport. Addresses are names, IPv4, "*"
# or a bracketed IPv6. The bind address of a remote forward ends up in a
# command line the server's shell reads (nc -z ADDR PORT), so the character
# set is kept strict on purpose.
_ADDR = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.*-]+)"
_FORWARD_RE = re.compile(r"^(?:%s:)?(\d+):%s:(\d+)$" % (_ADDR, _ADDR))
_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
_OPTION_RE = re.compile(r"^[A-Za-z][A-Za-z0-9]*=\S.*$")
_WILDCARD_BINDS = ("", "*", "0.0.0.0", "localhost")


# ---------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------

class CtunnelError(Exception):
    """Base of every error ctunnel reports as one line."""


class ConfigError(CtunnelError):
    """The config file is missing, malformed or names something impossible."""


class UsageError(CtunnelError):
    """The command line asks for something that does not exist."""


# ---------------------------------------------------------------------------
# Config: parse and validate into immutable tunnels
# ---------------------------------------------------------------------------

Forward = namedtuple("Forward", "kind bind port host hostport spec")
Tunnel = namedtuple(
    "Tunnel",
    "name host user port identity_file ssh_config forwards ssh_options ssh "
    "alive_interval alive_count check_timeout state_dir",
)


def parse_forward(spec, kind="R"):
    """Parse "[bind:]port:host:hostport" into a Forward.

    kind is "R" (remote, -R) or "L" (local, -L). Raises ValueError with a
    message fit to show the user.
    """
    spec = spec.strip()
    m = _FORWARD_RE.match(spec)
    if not m:
        raise ValueError('"%s" is not [bind:]port:host:hostport' % spec)
    bind, port, host, hostport = m.groups()
    return Forward(kind, bind or "", parse_port(port), host,
                   parse_port(hostport), spec)


def parse_port(text):
    """Return text as a TCP port number 1-65535, or raise ValueError."""
    text = str(text).strip()
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError('"%s" is not a port (use 1-65535)' % text)
    return int(text)


def parse_host(text, what="host"):
    """Return text as an ssh destination (or user) name, or raise ValueError.

    It becomes an argv element of ssh, so it may not look like an option.
    """
    text = text.strip()
    if not text or text.startswith("-") or re.search(r"[\s@'\"\\;|&$`]", text):
        raise ValueError('"%s" is not a valid %s name' % (text, what))
    return text


def parse_tunnel_name(text):
    """Return text as a tunnel name (it names files in state_dir), or raise ValueError."""
    text = text.strip()
    if not _NAME_RE.match(text):
        raise ValueError('tunnel name "%s" may use only letters, digits, "_", "." and "-"'
                         % text)
    return text


def check_address(forward):
    """Return the address a check connects to for this forward's listener."""
    bind = forward.bind.strip("[]")
    if bind in _WILDCARD_BINDS:
        return "127.0.0.1"
    if bind == "::":
        return "::1"
    return bind


def config_candidates(script=__file__):
    """Return the places a config is looked for when neither -c nor $CTUNNEL_CONFIG says."""
    return [
        os.path.join(os.path.dirname(os.path.realpath(script)), CONFIG_NAME),
        os.path.expanduser("~/.config/ctunnel/" + CONFIG_NAME),
        "/etc/ctunnel/" + CONFIG_NAME,
    ]


def find_config(explicit=None, environ=None, script=__file__):
    """Return the config path to use, following the documented search order."""
    environ = os.environ if environ is None else environ
    if explicit:
        return explicit
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    candidates = config_candidates(script)
    for path in candidates:
        if os.path.exists(path):
            return path
    raise ConfigError("no config found (looked in %s); pass -c FILE or set $%s"
                      % (", ".join(candidates), CONFIG_ENV))


def read_config(path):
    """Read an ini file strictly into a ConfigParser, or raise ConfigError."""
    parser = configparser.ConfigParser(interpolation=None, defaults=DEFAULTS,
                                       strict=True, empty_lines_in_values=False)
    try:
        with open(path, encoding="utf-8") as f:
            parser.read_file(f)
    except OSError as e:
        raise ConfigError("%s: cannot read config: %s" % (path, e.strerror or e))
    except UnicodeDecodeError:
        raise ConfigError("%s: not a text file (expected UTF-8 ini)" % path)
    except configparser.Error as e:
        # configparser repeats the file name; keep its line number and words
        first = re.sub(r"^While reading from .*? \[line\s*(\d+)\]", r"line \1",
                       str(e).splitlines()[0])
        raise ConfigError("%s: malformed config: %s" % (path, first))
    return parser


def load_config(path):
    """Load and validate every tunnel of the config at path.

    Returns a list of Tunnel. Raises ConfigError naming file, section and key.
    """
    parser = read_config(path)
    for key in parser.defaults():
        if key not in KNOWN_KEYS:
            raise ConfigError("%s [DEFAULT]: unknown key \"%s\" (known: %s)"
                              % (path, key, ", ".join(sorted(KNOWN_KEYS))))
    tunnels = [_load_tunnel(path, name, parser[name]) for name in parser.sections()]
    if not tunnels:
        raise ConfigError("%s: no tunnels: add a [NAME] section with host and "
                          "remote_forward or local_forward" % path)
    return tunnels


def _load_tunnel(path, name, section):
    """Validate one section into a Tunnel: each key through its parser."""
    where = "%s [%s]" % (path, name)
    try:
        parse_tunnel_name(name)
    except ValueError as e:
        raise ConfigError("%s: %s" % (where, e))
    for key in section:
        if key not in KNOWN_KEYS:
            raise ConfigError('%s: unknown key "%s" (known: %s)'
                              % (where, key, ", ".join(sorted(KNOWN_KEYS))))
    values = {}
    for key, parse in _KEY_PARSERS:
        try:
            values[key] = parse(section.get(key, "").strip())
        except ValueError as e:
            raise ConfigError("%s: %s %s" % (where, key, e))
    forwards = values["remote_forward"] + values["local_forward"]
    if not forwards:
        raise ConfigError("%s: no forwards: set remote_forward or local_forward" % where)
    try:
        state_dir = _state_dir(values["state_dir"], name)
    except ValueError as e:
        raise ConfigError("%s: state_dir %s" % (where, e))
    return Tunnel(name=name, host=values["host"], user=values["user"], port=values["port"],
                  identity_file=values["identity_file"], ssh_config=values["ssh_config"],
                  forwards=tuple(forwards), ssh_options=tuple(values["ssh_options"]),
                  ssh=values["ssh"], alive_interval=values["server_alive_interval"],
                  alive_count=values["server_alive_count_max"],
                  check_timeout=values["check_timeout"], state_dir=state_dir)


# Each parser takes the stripped value and returns it validated, or raises
# ValueError with the problem ("is missing ...", '"x" is not ...').

def _required_host(text):
    if not text:
        raise ValueError("is missing (the ssh server or its ssh_config alias)")
    return parse_host(text)


def _optional(parse):
    return lambda text: parse(text) if text else None


def _forwards(kind):
    return lambda text: [parse_forward(line, kind) for line in _lines(text)]


def _ssh_options(text):
    options = _lines(text)
    for option in options:
        if not _OPTION_RE.match(option):
            raise ValueError('"%s" is not Key=Value' % option)
    return options


def _lines(value):
    return [line.strip() for line in value.splitlines() if line.strip()]


def _readable_file(value):
    if not value:
        return ""
    path = os.path.expanduser(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError('"%s" is not a readable file' % value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError('"%s" cannot be read: %s' % (value, e.strerror))
    return path


def _find_program(value):
    if not value:
        raise ValueError("is empty (the ssh client to run, e.g. ssh)")
    path = os.path.expanduser(value)
    dirs = [""] if os.sep in path else os.environ.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        candidate = os.path.join(d, path) if d else path
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ValueError('"%s" not found or not executable (install the OpenSSH client or '
                     'give its full path)' % value)


def _positive(integer):
    def parse(value):
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = 0
        if not 0 < number <= 3600:
            raise ValueError('"%s" is not a positive %s (1-3600)'
                             % (value, "whole number" if integer else "number"))
        return number
    return parse


def _state_dir(value, name):
    path = os.path.abspath(os.path.expanduser(value))
    ctl = os.path.join(path, name + ".ctl")
    if len(ctl.encode()) >= SOCKET_PATH_MAX:
        raise ValueError('"%s" is too long: the control socket path %s must stay under '
                         '%d bytes' % (value, ctl, SOCKET_PATH_MAX))
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ValueError('"%s" cannot be created: %s' % (value, e.strerror))
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError('"%s" is not writable' % value)
    return path


_KEY_PARSERS = (
    ("host", _required_host),
    ("user", lambda text: parse_host(text, "user") if text else ""),
    ("port", _optional(parse_port)),
    ("identity_file", _readable_file),
    ("ssh_config", _readable_file),
    ("remote_forward", _forwards("R")),
    ("local_forward", _forwards("L")),
    ("ssh_options", _ssh_options),
    ("ssh", _find_program),
    ("server_alive_interval", _positive(integer=True)),
    ("server_alive_count_max", _positive(integer=True)),
    ("check_timeout", _positive(integer=False)),
    ("state_dir", str),
)


def state_path(tunnel, suffix):
    """Return the path of one of the tunnel's files: pid, ctl, lock, state, log."""
    return os.path.join(tunnel.state_dir, "%s.%s" % (tunnel.name, suffix))


# ---------------------------------------------------------------------------
# ssh command lines
# ---------------------------------------------------------------------------

def _target_args(tunnel):
    """Arguments that pick the server: config file, port, user."""
    args = []
    if tunnel.ssh_config:
        args += ["-F", tunnel.ssh_config]
    if tunnel.port:
        args += ["-p", str(tunnel.port)]
    if tunnel.user:
        args += ["-l", tunnel.user]
    return args


def build_launch_argv(tunnel):
    """Return the argv that starts the tunnel's ssh as a background master."""
    argv = [tunnel.ssh, "-f", "-N", "-M", "-S", state_path(tunnel, "ctl"),
            # once in the background, ssh sends stderr to /dev/null; -E keeps
            # its last words ("Timeout, server not responding.") for the tick
            "-E", state_path(tunnel, "log"),
            "-o", "ControlPersist=no",
            # -f then backgrounds only once every forward is set up, and a
            # forward the server refuses (port still held) makes ssh exit 255.
            "-o", "ExitOnForwardFailure=yes",
            # never wait for a password or a host-key question under cron
            "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=%d" % math.ceil(tunnel.check_timeout),
            "-o", "ServerAliveInterval=%d" % tunnel.alive_interval,
            "-o", "ServerAliveCountMax=%d" % tunnel.alive_count]
    argv += _target_args(tunnel)
    if tunnel.identity_file:
        argv += ["-i", tunnel.identity_file, "-o", "IdentitiesOnly=yes"]
    for option in tunnel.ssh_options:
        argv += ["-o", option]
    for fwd in tunnel.forwards:
        argv += ["-" + fwd.kind, fwd.spec]
    return argv + ["--", tunnel.host]


def build_mux_argv(tunnel, *command):
    """Return an argv that talks to the running master only.

    With -O it is a control request; otherwise a command run on the server
    over the tunnel's own connection. If the master is gone, ssh would
    silently open a fresh connection instead, which proves nothing about the
    tunnel: ProxyCommand=false makes that fallback fail at once.
    """
    argv = [tunnel.ssh, "-S", state_path(tunnel, "ctl"),
            "-o", "ProxyCommand=false", "-o", "BatchMode=yes",
            "-o", "ClearAllForwardings=yes", "-o", "RemoteCommand=none", "-T"]
    argv += _target_args(tunnel)
    if command and command[0] == "-O":
        return argv + list(command) + ["--", tunnel.host]
    return argv + ["--", tunnel.host] + list(command)


def remote_check_command(forward, timeout):
    """Return the command the server runs to see its end of a -R forward.

    nc gives up a second before our own timeout would fire on the ssh client.
    """
    wait = max(1, int(timeout) - 1)
    return ["nc", "-z", "-w", str(wait), check_address(forward), str(forward.port)]


def quote_argv(argv):
    """Return argv as one shell-quoted line, for logs and --dry-run."""
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------
# Processes and state files
# ---------------------------------------------------------------------------

def read_pidfile(tunnel):
    """Return the PID in the tunnel's pidfile, or None."""
    try:
        with open(state_path(tunnel, "pid")) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def _write_atomic(path, text):
    tmp = "%s.tmp%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_pidfile(tunnel, pid):
    _write_atomic(state_path(tunnel, "pid"), "%d\n" % pid)


def read_state(tunnel):
    """Return the tunnel's small state record (restarts, reasons), or {}."""
    try:
        with open(state_path(tunnel, "state")) as f:
            state = json.load(f)
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def write_state(tunnel, state):
    _write_atomic(state_path(tunnel, "state"), json.dumps(state, sort_keys=True) + "\n")


def process_alive(pid):
    """Return True if pid is a live process (zombies count as dead)."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return False
    # the state letter follows the command name, which may itself hold ")"
    return stat[stat.rfind(")") + 2:][:1] not in ("Z", "X", "")


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def is_tunnel_ssh(pid, tunnel):
    """Return True if pid is an ssh whose argv holds this tunnel's -S CTL.

    The control socket path is unique to this tunnel, so this is what makes
    a PID ours; a recycled PID or an admin's own ssh never matches.
    """
    args = _cmdline(pid)
    if not args or "ssh" not in os.path.basename(args[0]):
        return False
    ctl = state_path(tunnel, "ctl")
    return any(a == "-S" and b == ctl for a, b in zip(args, args[1:]))


def find_tunnel_processes(tunnel):
    """Return the PIDs of every live ssh that is this tunnel's (scan /proc).

    Only the repair path needs this: it finds a master whose pidfile was lost,
    which would otherwise hold the server's port forever.
    """
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            if is_tunnel_ssh(pid, tunnel) and process_alive(pid):
                pids.append(pid)
    return pids


def kill_process(pid, grace=KILL_GRACE):
    """SIGTERM pid, wait up to grace seconds, then SIGKILL. Return True if gone.

    SIGCONT follows SIGTERM so that a stopped (hung) ssh can act on it.
    """
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.kill(pid, sig)
            if sig == signal.SIGTERM:
                os.kill(pid, signal.SIGCONT)
        except OSError as e:
            if e.errno == errno.ESRCH:
                return True
            raise
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not process_alive(pid):
                return True
            time.sleep(0.05)
    return not process_alive(pid)


def process_uptime(pid):
    """Return seconds since pid started, or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return max(0, int(uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")))


class TunnelLock:
    """An flock on NAME.lock, held for the whole tick of one tunnel."""

    def __init__(self, tunnel):
        self.path = state_path(tunnel, "lock")
        self.fd = None

    def acquire(self, wait=0.0):
        """Take the lock; return False if another tick holds it after wait s."""
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except OSError as e:
                if e.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
            if time.monotonic() >= deadline:
                self.release()
                return False
            time.sleep(0.1)

    def release(self):
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


# ---------------------------------------------------------------------------
# Checks: each returns a Verdict and prints nothing
# ---------------------------------------------------------------------------

Verdict = namedtuple("Verdict", "check state detail")


def _run(argv, timeout):
    """Run argv without a shell; return (exit status or None on timeout, stderr)."""
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, ""
    except OSError as e:
        return 255, "cannot run %s: %s" % (argv[0], e.strerror)
    return proc.returncode, proc.stderr.decode("utf-8", "replace").strip()


def _lines_said(text):
    return [l.strip() for l in text.splitlines()
            if l.strip() and not l.startswith("Warning: Permanently added")]


def _last_line(text):
    """The line a failed launch ends with: ssh's reason for giving up."""
    lines = _lines_said(text)
    return lines[-1] if lines else ""


def _first_line(text):
    """The line a failed mux client starts with; what follows is its fallback."""
    lines = _lines_said(text)
    return lines[0] if lines else ""


def check_process(tunnel):
    """Is the pidfile's PID alive and this tunnel's ssh?"""
    pid = read_pidfile(tunnel)
    if pid is None:
        return Verdict("process", DOWN, "not running")
    if not process_alive(pid):
        return Verdict("process", DOWN, "process %d gone" % pid)
    if not is_tunnel_ssh(pid, tunnel):
        return Verdict("process", DOWN,
                       "pidfile names PID %d, which is not this tunnel's ssh" % pid)
    return Verdict("process", UP, "pid %d" % pid)


def query_master(tunnel):
    """Ask the control master for its PID: return (pid, None) or (None, problem)."""
    rc, err = _run(build_mux_argv(tunnel, "-O", "check"), tunnel.check_timeout)
    if rc is None:
        return None, "control master did not answer within %gs (hung)" % tunnel.check_timeout
    m = re.search(r"Master running \(pid=(\d+)\)", err)
    if rc != 0 or not m:
        return None, "control master: %s" % (_first_line(err) or "ssh exited %d" % rc)
    return int(m.group(1)), None


def check_master(tunnel):
    """Does the control master answer `ssh -O check` in time?"""
    pid, problem = query_master(tunnel)
    return Verdict("master", DOWN, problem) if problem else Verdict("master", UP, "pid %d" % pid)


def check_local_forward(tunnel, forward):
    """Does the -L listen port accept a connection?

    Connected is UP even when the far end then says nothing and keeps the
    connection open: that silence is what `timeout 3 nc` reported as exit 124,
    a success that looked like a failure.
    """
    name = "local forward %d" % forward.port
    try:
        sock = socket.create_connection((check_address(forward), forward.port),
                                        timeout=tunnel.check_timeout)
        sock.close()
    except socket.timeout:
        return Verdict(name, DOWN, "connect timed out")
    except OSError as e:
        return Verdict(name, DOWN, e.strerror.lower() if e.strerror else str(e))
    return Verdict(name, UP, "listening")


def check_remote_forward(tunnel, forward):
    """Is there a listener on the server's end of a -R forward?

    Asked on the server over the tunnel's own connection, so the check fails
    exactly when this tunnel is dead, even when the server is reachable and a
    stale session of ours still holds the port.
    """
    name = "remote forward %d" % forward.port
    argv = build_mux_argv(tunnel, *remote_check_command(forward, tunnel.check_timeout))
    rc, err = _run(argv, tunnel.check_timeout)
    if rc is None:
        return Verdict(name, DOWN, "check hung for %gs: the connection is dead"
                       % tunnel.check_timeout)
    if rc == 0:
        return Verdict(name, UP, "listening on server")
    if rc == 1 and not re.search(r"usage|invalid|unrecognized|illegal", err, re.I):
        return Verdict(name, DOWN, "no listener on server")
    if rc == 124:
        return Verdict(name, DOWN, "check timed out on the server")
    if rc in (126, 127):
        return Verdict(name, UNKNOWN, "cannot check: no nc on the server "
                       "(install netcat-openbsd there)")
    if re.search(r"refused by peer|open failed", err):
        # the connection is alive: the server just will not run a command
        return Verdict(name, UNKNOWN, "cannot check: the server refuses command sessions "
                       "(%s)" % _first_line(err))
    if rc == 255:
        return Verdict(name, DOWN, "ssh failed: %s" % (_first_line(err) or "exit 255"))
    return Verdict(name, UNKNOWN, "cannot check: server answered exit %d%s"
                   % (rc, ": " + _last_line(err) if err else ""))


def run_ladder(tunnel, with_process=True):
    """Run the checks cheapest first; stop at the first DOWN.

    Returns the list of verdicts reached; the tunnel is healthy if none is DOWN.
    with_process=False starts at the master, for a tunnel just launched.
    """
    steps = [lambda: check_process(tunnel)] if with_process else []
    steps.append(lambda: check_master(tunnel))
    steps += [lambda f=f: check_local_forward(tunnel, f)
              for f in tunnel.forwards if f.kind == "L"]
    steps += [lambda f=f: check_remote_forward(tunnel, f)
              for f in tunnel.forwards if f.kind == "R"]
    verdicts = []
    for step in steps:
        verdicts.append(step())
        if verdicts[-1].state == DOWN:
            break
    return verdicts


def first_down(verdicts):
    return next((v for v in verdicts if v.state == DOWN), None)


# ---------------------------------------------------------------------------
# Repair: stop and launch
# ---------------------------------------------------------------------------

def stop_tunnel(tunnel):
    """Kill this tunnel's ssh (verified PIDs only) and remove pidfile and socket.

    Returns the list of PIDs that were stopped.
    """
    pids = set(find_tunnel_processes(tunnel))
    recorded = read_pidfile(tunnel)
    if recorded and process_alive(recorded) and is_tunnel_ssh(recorded, tunnel):
        pids.add(recorded)
    stopped = []
    for pid in sorted(pids):
        if kill_process(pid):
            stopped.append(pid)
    for suffix in ("pid", "ctl"):
        try:
            os.unlink(state_path(tunnel, suffix))
        except FileNotFoundError:
            pass
    return stopped


def _death_note(tunnel):
    """Return what the tunnel's last ssh said before it died, if anything."""
    try:
        with open(state_path(tunnel, "log"), errors="replace") as f:
            return _last_line(f.read()[-4096:])
    except OSError:
        return ""


def launch_tunnel(tunnel):
    """Start the tunnel's ssh in the background and record its PID.

    Returns (pid, None) on success or (None, reason) with ssh's own words.
    ssh's output goes to NAME.log, a file rather than a pipe: a backgrounded
    ssh that kept a pipe open would hold this tick until it dies.
    """
    argv = build_launch_argv(tunnel)
    limit = LAUNCH_TIMEOUT_FACTOR * tunnel.check_timeout
    log_path = state_path(tunnel, "log")
    with open(log_path, "wb") as log:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)
        except OSError as e:
            return None, "cannot run %s: %s" % (tunnel.ssh, e.strerror)
        try:
            rc = proc.wait(timeout=limit)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return None, "ssh did not connect within %gs" % limit
    with open(log_path, errors="replace") as f:
        said = _last_line(f.read())
    if rc != 0:
        return None, explain_ssh_failure(said, rc)
    pid, problem = query_master(tunnel)
    if problem:
        return None, "ssh started but %s" % problem
    write_pidfile(tunnel, pid)
    return pid, None


def explain_ssh_failure(said, rc):
    """Turn what a failed `ssh -f` printed into one line with a hint."""
    said = said or "ssh exited %d without a message" % rc
    hints = (
        ("remote port forwarding failed", "the server still holds the port: a stale "
         "session (set ClientAliveInterval on the server) or another program"),
        ("Permission denied", "the server refused the key: check identity_file and "
         "the server's authorized_keys"),
        ("Host key verification failed", "the server is not in known_hosts: run "
         "ssh once by hand to accept its key"),
        ("Could not resolve hostname", "check host, or the network"),
    )
    for needle, hint in hints:
        if needle in said:
            return "%s (%s)" % (said, hint)
    return said


# ---------------------------------------------------------------------------
# The tick: check, repair, report
# ---------------------------------------------------------------------------

# stderr: also print it (cron mails what a job prints); syslog always gets it
Event = namedtuple("Event", "level text stderr", defaults=(True,))
Outcome = namedtuple("Outcome", "name healthy events verdicts")


def tick_tunnel(tunnel, verbose=False):
    """Check one tunnel under its lock and repair it if a check says DOWN."""
    lock = TunnelLock(tunnel)
    if not lock.acquire():
        # another tick is on it right now: leave the tunnel to that tick
        return Outcome(tunnel.name, True, [], [])
    try:
        return _tick_locked(tunnel, verbose)
    finally:
        lock.release()


def _verdict_events(tunnel, verdicts):
    return [Event(LOG_INFO, "%s: %s %s (%s)" % (tunnel.name, v.check, v.state, v.detail))
            for v in verdicts]


def _tick_locked(tunnel, verbose):
    verdicts = run_ladder(tunnel)
    events = _verdict_events(tunnel, verdicts) if verbose else []
    state = read_state(tunnel)
    down = first_down(verdicts)
    if down is not None:
        healthy, verdicts = _repair(tunnel, down, state, events, verbose)
        if not healthy:
            return Outcome(tunnel.name, False, events, verdicts)
    _note_unknowns(tunnel, verdicts, state, events)
    return Outcome(tunnel.name, True, events, verdicts)


def _down_reason(tunnel, down):
    """Say why the tunnel is being (re)started, with a dead ssh's last words."""
    if down.check not in ("process", "master"):
        return "%s: %s" % (down.check, down.detail)
    said = _death_note(tunnel) if down.detail.endswith("gone") else ""
    return down.detail + ("; ssh said: %s" % said if said else "")


def _repair(tunnel, down, state, events, verbose):
    """Stop the tunnel's ssh, launch a new one and check it again.

    Records the outcome in state and adds its event. Returns (healthy, verdicts).
    """
    reason = _down_reason(tunnel, down)
    first = down.detail == "not running"
    stop_tunnel(tunnel)
    pid, failure = launch_tunnel(tunnel)
    verdicts = []
    if failure is None:
        verdicts = run_ladder(tunnel, with_process=False)
        if verbose:
            events += _verdict_events(tunnel, verdicts)
        after = first_down(verdicts)
        if after is not None:
            failure = "came up but %s: %s" % (after.check, after.detail)
    now = int(time.time())
    state.update(last_restart=now, last_reason=reason)
    if failure is None:
        events.append(_record_success(tunnel, state, first, reason, pid))
    else:
        events.append(_record_failure(tunnel, state, first, reason, failure, now))
    write_state(tunnel, state)
    return failure is None, verdicts


def _record_success(tunnel, state, first, reason, pid):
    attempts = state.pop("failures", 0)
    state.pop("last_failure", None)
    state.pop("failure_said", None)
    if not first:
        state["restarts"] = state.get("restarts", 0) + 1
    text = "started (pid %d)" % pid if first else "restarted (%s)" % reason
    if attempts:
        text += " after %d failed attempt%s" % (attempts, "s" if attempts > 1 else "")
    return Event(LOG_NOTICE, "%s: %s" % (tunnel.name, text))


def _record_failure(tunnel, state, first, reason, failure, now):
    """A failed (re)start goes to syslog every time, to stderr only when it is news.

    A server that is away all night would otherwise mean a cron mail every
    minute: stderr repeats a failure when ssh's reason changes, else hourly.
    """
    verb = "start failed" if first else "restart failed (%s)" % reason
    state["failures"] = state.get("failures", 0) + 1
    news = failure != state.get("last_failure") or \
        now - state.get("failure_said", 0) >= REPEAT_FAILURE_AFTER
    state["last_failure"] = failure
    if news:
        state["failure_said"] = now
    count = " (%d failed attempts)" % state["failures"] if state["failures"] > 1 else ""
    return Event(LOG_ERR, "%s: %s: %s%s" % (tunnel.name, verb, failure, count), news)


def _note_unknowns(tunnel, verdicts, state, events):
    """Warn about checks that could not tell, once, not every minute."""
    unknown = "; ".join("%s: %s" % (v.check, v.detail) for v in verdicts if v.state == UNKNOWN)
    if unknown != state.get("unknown", ""):
        if unknown:
            events.append(Event(LOG_WARNING, "%s: %s (not restarting; warned once)"
                                % (tunnel.name, unknown)))
            state["unknown"] = unknown
        else:
            state.pop("unknown", None)
        write_state(tunnel, state)


class Reporter:
    """Write event lines to stderr and to syslog."""

    def __init__(self, quiet=False, stream=None, syslog_path=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        self.syslog_path = syslog_path or os.environ.get(SYSLOG_ENV, SYSLOG_PATH)
        self.lock = threading.Lock()

    def event(self, level, text, stderr=True):
        """Report one event: syslog, and stderr unless told not (or quiet and no error)."""
        with self.lock:
            if stderr and (not self.quiet or level <= LOG_ERR):
                stamp = time.strftime("%Y/%m/%d %H:%M:%S")
                self.stream.write("%s ctunnel[%d]: %s\n" % (stamp, os.getpid(), text))
                self.stream.flush()
            if level < LOG_INFO:
                self._syslog(level, text)

    def _syslog(self, level, text):
        # a datagram to /dev/log: the syslog module is missing on some
        # minimal Pythons, and a box without syslogd simply has no socket
        if not os.path.exists(self.syslog_path):
            return
        message = "<%d>ctunnel[%d]: %s" % (LOG_USER * 8 + level, os.getpid(), text)
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                sock.connect(self.syslog_path)
                sock.send(message.encode("utf-8", "replace"))
            finally:
                sock.close()
        except OSError:
            pass


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def cmd_check(tunnels, args, reporter):
    """One tick: every tunnel checked and repaired concurrently."""
    outcomes = {}

    def work(t):
        try:
            outcomes[t.name] = tick_tunnel(t, verbose=args.verbose)
        except OSError as e:      # e.g. state_dir removed or full: say so, in one line
            outcomes[t.name] = Outcome(t.name, False, [Event(LOG_ERR, "%s: %s" % (t.name, e))],
                                       [])

    threads = [threading.Thread(target=work, args=(t,)) for t in tunnels]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    healthy = True
    for t in tunnels:
        for event in outcomes[t.name].events:
            reporter.event(event.level, event.text, event.stderr or args.verbose)
        healthy = healthy and outcomes[t.name].healthy
    return EXIT_OK if healthy else EXIT_DOWN


def describe_tunnel(tunnel):
    """Return the status record of one tunnel, changing nothing."""
    verdicts = run_ladder(tunnel)
    state = read_state(tunnel)
    pid = read_pidfile(tunnel) if verdicts[0].state == UP else None
    return {
        "name": tunnel.name,
        "healthy": first_down(verdicts) is None,
        "pid": pid,
        "uptime": process_uptime(pid) if pid else None,
        "host": tunnel.host,
        "forwards": ["-%s %s" % (f.kind, f.spec) for f in tunnel.forwards],
        "checks": [{"check": v.check, "verdict": v.state, "detail": v.detail}
                   for v in verdicts],
        "restarts": state.get("restarts", 0),
        "last_restart": state.get("last_restart"),
        "last_reason": state.get("last_reason"),
        "last_failure": state.get("last_failure"),
    }


def cmd_status(tunnels, args, out):
    records = [describe_tunnel(t) for t in tunnels]
    if args.json:
        out.write(json.dumps({"tunnels": records}, indent=2) + "\n")
    else:
        for r in records:
            out.write(_format_status(r))
    return EXIT_OK if all(r["healthy"] for r in records) else EXIT_DOWN


def _format_status(r):
    head = "%s: %s" % (r["name"], "healthy" if r["healthy"] else "DOWN")
    if r["pid"]:
        head += ", pid %d" % r["pid"]
        if r["uptime"] is not None:
            head += ", up %s" % _format_duration(r["uptime"])
    lines = [head, "  host %s  %s" % (r["host"], "  ".join(r["forwards"]))]
    lines += ["  %-20s %-8s %s" % (c["check"], c["verdict"], c["detail"]) for c in r["checks"]]
    if r["last_restart"]:
        lines.append("  last (re)start %s: %s%s" % (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_restart"])),
            r["last_reason"], ", failed: %s" % r["last_failure"] if r["last_failure"] else ""))
    return "\n".join(lines) + "\n"


def _format_duration(seconds):
    days, rest = divmod(int(seconds), 86400)
    hours, rest = divmod(rest, 3600)
    minutes, seconds = divmod(rest, 60)
    if days:
        return "%dd%02dh" % (days, hours)
    if hours:
        return "%dh%02dm" % (hours, minutes)
    return "%dm%02ds" % (minutes, seconds)


def cmd_stop(tunnels, args, reporter):
    status = EXIT_OK
    for t in tunnels:
        lock = TunnelLock(t)
        if not lock.acquire(wait=STOP_LOCK_WAIT):
            reporter.event(LOG_ERR, "%s: not stopped: another tick still holds %s"
                           % (t.name, lock.path))
            status = EXIT_DOWN
            continue
        try:
            stopped = stop_tunnel(t)
        finally:
            lock.release()
        if stopped:
            reporter.event(LOG_NOTICE, "%s: stopped (pid %s)"
                           % (t.name, ", ".join(map(str, stopped))))
    return status


def cmd_dry_run(tunnels, out):
    for t in tunnels:
        out.write("# %s: check, then launch if a check fails\n" % t.name)
        out.write(quote_argv(build_mux_argv(t, "-O", "check")) + "\n")
        for f in t.forwards:
            if f.kind == "R":
                out.write(quote_argv(build_mux_argv(
                    t, *remote_check_command(f, t.check_timeout))) + "\n")
        out.write(quote_argv(build_launch_argv(t)) + "\n")
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

COMMANDS = ("check", "status", "stop")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="ctunnel.py", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        usage=argparse.SUPPRESS)
    parser.add_argument("words", nargs="*", metavar="[check|status|stop] NAME",
                        help="command (default: check) and tunnel names (default: all)")
    parser.add_argument("-c", "--config", metavar="CONF", help="config file")
    parser.add_argument("-n", "--dry-run", action="store_true",
                        help="print the ssh command lines a tick would run; run nothing")
    noise = parser.add_mutually_exclusive_group()
    noise.add_argument("-v", "--verbose", action="store_true",
                       help="say what every check concluded, also when healthy")
    noise.add_argument("-q", "--quiet", action="store_true",
                       help="print only failures (syslog still gets every event)")
    parser.add_argument("--json", action="store_true", help="with status: print JSON")
    parser.add_argument("--version", action="version", version="ctunnel " + __version__)
    args = parser.parse_args(argv)
    args.command = "check"
    if args.words and args.words[0] in COMMANDS:
        args.command = args.words.pop(0)
    args.names = args.words
    if args.json and args.command != "status":
        parser.error("--json goes with status")
    return args


def select_tunnels(tunnels, names, path):
    """Return the tunnels named (all when none), or raise UsageError."""
    by_name = {t.name: t for t in tunnels}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError('no tunnel named "%s" in %s (have: %s)'
                         % (unknown[0], path, ", ".join(sorted(by_name))))
    return [by_name[n] for n in names] if names else tunnels


def main(argv=None):
    args = parse_args(argv)
    reporter = Reporter(quiet=args.quiet)
    try:
        path = find_config(args.config)
        tunnels = select_tunnels(load_config(path), args.names, path)
    except CtunnelError as e:
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_USAGE
    try:
        if args.dry_run:
            return cmd_dry_run(tunnels, sys.stdout)
        if args.command == "status":
            return cmd_status(tunnels, args, sys.stdout)
        if args.command == "stop":
            return cmd_stop(tunnels, args, reporter)
        return cmd_check(tunnels, args, reporter)
    except OSError as e:      # e.g. state_dir removed after loading: one line, no traceback
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_DOWN


if __name__ == "__main__":
    sys.exit(main())
