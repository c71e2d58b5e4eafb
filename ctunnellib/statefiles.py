"""Files under state_dir: trust, pidfiles, the state record, the lock, ssh's log.

state_dir is ours alone: owned by us, 0700. Nothing in it is opened through
a symbolic link, and every file is replaced through a temp file of
unpredictable name, so that nobody can make a tick write elsewhere.
"""

import errno
import fcntl
import os
import time

from .model import LOG_WARNING, Event, launch_settings, record, state_path

STATE_MAX = 65536           # bytes read of a state file at most
LOG_MAX = 1 << 20           # NAME.log is cut back to LOG_KEEP bytes past this size
LOG_KEEP = 65536

PIDFILE_MAX = 8192          # bytes read of a pidfile at most
# the line ctunnel writes into NAME.log before each launch: what follows is that
# launch's client's own words, and nothing before it is
LAUNCH_MARK = "ctunnel: launching "

# the state record's keys and their types: a garbled or hand-edited file
# loses what has the wrong type, never the tick
STATE_TYPES = {"restarts": int, "failures": int, "last_restart": int, "failure_said": int,
               "stopped": int, "last_reason": str, "last_failure": str, "warnings": dict,
               "outage": str, "session": dict, "notes": list, "said": dict,
               "failures_total": int, "reason_code": str, "outage_code": str}

# What the pidfile says of the process a tick launched: its PID, the client
# kind and program it was launched as (which PATH or the config may have
# changed since), and the config it was launched with (model.launch_settings),
# or None for each that a pidfile of an older ctunnel leaves out.
Launch = record("Launch", "pid client program settings")


def untrusted(st):
    """Why a file or folder with this stat may not be trusted (a % template for its
    path), or None. Trusted: this user's or root's, and nobody else may write it."""
    if st.st_uid not in (os.geteuid(), 0):
        owner = user_name(st.st_uid)
        return ("it belongs to %s (uid %d), not to you (%s): run ctunnel as %s, whose it is "
                "(or, if it is yours to take, chown %s %%(path)s)"
                % (owner, st.st_uid, user_name(os.geteuid()), owner, user_name(os.geteuid())))
    if st.st_mode & 0o1002 == 0o1002:       # /tmp: anyone may create, nobody may remove
        return ("it is shared: every user may create files there; use a folder of your own, "
                "e.g. ~/.local/state/ctunnel")
    if st.st_mode & 0o022:
        return "group or others may write it (chmod go-w %(path)s)"
    return None


def user_name(uid):
    """The name of uid from the password database (its number if it has none)."""
    import pwd
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return "uid %d" % uid


def make_state_dir(tunnel):
    """Create state_dir (0700) if need be, and refuse one that others control."""
    try:
        st = os.stat(tunnel.state_dir)
    except FileNotFoundError:
        os.makedirs(tunnel.state_dir, mode=0o700, exist_ok=True)
        st = os.stat(tunnel.state_dir)
    problem = untrusted(st)
    if problem:
        raise OSError(errno.EPERM, "state_dir %s: %s" % (tunnel.state_dir, problem % {
            "path": tunnel.state_dir}))


def read_state_file(path, limit, start=None):
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


def write_atomic(path, text, mode=0o600):
    """Replace path with text: a temp file of unpredictable name, made exclusively,
    then renamed over path. A reader sees the old file or the new one, whole.

    Nothing is left behind when the write fails (a full disk).
    """
    tmp = os.path.join(os.path.dirname(path), ".%s.%s" % (os.path.basename(path),
                                                           os.urandom(8).hex()))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), mode)
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------
# The pidfile and the state record
# ---------------------------------------------------------------------------

def read_launch(tunnel):
    """Return the Launch the tunnel's pidfile records, or None (also for a garbled one)."""
    try:
        lines = read_state_file(state_path(tunnel, "pid"), PIDFILE_MAX).split(b"\n")
    except OSError:
        return None
    text = lines[0].strip()
    if not (0 < len(text) <= 10 and all(48 <= c <= 57 for c in text)
            and 0 < int(text) < 1 << 31):
        return None
    client = program = settings = None
    try:
        if len(lines) > 2 and b" " in lines[1]:
            client, program = lines[1].decode().split(" ", 1)
            settings = lines[2].decode()
    except UnicodeDecodeError:
        pass
    return Launch(int(text), client, program, settings)


def read_pidfile(tunnel):
    """Return the PID in the tunnel's pidfile, or None."""
    launch = read_launch(tunnel)
    return launch.pid if launch else None


def write_pidfile(tunnel, pid):
    """Record pid as launched now, as the tunnel's config says (see Launch)."""
    write_atomic(state_path(tunnel, "pid"), "%d\n%s %s\n%s\n" % (
        pid, tunnel.client, os.path.realpath(tunnel.ssh), launch_settings(tunnel)))


def read_state_text(tunnel):
    """Return the raw text of the tunnel's state file ("" if none)."""
    try:
        return read_state_file(state_path(tunnel, "state"), STATE_MAX).decode("utf-8",
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
    return {k: v for k, v in state.items() if k in STATE_TYPES and
            isinstance(v, STATE_TYPES[k]) and not isinstance(v, bool)}


def pidfile_names(state_dir):
    """The tunnel names that have a pidfile in state_dir."""
    try:
        return [name[:-4] for name in os.listdir(state_dir) if name.endswith(".pid")]
    except OSError:
        return []


def write_state(tunnel, state):
    import json
    write_atomic(state_path(tunnel, "state"), json.dumps(state, sort_keys=True) + "\n")


# ---------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------

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
# NAME.log: what ssh said
# ---------------------------------------------------------------------------

def log_size(tunnel):
    try:
        return os.stat(state_path(tunnel, "log")).st_size
    except OSError:
        return 0


def log_since(tunnel, offset, limit=8192):
    """Return what ssh wrote to NAME.log since offset (at most limit bytes)."""
    try:
        return read_state_file(state_path(tunnel, "log"), limit, offset).decode("utf-8",
                                                                              "replace")
    except OSError:
        return ""


def open_launch_log(tunnel, program):
    """Open NAME.log for a launch's output; return (its fd, the offset where the
    launch's own words begin). A line marks the launch first: what an earlier
    client said is never taken for this one's words."""
    trim_log(tunnel)                # what earlier clients said stays, capped
    fd = os.open(state_path(tunnel, "log"), os.O_WRONLY | os.O_APPEND | os.O_NOFOLLOW)
    try:
        os.write(fd, ("%s%s at %s\n" % (LAUNCH_MARK, program, time.strftime(
            "%Y-%m-%d %H:%M:%S"))).encode())
    except OSError:
        pass                # a full disk: the launch goes on (nor can its client write)
    return fd, os.fstat(fd).st_size


def launch_words(tunnel, limit=4096):
    """What the client of the last launch wrote to NAME.log (the end of it), as text."""
    try:
        tail = read_state_file(state_path(tunnel, "log"), limit, -limit).decode(
            "utf-8", "replace")
    except OSError:
        return ""
    mark = tail.rfind(LAUNCH_MARK)
    return tail[tail.find("\n", mark) + 1:] if mark >= 0 else tail


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


def first_time(tunnel, topic, text):
    """Is text news about topic for this tunnel (not said since it last changed)?
    Records it as said. For warnings that the tick repeats to syslog only."""
    state = read_state(tunnel)
    said = state.get("said", {})
    if said.get(topic) == text:
        return False
    said[topic] = text
    state["said"] = said
    try:
        write_state(tunnel, state)
    except OSError:
        pass                    # a full disk: said again next time
    return True


def save_state(tunnel, state, events):
    """Write the state record; a full disk costs a line (added to events), not the tick."""
    try:
        write_state(tunnel, state)
    except OSError as e:
        events.append(Event(LOG_WARNING, "%s: cannot write %s: %s"
                            % (tunnel.name, state_path(tunnel, "state"), e.strerror or e)))
