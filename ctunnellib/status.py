"""The commands that look and stop: status (text or JSON), stop, and -n (dry run).

status and -n change nothing; stop ends the tunnels' clients (verified PIDs
only) and records that it was on purpose.
"""

import time

from .clients import client_of
from .ladder import for_each, run_ladder
from .model import (EXIT_DOWN, EXIT_OK, LOG_ERR, LOG_NOTICE, NOT_RUNNING, STOPPED, Event,
                    first_down)
from .procfs import process_uptime
from .report import printable
from .statefiles import TunnelLock, make_state_dir, read_state, save_state
from .tcp import TcpTable

STOP_LOCK_WAIT = 30.0       # `stop` waits this long for a running tick


def describe_tunnel(tunnel, table=None):
    """Return the status record of one tunnel, changing nothing.

    A client that a tick adopted but could not record (a full disk) is shown
    as it is: found by its token.
    """
    verdicts = run_ladder(tunnel, table=table, adopt=True, record=False)
    state = read_state(tunnel)
    pid = verdicts[0].pid
    if verdicts[0].cause == NOT_RUNNING and state.get("stopped"):
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
        "notes": state.get("notes", []),
    }


def cmd_status(tunnels, args, out):
    table = TcpTable()
    records = for_each(tunnels, lambda t: describe_tunnel(t, table))
    if args.json:
        import json
        from .ladder import find_orphans
        orphans = [{"name": ghost.name, "pid": pid, "state_dir": ghost.state_dir}
                   for ghost, pid in find_orphans(tunnels, args.sections)]
        out.write(json.dumps({"config": args.config_path, "ignored": list(args.ignored),
                              "orphans": orphans, "tunnels": records}, indent=2) + "\n")
    else:
        out.write(printable("config %s" % args.config_path) + "\n")
        from .ladder import find_orphans
        from .tick import ignored_line, orphan_line
        if args.ignored:
            out.write(printable("  " + ignored_line(args.config_path, args.ignored)) + "\n")
        for ghost, pid in find_orphans(tunnels, args.sections):
            out.write(printable("  " + orphan_line(ghost, pid, args.config_path)) + "\n")
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
    lines += ["  note: %s" % note for note in r["notes"]]
    if r["last_restart"]:
        first = r["last_reason"] == NOT_RUNNING
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
    from .repair import stop_tunnel
    status = EXIT_OK
    for t in tunnels:
        make_state_dir(t)
        lock = TunnelLock(t)
        if not lock.acquire(wait=STOP_LOCK_WAIT):
            reporter.event(LOG_ERR, "%s: not stopped: another tick still holds %s"
                           % (t.name, lock.path))
            status = EXIT_DOWN
            continue
        events = []
        try:
            stopped = stop_tunnel(t)
            state = read_state(t)
            for key in ("outage", "session", "notes", "failures", "last_failure"):
                state.pop(key, None)
            state["stopped"] = int(time.time())      # for status: stopped on purpose
            save_state(t, state, events)             # a full disk: a line, still stopped
        finally:
            lock.release()
        if stopped:
            events.insert(0, Event(LOG_NOTICE, "%s: stopped (pid %s)" % (
                t.name, ", ".join(map(str, stopped))), True, STOPPED, {"pid": stopped[0]}))
        if t.on_event and stopped:
            from .hooks import run_hooks
            events += run_hooks([(t, events[0])], args.config_path)
        for event in events:
            reporter.event(event.level, event.text, event.stderr)
    return status


def cmd_dry_run(tunnels, out):
    for t in tunnels:
        client_of(t).dry_run(t, out)
    return EXIT_OK
