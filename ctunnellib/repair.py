"""The repair: stop the tunnel's client, launch a new one, and tell the story of the outage.

Loaded only when a check said DOWN (or by stop): a healthy tick never
imports it, nor subprocess. An outage is one story from the DOWN that
began it to the launch that ends it, however many ticks that takes: the
reason it went down is kept, every failed attempt counted, and the restart
counted once, when it is back.
"""

import os
import re
import time

from .clients import client_of, find_tunnel_processes, is_tunnel_process
from .ladder import run_ladder
from .model import (BACK, BEFORE_LOGIN, CANNOT_TELL, CONFIG_CHANGED, CONFIG_CHANGED_EVENT, FAILED, GONE,
                    HOST_KEY_CHANGED, LINK, LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, NOTE,
                    NOT_OURS, NOT_RUNNING, NOTHING_LISTENS, PORT_HELD, PROCESS, RECLAIMED, RESTARTED,
                    STARTED, Event, check_address, first_down, state_path)
from .procfs import kill_processes, process_alive
from .statefiles import launch_words, read_launch, save_state

REPEAT_FAILURE_AFTER = 3600  # seconds before an unchanged failure is printed again
FREE_AGAIN = "free again"   # a held port that nothing holds when ctunnel looks
_HELD = re.compile(r"(?:remote port forwarding failed for listen port|Remote TCP forward "
                   r"request failed \(port) (\d+)")


# ---------------------------------------------------------------------------
# Stop
# ---------------------------------------------------------------------------

def stop_tunnel(tunnel):
    """Kill this tunnel's client (verified PIDs only) and remove pidfile and socket.

    The pidfile's record says what was launched: the client kind and program
    then, whatever PATH or the config say now. Returns the PIDs stopped.
    """
    launch = read_launch(tunnel)
    pids = set(find_tunnel_processes(tunnel))
    if launch:
        pids |= set(find_tunnel_processes(tunnel, launch))
        if process_alive(launch.pid) and is_tunnel_process(launch.pid, tunnel, launch):
            pids.add(launch.pid)
    stopped = kill_processes(sorted(pids))
    for suffix in ("pid", "ctl"):
        try:
            os.unlink(state_path(tunnel, suffix))
        except FileNotFoundError:
            pass
    return stopped


# ---------------------------------------------------------------------------
# Repair
# ---------------------------------------------------------------------------

def repair(tunnel, down, state, events, verbose, table):
    """Stop the tunnel's client, launch a new one and check it again.

    Records the outcome in state and adds its events. Returns (healthy, verdicts).
    """
    first = down.cause == NOT_RUNNING and "outage" not in state
    reason = down.detail if first else state.get("outage") or down_reason(tunnel, down)
    code = "first_start" if first else state.get("outage_code") or reason_code(down)
    if not first:
        state.update(outage=reason, outage_code=code)
    stop_tunnel(tunnel)
    pid, failure, reclaimed = relaunch(tunnel, state.get("session"), events)
    verdicts = []
    if failure is None:
        verdicts = run_ladder(tunnel, launched=pid, table=table)
        if verbose:
            events += [Event(LOG_INFO, "%s: %s %s (%s)" % (tunnel.name, v.check, v.state,
                                                            v.detail)) for v in verdicts]
        after = first_down(verdicts)
        if after is not None:
            failure = "came up but %s: %s" % (after.check, after.detail)
    now = int(time.time())
    state.update(last_restart=now, last_reason=reason, reason_code=code)
    state.pop("stopped", None)
    if failure is None:
        events.append(_record_success(tunnel, state, first, reason, pid, reclaimed))
        learn_session(tunnel, state, events)
    else:
        events.append(_record_failure(tunnel, state, first, reason, failure, now))
    save_state(tunnel, state, events)
    return failure is None, verdicts


def relaunch(tunnel, session, events):
    """Launch the client, and again in the same tick when the server said why not:

    - it dropped the login before authentication (sshd's MaxStartups: many
      boxes log in at once, after the server restarted): again after a random,
      growing delay, until STORM_TIME has passed. Each such try is a line in
      syslog only: one that the tick's next try mends is not news;
    - a -R port is held by a stale session that was ended, or is free again:
      again at once (see explain_held_port).

    Returns (pid, failure, what was reclaimed or "").
    """
    launch = client_of(tunnel).launch
    pid, failure = launch(tunnel)
    retried, storm = [], Storm()
    while failure is not None:
        if dropped_before_login(failure) and storm.wait():
            events.append(Event(LOG_NOTICE, "%s: %s; trying again (%d)" % (
                tunnel.name, failure, storm.tries), stderr=False))
            pid, failure = launch(tunnel)
            continue
        if len(retried) == 2:
            break
        again, failure = explain_held_port(tunnel, failure, session, retried)
        if not again:
            break
        retried.append(again)
        pid, failure = launch(tunnel)
    return pid, failure, ", ".join(r for r in retried if r != FREE_AGAIN)


STORM_TIME = 40.0           # seconds a tick tries again after the server dropped its login
STORM_FIRST = 1.0           # the first delay is at most this; each next one at most twice


def dropped_before_login(failure):
    """Did the server drop the connection before the login (not refuse it)?"""
    return failure.startswith(BEFORE_LOGIN)


class Storm:
    """The delays between tries at a server that drops logins: random (so that boxes
    that all failed at once do not all try again at once), each at most twice the
    last, all within STORM_TIME."""

    def __init__(self):
        self.began, self.tries = time.monotonic(), 0

    def wait(self):
        """Sleep before the next try; False when there is no time left for one."""
        import random
        delay = random.uniform(0, STORM_FIRST * 2 ** self.tries)
        if time.monotonic() + delay - self.began > STORM_TIME:
            return False
        time.sleep(delay)
        self.tries += 1
        return True


def reason_code(down):
    """Why a tunnel went down, as a word for the metrics (one of a few)."""
    if down.kind == PROCESS:
        return {GONE: "process_gone", NOT_OURS: "pidfile_not_ours",
                CONFIG_CHANGED: "config_changed"}.get(down.cause, "process")
    return "link_down" if down.kind == LINK else "forward_down"


def down_reason(tunnel, down):
    """Say why the tunnel is being restarted, with a dead client's last words."""
    if down.kind not in (PROCESS, LINK):
        return "%s: %s" % (down.check, down.detail)
    said = death_note(tunnel) if down.cause == GONE else ""
    return down.detail + ("; %s said: %s" % (client_of(tunnel).name, said) if said else "")


def death_note(tunnel):
    """What the last launched client said before it died (only it: see launch_words)."""
    from .programs import last_line
    return last_line(launch_words(tunnel))


def learn_session(tunnel, state, events):
    """Record the server-side session that serves the tunnel now, and what the
    server made of its -R binds (a warning, once, never a restart)."""
    from .serverside import describe_command, narrowed_binds, read_description
    client = client_of(tunnel)
    command = describe_command(tunnel)
    answer = client.run_on_link(tunnel, command, tunnel.check_timeout)
    own = answer is not None        # over the tunnel's own connection: its session
    if not own:
        answer = client.run_command(tunnel, command, tunnel.check_timeout) \
            if any(f.kind == "R" and f.bind for f in tunnel.forwards) else (None, "", "")
    session, listening = read_description(answer[1])
    state.pop("session", None)
    if own and session:
        state["session"] = dict(zip(session._fields, session))
    notes = narrowed_binds(tunnel, listening)
    state.pop("notes", None)
    if notes:
        state["notes"] = notes
    events += [Event(LOG_WARNING, "%s: %s (not restarting)" % (tunnel.name, note), True, NOTE,
                     {"reason": note}) for note in notes]


def _record_success(tunnel, state, first, reason, pid, reclaimed=""):
    attempts = state.pop("failures", 0)
    for key in ("last_failure", "failure_said", "outage", "outage_code"):
        state.pop(key, None)
    if not first:
        state["restarts"] = state.get("restarts", 0) + 1
    text = "started (pid %d)" % pid if first else "restarted (%s)" % reason
    kind = STARTED if first else CONFIG_CHANGED_EVENT if reason.startswith(
        CONFIG_CHANGED) else RESTARTED
    if reclaimed:
        text, kind = "%s, %s" % (reclaimed, text), RECLAIMED
    if attempts:
        text += " after %d failed attempt%s" % (attempts, "s" if attempts > 1 else "")
        kind = BACK if kind in (STARTED, RESTARTED) else kind
    return Event(LOG_NOTICE, "%s: %s" % (tunnel.name, text), True, kind,
                 {"reason": reason, "pid": pid, "attempts": attempts})


def _record_failure(tunnel, state, first, reason, failure, now):
    """A failed (re)start goes to syslog every time, to stderr only when it is news.

    A server that is away all night would otherwise mean a cron mail every
    minute: stderr repeats a failure when ssh's reason changes, else hourly.
    """
    verb = "start failed" if first else "restart failed (%s)" % reason
    state["failures"] = state.get("failures", 0) + 1
    state["failures_total"] = state.get("failures_total", 0) + 1
    news = failure != state.get("last_failure") or \
        now - state.get("failure_said", 0) >= REPEAT_FAILURE_AFTER
    state["last_failure"] = failure
    if news:
        state["failure_said"] = now
    count = " (%d failed attempts)" % state["failures"] if state["failures"] > 1 else ""
    kind = HOST_KEY_CHANGED if "host key has CHANGED" in failure else \
        PORT_HELD if _HELD.search(failure) else FAILED
    return Event(LOG_ERR, "%s: %s: %s%s" % (tunnel.name, verb, failure, count), news, kind,
                 {"reason": failure, "attempts": state["failures"]})


# ---------------------------------------------------------------------------
# A held -R port: policy, a live client, another program, or a stale session
# ---------------------------------------------------------------------------

def explain_held_port(tunnel, failure, session=None, retried=()):
    """The client said a -R port was refused ("remote port forwarding failed for listen
    port N"): find out why.

    Returns (again, failure). again: launch once more, at once: the stale
    session that was ended (a line for the user), or FREE_AGAIN when nothing
    holds the port any more (the first time only: retried lists what was
    retried already). Else failure is the client's line with the reason: the
    server's policy, a live client, another program, or what the server needs.
    session: this tunnel's recorded server-side session (state["session"]).
    """
    m = _HELD.search(failure or "")
    forward = m and next((f for f in tunnel.forwards
                          if f.kind == "R" and f.port == int(m.group(1))), None)
    if not forward:
        return None, failure
    client = client_of(tunnel)
    probe = client.probe_port(tunnel, check_address(forward), forward.port)
    if probe.answer == CANNOT_TELL:
        return None, "%s (the server still holds the port, or refuses it: %s)" % (
            failure, probe.detail)
    if probe.answer != NOTHING_LISTENS:
        from .serverside import held_command, read_held
        _, out, _ = client.run_command(tunnel, held_command(tunnel, forward, session),
                                       tunnel.check_timeout + 3)
        reclaimed, why = read_held(tunnel, forward, out)
        if reclaimed or why:
            return reclaimed, why and "%s (%s)" % (failure, why)
    if not retried:
        return FREE_AGAIN, None     # released between the refusal and our look
    return None, "%s (%s)" % (failure, refused_by_policy(tunnel, forward))


def refused_by_policy(tunnel, forward):
    """Why the server refuses a -R port that nothing holds."""
    address = check_address(forward)
    if forward.port < 1024 and client_of(tunnel).login_user(tunnel) != "root":
        return ("only root may listen below 1024 on the server, and this tunnel logs in as "
                "%s: use a port from 1024 up" % client_of(tunnel).login_user(tunnel))
    return ("nothing listens on %s:%d there: the server's policy refuses the port (see "
            "permitlisten in authorized_keys, PermitListen, AllowTcpForwarding and "
            "GatewayPorts in sshd_config); this is not a stale session"
            % (address, forward.port))
