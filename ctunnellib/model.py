"""The words every module shares: errors, verdicts, forwards, events, exit codes.

Pure data and small pure helpers; no I/O. Control flow compares the named
constants here, never the words shown to the user.
"""

import os


# ---------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------

def record(name, fields, defaults=()):
    """Return a class of immutable records with named fields, a tuple subclass.

    What collections.namedtuple makes (fields by position or name, defaults
    for the last ones, _replace), without importing collections: that import
    costs a cron tick about a sixth of the interpreter's own start.
    """
    fields = tuple(fields.split())
    defaults = dict(zip(fields[len(fields) - len(defaults):], defaults))

    def __new__(cls, *args, **named):
        if len(args) > len(fields):
            raise TypeError("%s takes %d values, not %d" % (name, len(fields), len(args)))
        values = list(args)
        for field in fields[len(args):]:
            if field not in named and field not in defaults:
                raise TypeError("%s needs %s" % (name, field))
            values.append(named.pop(field, defaults.get(field)))
        if named:
            raise TypeError("%s has no field %s" % (name, ", ".join(sorted(named))))
        return tuple.__new__(cls, values)

    def _replace(self, **changes):
        return type(self)(**dict(zip(fields, self), **changes))

    def __repr__(self):
        return "%s(%s)" % (name, ", ".join("%s=%r" % pair for pair in zip(fields, self)))

    namespace = {"__slots__": (), "_fields": fields, "__new__": __new__,
                 "_replace": _replace, "__repr__": __repr__,
                 "__getnewargs__": lambda self: tuple(self)}
    for index, field in enumerate(fields):
        namespace[field] = property(lambda self, index=index: self[index])
    return type(name, (tuple,), namespace)


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
# Verdicts
# ---------------------------------------------------------------------------

# What a check concludes. Only DOWN restarts the tunnel. TARGET_DOWN: the
# tunnel works but the service behind a forward refuses or does not answer.
# SLOW: no answer in time, through a connection that is alive (the server
# still sends): a busy or slow link, never a restart.
UP, DOWN, UNKNOWN, TARGET_DOWN, SLOW = "UP", "DOWN", "UNKNOWN", "TARGET_DOWN", "SLOW"

# Which rung of the ladder a verdict is from.
PROCESS, LINK, FORWARD = "process", "link", "forward"

# Why a process check is DOWN, where the tick acts on the difference.
NOT_RUNNING = "not running"     # no pidfile and no process of the tunnel: a first start
GONE = "gone"                   # the recorded process died: its last words are news
NOT_OURS = "not ours"           # the pidfile names a process that is not this tunnel's
CONFIG_CHANGED = "config changed"   # the running client was launched with other settings

# check: the name the user sees ("process", "master", "remote forward 1122");
# kind: PROCESS, LINK or FORWARD; cause: one of the causes above, or None;
# pid: the client's, when the process check found it.
# took: seconds the proof took (a forward's data path), for the metrics.
Verdict = record("Verdict", "check state detail kind cause pid took",
                 defaults=(FORWARD, None, None, None))


def first_down(verdicts):
    """The first DOWN verdict of a ladder, or None."""
    return next((v for v in verdicts if v.state == DOWN), None)


# The words a client's launch failure starts with when the server dropped the
# login (sshd's MaxStartups: a failure the repair tries again within the tick,
# see repair.relaunch), or did not answer before it (too busy, or silent: not
# tried again, the connect itself took its time)
BEFORE_LOGIN = "the server dropped the connection before the login"
BUSY_BEFORE_LOGIN = "the server did not answer before the login"

# What a probe of a port on the server found (Probe.answer), see Client.probe_port.
LISTENS, NOTHING_LISTENS, CANNOT_TELL = "listens", "nothing listens", "cannot tell"
Probe = record("Probe", "answer detail", defaults=("",))


# ---------------------------------------------------------------------------
# Forwards
# ---------------------------------------------------------------------------

DEFAULT_BIND = "127.0.0.1"      # a forward without a bind address listens here
_WILDCARD_BINDS = ("", "*", "0.0.0.0", "localhost")

# kind: "R" (remote, -R) or "L" (local, -L); spec: as the config wrote it
Forward = record("Forward", "kind bind port host hostport spec")


def forward_arg(forward):
    """Return the -L/-R argument, always with a bind address.

    Without one, ssh asks for "localhost": the listener may then end up on
    only one of 127.0.0.1 and ::1 (the other held by another program) and the
    forward still "succeeds". Naming 127.0.0.1 makes ssh bind exactly that,
    and ExitOnForwardFailure fire when it is taken.
    """
    return "%s:%d:%s:%d" % (forward.bind or DEFAULT_BIND, forward.port, forward.host,
                            forward.hostport)


def check_address(forward):
    """Return the address a check connects to for this forward's listener."""
    bind = forward.bind.strip("[]")
    if bind in _WILDCARD_BINDS:
        return "127.0.0.1"
    if bind == "::":
        return "::1"
    return bind


def state_path(tunnel, suffix):
    """Return the path of one of the tunnel's files: pid, ctl, lock, state, log."""
    return os.path.join(tunnel.state_dir, "%s.%s" % (tunnel.name, suffix))


# the settings a running client does not follow: a change restarts it. Not
# the program's path: PATH may find another ssh for cron than at a terminal;
# the client kind it is of counts.
LAUNCH_KEYS = ("client", "host", "user", "port", "identity_file", "ssh_config",
               "remote_forward", "local_forward", "ssh_options", "server_alive_interval",
               "server_alive_count_max")


def launch_settings(tunnel):
    """The settings a tunnel's client is launched with, as one line of text.

    The pidfile keeps it: a tick that reads other settings in the config knows
    the running client is not what the config asks for. "\x1f" separates them
    (no config value may hold a control character).
    """
    def text(value):
        if isinstance(value, tuple):
            return ",".join(forward_arg(v) if isinstance(v, Forward) else v for v in value)
        return "" if value is None else str(value)
    return "\x1f".join("%s=%s" % (key, text(getattr(tunnel, key))) for key in LAUNCH_KEYS)


def changed_settings(before, tunnel):
    """The keys whose value differs between settings text before and the tunnel's now."""
    then = dict(item.partition("=")[::2] for item in before.split("\x1f"))
    now = dict(item.partition("=")[::2] for item in launch_settings(tunnel).split("\x1f"))
    return [key for key in LAUNCH_KEYS if then.get(key) != now.get(key)]


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


# ---------------------------------------------------------------------------
# Events, outcomes, exit status
# ---------------------------------------------------------------------------

# syslog severities (RFC 5424); events at LOG_INFO go to stderr only with -v
LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO = 3, 4, 5, 6

# stderr: also print it (cron mails what a job prints); syslog always gets it.
# kind: what happened, for the on_event hook and the metrics (the names below),
# None for a line that is no state change; facts: {"reason", "pid", "attempts"}.
Event = record("Event", "level text stderr kind facts", defaults=(True, None, None))

# The kinds of event: what a tunnel's on_event hook is told ($CTUNNEL_EVENT)
STARTED, RESTARTED, BACK, RECLAIMED, CONFIG_CHANGED_EVENT = (
    "started", "restarted", "back", "reclaimed", "config-changed")
FAILED, PORT_HELD, HOST_KEY_CHANGED = "failed", "port-held", "host-key-changed"
TARGET_DOWN_EVENT, TARGET_BACK, UNKNOWN_EVENT, UNKNOWN_ENDED = (
    "target-down", "target-back", "unknown", "unknown-ended")
SLOW_EVENT, SLOW_ENDED, NOTE, STOPPED = "slow", "slow-ended", "note", "stopped"
EVENT_KINDS = (STARTED, RESTARTED, BACK, RECLAIMED, CONFIG_CHANGED_EVENT, FAILED, PORT_HELD,
               HOST_KEY_CHANGED, TARGET_DOWN_EVENT, TARGET_BACK, UNKNOWN_EVENT, UNKNOWN_ENDED,
               SLOW_EVENT, SLOW_ENDED, NOTE, STOPPED)
# one tunnel's tick: healthy at its end?, its events, the verdicts it reached
Outcome = record("Outcome", "name healthy events verdicts")

EXIT_OK, EXIT_DOWN, EXIT_USAGE = 0, 1, 2
