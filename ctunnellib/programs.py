"""Running a program: bounded in time and in what it may print, never through a shell.

Only the repair, the fallbacks and status load this module (and subprocess):
a healthy tick runs no program.
"""

import os
import subprocess
import time

from .statefiles import LAUNCH_MARK

OUTPUT_MAX = 65536          # bytes kept of what a program prints; the rest is drained


def run(argv, timeout, answers=None, env=None, hold_input=False):
    """Run argv without a shell; return (status or None on timeout, stdout, stderr).

    Output is read with a cap, so a server that talks without end cannot
    fill the box's memory; the excess is read and thrown away. answers:
    bytes for its stdin (default: none, /dev/null); hold_input: its stdin
    reaches no end until it exits or the timeout; env: its environment.
    """
    import selectors
    stdin, ours = subprocess.DEVNULL, None
    if answers is not None:
        stdin, ours = os.pipe()
        os.write(ours, answers)
        if not hold_input:
            os.close(ours)
            ours = None
    try:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env=env, start_new_session=True)
    except OSError as e:
        if ours is not None:
            os.close(ours)
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
    if ours is not None:
        os.close(ours)
    return status, kept[proc.stdout].decode("utf-8", "replace"), \
        kept[proc.stderr].decode("utf-8", "replace").strip()


def quote_argv(argv):
    """Return argv as one shell-quoted line, for logs and --dry-run."""
    import shlex
    return " ".join(shlex.quote(a) for a in argv)


# ---------------------------------------------------------------------------
# What a program said
# ---------------------------------------------------------------------------

def lines_said(text):
    """The lines of text worth reading: not blank, not ssh's known_hosts chatter,
    not the line ctunnel writes before a launch."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.startswith(("Warning: Permanently added",
                                                     LAUNCH_MARK))]


def last_line(text):
    """The line a failed launch ends with: ssh's reason for giving up."""
    lines = lines_said(text)
    return lines[-1] if lines else ""


def first_line(text):
    """The line a failed mux client starts with; what follows is its fallback."""
    lines = lines_said(text)
    return lines[0] if lines else ""
