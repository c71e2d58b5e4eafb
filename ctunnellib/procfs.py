"""Processes as Linux shows them in /proc: state, identity, sockets, age; ending them.

Nothing here signals a process it was not handed: which process is a
tunnel's is decided by the caller (clients.is_tunnel_process).
"""

import os
import time

CMDLINE_MAX = 65536         # bytes of a /proc/PID/cmdline or environ read at most
KILL_GRACE = 2.0            # seconds between SIGTERM and SIGKILL


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


def process_stopped(pid):
    """Is pid stopped (SIGSTOP, or a debugger): frozen, however healthy it looks?"""
    return process_state(pid) in ("T", "t")


def cmdline(pid):
    """Return the argv of pid ([] if it is gone or not ours to read)."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            raw = f.read(CMDLINE_MAX)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]]


def has_environ(pid, entry):
    """Does pid's environment hold entry ("NAME=value")? Readable only by its owner."""
    try:
        with open("/proc/%d/environ" % pid, "rb") as f:
            environ = f.read(CMDLINE_MAX).split(b"\0")
    except OSError:
        return False
    return entry.encode() in environ


def runs_program(pid, program):
    """Does pid run as this user and execute program (the real path of the binary)?

    A running binary that was upgraded since shows as "PATH (deleted)".
    """
    try:
        if os.stat("/proc/%d" % pid).st_uid != os.geteuid():
            return False
        exe = os.readlink("/proc/%d/exe" % pid)
    except OSError:
        return False
    return exe.rsplit(" (deleted)", 1)[0] == real_path(program)


_real_paths = {}


def real_path(path):
    """os.path.realpath, once per path and process: a tick asks it for each tunnel."""
    if path not in _real_paths:
        _real_paths[path] = os.path.realpath(path)
    return _real_paths[path]


def find_processes(match):
    """Return the PIDs of every live process for which match(pid) is true (scans /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid():
            pid = int(entry)
            if match(pid) and process_alive(pid):
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


def kill_processes(pids, grace=KILL_GRACE):
    """SIGTERM every pid, wait one grace period for all of them, then SIGKILL.

    Returns the pids that are gone. SIGCONT follows SIGTERM so that a stopped
    (hung) ssh can act on it. A refused or vanished kill never raises, and
    however many there are, they cost one grace period in all.
    """
    import signal

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
