"""One tick: every tunnel checked under its lock, repaired if a check says DOWN.

A healthy tunnel costs the ladder and nothing else: no program, no write,
no line. Only a DOWN loads the repair.
"""

import time

from .ladder import for_each, run_ladder
from .model import (EXIT_DOWN, EXIT_OK, LOG_ERR, LOG_INFO, LOG_NOTICE, LOG_WARNING, SLOW,
                    SLOW_ENDED, SLOW_EVENT, TARGET_BACK, TARGET_DOWN, TARGET_DOWN_EVENT, UNKNOWN,
                    UNKNOWN_ENDED, UNKNOWN_EVENT, UP, Event, Outcome, first_down)
from .statefiles import (TunnelLock, first_time, make_state_dir, read_state,
                         read_state_text, save_state)
from .tcp import SharedTcpTable, TcpTable


def cmd_check(tunnels, args, reporter):
    """One tick: every tunnel checked and repaired, side by side."""
    table = SharedTcpTable() if len(tunnels) > 1 else TcpTable()

    def work(t):
        try:
            return tick_tunnel(t, verbose=args.verbose, table=table)
        except OSError as e:      # e.g. state_dir removed or full: say so, in one line
            return Outcome(t.name, False, [Event(LOG_ERR, "%s: %s" % (t.name, e))], [])
        except Exception as e:    # a bug must cost one tunnel one line, not the whole tick
            return Outcome(t.name, False, [Event(LOG_ERR, "%s: internal error: %s: %s"
                                                 % (t.name, e.__class__.__name__, e))], [])

    began = time.time()
    if args.verbose:
        reporter.event(LOG_INFO, "config %s; state_dir %s" % (args.config_path, ", ".join(
            sorted({t.state_dir for t in tunnels}))))
    outcomes = for_each(tunnels, work)
    for outcome in outcomes:
        for event in outcome.events:
            reporter.event(event.level, event.text, event.stderr or args.verbose)
    events = config_events(tunnels, args) + after_tick(tunnels, outcomes, args, began)
    for event in events:
        reporter.event(event.level, event.text, event.stderr or args.verbose)
    return EXIT_OK if all(o.healthy for o in outcomes) else EXIT_DOWN


def after_tick(tunnels, outcomes, args, began):
    """The owner's hooks for what happened, and the metrics file; their events."""
    events = []
    news = [(t, e) for t, o in zip(tunnels, outcomes) if t.on_event
            for e in o.events if e.kind and e.stderr]
    if news:
        from .hooks import run_hooks
        events += run_hooks(news, args.config_path)
    if any(t.metrics_file for t in tunnels):
        from .metrics import write_metrics
        events += [Event(LOG_WARNING, "ctunnel: cannot write the metrics file %s: %s"
                         % failed) for failed in write_metrics(tunnels, outcomes, began,
                                                                time.time())]
    return events


def config_events(tunnels, args):
    """What the tick says about the config as a whole: other configs it ignores, and
    tunnels gone from it whose client still runs. Each once on stderr (syslog every
    tick); `status` always shows them."""
    from .ladder import find_orphans
    events = []
    if args.ignored and tunnels:
        text = ignored_line(args.config_path, args.ignored)
        events.append(Event(LOG_WARNING, "ctunnel: " + text,
                            first_time(tunnels[0], "ignored configs", text)))
    for ghost, pid in find_orphans(tunnels, args.sections) if not args.names else ():
        events.append(Event(LOG_WARNING, orphan_line(ghost, pid, args.config_path),
                            first_time(ghost, "orphan", str(pid))))
    return events


def ignored_line(path, ignored):
    return ("using %s; %s also exist%s, and %s ignored (only the first of the search path "
            "counts: merge them into one)" % (path, ", ".join(ignored),
                                              "s" if len(ignored) == 1 else "",
                                              "it is" if len(ignored) == 1 else "they are"))


def orphan_line(ghost, pid, path):
    return ("%s: not in %s, but its ssh (pid %d) still runs: `ctunnel.py stop %s` ends it"
            % (ghost.name, path, pid, ghost.name))


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


def verdict_events(tunnel, verdicts):
    return [Event(LOG_INFO, "%s: %s %s (%s)" % (tunnel.name, v.check, v.state, v.detail))
            for v in verdicts]


def _tick_locked(tunnel, verbose, table):
    verdicts = run_ladder(tunnel, table=table, adopt=True)
    events = verdict_events(tunnel, verdicts) if verbose else []
    down = first_down(verdicts)
    if down is None and all(v.state == UP for v in verdicts) and \
            '"warnings"' not in read_state_text(tunnel):
        return Outcome(tunnel.name, True, events, verdicts)    # healthy: nothing to write
    state = read_state(tunnel)
    if down is not None:
        from .repair import repair
        healthy, verdicts = repair(tunnel, down, state, events, verbose, table)
        if not healthy:
            return Outcome(tunnel.name, False, events, verdicts)
    note_warnings(tunnel, verdicts, state, events)
    return Outcome(tunnel.name, True, events, verdicts)


def note_warnings(tunnel, verdicts, state, events):
    """Report UNKNOWN and TARGET_DOWN once when they start and once when they end.

    Neither restarts the tunnel, and a cron mail every minute would say nothing new.
    """
    now = {v.check: [v.state, v.detail] for v in verdicts
           if v.state in (UNKNOWN, TARGET_DOWN, SLOW)}
    before = state.get("warnings")
    before = before if isinstance(before, dict) else {}
    if now == before:
        return
    for check, (verdict, detail) in sorted(now.items()):
        if before.get(check) != [verdict, detail]:
            why = "cannot tell; not restarting" if verdict == UNKNOWN else "not restarting"
            events.append(Event(LOG_WARNING, "%s: %s: %s (%s)"
                                % (tunnel.name, check, detail, why), True, {
                                    TARGET_DOWN: TARGET_DOWN_EVENT, SLOW: SLOW_EVENT}.get(
                                        verdict, UNKNOWN_EVENT), {"reason": detail}))
    for check, (verdict, _) in sorted(before.items()):
        if check not in now:
            back, kind = {TARGET_DOWN: ("its target answers again", TARGET_BACK),
                          SLOW: ("answers in time again", SLOW_ENDED)}.get(
                              verdict, ("checked again", UNKNOWN_ENDED))
            events.append(Event(LOG_NOTICE, "%s: %s: %s" % (tunnel.name, check, back), True,
                                kind, {"reason": check}))
    state["warnings"] = now
    if not now:
        del state["warnings"]
    save_state(tunnel, state, events)
