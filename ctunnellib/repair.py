"""The repair: stop the tunnel's client, launch a new one, and find out why a port is held.

Loaded only when a check said DOWN (or by stop): a healthy tick never
imports it, nor subprocess.
"""

import os
import re
import time

from .clients import client_of, find_tunnel_processes, is_tunnel_process
from .ladder import run_ladder
from .model import (GONE, LINK, LISTENS, LOG_ERR, LOG_INFO, LOG_NOTICE, NOT_RUNNING,
                    NOTHING_LISTENS, PROCESS, Event, check_address, first_down, state_path)
from .probes import packed_ip
from .procfs import kill_processes, process_alive
from .statefiles import read_pidfile, read_state_file, save_state
from .tcp import proc_address

REPEAT_FAILURE_AFTER = 3600  # seconds before an unchanged failure is printed again


# ---------------------------------------------------------------------------
# Stop and relaunch
# ---------------------------------------------------------------------------

def stop_tunnel(tunnel):
    """Kill this tunnel's client (verified PIDs only) and remove pidfile and socket.

    Returns the list of PIDs that were stopped.
    """
    pids = set(find_tunnel_processes(tunnel))
    recorded = read_pidfile(tunnel)
    if recorded and process_alive(recorded) and is_tunnel_process(recorded, tunnel):
        pids.add(recorded)
    stopped = kill_processes(sorted(pids))
    for suffix in ("pid", "ctl"):
        try:
            os.unlink(state_path(tunnel, suffix))
        except FileNotFoundError:
            pass
    return stopped


def repair(tunnel, down, state, events, verbose, table):
    """Stop the tunnel's client, launch a new one and check it again.

    Records the outcome in state and adds its event. Returns (healthy, verdicts).
    """
    reason = down_reason(tunnel, down)
    first = down.cause == NOT_RUNNING
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
            events += [Event(LOG_INFO, "%s: %s %s (%s)" % (tunnel.name, v.check, v.state,
                                                            v.detail)) for v in verdicts]
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
    save_state(tunnel, state, events)
    return failure is None, verdicts


def down_reason(tunnel, down):
    """Say why the tunnel is being (re)started, with a dead client's last words."""
    if down.kind not in (PROCESS, LINK):
        return "%s: %s" % (down.check, down.detail)
    said = death_note(tunnel) if down.cause == GONE else ""
    return down.detail + ("; ssh said: %s" % said if said else "")


def death_note(tunnel):
    """Return what the tunnel's last client said before it died, if anything."""
    from .programs import last_line
    try:
        return last_line(read_state_file(state_path(tunnel, "log"), 4096, -4096)
                         .decode("utf-8", "replace"))
    except OSError:
        return ""


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


# ---------------------------------------------------------------------------
# A held -R port: policy, a live client, another program, or a stale session
# ---------------------------------------------------------------------------

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
    probe = client_of(tunnel).probe_port(tunnel, address, forward.port)
    if probe.answer == NOTHING_LISTENS:
        return ("nothing listens on %s:%d there: the server's policy refuses the port (see "
                "permitlisten in authorized_keys, PermitListen, AllowTcpForwarding and "
                "GatewayPorts in sshd_config); this is not a stale session"
                % (address, forward.port))
    if probe.answer == LISTENS:
        return None
    return "the server still holds the port, or refuses it: " + probe.detail


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
    raw = packed_ip(address) or b""
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
        return "%s:%d" % (proc_address(addr.encode()), int(port_hex, 16))
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
