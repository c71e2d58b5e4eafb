#!/usr/bin/env python3
"""ctunnel - keep SSH tunnels up from cron, with nothing but python3 and ssh.

usage: ctunnel.py [-c CONF] [-n] [-v | -q] [check] [NAME ...]
       ctunnel.py [-c CONF] status [--json] [NAME ...]
       ctunnel.py [-c CONF] stop [NAME ...]

Each run ("tick") reads the config, checks every tunnel (or the NAMEs given)
and repairs what is broken. A healthy tick runs no program: it speaks ssh's
control-socket protocol to the tunnel's own ssh.

  1. process  the pidfile names a live ssh that is this tunnel's own
  2. master   the ssh control master answers, with that PID
  3. local    each -L listen port belongs to this ssh; the server reaches
              the forward's target
  4. remote   each -R forward carries a connection end to end: from the
              server's listener, back through this tunnel, to the target

The first check that fails ends the ladder: the tunnel's ssh is stopped and
relaunched with `ssh -f -M -o ExitOnForwardFailure=yes -o BatchMode=yes`.
A check that cannot tell, or a target that is down while the tunnel works,
is reported once and never causes a restart.

A healthy tick prints nothing. Every event is one line on stderr and in syslog.

options:
  -c CONF     config file
  -n          print what a tick would run; run and change nothing
  -v          say what every check concluded, also when healthy
  -q          print only failures (syslog still gets every event)
  --json      with status: print JSON
  --version   print the version

config: -c CONF, else $CTUNNEL_CONFIG, else the first that exists of
  rstunnel.conf beside this script, ~/.config/ctunnel/rstunnel.conf,
  /etc/ctunnel/rstunnel.conf

exit status:
  0  every tunnel is up (a target reported down is not the tunnel's failure)
  1  some tunnel is still down
  2  usage or config error

crontab:
  * * * * * /path/to/ctunnel.py
"""

import _thread
import configparser
import errno
import fcntl
import math
import os
import re
import select
import signal
import socket
import stat
import sys
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
    "remote_check": "auto",
    "reclaim": "yes",
    "state_dir": "~/.local/state/ctunnel",
}
KNOWN_KEYS = frozenset(DEFAULTS) | {"host"}

CONFIG_NAME = "rstunnel.conf"
CONFIG_ENV = "CTUNNEL_CONFIG"
SYSLOG_ENV = "CTUNNEL_SYSLOG"          # socket path, for tests; default /dev/log
SYSLOG_PATH = "/dev/log"

# Verdicts. Only DOWN restarts the tunnel. TARGET_DOWN: the tunnel works but
# the service behind a forward refuses or does not answer.
UP, DOWN, UNKNOWN, TARGET_DOWN = "UP", "DOWN", "UNKNOWN", "TARGET_DOWN"
REMOTE_CHECKS = ("auto", "channel", "nc", "none")
DEFAULT_BIND = "127.0.0.1"  # a forward without a bind address listens here
EXIT_OK, EXIT_DOWN, EXIT_USAGE = 0, 1, 2

KILL_GRACE = 2.0            # seconds between SIGTERM and SIGKILL
LAUNCH_TIMEOUT_FACTOR = 4   # ssh -f may take this many check_timeouts to connect
SOCKET_PATH_MAX = 104       # sun_path is 104-108 bytes depending on the OS
CTL_TEMP_SUFFIX = 17        # ssh binds NAME.ctl.XXXXXXXXXXXXXXXX first, then renames it
STOP_LOCK_WAIT = 30.0       # `stop` waits this long for a running tick
PARALLEL = 32               # tunnels checked at once (a thread each)
STATE_MAX = 65536           # bytes read of a state file at most
CONFIG_MAX = 1 << 20        # bytes a config may have
LOG_MAX = 1 << 20           # NAME.log is cut back to LOG_KEEP bytes past this size
LOG_KEEP = 65536
CMDLINE_MAX = 65536         # bytes of a /proc/PID/cmdline read at most
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
_CONTROL_RE = re.compile("[\x00-\x1f\x7f-\x9f]")


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
    "alive_interval alive_count check_timeout remote_check reclaim state_dir client",
    defaults=("openssh",),      # client: "openssh" or "dbclient", told from the ssh key
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


def expand_home(path):
    """Expand ~ as ssh does: from the password database, not $HOME.

    OpenWrt boots with HOME=/: a tick from boot and one from cron must find
    the same key and the same state.
    """
    if path == "~" or path.startswith("~/"):
        import pwd
        try:
            return pwd.getpwuid(os.geteuid()).pw_dir + path[1:]
        except KeyError:        # a uid with no passwd entry (some containers)
            pass
    return os.path.expanduser(path)


def config_candidates(script=__file__):
    """Return the places a config is looked for when neither -c nor $CTUNNEL_CONFIG says."""
    return [
        os.path.join(os.path.dirname(os.path.realpath(script)), CONFIG_NAME),
        expand_home("~/.config/ctunnel/" + CONFIG_NAME),
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
    """Read an ini file strictly into a ConfigParser, or raise ConfigError.

    The config is trusted as ssh trusts ~/.ssh/config (its ssh_options may
    name a ProxyCommand): it must be a regular file of this user or root
    that nobody else may write.
    """
    parser = configparser.ConfigParser(interpolation=None, defaults=DEFAULTS,
                                       strict=True, empty_lines_in_values=False)
    try:
        parser.read_string(read_trusted(path, CONFIG_MAX).decode("utf-8-sig"))
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


def read_trusted(path, limit):
    """Return the bytes of a file that only this user (or root) may write.

    Opened without blocking (a FIFO cannot hang the tick), then checked on
    the open file itself. Raises ConfigError naming the fix, or OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("%s: not a regular file" % path)
        problem = untrusted(st)
        if problem:
            raise ConfigError("%s: %s" % (path, problem % {"path": path}))
        if st.st_size > limit:
            raise ConfigError("%s: %d bytes is too big for a config (at most %d)"
                              % (path, st.st_size, limit))
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def untrusted(st):
    """Why a file or folder with this stat may not be trusted (a % template), or None."""
    if st.st_uid not in (os.geteuid(), 0):
        return "owned by uid %d, not by this user or root (chown %d %%(path)s)" \
            % (st.st_uid, os.geteuid())
    if st.st_mode & 0o022:
        return "group or others may write it (chmod go-w %(path)s)"
    return None


def load_config(path, problems=None):
    """Load and validate every tunnel of the config at path.

    Returns a list of Tunnel. Raises ConfigError naming file, section and key.
    With a problems dict, a bad section is put there ({name: message}) and
    the others are still returned: one typo must not stop every tunnel.
    """
    parser = read_config(path)
    for key in parser.defaults():
        if key not in KNOWN_KEYS:
            raise ConfigError("%s [DEFAULT]: unknown key \"%s\" (known: %s)"
                              % (path, key, ", ".join(sorted(KNOWN_KEYS))))
    tunnels = []
    for name in parser.sections():
        try:
            tunnels.append(_load_tunnel(path, name, parser[name]))
        except ConfigError as e:
            if problems is None:
                raise
            problems[name] = str(e)
    if not tunnels and not problems:
        raise ConfigError("%s: no tunnels: add a [NAME] section with host and "
                          "remote_forward or local_forward" % path)
    return tunnels


def _load_tunnel(path, name, section):
    """Validate one section into a Tunnel: each key through its parser."""
    where = "%s [%s]" % (path, name)
    try:
        if name != name.strip():
            raise ValueError('tunnel name "%s" has blanks around it' % name)
        parse_tunnel_name(name)
    except ValueError as e:
        raise ConfigError("%s: %s" % (where, e))
    for key in section:
        if key not in KNOWN_KEYS:
            raise ConfigError('%s: unknown key "%s" (known: %s)'
                              % (where, key, ", ".join(sorted(KNOWN_KEYS))))
    values = {}
    for key, parse in _KEY_PARSERS:
        text = section.get(key, "").strip()
        if key in _PATH_KEYS and text and (key != "ssh" or os.sep in text):
            # cron runs in HOME, a user by hand anywhere: relative to the config file
            text = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                                 expand_home(text)))
        try:
            if re.search("[\x00-\x08\x0b-\x1f\x7f]", text):
                raise ValueError("contains a control character (%r)" % text)
            if "\n" in text and key not in _MULTI_KEYS:
                raise ValueError('has a second line "%s": is it indented by mistake? (an '
                                 'indented line continues the key above)'
                                 % text.splitlines()[1].strip())
            values[key] = parse(text)
        except ValueError as e:
            hint = " (a comment must be on a line of its own)" if re.search(r"\s[#;]", text) \
                else ""
            raise ConfigError("%s: %s %s%s" % (where, key, e, hint))
    forwards = values["remote_forward"] + values["local_forward"]
    if not forwards:
        raise ConfigError("%s: no forwards: set remote_forward or local_forward" % where)
    try:
        state_dir = _state_dir(values["state_dir"], name)
    except ValueError as e:
        raise ConfigError("%s: state_dir %s" % (where, e))
    client = client_kind(values["ssh"])
    if client == "dbclient":
        problem = dbclient_cannot(values, forwards)
        if problem:
            raise ConfigError("%s: %s" % (where, problem))
    return Tunnel(name=name, host=values["host"], user=values["user"], port=values["port"],
                  identity_file=values["identity_file"], ssh_config=values["ssh_config"],
                  forwards=tuple(forwards), ssh_options=tuple(values["ssh_options"]),
                  ssh=values["ssh"], alive_interval=values["server_alive_interval"],
                  alive_count=values["server_alive_count_max"],
                  check_timeout=values["check_timeout"],
                  remote_check=values["remote_check"], reclaim=values["reclaim"] == "yes",
                  state_dir=state_dir, client=client)


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


def _one_of(choices):
    def parse(value):
        if value not in choices:
            raise ValueError('"%s" is not one of %s' % (value, ", ".join(choices)))
        return value
    return parse


def _lines(value):
    return [line.strip() for line in value.splitlines() if line.strip()]


def _readable_file(value):
    if not value:
        return ""
    path = expand_home(value)
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
    path = expand_home(value)
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


DROPBEAR_NAMES = ("dbclient", "dropbear", "dropbearmulti")
DBCLIENT_OPTIONS = ("DisableTrivialAuth", "UseSyslog")   # -o options ctunnel leaves to you


def client_kind(program):
    """Is program OpenSSH's ssh or Dropbear's dbclient? Told by name, not by running it.

    OpenWrt's /usr/bin/ssh is a symlink to the dropbear multi-call binary,
    which acts as the client when called as ssh or dbclient.
    """
    names = {os.path.basename(program), os.path.basename(os.path.realpath(program))}
    return "dbclient" if names & set(DROPBEAR_NAMES) else "openssh"


def dbclient_cannot(values, forwards):
    """What in a section dbclient cannot do ("" if nothing): said at load, exit 2."""
    if values["ssh_config"]:
        return "ssh_config: dbclient reads no ssh_config file; give host, port and user here"
    for option in values["ssh_options"]:
        if option.split("=")[0] not in DBCLIENT_OPTIONS:
            return ('ssh_options "%s": dbclient knows only %s (ctunnel sets '
                    'ExitOnForwardFailure and Port itself)' % (option, ", ".join(DBCLIENT_OPTIONS)))
    if values["remote_check"] == "nc":
        return ("remote_check = nc needs OpenSSH's ssh (a control master); dbclient is "
                "checked through a loopback forward: use auto")
    if re.search("[,/]", values["host"]):
        return 'host "%s": dbclient would read "," and "/" as hops and ports' % values["host"]
    for forward in forwards:
        if ":" in check_address(forward) + forward.host.strip("[]"):
            return ("%s: ctunnel drives dbclient over IPv4 only; use an IPv4 address"
                    % forward.spec)
    return ""


def _state_dir(value, name):
    """Check that state_dir can hold the control socket and be made; make nothing.

    A tick creates it (0700); status and -n only look.
    """
    path = os.path.normpath(value)
    ctl = os.path.join(path, name + ".ctl")
    if len(ctl.encode()) + CTL_TEMP_SUFFIX >= SOCKET_PATH_MAX:
        raise ValueError('"%s" is too long: the control socket %s, plus the %d bytes ssh adds '
                         'while it creates it, must stay under %d bytes'
                         % (value, ctl, CTL_TEMP_SUFFIX, SOCKET_PATH_MAX))
    if os.path.isdir(path):
        problem = untrusted(os.stat(path))
        if problem:
            raise ValueError('"%s" is %s' % (value, problem % {"path": path}))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError('"%s" cannot be created: %s is not a directory' % (value, existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError('"%s" %s' % (value, "is not writable" if existing == path else
                                      "cannot be created: %s is not writable" % existing))
    return path


_PATH_KEYS = ("identity_file", "ssh_config", "ssh", "state_dir")
_MULTI_KEYS = ("remote_forward", "local_forward", "ssh_options")
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
    ("remote_check", _one_of(REMOTE_CHECKS)),
    ("reclaim", _one_of(("yes", "no"))),
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


def _login_args(tunnel):
    """Arguments that log in as the tunnel does: server, key, the user's ssh_options.

    They come after ctunnel's own -o options: ssh takes the first value it is given.
    """
    args = _target_args(tunnel)
    if tunnel.identity_file:
        args += ["-i", tunnel.identity_file, "-o", "IdentitiesOnly=yes"]
    for option in tunnel.ssh_options:
        args += ["-o", option]
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
    argv += _login_args(tunnel)
    for fwd in tunnel.forwards:
        argv += ["-" + fwd.kind, forward_arg(fwd)]
    return argv + ["--", tunnel.host]


def forward_arg(forward):
    """Return the -L/-R argument, always with a bind address.

    Without one, ssh asks for "localhost": the listener may then end up on
    only one of 127.0.0.1 and ::1 (the other held by another program) and the
    forward still "succeeds". Naming 127.0.0.1 makes ssh bind exactly that,
    and ExitOnForwardFailure fire when it is taken.
    """
    return "%s:%d:%s:%d" % (forward.bind or DEFAULT_BIND, forward.port, forward.host,
                            forward.hostport)


def build_fresh_argv(tunnel, *tail):
    """Return an argv for a fresh connection with the tunnel's own key and
    options, no forwards and no master: to ask the server about a port the
    tunnel could not have. tail: -W host:port, or -T and a command."""
    argv = [tunnel.ssh, "-o", "BatchMode=yes", "-o", "ControlPath=none",
            "-o", "ClearAllForwardings=yes",
            "-o", "ConnectTimeout=%d" % math.ceil(tunnel.check_timeout)]
    return argv + _login_args(tunnel) + list(tail)


def build_probe_argv(tunnel, address, port):
    """ssh -W address:port over a fresh connection: does anything listen there?"""
    where = "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)
    return build_fresh_argv(tunnel, "-W", where, "--", tunnel.host)


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
    return ["nc", "-z", "-w", str(wait), "--", check_address(forward), str(forward.port)]


def quote_argv(argv):
    """Return argv as one shell-quoted line, for logs and --dry-run."""
    import shlex
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------
# The control-socket client: OpenSSH's multiplexing protocol (PROTOCOL.mux)
# ---------------------------------------------------------------------------
#
# A packet is a uint32 length, then a uint32 type and its fields: uint32s and
# strings (uint32 length + bytes). Both sides start with a hello; version 4
# has been the protocol since OpenSSH 5.x. Since OpenSSH 6.7 the master
# answers a stdio forward only once the server has opened or refused the
# channel, so the reply itself tells a refused channel from an open one.

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
    """One connection to a tunnel's control socket; every read bounded by deadline."""

    def __init__(self, path, deadline):
        self.deadline = deadline
        self.request_id = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._settimeout()
            try:
                self.sock.connect(path)
            except socket.timeout:
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
        data = b""
        while len(data) < size:
            self._settimeout()
            try:
                chunk = self.sock.recv(size - len(data))
            except socket.timeout:
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
                self.sock.sendmsg([b"\0"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                             fd.to_bytes(4, sys.byteorder))])
        except socket.timeout:
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


# ---------------------------------------------------------------------------
# Processes and state files
# ---------------------------------------------------------------------------

def make_state_dir(tunnel):
    """Create state_dir (0700) if need be, and refuse one that others control."""
    os.makedirs(tunnel.state_dir, mode=0o700, exist_ok=True)
    problem = untrusted(os.stat(tunnel.state_dir))
    if problem:
        raise OSError(errno.EPERM, "state_dir %s" % problem % {"path": tunnel.state_dir})


def _read_state_file(path, limit, start=None):
    """Read at most limit bytes of a file in state_dir: never through a symlink.

    start: read from there; negative counts from the end (a log's last words).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if start is not None:
            os.lseek(fd, start, os.SEEK_END if start < 0 else os.SEEK_SET)
        return os.read(fd, limit)
    except OSError as e:
        if e.errno == errno.EINVAL:         # seeking before the start of a short file
            os.lseek(fd, 0, os.SEEK_SET)
            return os.read(fd, limit)
        raise
    finally:
        os.close(fd)


def read_pidfile(tunnel):
    """Return the PID in the tunnel's pidfile, or None (also for a garbled one)."""
    try:
        text = _read_state_file(state_path(tunnel, "pid"), 32).strip()
    except OSError:
        return None
    ok = re.match(rb"^[0-9]{1,10}$", text) and 0 < int(text) < 1 << 31
    return int(text) if ok else None


def _write_atomic(path, text):
    """Replace path with text: a temp file of unpredictable name, mode 0600.

    Nothing is left behind when the write fails (a full disk).
    """
    import tempfile
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".",
                               dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_pidfile(tunnel, pid):
    _write_atomic(state_path(tunnel, "pid"), "%d\n" % pid)


def read_state_text(tunnel):
    """Return the raw text of the tunnel's state file ("" if none)."""
    try:
        return _read_state_file(state_path(tunnel, "state"), STATE_MAX).decode("utf-8",
                                                                               "replace")
    except OSError:
        return ""


def read_state(tunnel):
    """Return the tunnel's small state record (restarts, reasons), or {}."""
    import json
    try:
        state = json.loads(read_state_text(tunnel) or "{}")
    except ValueError:
        return {}
    if not isinstance(state, dict):
        return {}
    # a garbled or hand-edited state file: what has the wrong type is dropped
    return {k: v for k, v in state.items() if k in STATE_TYPES and
            isinstance(v, STATE_TYPES[k]) and not isinstance(v, bool)}


STATE_TYPES = {"restarts": int, "failures": int, "last_restart": int, "failure_said": int,
               "stopped": int, "last_reason": str, "last_failure": str, "warnings": dict}


def write_state(tunnel, state):
    import json
    _write_atomic(state_path(tunnel, "state"), json.dumps(state, sort_keys=True) + "\n")


def process_state(pid):
    """Return the state letter of pid (R, S, T for stopped, Z...), "" if there is none."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            stat = f.read()
    except OSError:
        return ""
    # the state letter follows the command name, which may itself hold ")"
    return stat[stat.rfind(")") + 2:][:1]


def process_alive(pid):
    """Return True if pid is a live process (zombies count as dead)."""
    return process_state(pid) not in ("Z", "X", "")


def _cmdline(pid):
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read(CMDLINE_MAX)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def is_tunnel_ssh(pid, tunnel):
    """Return True if pid is this tunnel's ssh: ours, the ssh binary, its token.

    The token is unique to this tunnel (for OpenSSH's ssh its -S CTL, see
    the client's `owns`), so a recycled PID or an admin's own ssh never
    matches; the owner and /proc/PID/exe keep another user's look-alike, or
    a program that only calls itself ssh, from matching.
    """
    try:
        if os.stat("/proc/%d" % pid).st_uid != os.geteuid():
            return False
        exe = os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return False
    # a running ssh whose binary was upgraded since shows "PATH (deleted)"
    if exe.rsplit(" (deleted)", 1)[0] != os.path.realpath(tunnel.ssh):
        return False
    return client_of(tunnel).owns(pid, tunnel)


def has_control_socket(pid, tunnel):
    """OpenSSH's token: the master was started with -S and this tunnel's socket."""
    args = _cmdline(pid)
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


def socket_inodes(pid):
    """Return the inodes of every socket pid holds open (its /proc/PID/fd)."""
    inodes = set()
    fd_dir = "/proc/%d/fd" % pid
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(os.path.join(fd_dir, fd))
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(int(link[8:-1]))
    return inodes


TcpSocket = namedtuple("TcpSocket", "inode local_addr local_port remote_addr remote_port state")
TCP_SYN_SENT, TCP_LISTEN = 0x02, 0x0A
TCP_TABLE_MAX = 4 << 20     # bytes read of /proc/net/tcp{,6} at most


class TcpTable:
    """The kernel's TCP sockets (/proc/net/tcp and tcp6), read as seldom as possible.

    Reading either file walks the kernel's whole connection table: well under
    a millisecond on a small box, several on a big machine. One table serves
    a whole tick: a check that saw a new socket asks for a read that began
    after that moment, and checks that wait together share one read. The
    other checks of a tunnel's ladder (a listener, a connection) share a read
    that began after their ladder did.
    """

    FILES = ("/proc/net/tcp", "/proc/net/tcp6")

    def __init__(self):
        self.lock = _thread.allocate_lock()
        self.reads = {}         # file -> (monotonic time the read began, its text)
        self.ladder = _thread._local()      # .began: when this thread's ladder began

    def sockets(self, inodes, since=None):
        """Return the TcpSocket of each inode, from reads that began after since.

        since None: after this thread's ladder began (or now, outside one).
        inodes None: every socket. tcp6 is read only when tcp did not hold
        every inode asked for.
        """
        if since is None:
            since = getattr(self.ladder, "began", None) or time.monotonic()
        found = []
        for path in self.FILES:
            text = self._text(path, since)
            if inodes is None:
                found += [_tcp_socket(l) for l in text.splitlines()[1:] if len(l.split()) > 9]
                continue
            found += [s for s in (_find_inode(text, i) for i in inodes) if s]
            if len(found) >= len(inodes):
                break
        return found

    def _text(self, path, since):
        with self.lock:
            began, text = self.reads.get(path, (-1.0, b""))
            if began < since:
                began = time.monotonic()
                try:
                    with open(path, "rb") as f:
                        text = f.read(TCP_TABLE_MAX)
                except OSError:
                    text = b""
                self.reads[path] = (began, text)
            return text


def _find_inode(text, inode):
    """Return the TcpSocket of the line whose inode field is inode, or None."""
    needle = b" %d " % inode
    at = text.find(needle)
    while at >= 0:
        start, end = text.rfind(b"\n", 0, at) + 1, text.find(b"\n", at)
        line = text[start:end if end >= 0 else len(text)]
        if line.split()[9:10] == [b"%d" % inode]:
            return _tcp_socket(line)
        at = text.find(needle, at + 1)
    return None


def _tcp_socket(line):
    fields = line.split()
    local, remote = fields[1].split(b":"), fields[2].split(b":")
    return TcpSocket(int(fields[9]), _proc_address(local[0]), int(local[1], 16),
                     _proc_address(remote[0]), int(remote[1], 16), int(fields[3], 16))


def _proc_address(text):
    """Decode /proc/net/tcp's hex address: 32-bit words in the host's byte order."""
    raw = bytes.fromhex(text.decode("ascii"))
    if sys.byteorder == "little":
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    if len(raw) == 16 and raw[:12] == b"\0" * 10 + b"\xff\xff":
        raw = raw[12:]              # an IPv4 client of a dual-stack socket
    return socket.inet_ntop(socket.AF_INET if len(raw) == 4 else socket.AF_INET6, raw)


def kill_processes(pids, grace=KILL_GRACE):
    """SIGTERM every pid, wait one grace period for all of them, then SIGKILL.

    Returns the pids that are gone. SIGCONT follows SIGTERM so that a stopped
    (hung) ssh can act on it. A refused or vanished kill never raises, and
    however many there are, they cost one grace period in all.
    """
    def send(pid, *sigs):
        for sig in sigs:
            try:
                os.kill(pid, sig)
            except OSError:         # ESRCH: gone already; EPERM: not ours to end
                pass
    for pid in pids:
        send(pid, signal.SIGTERM, signal.SIGCONT)
    for sig, wait in ((signal.SIGKILL, grace), (None, 1.0)):
        deadline = time.monotonic() + wait
        while any(map(process_alive, pids)) and time.monotonic() < deadline:
            time.sleep(0.05)
        for pid in filter(process_alive, pids):
            if sig:
                send(pid, sig)
    return [pid for pid in pids if not process_alive(pid)]


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
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
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
OUTPUT_MAX = 65536          # bytes kept of what a program prints; the rest is drained


def _run(argv, timeout, answers=None, env=None):
    """Run argv without a shell; return (status or None on timeout, stdout, stderr).

    Output is read with a cap, so a server that talks without end cannot
    fill the box's memory; the excess is read and thrown away. answers:
    bytes for its stdin (default: none, /dev/null); env: its environment.
    """
    import subprocess
    import selectors
    stdin = subprocess.DEVNULL
    if answers is not None:
        stdin, ours = os.pipe()
        os.write(ours, answers)
        os.close(ours)
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        return 255, "", "cannot run %s: %s" % (argv[0], e.strerror)
    finally:
        if answers is not None:
            os.close(stdin)
    kept = {proc.stdout: b"", proc.stderr: b""}
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        for pipe in kept:
            selector.register(pipe, selectors.EVENT_READ)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                data = os.read(key.fd, 16384)
                if not data:
                    selector.unregister(key.fileobj)
                elif len(kept[key.fileobj]) < OUTPUT_MAX:
                    kept[key.fileobj] += data[:OUTPUT_MAX - len(kept[key.fileobj])]
    try:
        status = proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        status = None
    for pipe in kept:
        pipe.close()
    return status, kept[proc.stdout].decode("utf-8", "replace"), \
        kept[proc.stderr].decode("utf-8", "replace").strip()


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


def _why(error):
    """One line for an exception: an OSError's own words, else its message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__


def check_process(tunnel, adopt=False):
    """Is the pidfile's PID alive and this tunnel's ssh? Return (pid, Verdict).

    adopt: with no usable pidfile, look for this tunnel's ssh by its control
    socket (a launch whose pidfile could not be written: a full disk) and
    record it, rather than start a second one.
    """
    pid = read_pidfile(tunnel)
    if pid is None:
        found = find_tunnel_processes(tunnel) if adopt else []
        if len(found) != 1:
            return None, Verdict("process", DOWN, "not running")
        try:
            write_pidfile(tunnel, found[0])
        except OSError:
            pass                    # still full: adopted again next tick
        return found[0], Verdict("process", UP, "pid %d, adopted (it had no pidfile)"
                                 % found[0])
    if not process_alive(pid):
        return None, Verdict("process", DOWN, "process %d gone" % pid)
    if not is_tunnel_ssh(pid, tunnel):
        return None, Verdict("process", DOWN,
                             "pidfile names PID %d, which is not this tunnel's ssh" % pid)
    return pid, Verdict("process", UP, "pid %d" % pid)


def query_master(tunnel):
    """Ask `ssh -O check` for the master's PID: return (pid, None) or (None, problem).

    Only for a master that does not speak mux protocol version 4.
    """
    rc, _, err = _run(build_mux_argv(tunnel, "-O", "check"), tunnel.check_timeout)
    if rc is None:
        return None, "control master did not answer within %gs: hung" % tunnel.check_timeout
    m = re.search(r"Master running \(pid=(\d+)\)", err)
    if rc != 0 or not m:
        return None, "control master: %s" % (_first_line(err) or "ssh exited %d" % rc)
    return int(m.group(1)), None


def check_master(tunnel, expected=None, table=None):
    """Does the control master answer, and is it the expected PID? Return (pid, Verdict)."""
    try:
        with MuxClient(state_path(tunnel, "ctl"), _deadline(tunnel)) as mux:
            pid = mux.alive()
    except MuxVersionError:
        pid, problem = query_master(tunnel)
        if problem:
            return None, Verdict("master", DOWN, problem)
    except MuxTimeout:
        return None, Verdict("master", DOWN, "control master did not answer within %gs: hung"
                             % tunnel.check_timeout)
    except (MuxError, OSError) as e:
        return None, Verdict("master", DOWN, "control socket: %s" % _why(e))
    if expected and pid != expected:
        return None, Verdict("master", DOWN, "control socket answers for pid %d, not the "
                             "pidfile's %d" % (pid, expected))
    return pid, Verdict("master", UP, "pid %d" % pid)


def _deadline(tunnel):
    return time.monotonic() + tunnel.check_timeout


def _ms(since):
    return "%d ms" % max(1, round((time.monotonic() - since) * 1000))


class Channel:
    """A channel from the server to host:port, opened by the tunnel's own master.

    We keep the write end of its input: while we hold it the server sees no
    end of input, and the connection at the far end stays open while we look.
    """

    own_port = None             # (dbclient's loopback probe has one: see Loopback)

    def __init__(self, tunnel, deadline):
        self.mux = MuxClient(state_path(tunnel, "ctl"), deadline)
        self.read_end, self.input = os.pipe()
        self.output, self.theirs = socket.socketpair()
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


def _log_size(tunnel):
    try:
        return os.stat(state_path(tunnel, "log")).st_size
    except OSError:
        return 0


def _log_since(tunnel, offset, limit=8192):
    """Return what the master wrote to NAME.log since offset (at most limit bytes)."""
    try:
        return _read_state_file(state_path(tunnel, "log"), limit, offset).decode("utf-8",
                                                                                "replace")
    except OSError:
        return ""


def _ip(text):
    """Return text as packed IP address bytes, or None if it is a name."""
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            return socket.inet_pton(family, text)
        except OSError:
            pass
    return None


def _is_target(sock, forward):
    """Is sock a connection to the forward's host:hostport (by port alone for a name)?"""
    wanted = _ip(forward.host.strip("[]"))
    return sock.remote_port == forward.hostport and \
        (wanted is None or wanted == _ip(sock.remote_addr))


def _await_loop(tunnel, forward, pid, before, channel, log_offset, deadline, table):
    """Watch the master while the channel is open: did the connection come back?

    It came back through this tunnel when the master (our verified PID) holds
    a new connection to the forward's target, or says it could not make one.
    Returns "loop", "connecting" (target does not answer), "target refused",
    "closed" (far end hung up with no sign either way) or "silent".
    """
    refused = "connect_to %s port %d: failed" % (forward.host.strip("[]"), forward.hostport)
    seen, interval, own = None, 0.001, channel.own_port
    while True:
        # a socket looked up once and found to be no target (a unix socket of
        # another mux client) is not looked up again; one still connecting is
        new = socket_inodes(pid) - before
        for sock in table.sockets(new, time.monotonic()) if new else ():
            if _is_target(sock, forward) and sock.local_port != own:
                if sock.state != TCP_SYN_SENT:
                    return "loop"
                seen = sock
        before |= new - ({seen.inode} if seen else set())
        if _log_size(tunnel) > log_offset and refused in _log_since(tunnel, log_offset):
            return "target refused"
        left = deadline - time.monotonic()
        if channel is None or left <= 0:
            return "connecting" if seen else ("closed" if channel is None else "silent")
        if select.select([channel.output], [], [], min(interval, left))[0]:
            if not channel.output.recv(4096):
                channel = None      # hung up: one last look at the master, then decide
        interval = min(interval * 2, 0.02)


def _refusal(tunnel, log_offset, error):
    """Why the server refused a channel, in the master's words from its log."""
    said = [l for l in _lines_said(_log_since(tunnel, log_offset)) if "open failed" in l]
    return said[-1].split("open failed: ", 1)[1] if said else str(error)


def _forbidden(reason):
    return "prohibited" in reason


def check_data_path(tunnel, forward, pid, table, tries=2):
    """Prove a -R forward end to end: server listener -> this tunnel -> box target.

    Returns (Verdict, fallback): fallback is True when the server would not
    open the channel at all, so that `nc` may be asked instead.
    """
    name, address = "remote forward %d" % forward.port, check_address(forward)
    where = "%s:%d" % (address, forward.port)
    target = "%s:%d" % (forward.host, forward.hostport)
    began = time.monotonic()
    deadline = began + tunnel.check_timeout
    log_offset = _log_size(tunnel)
    if log_offset > LOG_MAX:        # a target down for weeks adds a line every tick
        log_offset = trim_log(tunnel)
    for _ in range(tries):
        try:
            with Channel(tunnel, deadline) as channel:
                before = socket_inodes(pid) | channel.passed
                channel.open(address, forward.port)
                outcome = _await_loop(tunnel, forward, pid, before, channel, log_offset,
                                      deadline, table)
        except MuxRefused as e:
            reason = _refusal(tunnel, log_offset, e)
            if _forbidden(reason):
                return Verdict(name, UNKNOWN, "the server forbids a channel to %s (%s): "
                               "see AllowTcpForwarding and permitopen" % (where, reason)), True
            if "Connection refused" in reason:
                return Verdict(name, DOWN, "no listener on the server at %s" % where), False
            return Verdict(name, DOWN, "the server refused a channel to %s: %s"
                           % (where, reason)), False
        except MuxTimeout:
            return Verdict(name, DOWN, "no answer within %gs: the connection is hung"
                           % tunnel.check_timeout), False
        except MuxVersionError as e:
            return Verdict(name, UNKNOWN, "the %s, which cannot open a channel" % e), True
        except (MuxError, OSError) as e:
            return Verdict(name, DOWN, "control socket: %s" % _why(e)), False
        if outcome != "closed":
            break
    return {
        "loop": Verdict(name, UP, "data path %s -> box %s proven in %s"
                        % (where, target, _ms(began))),
        "target refused": Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box "
                                  "refused the connection" % target),
        "connecting": Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box does "
                              "not answer" % target),
        "closed": Verdict(name, UNKNOWN, "%s on the server hung up at once; cannot tell "
                          "whether it is this tunnel's" % where),
        "silent": Verdict(name, DOWN, "port %d on the server is held by another program: "
                          "a connection to %s did not come back through this tunnel"
                          % (forward.port, where)),
    }[outcome], False


def remote_nc_command(forward, timeout):
    """Return the line the server's shell runs for the nc check.

    nc's own words and status come between two markers, so that an answer
    that is not nc's (a forced command, a chatty login shell) is recognised.
    """
    import shlex
    nc = " ".join(shlex.quote(a) for a in remote_check_command(forward, timeout))
    return "echo ctunnel-nc; %s 2>&1; echo ctunnel-nc=$?" % nc


def check_remote_nc(tunnel, forward):
    """Is there a listener on the server's end of a -R forward? (nc over the master)

    Proves only that something listens there; used where the server forbids
    channels, or when remote_check = nc.
    """
    name = "remote forward %d" % forward.port
    command = remote_nc_command(forward, tunnel.check_timeout)
    rc, out, err = _run(build_mux_argv(tunnel, command), tunnel.check_timeout)
    if rc is None:
        return Verdict(name, DOWN, "nc check hung for %gs: the connection is dead"
                       % tunnel.check_timeout)
    m = re.search(r"^ctunnel-nc\n(.*?)^ctunnel-nc=(\d+)$", out, re.M | re.S)
    if m:
        said, status = m.group(1).strip(), int(m.group(2))
        if status == 0:
            return Verdict(name, UP, "listening on the server (nc)")
        if re.search(r"usage|invalid option|unrecognized|illegal", said, re.I):
            return Verdict(name, UNKNOWN, "the server's nc cannot do nc -z (BusyBox?): "
                           "install netcat-openbsd there")
        if status in (126, 127):
            return Verdict(name, UNKNOWN, "no nc on the server (install netcat-openbsd there)")
        if status == 1:
            return Verdict(name, DOWN, "no listener on the server (nc)")
        return Verdict(name, UNKNOWN, "nc on the server exited %d%s"
                       % (status, ": " + _first_line(said) if said else ""))
    if rc == 255 and re.search(r"refused by peer|open failed", err):
        return Verdict(name, UNKNOWN, "cannot check: the server refuses command sessions "
                       "(%s)" % _first_line(err))
    if rc == 255:
        return Verdict(name, DOWN, "ssh failed: %s" % (_first_line(err) or "exit 255"))
    said = _first_line(out) or _first_line(err)
    return Verdict(name, UNKNOWN, "the server did not run nc (a forced command on the key?): "
                   "exit %d%s" % (rc, ", said: " + said if said else ""))


def check_remote_forward(tunnel, forward, pid, table):
    """Check a -R forward the way remote_check says (auto: data path, nc if forbidden)."""
    if tunnel.remote_check == "none":
        return Verdict("remote forward %d" % forward.port, UP, "not checked (remote_check = none)")
    if tunnel.remote_check == "nc":
        return check_remote_nc(tunnel, forward)
    verdict, fallback = check_data_path(tunnel, forward, pid, table)
    if not (fallback and tunnel.remote_check == "auto"):
        return verdict
    nc = check_remote_nc(tunnel, forward)
    if nc.state == UNKNOWN:
        return verdict._replace(detail="%s; and nc: %s" % (verdict.detail, nc.detail))
    return nc._replace(detail="%s, since %s" % (nc.detail, verdict.detail))


def check_listener(tunnel, pid, table, address, port):
    """Does pid listen on address:port? Return None if it does, else what is wrong."""
    def binds(sock):
        return sock.state == TCP_LISTEN and sock.local_port == port and \
            sock.local_addr in (address, "0.0.0.0", "::")
    if any(binds(s) for s in table.sockets(socket_inodes(pid))):
        return None
    if any(binds(s) for s in table.sockets(None)):
        return "%s:%d is held by another program" % (address, port)
    return "%s does not listen on %s:%d" % (client_of(tunnel).name, address, port)


def check_local_forward(tunnel, forward, pid, table):
    """Does this tunnel's ssh own the -L listener, and does the server reach the target?"""
    name = "local forward %d" % forward.port
    address = check_address(forward)
    where = "%s:%d" % (address, forward.port)
    problem = check_listener(tunnel, pid, table, address, forward.port)
    if problem:
        return Verdict(name, DOWN, problem)
    if tunnel.remote_check in ("nc", "none"):
        return Verdict(name, UP, "listening on %s" % where)
    target = "%s:%d" % (forward.host, forward.hostport)
    began, log_offset = time.monotonic(), _log_size(tunnel)
    try:
        with Channel(tunnel, _deadline(tunnel)) as channel:
            channel.open(forward.host.strip("[]"), forward.hostport)
    except MuxRefused as e:
        reason = _refusal(tunnel, log_offset, e)
        if _forbidden(reason):
            return Verdict(name, UNKNOWN, "listening on %s, but the server forbids channels to "
                           "%s (%s): see permitopen" % (where, target, reason))
        return Verdict(name, TARGET_DOWN, "the tunnel works, but the server cannot reach %s "
                       "(%s)" % (target, reason))
    except MuxTimeout:
        return Verdict(name, DOWN, "no answer within %gs: the connection is hung"
                       % tunnel.check_timeout)
    except MuxVersionError:
        return Verdict(name, UP, "listening on %s (old master: far end not checked)" % where)
    except (MuxError, OSError) as e:
        return Verdict(name, DOWN, "control socket: %s" % _why(e))
    return Verdict(name, UP, "listening on %s; the server reaches %s in %s"
                   % (where, target, _ms(began)))


def run_ladder(tunnel, launched=None, table=None, adopt=False):
    """Run the checks cheapest first; stop at the first DOWN.

    Returns the list of verdicts reached; the tunnel is healthy if none is DOWN.
    launched: the PID of a client just launched; the ladder then starts at
    the master. table: the tick's TcpTable, shared by every tunnel of the tick.
    """
    table = table or TcpTable()
    table.ladder.began = time.monotonic()
    client = client_of(tunnel)
    verdicts, expected = [], launched
    if not launched:
        expected, verdict = check_process(tunnel, adopt)
        verdicts.append(verdict)
        if expected is None:
            return verdicts
    pid, verdict = client.check_link(tunnel, expected, table)
    verdicts.append(verdict)
    if pid is None:
        return verdicts
    for forward in sorted(tunnel.forwards, key=lambda f: f.kind):    # -L first
        check = client.check_local if forward.kind == "L" else client.check_remote
        verdicts.append(check(tunnel, forward, pid, table))
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
    stopped = kill_processes(sorted(pids))
    for suffix in ("pid", "ctl"):
        try:
            os.unlink(state_path(tunnel, suffix))
        except FileNotFoundError:
            pass
    return stopped


def _death_note(tunnel):
    """Return what the tunnel's last ssh said before it died, if anything."""
    try:
        return _last_line(_read_state_file(state_path(tunnel, "log"), 4096, -4096)
                          .decode("utf-8", "replace"))
    except OSError:
        return ""


def trim_log(tunnel, keep=LOG_KEEP):
    """Cut NAME.log to its last keep bytes; return its size after.

    ssh appends to it (O_APPEND), so it goes on writing at the new end.
    """
    path = state_path(tunnel, "log")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        if size > keep:
            os.lseek(fd, size - keep, os.SEEK_SET)
            tail = os.read(fd, keep)
            tail = tail[tail.find(b"\n") + 1:]      # whole lines only
            os.ftruncate(fd, 0)
            os.write(fd, tail)
            size = len(tail)
        return size
    finally:
        os.close(fd)


def launch_tunnel(tunnel):
    """Start the tunnel's ssh in the background and record its PID.

    Returns (pid, None) on success or (None, reason) with ssh's own words.
    ssh's output goes to NAME.log, a file rather than a pipe: a backgrounded
    ssh that kept a pipe open would hold this tick until it dies.
    """
    import subprocess
    argv = build_launch_argv(tunnel)
    limit = LAUNCH_TIMEOUT_FACTOR * tunnel.check_timeout
    log_path = state_path(tunnel, "log")
    start = trim_log(tunnel)        # what earlier ssh processes said stays, capped
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
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
    finally:
        os.close(log)
    said = _lines_said(_log_since(tunnel, start, 16384)[-8192:])
    if rc != 0:
        return None, explain_ssh_failure(tunnel, said, rc)
    pid, verdict = check_master(tunnel, None)
    if pid is None:
        return None, "ssh started but %s" % verdict.detail
    try:
        write_pidfile(tunnel, pid)
    except OSError:
        pass            # the next tick adopts it by its control socket (see check_process)
    return pid, None


def explain_ssh_failure(tunnel, lines, rc):
    """Turn what a failed `ssh -f` printed (its lines) into one line the user can act on."""
    said = lines[-1] if lines else "ssh exited %d without a message" % rc
    text = "\n".join(lines)
    bind = [l for l in lines if l.startswith("bind ")]
    if said.startswith("Could not request local forwarding") and bind:
        said = "%s: %s" % (said.rstrip("."), bind[-1])
    login = "%s%s" % (tunnel.user + "@" if tunnel.user else "", tunnel.host)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        known = "[%s]:%d" % (tunnel.host, tunnel.port) if tunnel.port and tunnel.port != 22 \
            else tunnel.host
        return ("the server's host key has CHANGED since it was accepted: this may be an "
                "attack by someone between this box and %s. Not connecting. If the server "
                "was reinstalled, check its new key's fingerprint with its admin, then "
                "ssh-keygen -R '%s' and accept the new key by logging in once by hand"
                % (tunnel.host, known))
    if "UNPROTECTED PRIVATE KEY FILE" in text:
        return ("%s (ssh ignores the key %s because others may read it: chmod 600 %s)"
                % (said, tunnel.identity_file, tunnel.identity_file))
    if "Host key verification failed" in said:
        return ("%s (the server's host key is not in known_hosts yet: check its fingerprint "
                "(ssh-keyscan %s%s | ssh-keygen -lf -), then accept it by logging in once by "
                "hand: ssh %s%s)" % (said, "-p %d " % tunnel.port if tunnel.port else "",
                                     tunnel.host, "-p %d " % tunnel.port if tunnel.port
                                     else "", login))
    if "Permission denied" in said:
        if key_has_passphrase(tunnel.identity_file):
            return ("%s (the key %s has a passphrase, which cron cannot type: make a key "
                    "without one, ssh-keygen -N '')" % (said, tunnel.identity_file))
        return ("%s (the server refused the key for %s: check user, and that the key's .pub "
                "line is in that user's ~/.ssh/authorized_keys on the server)"
                % (said, login.split("@")[0] if tunnel.user else "your user name"))
    version = _client_version(tunnel.ssh) if rc not in (0, 255) else "OpenSSH"
    if "Dropbear" in version:
        return ("%s is Dropbear's dbclient under another name, which ctunnel tells by its "
                "name: set ssh = a path or symlink named dbclient (it exited %d: %s)"
                % (tunnel.ssh, rc, said))
    if "OpenSSH" not in version:
        return ("%s is not OpenSSH's ssh client (it exited %d: %s); set ssh = the path of "
                "ssh" % (tunnel.ssh, rc, said))
    hints = (
        ("Could not resolve hostname", "check host, or the network"),
    )
    for needle, hint in hints:
        if needle in said:
            return "%s (%s)" % (said, hint)
    return said


def explain_held_port(tunnel, failure):
    """ssh said "remote port forwarding failed for listen port N": find out why.

    Returns (reclaimed, failure). reclaimed says which stale session of this
    login was ended (the caller then launches again, and failure is None);
    otherwise failure is ssh's line with the reason: the server's policy, a
    live client, another program, or what the server would need.
    """
    m = re.search(r"(?:remote port forwarding failed for listen port|Remote TCP forward "
                  r"request failed \(port) (\d+)", failure or "")
    forward = m and next((f for f in tunnel.forwards
                          if f.kind == "R" and f.port == int(m.group(1))), None)
    if not forward:
        return None, failure
    why = why_port_refused(tunnel, forward)
    if why is None:                 # something holds it: who?
        reclaimed, why = inspect_port(tunnel, forward)
        if reclaimed:
            return reclaimed, None
    return None, "%s (%s)" % (failure, why)


def why_port_refused(tunnel, forward):
    """Why the server will not listen on a -R port, or None when something holds it.

    One bounded connection asks for a channel to that port on the server:
    refused means nothing listens there, so the server's policy said no.
    """
    address = check_address(forward)
    listens = client_of(tunnel).probe_port(tunnel, address, forward.port)
    if listens is False:
        return ("nothing listens on %s:%d there: the server's policy refuses the port (see "
                "permitlisten in authorized_keys, PermitListen, AllowTcpForwarding and "
                "GatewayPorts in sshd_config); this is not a stale session"
                % (address, forward.port))
    return None if listens is True else "the server still holds the port, or refuses it: " \
        + listens


def probe_port_openssh(tunnel, address, port):
    """Does anything listen on address:port on the server? True, False, or the problem."""
    rc, _, err = _run(build_probe_argv(tunnel, address, port), tunnel.check_timeout)
    if rc is not None and "Connection refused" in err:
        return False
    if rc is None or rc == 0:
        return True
    return _first_line(err) or "ssh exited %d" % rc


def run_command_openssh(tunnel, command, timeout):
    """Run command on the server over a fresh connection with the tunnel's key."""
    return _run(build_fresh_argv(tunnel, "-T", "--", tunnel.host, command), timeout)


# The command a tunnel's own login runs on the server when its reverse port is
# held: it lists this user's sshd sessions that listen on exactly BIND:PORT and
# ends the stale ones. Stale: the session's client connection is half closed by
# the client (CLOSE_WAIT), or has bytes the client never acknowledged, sent
# again and again (no TCP reset came back: a power cut, a dropped line). A live
# client acknowledges within a round trip. POSIX sh, awk and Linux /proc; the
# values put in are numbers only.
STALE_SCRIPT = r"""
port=%(port)s a1=%(le)s a2=%(be)s reclaim=%(reclaim)d
set -- $SSH_CONNECTION
sp=$(printf %%04X "$4")
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
echo ctunnel-sessions
{ echo 0; for d in /proc/[0-9]*; do
    [ -O "$d" ] || continue
    read -r c < "$d/comm" 2>/dev/null || continue
    case $c in sshd|sshd-session) ;; *) continue ;; esac
    echo "${d#/proc/}" $(ls -l "$d/fd" 2>/dev/null | sed -n 's/.*socket:\[\([0-9]*\)\]$/\1/p')
  done; } | awk -v port="$port" -v a1="$a1" -v a2="$a2" -v sp="$sp" '
  NR == FNR { for (i = 2; i <= NF; i++) owner[$i] = $1; next }
  FNR == 1 || !($10 in owner) { next }
  { split($2, l, ":"); split($3, r, ":"); split($5, q, ":"); pid = owner[$10] }
  $4 == "0A" && l[2] == port && (l[1] == a1 || l[1] == a2) { listens[pid] = 1 }
  ($4 == "01" || $4 == "08") && l[2] == sp {
    peer[pid] = $3; stuck[pid] = $4 == "08" || (q[1] ~ /[1-9A-F]/ && $7 ~ /[1-9A-F]/) }
  END { for (pid in listens) print pid, (pid in peer) ? peer[pid] : "-", stuck[pid] + 0 }
' - /proc/net/tcp /proc/net/tcp6 | {
  ended=
  while read -r pid peer stuck; do
    start=$(cut -d' ' -f22 "/proc/$pid/stat" 2>/dev/null)
    began=$(awk -v s="${start:-0}" -v hz="$hz" '$1 == "btime" { print int($2 + s / hz) }' \
      /proc/stat)
    echo session "$pid" "$began" "$peer" "$stuck"
    if [ "$stuck" = 1 ] && [ "$reclaim" = 1 ]; then
      kill -TERM "$pid" 2>/dev/null && ended="$ended $pid"
    fi
  done
  [ -n "$ended" ] && sleep 1
  for pid in $ended; do
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    echo ended "$pid"
  done
}
echo ctunnel-done
"""


def _hex_both_orders(address):
    """The address as /proc/net/tcp prints it on a little- and a big-endian server."""
    raw = _ip(address) or b""
    little = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return little.hex().upper(), raw.hex().upper()


def inspect_port(tunnel, forward):
    """Who holds a -R port on the server? End a stale session of ours if allowed.

    Returns (reclaimed, why): reclaimed is one line saying what was ended (then
    the caller launches again); else why says who holds the port.
    """
    address, port = check_address(forward), forward.port
    le, be = _hex_both_orders(address)
    script = STALE_SCRIPT % {"port": "%04X" % port, "le": le or "-", "be": be or "-",
                             "reclaim": tunnel.reclaim}
    rc, out, err = client_of(tunnel).run_command(tunnel, script, tunnel.check_timeout + 3)
    if "ctunnel-sessions" not in out or "ctunnel-done" not in out:
        return None, ("something on the server holds %s:%d, and ctunnel cannot look for a "
                      "stale session there (a forced command on the key, no POSIX shell or "
                      "no /proc): set ClientAliveInterval 10 and ClientAliveCountMax 3 in "
                      "the server's sshd_config" % (address, port))
    sessions = re.findall(r"^session (\d+) (\d+) (\S+) ([01])$", out, re.M)
    ended = set(re.findall(r"^ended (\d+)$", out, re.M))

    def since(began):
        """When the session began, from the server's boot time: the same on every
        tick (an age would shift it across a minute, and a repeated line become news)."""
        return time.strftime("%H:%M", time.localtime(int(began)))

    def peer(text):
        if text == "-":
            return "?"
        addr, port_hex = text.split(":")
        return "%s:%d" % (_proc_address(addr.encode()), int(port_hex, 16))
    for pid, began, _, _ in sessions:
        if pid in ended:
            return ("reclaimed port %d from a stale session (server pid %s, up since %s)"
                    % (port, pid, since(began)), "")
    for pid, began, client, stuck in sorted(sessions, key=lambda s: s[3]):   # live ones first
        if stuck == "0":
            return None, ("port %d is held by another live client of this login (server pid "
                          "%s, up since %s, from %s): leaving it alone"
                          % (port, pid, since(began), peer(client)))
        return None, ("a stale session holds port %d (server pid %s, up since %s); %s"
                      % (port, pid, since(began), "it could not be ended" if tunnel.reclaim
                         else "reclaim = no: waiting for the server to drop it"))
    return None, ("port %d on the server is held by another program or another user (a "
                  "Dropbear server's sessions cannot be looked into: start it with -K 10 -I "
                  "300 so that it drops dead clients)" % port)


def key_has_passphrase(path):
    """Is the private key at path encrypted? (OpenSSH's own format, or PEM.)"""
    import base64
    try:
        with open(path, "rb") as f:
            text = f.read(65536)
    except (OSError, TypeError):
        return False
    if b"ENCRYPTED" in text:
        return True
    body = b"".join(l for l in text.splitlines() if not l.startswith(b"-----"))
    try:
        blob = base64.b64decode(body)
    except ValueError:
        return False
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic):
        return False
    size = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
    return blob[len(magic) + 4:len(magic) + 4 + size] != b"none"


def _client_version(program):
    """What program -V says (OpenSSH_9.2p1, Dropbear v2022.83); asked only after a
    launch failed."""
    status, out, err = _run([program, "-V"], 5)
    return out + err


# ---------------------------------------------------------------------------
# Dropbear's dbclient: the same ladder without a control master
# ---------------------------------------------------------------------------
#
# Stock OpenWrt has no OpenSSH client: its ssh is Dropbear's dbclient, which
# has no control master, no BatchMode and no pidfile, and whose -f returns
# before the server has answered the forwards. So ctunnel runs it in the
# foreground, as a child of the tick in a session of its own (it outlives
# the tick), and takes its PID from the launch. Each -R forward is proven
# through a "loopback" -L in the same client: a connection to 127.0.0.1:C on
# the box goes to the server's listener of the -R forward, and comes back
# through this client to the target. No program runs and no new login.

DBCLIENT_TOKEN = "CTUNNEL_TUNNEL"   # in dbclient's environment: whose it is
# dbclient's stdin. Where it would ask (an unknown host key, a password) it
# reads stdin when it has no terminal; /dev/null makes it spin at 100% CPU on
# the question or send empty passwords. Ctrl-C is "no": it exits instead.
NO_ANSWER = b"\x03\n"
EXIT_GRACE = 0.5            # a dbclient refused a -R forward exits this soon after


def build_dbclient_argv(tunnel, loopbacks):
    """Return dbclient's argv: the forwards, then one loopback -L per checked -R.

    loopbacks: a free box port for each (from dbclient_remotes), in order.
    """
    argv = _dbclient_login(tunnel) + [
        "-N", "-T",
        # a silent server is given up after about three keepalives
        "-K", str(tunnel.alive_interval),
        "-o", "ExitOnForwardFailure=yes"]
    for option in tunnel.ssh_options:
        argv += ["-o", option]
    for fwd in tunnel.forwards:
        argv += ["-" + fwd.kind, forward_arg(fwd)]
    for fwd, port in zip(dbclient_remotes(tunnel), loopbacks):
        argv += ["-L", "127.0.0.1:%s:%s:%d" % (port, check_address(fwd), fwd.port)]
    return argv + [tunnel.host]


def dbclient_remotes(tunnel):
    """The -R forwards, each with a loopback: the launch needs it to know the forward
    is up, also when remote_check = none leaves it out of the ticks' checks."""
    return [f for f in tunnel.forwards if f.kind == "R"]


def tunnel_token(tunnel):
    """The path only this tunnel has; dbclient gets it as $CTUNNEL_TUNNEL."""
    return os.path.join(tunnel.state_dir, tunnel.name)


def has_tunnel_token(pid, tunnel):
    """dbclient's token: ctunnel put this tunnel's path in its environment.

    dbclient takes no option that could carry it without a warning; its
    environment stays readable by its owner (Dropbear does not make itself
    undumpable, as OpenSSH does).
    """
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read(CMDLINE_MAX).split(b"\0")
    except OSError:
        return False
    return ("%s=%s" % (DBCLIENT_TOKEN, tunnel_token(tunnel))).encode() in environ


def dbclient_loopbacks(pid, tunnel):
    """Return {-R forward: its loopback port, or None}, read from dbclient's argv."""
    args = _cmdline(pid)
    configured = {forward_arg(f) for f in tunnel.forwards if f.kind == "L"}
    ports = {}
    for flag, spec in zip(args, args[1:]):
        m = re.match(r"^127\.0\.0\.1:(\d+):(.+):(\d+)$", spec)
        if flag == "-L" and m and spec not in configured:
            ports[m.group(2), int(m.group(3))] = int(m.group(1))
    return {f: ports.get((check_address(f), f.port)) for f in dbclient_remotes(tunnel)}


def check_dbclient(tunnel, expected, table):
    """dbclient has no master to ask: is it running, not frozen?

    Whether its connection still carries anything, the forwards' checks
    prove (a dbclient whose connection closes exits).
    """
    pid = expected
    if process_state(pid) in ("T", "t"):
        return None, Verdict("connection", DOWN, "dbclient (pid %d) is stopped: frozen" % pid)
    return pid, Verdict("connection", UP, "pid %d running" % pid)


class Loopback:
    """A connection to dbclient's loopback port: what Channel is to a master."""

    def __init__(self, port, deadline):
        self.own_port = port        # dbclient's end of it is no target connection
        self.output = socket.socket()
        self.output.settimeout(max(0.001, deadline - time.monotonic()))
        try:
            self.output.connect(("127.0.0.1", port))
        except OSError:
            self.output.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.output.close()


def probe_loopback(tunnel, forward, pid, port, table, deadline):
    """Send one connection round the loop; return _await_loop's outcome."""
    before = socket_inodes(pid)
    with Loopback(port, deadline) as loopback:
        return _await_loop(tunnel, forward, pid, before, loopback, _log_size(tunnel),
                           deadline, table)


def _target_listens(forward, table):
    """For a target on the box itself: does anything listen there? (None: cannot tell)"""
    host = forward.host.strip("[]")
    if host not in ("localhost", "::1") and not host.startswith("127."):
        return None
    return any(s.state == TCP_LISTEN and s.local_port == forward.hostport
               for s in table.sockets(None))


def check_loopback(tunnel, forward, pid, table):
    """Prove a -R forward through dbclient's loopback: box C -> server -> box target."""
    name, address = "remote forward %d" % forward.port, check_address(forward)
    where, target = "%s:%d" % (address, forward.port), "%s:%d" % (forward.host,
                                                                   forward.hostport)
    if tunnel.remote_check == "none":
        return Verdict(name, UP, "not checked (remote_check = none)")
    port = dbclient_loopbacks(pid, tunnel).get(forward)
    if port is None:
        return Verdict(name, DOWN, "dbclient runs without the loopback that checks it "
                       "(started from another config?)")
    problem = check_listener(tunnel, pid, table, "127.0.0.1", port)
    if problem:
        return Verdict(name, DOWN, "its loopback: %s" % problem)
    began = time.monotonic()
    try:
        outcome = probe_loopback(tunnel, forward, pid, port, table, began + tunnel.check_timeout)
    except OSError as e:
        return Verdict(name, DOWN, "its loopback 127.0.0.1:%d: %s" % (port, _why(e)))
    if outcome == "closed" and _target_listens(forward, table) is False:
        outcome = "target refused"
    return {
        "loop": Verdict(name, UP, "data path %s -> box %s proven in %s (loopback %d)"
                        % (where, target, _ms(began), port)),
        "target refused": Verdict(name, TARGET_DOWN, "the connection answers, but nothing "
                                  "listens on %s on the box" % target),
        "connecting": Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box does "
                              "not answer" % target),
        "closed": Verdict(name, UNKNOWN, "the server closed the loopback's channel to %s at "
                          "once: it forbids it (permitopen), nothing listens there, or %s "
                          "refused; dbclient does not say which" % (where, target)),
        "silent": Verdict(name, DOWN, "no answer through the loopback within %gs: the "
                          "connection is hung, or another program holds port %d on the server"
                          % (tunnel.check_timeout, forward.port)),
    }[outcome]


def check_dbclient_local(tunnel, forward, pid, table):
    """Does this tunnel's dbclient own the -L listener? (dbclient cannot ask the far end)"""
    address = check_address(forward)
    problem = check_listener(tunnel, pid, table, address, forward.port)
    return Verdict("local forward %d" % forward.port, DOWN if problem else UP, problem or
                   "listening on %s:%d (dbclient: the far end is not checked)"
                   % (address, forward.port))


def dbclient_knows_host(tunnel):
    """Is the server in ~/.ssh/known_hosts as dbclient looks it up ("HOST TYPE KEY")?"""
    try:
        with open(expand_home("~/.ssh/known_hosts"), "rb") as f:
            text = f.read(CONFIG_MAX)
    except OSError:
        return False
    return any(line.startswith(tunnel.host.encode() + b" ") for line in text.splitlines())


def _free_loopback_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_dbclient(tunnel):
    """Start dbclient in the foreground, detached; return (pid, None) once it is up.

    Up: each -R forward's loopback came back (or the server answered it while
    dbclient lived on: it exits when a forward is refused), each -L listens.
    Anything else within the launch time is (None, reason); dbclient is ended.
    """
    import subprocess
    if not dbclient_knows_host(tunnel):
        return None, ("the server's host key is not in %s in dbclient's form (HOST TYPE "
                      "KEY, no port), and dbclient would ask a question cron cannot answer: "
                      "not starting it. Check the key's "
                      "fingerprint with the server's admin and accept it once by hand: "
                      "dbclient %s%s%s true" % (
                          expand_home("~/.ssh/known_hosts"),
                          "-p %d " % tunnel.port if tunnel.port else "",
                          "-i %s " % tunnel.identity_file if tunnel.identity_file else "",
                          "%s@%s" % (tunnel.user, tunnel.host) if tunnel.user
                          else tunnel.host))
    argv = build_dbclient_argv(tunnel, [_free_loopback_port() for _ in
                                        dbclient_remotes(tunnel)])
    limit = LAUNCH_TIMEOUT_FACTOR * tunnel.check_timeout
    start = trim_log(tunnel)
    log = os.open(state_path(tunnel, "log"), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    answers, ours = os.pipe()
    os.write(ours, NO_ANSWER)
    os.close(ours)
    try:
        proc = subprocess.Popen(argv, stdin=answers, stdout=log, stderr=log,
                                env=dict(dbclient_env(tunnel),
                                         **{DBCLIENT_TOKEN: tunnel_token(tunnel)}),
                                start_new_session=True)
    except OSError as e:
        return None, "cannot run %s: %s" % (tunnel.ssh, e.strerror)
    finally:
        os.close(log)
        os.close(answers)
    deadline = time.monotonic() + limit
    problem = "it did not connect"
    while proc.poll() is None and time.monotonic() < deadline:
        problem = _dbclient_not_ready(tunnel, proc.pid, deadline)
        if problem is None or problem == "closed":
            try:            # a refused forward makes it exit right after the answer
                proc.wait(EXIT_GRACE if problem else 0)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        said = _lines_said(_log_since(tunnel, start, 16384)[-8192:])
        return None, explain_dbclient_failure(tunnel, said, proc.returncode)
    if problem not in (None, "closed"):
        kill_processes([proc.pid])
        proc.wait()
        return None, "dbclient did not set up its forwards within %gs: %s" % (limit, problem)
    try:
        write_pidfile(tunnel, proc.pid)
    except OSError:
        pass            # the next tick adopts it by its token (see check_process)
    return proc.pid, None


def _dbclient_not_ready(tunnel, pid, deadline):
    """None when every forward is set up; "closed" when a loopback's channel was
    closed at once (the server answered: up, if dbclient lives on); else why not."""
    table, closed = TcpTable(), False
    loopbacks = dbclient_loopbacks(pid, tunnel)
    if None in loopbacks.values():
        return "it is gone"             # exited as we looked: the caller reads why
    for forward in tunnel.forwards:
        address, port = (("127.0.0.1", loopbacks[forward]) if forward in loopbacks
                         else (check_address(forward), forward.port))
        problem = check_listener(tunnel, pid, table, address, port)
        if problem:
            return problem
        if forward in loopbacks:
            try:
                outcome = probe_loopback(tunnel, forward, pid, port, table,
                                         min(deadline, time.monotonic() + tunnel.check_timeout))
            except OSError as e:
                return "its loopback 127.0.0.1:%d: %s" % (port, _why(e))
            if outcome == "silent":
                return "no answer through its loopback for -R %s" % forward.spec
            closed = closed or outcome == "closed"
    return "closed" if closed else None


def explain_dbclient_failure(tunnel, lines, rc):
    """Turn what a dbclient that exited said into one line the user can act on."""
    said = lines[-1] if lines else "dbclient exited %d without a message" % rc
    text = "\n".join(lines)
    login = "%s@%s" % (tunnel.user, tunnel.host) if tunnel.user else tunnel.host
    known_hosts = expand_home("~/.ssh/known_hosts")
    fingerprint = re.search(r"\((\S+) fingerprint (\S+)\)", text)
    if "host key mismatch" in text:
        return ("the server's host key has CHANGED since it was accepted: this may be an "
                "attack by someone between this box and %s. Not connecting. If the server "
                "was reinstalled, check its new key's fingerprint with its admin, then remove "
                "the line starting '%s ' from %s and accept the new key by hand"
                % (tunnel.host, tunnel.host, known_hosts))
    if fingerprint:
        return ("dbclient does not trust the server's %s host key (%s): accept it once by "
                "hand, after checking the fingerprint with the server's admin: dbclient %s%s "
                "true" % (fingerprint.group(1), fingerprint.group(2),
                          "-p %d " % tunnel.port if tunnel.port else "", login))
    if "String too long" in text or key_is_openssh_format(tunnel.identity_file):
        return ("%s (dbclient cannot read the key %s, which is in OpenSSH's format: convert "
                "it with dropbearconvert openssh dropbear %s %s.dropbear and set "
                "identity_file to the new file)" % (said, tunnel.identity_file,
                                                    tunnel.identity_file, tunnel.identity_file))
    if "password:" in text or said.endswith("Interrupted."):
        return ("the server refused the key for %s and asked for a password, which ctunnel "
                "never gives: put the key's public line (dropbearkey -y -f %s) in that user's "
                "~/.ssh/authorized_keys on the server" % (login, tunnel.identity_file or "KEY"))
    if "No auth methods could be used" in said:
        return ("%s (the server refused the key for %s: check user, and that the key's public "
                "line is in that user's ~/.ssh/authorized_keys on the server)" % (said, login))
    return said                 # a refused -R forward: explain_held_port looks into it


def dbclient_env(tunnel):
    """dbclient's environment: the home ssh would use (never $HOME), and PATH."""
    return {"HOME": expand_home("~"), "PATH": os.environ.get("PATH", os.defpath)}


def _dbclient_login(tunnel):
    argv = [tunnel.ssh]
    for flag, value in (("-p", tunnel.port), ("-l", tunnel.user),
                        ("-i", tunnel.identity_file)):
        if value:
            argv += [flag, str(value)]
    return argv


def probe_port_dbclient(tunnel, address, port):
    """dbclient -B address:port: a refused channel ends it at once ("closed"); one that
    opened stays until our timeout."""
    rc, _, err = _run(_dbclient_login(tunnel) + ["-B", "%s:%d" % (address, port), tunnel.host],
                      tunnel.check_timeout, NO_ANSWER, dbclient_env(tunnel))
    if rc is None:
        return True
    if rc == 0:                 # the channel was closed at once ("Connection ... closed.")
        return False
    return _last_line(err) or "dbclient exited %d" % rc


def run_command_dbclient(tunnel, command, timeout):
    return _run(_dbclient_login(tunnel) + ["-T", tunnel.host, command], timeout, NO_ANSWER,
                dbclient_env(tunnel))


def key_is_openssh_format(path):
    try:
        with open(path, "rb") as f:
            return f.read(64).startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    except (OSError, TypeError):
        return False


def dry_run_dbclient(t, out):
    out.write("# %s: dbclient, checked through its own connection: each -R forward by a "
              "loopback -L 127.0.0.1:Cn (no program run; Cn: a free port chosen at launch)\n"
              % t.name)
    out.write("# if a check fails (with HOME=%s, in its own session, stdin answering no):\n%s\n"
              % (expand_home("~"), quote_argv(build_dbclient_argv(
                  t, ["C%d" % n for n, _ in enumerate(dbclient_remotes(t), 1)]))))


# ---------------------------------------------------------------------------
# The clients: what differs between OpenSSH's ssh and Dropbear's dbclient
# ---------------------------------------------------------------------------
#
# The tick, the repair and status use only these. launch(tunnel) -> (pid,
# failure); owns(pid, tunnel): the token that makes a process this tunnel's;
# check_link(tunnel, pid, table) -> (pid, Verdict): the master, or dbclient's
# connection; check_local / check_remote(tunnel, forward, pid, table): a forward;
# probe_port(tunnel, address, port) -> does anything listen there on the server
# (True, False or the problem), and run_command(tunnel, command, timeout) ->
# _run's answer: both over a fresh connection, when a -R port is held.

def dry_run_openssh(t, out):
    out.write("# %s: checks over the control socket %s (no program run)\n"
              % (t.name, state_path(t, "ctl")))
    for f in t.forwards:
        if f.kind == "R" and t.remote_check in ("auto", "nc"):
            out.write("# %s%s\n" % ("if the server forbids channels: " if
                                    t.remote_check == "auto" else "",
                                    quote_argv(build_mux_argv(
                                        t, remote_nc_command(f, t.check_timeout)))))
    out.write("# if a check fails:\n" + quote_argv(build_launch_argv(t)) + "\n")


Client = namedtuple("Client", "name launch owns check_link check_local check_remote dry_run "
                             "probe_port run_command")
CLIENTS = {
    "openssh": Client("ssh", launch_tunnel, has_control_socket, check_master,
                      check_local_forward, check_remote_forward, dry_run_openssh,
                      probe_port_openssh, run_command_openssh),
    "dbclient": Client("dbclient", launch_dbclient, has_tunnel_token, check_dbclient,
                       check_dbclient_local, check_loopback, dry_run_dbclient,
                       probe_port_dbclient, run_command_dbclient),
}


def client_of(tunnel):
    return CLIENTS[tunnel.client]


# ---------------------------------------------------------------------------
# The tick: check, repair, report
# ---------------------------------------------------------------------------

# stderr: also print it (cron mails what a job prints); syslog always gets it
Event = namedtuple("Event", "level text stderr", defaults=(True,))
Outcome = namedtuple("Outcome", "name healthy events verdicts")


def tick_tunnel(tunnel, verbose=False, table=None):
    """Check one tunnel under its lock and repair it if a check says DOWN."""
    make_state_dir(tunnel)
    lock = TunnelLock(tunnel)
    if not lock.acquire():
        # another tick is on it right now: leave the tunnel to that tick, and
        # count it as what it was when last seen
        healthy = not read_state(tunnel).get("last_failure")
        busy = Event(LOG_INFO, "%s: busy: another tick is checking it (last known: %s)"
                     % (tunnel.name, "healthy" if healthy else "down"))
        return Outcome(tunnel.name, healthy, [busy] if verbose else [], [])
    try:
        return _tick_locked(tunnel, verbose, table)
    finally:
        lock.release()


def _verdict_events(tunnel, verdicts):
    return [Event(LOG_INFO, "%s: %s %s (%s)" % (tunnel.name, v.check, v.state, v.detail))
            for v in verdicts]


def _tick_locked(tunnel, verbose, table):
    verdicts = run_ladder(tunnel, table=table, adopt=True)
    events = _verdict_events(tunnel, verdicts) if verbose else []
    down = first_down(verdicts)
    if down is None and all(v.state == UP for v in verdicts) and \
            '"warnings"' not in read_state_text(tunnel):
        return Outcome(tunnel.name, True, events, verdicts)    # healthy: nothing to write
    state = read_state(tunnel)
    if down is not None:
        healthy, verdicts = _repair(tunnel, down, state, events, verbose, table)
        if not healthy:
            return Outcome(tunnel.name, False, events, verdicts)
    _note_warnings(tunnel, verdicts, state, events)
    return Outcome(tunnel.name, True, events, verdicts)


def _down_reason(tunnel, down):
    """Say why the tunnel is being (re)started, with a dead ssh's last words."""
    if down.check not in ("process", "master"):
        return "%s: %s" % (down.check, down.detail)
    said = _death_note(tunnel) if down.detail.endswith("gone") else ""
    return down.detail + ("; ssh said: %s" % said if said else "")


def _repair(tunnel, down, state, events, verbose, table):
    """Stop the tunnel's ssh, launch a new one and check it again.

    Records the outcome in state and adds its event. Returns (healthy, verdicts).
    """
    reason = _down_reason(tunnel, down)
    first = down.detail == "not running"
    stop_tunnel(tunnel)
    launch = client_of(tunnel).launch
    pid, failure = launch(tunnel)
    reclaimed, failure = explain_held_port(tunnel, failure)
    if reclaimed:
        pid, failure = launch(tunnel)
    verdicts = []
    if failure is None:
        verdicts = run_ladder(tunnel, launched=pid, table=table)
        if verbose:
            events += _verdict_events(tunnel, verdicts)
        after = first_down(verdicts)
        if after is not None:
            failure = "came up but %s: %s" % (after.check, after.detail)
    now = int(time.time())
    state.update(last_restart=now, last_reason=reason)
    state.pop("stopped", None)
    if failure is None:
        events.append(_record_success(tunnel, state, first, reason, pid, reclaimed))
    else:
        events.append(_record_failure(tunnel, state, first, reason, failure, now))
    _save_state(tunnel, state, events)
    return failure is None, verdicts


def _save_state(tunnel, state, events):
    """Write the state file; a full disk costs a line, not the tick."""
    try:
        write_state(tunnel, state)
    except OSError as e:
        events.append(Event(LOG_WARNING, "%s: cannot write %s: %s"
                            % (tunnel.name, state_path(tunnel, "state"), e.strerror or e)))


def _record_success(tunnel, state, first, reason, pid, reclaimed=None):
    attempts = state.pop("failures", 0)
    state.pop("last_failure", None)
    state.pop("failure_said", None)
    if not first:
        state["restarts"] = state.get("restarts", 0) + 1
    text = "started (pid %d)" % pid if first else "restarted (%s)" % reason
    if reclaimed:
        text = "%s, %s" % (reclaimed, text)
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


def _note_warnings(tunnel, verdicts, state, events):
    """Report UNKNOWN and TARGET_DOWN once when they start and once when they end.

    Neither restarts the tunnel, and a cron mail every minute would say nothing new.
    """
    now = {v.check: [v.state, v.detail] for v in verdicts if v.state in (UNKNOWN, TARGET_DOWN)}
    before = state.get("warnings")
    before = before if isinstance(before, dict) else {}
    if now == before:
        return
    for check, (verdict, detail) in sorted(now.items()):
        if before.get(check) != [verdict, detail]:
            why = "not restarting" if verdict == TARGET_DOWN else "cannot tell; not restarting"
            events.append(Event(LOG_WARNING, "%s: %s: %s (%s)"
                                % (tunnel.name, check, detail, why)))
    for check, (verdict, _) in sorted(before.items()):
        if check not in now:
            back = "its target answers again" if verdict == TARGET_DOWN else "checked again"
            events.append(Event(LOG_NOTICE, "%s: %s: %s" % (tunnel.name, check, back)))
    state["warnings"] = now
    if not now:
        del state["warnings"]
    _save_state(tunnel, state, events)


def printable(text):
    """Escape control characters: what a server, ssh or a config says can neither
    steer a terminal nor start a second, forged log line."""
    return _CONTROL_RE.sub(lambda m: "\\x%02x" % ord(m.group()), text)


class Reporter:
    """Write event lines to stderr and to syslog."""

    def __init__(self, quiet=False, stream=None, syslog_path=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        # at a terminal every failure is shown; only cron mail is spared repeats
        self.tty = self.stream.isatty()
        self.syslog_path = syslog_path or os.environ.get(SYSLOG_ENV, SYSLOG_PATH)

    def event(self, level, text, stderr=True, stamp=True):
        """Report one event: syslog, and stderr unless told not (or quiet and no error)."""
        text = printable(text)
        if (stderr or self.tty) and (not self.quiet or level <= LOG_ERR):
            prefix = "%s ctunnel[%d]: " % (time.strftime("%Y/%m/%d %H:%M:%S"), os.getpid())
            self.stream.write("%s%s\n" % (prefix if stamp else "", text))
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

def for_each(items, work):
    """Return [work(item) for item in items], at most PARALLEL at a time.

    Tunnels are checked side by side so that one silent server cannot hold
    up the rest; one tunnel needs no thread at all.
    """
    if len(items) < 2:
        return [work(item) for item in items]
    import threading
    results, queue = [None] * len(items), list(enumerate(items))
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                if not queue:
                    return
                index, item = queue.pop()
            results[index] = work(item)
    threads = [threading.Thread(target=worker) for _ in range(min(PARALLEL, len(items)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def cmd_check(tunnels, args, reporter):
    """One tick: every tunnel checked and repaired, side by side."""
    table = TcpTable()

    def work(t):
        try:
            return tick_tunnel(t, verbose=args.verbose, table=table)
        except OSError as e:      # e.g. state_dir removed or full: say so, in one line
            return Outcome(t.name, False, [Event(LOG_ERR, "%s: %s" % (t.name, e))], [])
        except Exception as e:    # a bug must cost one tunnel one line, not the whole tick
            return Outcome(t.name, False, [Event(LOG_ERR, "%s: internal error: %s: %s"
                                                 % (t.name, e.__class__.__name__, e))], [])

    healthy = True
    if args.verbose:
        reporter.event(LOG_INFO, "config %s; state_dir %s" % (args.config_path, ", ".join(
            sorted({t.state_dir for t in tunnels}))))
    for outcome in for_each(tunnels, work):
        for event in outcome.events:
            reporter.event(event.level, event.text, event.stderr or args.verbose)
        healthy = healthy and outcome.healthy
    return EXIT_OK if healthy else EXIT_DOWN


def describe_tunnel(tunnel, table=None):
    """Return the status record of one tunnel, changing nothing."""
    verdicts = run_ladder(tunnel, table=table)
    state = read_state(tunnel)
    pid = read_pidfile(tunnel) if verdicts[0].state == UP else None
    if verdicts[0].detail == "not running" and state.get("stopped"):
        verdicts[0] = verdicts[0]._replace(detail="stopped by `ctunnel.py stop` at %s; the "
                                           "next tick starts it again" % _when(state["stopped"]))
    return {
        "name": tunnel.name,
        "state_dir": tunnel.state_dir,
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
    table = TcpTable()
    records = for_each(tunnels, lambda t: describe_tunnel(t, table))
    if args.json:
        import json
        out.write(json.dumps({"config": args.config_path, "tunnels": records}, indent=2) + "\n")
    else:
        out.write(printable("config %s" % args.config_path) + "\n")
        for r in records:
            out.write("\n".join(map(printable, _format_status(r).splitlines())) + "\n")
    return EXIT_OK if all(r["healthy"] for r in records) else EXIT_DOWN


def _format_status(r):
    head = "%s: %s" % (r["name"], "healthy" if r["healthy"] else "DOWN")
    if r["pid"]:
        head += ", pid %d" % r["pid"]
        if r["uptime"] is not None:
            head += ", up %s" % _format_duration(r["uptime"])
    lines = [head, "  host %s  %s" % (r["host"], "  ".join(r["forwards"])),
             "  state_dir %s" % r["state_dir"]]
    lines += ["  %-20s %-11s %s" % (c["check"], c["verdict"], c["detail"]) for c in r["checks"]]
    if r["last_restart"]:
        first = r["last_reason"] == "not running"
        lines.append("  %s %s%s%s" % (
            "started" if first else "last restart", _when(r["last_restart"]),
            "" if first else ": %s" % r["last_reason"],
            ", failed: %s" % r["last_failure"] if r["last_failure"] else ""))
    return "\n".join(lines) + "\n"


def _when(timestamp):
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))


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
        make_state_dir(t)
        lock = TunnelLock(t)
        if not lock.acquire(wait=STOP_LOCK_WAIT):
            reporter.event(LOG_ERR, "%s: not stopped: another tick still holds %s"
                           % (t.name, lock.path))
            status = EXIT_DOWN
            continue
        try:
            stopped = stop_tunnel(t)
            state = read_state(t)
            state["stopped"] = int(time.time())      # for status: stopped on purpose
            write_state(t, state)
        finally:
            lock.release()
        if stopped:
            reporter.event(LOG_NOTICE, "%s: stopped (pid %s)"
                           % (t.name, ", ".join(map(str, stopped))))
    return status


def cmd_dry_run(tunnels, out):
    for t in tunnels:
        client_of(t).dry_run(t, out)
    return EXIT_OK


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

COMMANDS = ("check", "status", "stop")
FLAGS = {"-n": "dry_run", "--dry-run": "dry_run", "-v": "verbose", "--verbose": "verbose",
         "-q": "quiet", "--quiet": "quiet", "--json": "json", "-h": "help", "--help": "help",
         "--version": "version"}


class Args:
    """The parsed command line."""
    command, names, config, config_path = "check", (), None, None
    dry_run = verbose = quiet = json = help = version = False


def parse_args(argv=None):
    """Parse the command line; raise UsageError for anything it does not know.

    By hand: argparse alone would add about 5 ms to every tick.
    """
    args, words = Args(), list(sys.argv[1:] if argv is None else argv)
    names = []
    while words:
        word = words.pop(0)
        if word in ("-c", "--config") or word.startswith("--config="):
            args.config = word.split("=", 1)[1] if "=" in word else (words.pop(0) if words
                                                                     else None)
            if not args.config:
                raise UsageError("%s needs a config file" % word.split("=")[0])
        elif word in FLAGS:
            setattr(args, FLAGS[word], True)
        elif word == "--":
            names += words
            break
        elif word.startswith("-") and word != "-":
            raise UsageError('unknown option "%s" (see --help)' % word)
        else:
            names.append(word)
    if names and names[0] in COMMANDS:
        args.command = names.pop(0)
    args.names = names
    if args.verbose and args.quiet:
        raise UsageError("-v and -q do not go together")
    if args.json and args.command != "status":
        raise UsageError("--json goes with status")
    if args.dry_run and args.command != "check":
        raise UsageError("-n goes with check: it prints what a tick would run")
    return args


def select_tunnels(tunnels, names, path, bad=()):
    """Return the tunnels named (all when none), or raise UsageError.

    A name in bad (a section with a config error, already reported) is left out.
    """
    if not names:
        return tunnels
    by_name = {t.name: t for t in tunnels}
    names = [n for n in names if n not in bad]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError('no tunnel named "%s" in %s (have: %s; commands: %s)'
                         % (unknown[0], path, ", ".join(sorted(by_name)), ", ".join(COMMANDS)))
    return [by_name[n] for n in names]


def main(argv=None):
    try:
        args = parse_args(argv)
    except UsageError as e:
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_USAGE
    if args.help or args.version:
        sys.stdout.write(__doc__ if args.help else "ctunnel %s\n" % __version__)
        return EXIT_OK
    reporter = Reporter(quiet=args.quiet)
    problems = {}
    try:
        path = find_config(args.config)
        tunnels = load_config(path, problems)
        for name in sorted(problems):           # every tick: cron mails it until fixed
            reporter.event(LOG_ERR, "ctunnel: %s" % problems[name], stamp=False)
        tunnels = select_tunnels(tunnels, args.names, path, problems)
        args.config_path = path
    except CtunnelError as e:
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_USAGE
    try:
        status = run_command(args, tunnels, reporter) if tunnels else EXIT_OK
    except OSError as e:      # e.g. state_dir removed after loading: one line, no traceback
        sys.stderr.write("ctunnel: %s\n" % e)
        status = EXIT_DOWN
    return EXIT_USAGE if problems else status


def run_command(args, tunnels, reporter):
    if args.dry_run:
        return cmd_dry_run(tunnels, sys.stdout)
    if args.command == "status":
        return cmd_status(tunnels, args, sys.stdout)
    if args.command == "stop":
        return cmd_stop(tunnels, args, reporter)
    return cmd_check(tunnels, args, reporter)


if __name__ == "__main__":
    sys.exit(main())
