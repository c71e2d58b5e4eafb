"""The on_event hook: a program of the owner's, told of each change of a tunnel's state.

A tunnel's on_event program runs once for each event that is news (what
cron would mail: started, restarted, back, failed, reclaimed, port held,
host key changed, target down and back, slow, unknown, notes, stopped),
with the facts in its environment ($CTUNNEL_TUNNEL, $CTUNNEL_EVENT, ...; see
README.md). It runs after every tunnel was checked, so it delays no check;
never on a healthy tick (nothing happened); without a shell, its input
/dev/null, in a session of its own; bounded in time (a hook that hangs is
killed, and one line says so) and in what it may print (to syslog).
"""

import os
import time

from .model import LOG_NOTICE, LOG_WARNING, Event

HOOK_TIME = 10.0            # seconds the hooks of one tick may take, all together
HOOK_OUTPUT = 2048          # bytes of what a hook prints that reach syslog


def environment(tunnel, event, config_path):
    """What a hook is told: the tick's environment and the event's facts."""
    facts = event.facts or {}
    env = dict(os.environ)
    env.update({
        "CTUNNEL_TUNNEL": tunnel.name,
        "CTUNNEL_EVENT": event.kind,
        "CTUNNEL_REASON": str(facts.get("reason", "")),
        "CTUNNEL_PID": str(facts.get("pid") or ""),
        "CTUNNEL_ATTEMPTS": str(facts.get("attempts") or 0),
        "CTUNNEL_HOST": tunnel.host,
        "CTUNNEL_FORWARDS": " ".join("-%s %s" % (f.kind, f.spec) for f in tunnel.forwards),
        "CTUNNEL_LINE": event.text,
        "CTUNNEL_CONFIG": config_path or "",
    })
    return env


def run_hooks(pairs, config_path):
    """Run each (tunnel, event)'s hook, all at once; return the events they make:
    what each said (syslog), and a line for each that had to be killed."""
    import subprocess
    running = []
    said = []
    for tunnel, event in pairs:
        try:
            proc = subprocess.Popen([tunnel.on_event], stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    env=environment(tunnel, event, config_path),
                                    start_new_session=True)
        except OSError as e:
            said.append(Event(LOG_WARNING, "%s: on_event %s cannot run: %s"
                              % (tunnel.name, tunnel.on_event, e.strerror)))
            continue
        running.append((tunnel, event, proc, bytearray()))
    deadline = time.monotonic() + HOOK_TIME
    _collect(running, deadline)
    for tunnel, event, proc, out in running:
        if proc.poll() is None:
            _kill(proc)
            said.append(Event(LOG_WARNING, "%s: on_event %s (%s) did not end within %gs: "
                              "killed" % (tunnel.name, tunnel.on_event, event.kind, HOOK_TIME)))
        elif out or proc.returncode:
            text = out[:HOOK_OUTPUT].decode("utf-8", "replace").strip().replace("\n", " | ")
            said.append(Event(LOG_NOTICE, "%s: on_event %s (%s): exit %d%s" % (
                tunnel.name, tunnel.on_event, event.kind, proc.returncode,
                ", said: " + text if text else ""), stderr=False))
        proc.stdout.close()
    return said


def _collect(running, deadline):
    """Read what the hooks print (keeping HOOK_OUTPUT bytes each) until all have ended
    or the deadline passed."""
    import selectors
    with selectors.DefaultSelector() as selector:
        for entry in running:
            selector.register(entry[2].stdout, selectors.EVENT_READ, entry)
        while selector.get_map() and time.monotonic() < deadline:
            for key, _ in selector.select(max(0.0, deadline - time.monotonic())):
                data = os.read(key.fd, 4096)
                out = key.data[3]
                if not data:
                    selector.unregister(key.fileobj)
                elif len(out) < HOOK_OUTPUT:
                    out += data[:HOOK_OUTPUT - len(out)]
    import subprocess
    for _, _, proc, _ in running:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass                # killed by the caller


def _kill(proc):
    """End a hook and whatever it started (its session)."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    proc.wait()
