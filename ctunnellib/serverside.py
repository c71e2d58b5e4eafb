"""What ctunnel asks the server: its own session, and who holds a -R port.

When a tunnel comes up, one command over its own connection records the
server-side session that serves it (the sshd process, its start time, the
connection as the server sees it) and the addresses its reverse listeners
got. When a later launch finds the port held, one command over a fresh
login with the tunnel's key finds out who holds it: this tunnel's recorded
session (live, or stale: its client gone), another client or program of
this login, or another user; and ends a stale session of its own if
reclaim says so. An ordinary login cannot look into other sshd sessions
(OpenSSH makes them undumpable), so the record is what lets it recognise its
own; root also sees every session of the port.

Both commands are POSIX sh, awk and Linux /proc; every value put into them
is a number or hex digits. Stale: the session's client connection is half
closed by the client (CLOSE_WAIT), or holds bytes the client never
acknowledged, sent again and again (no reset came back: a power cut, a
dropped line). A live client acknowledges within a round trip.
"""

import re
import time

from .model import check_address, record
from .probes import packed_ip
from .tcp import proc_address

# A server-side session: pid and start (field 22 of /proc/PID/stat, in clock
# ticks since boot) name the process; client and server the connection as
# the server sees it ("ADDRESS PORT"), from $SSH_CONNECTION.
Session = record("Session", "pid start uid client server")

# Run in a session over the tunnel's own connection: its shell's parent is
# the sshd process that serves the connection (and holds its listeners).
DESCRIBE_SCRIPT = r"""
set -- $SSH_CONNECTION
echo ctunnel-session $PPID $(cut -d' ' -f22 /proc/$PPID/stat 2>/dev/null || echo -) \
  $(id -u) "$1" "$2" "$3" "$4"
awk -v ports=" %(ports)s " 'FNR > 1 && $4 == "0A" { split($2, l, ":")
  if (index(ports, " " l[2] " ")) print "ctunnel-listen", $2 }' /proc/net/tcp /proc/net/tcp6
echo ctunnel-done
"""

HELD_SCRIPT = r"""
port=%(port)s a1=%(a1)s a2=%(a2)s reclaim=%(reclaim)d
rpid=%(rpid)d rstart=%(rstart)s rsp=%(rsp)s rcp=%(rcp)s rc1=%(rc1)s rc2=%(rc2)s
set -- $SSH_CONNECTION
sp=$(printf %%04X "$4")
hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
me=$(id -u)
read -r server < /proc/$PPID/comm 2>/dev/null
# can this login look into its sessions' sockets (root; not an ordinary OpenSSH login)?
ls "/proc/$PPID/fd" >/dev/null 2>&1 && sees=all || sees=none
echo ctunnel-sessions "$me" "${server:-?}" "$sees"
began() {
  awk -v s="$(cut -d' ' -f22 /proc/$1/stat 2>/dev/null)" -v hz="$hz" \
    '$1 == "btime" { print int($2 + s / hz) }' /proc/stat
}
awk -v port="$port" -v a1="$a1" -v a2="$a2" 'FNR > 1 { split($2, l, ":") }
  FNR > 1 && $4 == "0A" && l[2] == port && (l[1] == a1 || l[1] == a2) { print "listener", $8 }
' /proc/net/tcp /proc/net/tcp6
ended=
# the session this tunnel recorded when it came up, if it is still that process of this login
if [ "$rpid" -gt 0 ] && [ "$(cut -d' ' -f22 /proc/$rpid/stat 2>/dev/null)" = "$rstart" ] &&
    [ "$(awk '$1 == "Uid:" { print $2 }' /proc/$rpid/status 2>/dev/null)" = "$me" ]; then
  state=$(awk -v sp="$rsp" -v cp="$rcp" -v c1="$rc1" -v c2="$rc2" 'FNR > 1 {
      split($2, l, ":"); split($3, r, ":"); split($5, q, ":")
      if (l[2] == sp && r[2] == cp && (r[1] == c1 || r[1] == c2)) {
        print ($4 == "08" || (q[1] ~ /[1-9A-F]/ && $7 ~ /[1-9A-F]/)) ? "stuck" : "live"; exit
      } }' /proc/net/tcp /proc/net/tcp6)
  echo recorded "$rpid" "$(began "$rpid")" "${state:-gone}"
  if [ "${state:-gone}" != live ] && [ "$reclaim" = 1 ]; then
    kill -TERM "$rpid" 2>/dev/null && ended="$rpid"
  fi
fi
# every session of this login whose sockets it may see (all of them, for root)
sessions=$({ echo 0; for d in /proc/[0-9]*; do
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
' - /proc/net/tcp /proc/net/tcp6)
echo "$sessions" | while read -r pid peer stuck; do
  [ -n "$pid" ] && echo session "$pid" "$(began "$pid")" "$peer" "$stuck"
done
for pid in $(echo "$sessions" | awk '$3 == 1 { print $1 }'); do
  case " $ended " in *" $pid "*) continue ;; esac
  [ "$reclaim" = 1 ] && kill -TERM "$pid" 2>/dev/null && ended="$ended $pid"
done
[ -n "$ended" ] && sleep 1
for pid in $ended; do
  kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
  echo ended "$pid"
done
echo ctunnel-done
"""


def hex_both_orders(address):
    """The address as /proc/net/tcp prints it on a little- and a big-endian server."""
    raw = packed_ip(address) or b""
    little = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return little.hex().upper() or "-", raw.hex().upper() or "-"


# ---------------------------------------------------------------------------
# At launch: the tunnel's own session
# ---------------------------------------------------------------------------

def describe_command(tunnel):
    """The command that describes the session it runs in (see DESCRIBE_SCRIPT)."""
    ports = " ".join("%04X" % f.port for f in tunnel.forwards if f.kind == "R")
    return DESCRIBE_SCRIPT % {"ports": ports}


def read_description(out):
    """Parse DESCRIBE_SCRIPT's output: (Session or None, {port: [listen addresses]})."""
    if "ctunnel-done" not in out:
        return None, {}
    m = re.search(r"^ctunnel-session (\d+) (\d+) (\d+) (\S+) (\d+) (\S+) (\d+)$", out, re.M)
    session = Session(int(m.group(1)), m.group(2), int(m.group(3)),
                      "%s %s" % m.group(4, 5), "%s %s" % m.group(6, 7)) if m else None
    listening = {}
    for address, port in re.findall(r"^ctunnel-listen ([0-9A-F]+):([0-9A-F]{4})$", out, re.M):
        listening.setdefault(int(port, 16), []).append(proc_address(address.encode()))
    return session, listening


def narrowed_binds(tunnel, listening):
    """Lines about -R forwards whose bind address the server narrowed to loopback
    (sshd without GatewayPorts binds 127.0.0.1 whatever the client asks)."""
    notes = []
    for forward in tunnel.forwards:
        wide = forward.kind == "R" and forward.bind.strip("[]") not in (
            "", "localhost", "127.0.0.1", "::1")
        got = listening.get(forward.port, [])
        if wide and got and all(a in ("127.0.0.1", "::1") for a in got):
            notes.append("remote forward %s: the server bound it to its loopback only "
                         "(%s): set GatewayPorts clientspecified in its sshd_config"
                         % (forward.spec, " and ".join(sorted(set(got)))))
    return notes


# ---------------------------------------------------------------------------
# A held port: who holds it
# ---------------------------------------------------------------------------

def held_command(tunnel, forward, session):
    """The command that looks at who holds forward's port (see HELD_SCRIPT).

    session: this tunnel's recorded session (a dict of Session's fields), or None.
    """
    a1, a2 = hex_both_orders(check_address(forward))
    values = {"port": "%04X" % forward.port, "a1": a1, "a2": a2, "reclaim": tunnel.reclaim,
              "rpid": 0, "rstart": "-", "rsp": "-", "rcp": "-", "rc1": "-", "rc2": "-"}
    try:
        client_address, client_port = session["client"].split()
        server_port = session["server"].split()[1]
        rc1, rc2 = hex_both_orders(client_address)
        values.update(rpid=int(session["pid"]), rstart="%d" % int(session["start"]),
                      rsp="%04X" % int(server_port), rcp="%04X" % int(client_port),
                      rc1=rc1, rc2=rc2)
    except (TypeError, KeyError, ValueError, AttributeError):
        pass                        # no record (a forced command, an older ctunnel)
    return HELD_SCRIPT % values


def _since(began):
    """When a session began, from the server's boot time: the same on every tick (an
    age would shift it across a minute, and a repeated line become news)."""
    return time.strftime("%H:%M", time.localtime(int(began)))


def _peer(text):
    if text == "-":
        return "?"
    addr, port_hex = text.split(":")
    return "%s:%d" % (proc_address(addr.encode()), int(port_hex, 16))


def read_held(tunnel, forward, out):
    """Parse HELD_SCRIPT's output: (reclaimed, why).

    reclaimed: one line saying which stale session was ended (the caller then
    launches again); why: who holds the port, or None when nothing listens
    there now (free again: the caller may launch again).
    """
    port = forward.port
    head = re.search(r"^ctunnel-sessions (\d+) (\S+) (all|none)$", out, re.M)
    if not head or "ctunnel-done" not in out:
        return None, ("something on the server holds %s:%d, and ctunnel cannot look for a "
                      "stale session there (a forced command on the key, no POSIX shell or "
                      "no /proc): set ClientAliveInterval 10 and ClientAliveCountMax 3 in "
                      "the server's sshd_config" % (check_address(forward), port))
    me, server, sees = head.groups()
    owners = re.findall(r"^listener (\d+)$", out, re.M)
    recorded = re.search(r"^recorded (\d+) (\d+) (live|stuck|gone)$", out, re.M)
    sessions = re.findall(r"^session (\d+) (\d+) (\S+) ([01])$", out, re.M)
    ended = set(re.findall(r"^ended (\d+)$", out, re.M))
    began = dict((pid, b) for pid, b, _, _ in sessions)
    if recorded:
        began[recorded.group(1)] = recorded.group(2)
    if ended:
        pid = sorted(ended)[0]
        return ("reclaimed port %d from a stale session (server pid %s, up since %s)"
                % (port, pid, _since(began.get(pid, 0))), None)
    if not owners and not sessions:
        return None, None
    if recorded and recorded.group(3) == "live":
        return None, ("port %d is held by another live client of this login (server pid %s, "
                      "up since %s): this tunnel's session before, which the server still "
                      "takes for live; leaving it alone (ClientAliveInterval 10 on the server "
                      "drops a dead client)" % (port, recorded.group(1),
                                                _since(recorded.group(2))))
    stale = [(pid, b) for pid, b, _, stuck in sessions if stuck == "1"]
    if recorded:
        stale.insert(0, recorded.group(1, 2))
    live = [s for s in sessions if s[3] == "0"]
    for pid, b, client, _ in live:
        return None, ("port %d is held by another live client of this login (server pid "
                      "%s, up since %s, from %s): leaving it alone"
                      % (port, pid, _since(b), _peer(client)))
    for pid, b in stale:
        return None, ("a stale session holds port %d (server pid %s, up since %s); %s"
                      % (port, pid, _since(b), "it could not be ended" if tunnel.reclaim
                         else "reclaim = no: waiting for the server to drop it"))
    if server == "dropbear":
        return None, ("port %d on the server is held, and a Dropbear server's sessions cannot "
                      "be looked into (they run as root): start dropbear with -K 10 -I 300 so "
                      "that it drops dead clients" % port)
    if me in owners and sees == "none":
        return None, ("port %d on the server is held by another client of this login, or "
                      "another program of this user (not by this tunnel's own session; an "
                      "ordinary login cannot look into the others): leaving it alone" % port)
    return None, ("port %d on the server is held by another program or another user (uid "
                  "%s)" % (port, ", ".join(sorted(set(owners)))))
