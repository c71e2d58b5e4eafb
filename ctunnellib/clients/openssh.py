"""OpenSSH's ssh: a background control master, checked through its control socket.

The tunnel's ssh runs as `ssh -f -M -S NAME.ctl`; a healthy tick runs no
program: it speaks the master's multiplexing protocol (mux.py) from Python,
and proves each -R forward by a channel from the server into its own
reverse listener that must come back through this master (probes.py).
"""

import math
import os
import time

from ..model import (BEFORE_LOGIN, BUSY_BEFORE_LOGIN, CANNOT_TELL, DOWN, LINK, LISTENS,
                     NOTHING_LISTENS, TARGET_DOWN, UNKNOWN, UP, Probe, Verdict, check_address,
                     forward_arg, state_path)
from ..mux import Channel, MuxClient, MuxError, MuxRefused, MuxTimeout, MuxVersionError
from ..probes import (CLOSED, CONNECTING, LOOP, SILENT, TARGET_REFUSED, await_loop,
                      check_listener, deadline, launch_time, ms, no_answer,
                      still_connecting)
from ..procfs import cmdline, socket_inodes
from ..statefiles import (LOG_MAX, log_since, log_size, open_launch_log, trim_log,
                          write_pidfile)
from . import Client

CONNECT_FACTOR = 4          # the TCP connect and banner may take this many check_timeouts



# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------

def _target_args(tunnel):
    """Arguments that pick the server: config file, port, user."""
    args = []
    if tunnel.ssh_config:
        args += ["-F", tunnel.ssh_config]
    if tunnel.port:
        args += ["-p", str(tunnel.port)]
    if tunnel.user:
        args += ["-l", tunnel.user]
    return args


def _login_args(tunnel):
    """Arguments that log in as the tunnel does: server, key, the user's ssh_options.

    They come after ctunnel's own -o options: ssh takes the first value it is given.
    """
    args = _target_args(tunnel)
    if tunnel.identity_file:
        args += ["-i", tunnel.identity_file, "-o", "IdentitiesOnly=yes"]
    for option in tunnel.ssh_options:
        args += ["-o", option]
    return args


def build_launch_argv(tunnel):
    """Return the argv that starts the tunnel's ssh as a background master."""
    argv = [tunnel.ssh, "-f", "-N", "-M", "-S", state_path(tunnel, "ctl"),
            # once in the background, ssh sends stderr to /dev/null; -E keeps
            # its last words ("Timeout, server not responding.") for the tick
            "-E", state_path(tunnel, "log"),
            "-o", "ControlPersist=no",
            # -f then backgrounds only once every forward is set up, and a
            # forward the server refuses (port still held) makes ssh exit 255.
            "-o", "ExitOnForwardFailure=yes",
            # never wait for a password or a host-key question under cron
            "-o", "BatchMode=yes",
            # a slow, lossy link's connect and banner take several round trips (the
            # key exchange and login after it: the launch's own time, launch_time)
            "-o", "ConnectTimeout=%d" % math.ceil(CONNECT_FACTOR * tunnel.check_timeout),
            "-o", "ServerAliveInterval=%d" % tunnel.server_alive_interval,
            "-o", "ServerAliveCountMax=%d" % tunnel.server_alive_count_max]
    argv += _login_args(tunnel)
    for fwd in tunnel.forwards:
        argv += ["-" + fwd.kind, forward_arg(fwd)]
    return argv + ["--", tunnel.host]


def build_fresh_argv(tunnel, *tail):
    """Return an argv for a fresh connection with the tunnel's own key and
    options, no forwards and no master: to ask the server about a port the
    tunnel could not have. tail: -W host:port, or -T and a command."""
    argv = [tunnel.ssh, "-o", "BatchMode=yes", "-o", "ControlPath=none",
            "-o", "ClearAllForwardings=yes",
            "-o", "ConnectTimeout=%d" % math.ceil(tunnel.check_timeout)]
    return argv + _login_args(tunnel) + list(tail)


def build_probe_argv(tunnel, address, port):
    """ssh -W address:port over a fresh connection: does anything listen there?"""
    where = "[%s]:%d" % (address, port) if ":" in address else "%s:%d" % (address, port)
    return build_fresh_argv(tunnel, "-W", where, "--", tunnel.host)


def build_mux_argv(tunnel, *command):
    """Return an argv that talks to the running master only.

    With -O it is a control request; otherwise a command run on the server
    over the tunnel's own connection. If the master is gone, ssh would
    silently open a fresh connection instead, which proves nothing about the
    tunnel: ProxyCommand=false makes that fallback fail at once.
    """
    argv = [tunnel.ssh, "-S", state_path(tunnel, "ctl"),
            "-o", "ProxyCommand=false", "-o", "BatchMode=yes",
            "-o", "ClearAllForwardings=yes", "-o", "RemoteCommand=none", "-T"]
    argv += _target_args(tunnel)
    if command and command[0] == "-O":
        return argv + list(command) + ["--", tunnel.host]
    return argv + ["--", tunnel.host] + list(command)


def remote_check_command(forward, timeout):
    """Return the command the server runs to see its end of a -R forward.

    nc gives up a second before our own timeout would fire on the ssh client.
    """
    wait = max(1, int(timeout) - 1)
    return ["nc", "-z", "-w", str(wait), "--", check_address(forward), str(forward.port)]


def remote_nc_command(forward, timeout):
    """Return the line the server's shell runs for the nc check.

    nc's own words and status come between two markers, so that an answer
    that is not nc's (a forced command, a chatty login shell) is recognised.
    """
    import shlex
    nc = " ".join(shlex.quote(a) for a in remote_check_command(forward, timeout))
    return "echo ctunnel-nc; %s 2>&1; echo ctunnel-nc=$?" % nc


# ---------------------------------------------------------------------------
# The token and the master
# ---------------------------------------------------------------------------

def has_control_socket(pid, tunnel):
    """OpenSSH's token: the master was started with -S and this tunnel's socket."""
    args = cmdline(pid)
    ctl = state_path(tunnel, "ctl")
    return any(a == "-S" and b == ctl for a, b in zip(args, args[1:]))


def _why(error):
    """One line for an exception: an OSError's own words, else its message."""
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return str(error) or error.__class__.__name__


def query_master(tunnel):
    """Ask `ssh -O check` for the master's PID: return (pid, None) or (None, problem).

    Only for a master that does not speak mux protocol version 4.
    """
    import re
    from ..programs import first_line, run
    rc, _, err = run(build_mux_argv(tunnel, "-O", "check"), tunnel.check_timeout)
    if rc is None:
        return None, "control master did not answer within %gs: hung" % tunnel.check_timeout
    m = re.search(r"Master running \(pid=(\d+)\)", err)
    if rc != 0 or not m:
        return None, "control master: %s" % (first_line(err) or "ssh exited %d" % rc)
    return int(m.group(1)), None


def check_master(tunnel, expected=None, table=None):
    """Does the control master answer, and is it the expected PID? Return (pid, Verdict)."""
    def down(detail):
        return None, Verdict("master", DOWN, detail, LINK)
    try:
        with MuxClient(state_path(tunnel, "ctl"), deadline(tunnel)) as mux:
            pid = mux.alive()
    except MuxVersionError:
        pid, problem = query_master(tunnel)
        if problem:
            return down(problem)
    except MuxTimeout:
        return down("control master did not answer within %gs: hung" % tunnel.check_timeout)
    except (MuxError, OSError) as e:
        return down("control socket: %s" % _why(e))
    if expected and pid != expected:
        return down("control socket answers for pid %d, not the pidfile's %d"
                    % (pid, expected))
    return pid, Verdict("master", UP, "pid %d" % pid, LINK)


# ---------------------------------------------------------------------------
# The forwards
# ---------------------------------------------------------------------------

def _refusal(tunnel, log_offset, error):
    """Why the server refused a channel, in the master's words from its log."""
    from ..programs import lines_said
    said = [l for l in lines_said(log_since(tunnel, log_offset)) if "open failed" in l]
    return said[-1].split("open failed: ", 1)[1] if said else str(error)


def _forbidden(reason):
    return "prohibited" in reason


def check_data_path(tunnel, forward, pid, table, tries=2):
    """Prove a -R forward end to end: server listener -> this tunnel -> box target.

    Returns (Verdict, fallback): fallback is True when the server would not
    open the channel at all, so that `nc` may be asked instead.
    """
    name, address = "remote forward %d" % forward.port, check_address(forward)
    where = "%s:%d" % (address, forward.port)
    target = "%s:%d" % (forward.host, forward.hostport)
    began = time.monotonic()
    until = began + tunnel.check_timeout
    log_offset = log_size(tunnel)
    if log_offset > LOG_MAX:        # a target down for weeks adds a line every tick
        log_offset = trim_log(tunnel)
    for _ in range(tries):
        try:
            with Channel(state_path(tunnel, "ctl"), until) as channel:
                before = socket_inodes(pid) | channel.passed
                channel.open(address, forward.port)
                outcome = await_loop(tunnel, forward, pid, before, channel.output,
                                     log_offset, until, table)
        except MuxRefused as e:
            reason = _refusal(tunnel, log_offset, e)
            if _forbidden(reason):
                return Verdict(name, UNKNOWN, "the server forbids a channel to %s (%s): "
                               "see AllowTcpForwarding and permitopen" % (where, reason)), True
            if "Connection refused" in reason:
                return Verdict(name, DOWN, "no listener on the server at %s" % where), False
            return Verdict(name, DOWN, "the server refused a channel to %s: %s"
                           % (where, reason)), False
        except MuxTimeout:
            return no_answer(name, tunnel, pid, table, "no channel to %s" % where), False
        except MuxVersionError as e:
            return Verdict(name, UNKNOWN, "the %s, which cannot open a channel" % e), True
        except (MuxError, OSError) as e:
            return Verdict(name, DOWN, "control socket: %s" % _why(e)), False
        if outcome != CLOSED:
            break
    return {
        LOOP: Verdict(name, UP, "data path %s -> box %s proven in %s"
                      % (where, target, ms(began)), took=time.monotonic() - began),
        TARGET_REFUSED: Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box "
                                "refused the connection" % target),
        CONNECTING: Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box does "
                            "not answer" % target),
        CLOSED: Verdict(name, UNKNOWN, "%s on the server hung up at once; cannot tell "
                        "whether it is this tunnel's" % where),
        SILENT: no_answer(name, tunnel, pid, table, "no connection back from %s" % where,
                          idle=Verdict(name, DOWN, "port %d on the server is held by another "
                                       "program: a connection to %s did not come back "
                                       "through this tunnel" % (forward.port, where)))
        if outcome == SILENT else None,
    }[outcome], False


def check_remote_nc(tunnel, forward, pid=None, table=None):
    """Is there a listener on the server's end of a -R forward? (nc over the master)

    Proves only that something listens there; used where the server forbids
    channels, or when remote_check = nc.
    """
    import re
    from ..programs import first_line, run
    from ..tcp import TcpTable
    name = "remote forward %d" % forward.port
    command = remote_nc_command(forward, tunnel.check_timeout)
    rc, out, err = run(build_mux_argv(tunnel, command), tunnel.check_timeout)
    if rc is None:
        return no_answer(name, tunnel, pid, table or TcpTable(), "no answer from nc") \
            if pid else Verdict(name, DOWN, "nc check hung for %gs: the connection is dead"
                                % tunnel.check_timeout)
    m = re.search(r"^ctunnel-nc\n(.*?)^ctunnel-nc=(\d+)$", out, re.M | re.S)
    if m:
        said, status = m.group(1).strip(), int(m.group(2))
        if status == 0:
            return Verdict(name, UP, "listening on the server (nc)")
        if re.search(r"usage|invalid option|unrecognized|illegal", said, re.I):
            return Verdict(name, UNKNOWN, "the server's nc cannot do nc -z (BusyBox?): "
                           "install netcat-openbsd there")
        if status in (126, 127):
            return Verdict(name, UNKNOWN, "no nc on the server (install netcat-openbsd there)")
        if status == 1:
            return Verdict(name, DOWN, "no listener on the server (nc)")
        return Verdict(name, UNKNOWN, "nc on the server exited %d%s"
                       % (status, ": " + first_line(said) if said else ""))
    if rc == 255 and re.search(r"refused by peer|open failed", err):
        return Verdict(name, UNKNOWN, "cannot check: the server refuses command sessions "
                       "(%s)" % first_line(err))
    if rc == 255:
        return Verdict(name, DOWN, "ssh failed: %s" % (first_line(err) or "exit 255"))
    said = first_line(out) or first_line(err)
    return Verdict(name, UNKNOWN, "the server did not run nc (a forced command on the key?): "
                   "exit %d%s" % (rc, ", said: " + said if said else ""))


def check_remote_forward(tunnel, forward, pid, table):
    """Check a -R forward the way remote_check says (auto: data path, nc if forbidden)."""
    if tunnel.remote_check == "none":
        return Verdict("remote forward %d" % forward.port, UP, "not checked (remote_check = none)")
    if tunnel.remote_check == "nc":
        return check_remote_nc(tunnel, forward, pid, table)
    verdict, fallback = check_data_path(tunnel, forward, pid, table)
    if not (fallback and tunnel.remote_check == "auto"):
        return verdict
    nc = check_remote_nc(tunnel, forward, pid, table)
    if nc.state == UNKNOWN:
        return verdict._replace(detail="%s; and nc: %s" % (verdict.detail, nc.detail))
    return nc._replace(detail="%s, since %s" % (nc.detail, verdict.detail))


def check_local_forward(tunnel, forward, pid, table):
    """Does this tunnel's ssh own the -L listener, and does the server reach the target?"""
    name = "local forward %d" % forward.port
    address = check_address(forward)
    where = "%s:%d" % (address, forward.port)
    problem = check_listener(pid, table, address, forward.port, "ssh")
    if problem:
        return Verdict(name, DOWN, problem)
    if tunnel.remote_check in ("nc", "none"):
        return Verdict(name, UP, "listening on %s" % where)
    target = "%s:%d" % (forward.host, forward.hostport)
    began, log_offset = time.monotonic(), log_size(tunnel)
    try:
        with Channel(state_path(tunnel, "ctl"), deadline(tunnel)) as channel:
            channel.open(forward.host.strip("[]"), forward.hostport)
    except MuxRefused as e:
        reason = _refusal(tunnel, log_offset, e)
        if _forbidden(reason):
            return Verdict(name, UNKNOWN, "listening on %s, but the server forbids channels to "
                           "%s (%s): see permitopen" % (where, target, reason))
        return Verdict(name, TARGET_DOWN, "the tunnel works, but the server cannot reach %s "
                       "(%s)" % (target, reason))
    except MuxTimeout:
        return no_answer(name, tunnel, pid, table, "no channel to %s" % target)
    except MuxVersionError:
        return Verdict(name, UP, "listening on %s (old master: far end not checked)" % where)
    except (MuxError, OSError) as e:
        return Verdict(name, DOWN, "control socket: %s" % _why(e))
    return Verdict(name, UP, "listening on %s; the server reaches %s in %s"
                   % (where, target, ms(began)), took=time.monotonic() - began)


# ---------------------------------------------------------------------------
# Launch, and what a failed launch said
# ---------------------------------------------------------------------------

def launch_tunnel(tunnel):
    """Start the tunnel's ssh in the background and record its PID.

    Returns (pid, None) on success or (None, reason) with ssh's own words.
    ssh's output goes to NAME.log, a file rather than a pipe: a backgrounded
    ssh that kept a pipe open would hold this tick until it dies.
    """
    import subprocess
    from ..programs import lines_said
    argv = build_launch_argv(tunnel)
    log, start = open_launch_log(tunnel, "ssh")
    try:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, start_new_session=True)
        except OSError as e:
            return None, "cannot run %s: %s" % (tunnel.ssh, e.strerror)
        began = time.monotonic()
        rc = _wait(proc, launch_time(tunnel))
        while rc is None and still_connecting(tunnel, proc.pid, began):
            rc = _wait(proc, 1.0)       # still logging in, and its connection moves
        if rc is None:
            proc.kill()
            proc.wait()
            return None, "ssh did not connect within %ds" % round(time.monotonic() - began)
    finally:
        os.close(log)
    said = lines_said(log_since(tunnel, start, 16384)[-8192:])
    if rc != 0:
        return None, explain_ssh_failure(tunnel, said, rc)
    pid, verdict = check_master(tunnel, None)
    if pid is None:
        return None, "ssh started but %s" % verdict.detail
    try:
        write_pidfile(tunnel, pid)
    except OSError:
        pass            # the next tick adopts it by its control socket (see ladder)
    return pid, None


def _wait(proc, seconds):
    """proc's exit status, or None if it still runs after seconds."""
    import subprocess
    try:
        return proc.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        return None


def explain_ssh_failure(tunnel, lines, rc):
    """Turn what a failed `ssh -f` printed (its lines) into one line the user can act on."""
    said = lines[-1] if lines else "ssh exited %d without a message" % rc
    text = "\n".join(lines)
    bind = [l for l in lines if l.startswith("bind ")]
    if said.startswith("Could not request local forwarding") and bind:
        said = "%s: %s" % (said.rstrip("."), bind[-1])
    login = "%s%s" % (tunnel.user + "@" if tunnel.user else "", tunnel.host)
    if "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        known = "[%s]:%d" % (tunnel.host, tunnel.port) if tunnel.port and tunnel.port != 22 \
            else tunnel.host
        return ("the server's host key has CHANGED since it was accepted: this may be an "
                "attack by someone between this box and %s. Not connecting. If the server "
                "was reinstalled, check its new key's fingerprint with its admin, then "
                "ssh-keygen -R '%s' and accept the new key by logging in once by hand"
                % (tunnel.host, known))
    if "UNPROTECTED PRIVATE KEY FILE" in text:
        return ("%s (ssh ignores the key %s because others may read it: chmod 600 %s)"
                % (said, tunnel.identity_file, tunnel.identity_file))
    if "Host key verification failed" in said:
        return ("%s (the server's host key is not in known_hosts yet: check its fingerprint "
                "(ssh-keyscan %s%s | ssh-keygen -lf -), then accept it by logging in once by "
                "hand: ssh %s%s)" % (said, "-p %d " % tunnel.port if tunnel.port else "",
                                     tunnel.host, "-p %d " % tunnel.port if tunnel.port
                                     else "", login))
    if "Permission denied" in said:
        if key_has_passphrase(tunnel.identity_file):
            return ("%s (the key %s has a passphrase, which cron cannot type: make a key "
                    "without one, ssh-keygen -N '')" % (said, tunnel.identity_file))
        return ("%s (the server refused the key for %s: check user, and that the key's .pub "
                "line is in that user's ~/.ssh/authorized_keys on the server)"
                % (said, login.split("@")[0] if tunnel.user else "your user name"))
    if "kex_exchange_identification" in text:       # reset or closed before its banner
        return ("%s (%s): too many logins at once for its MaxStartups (many boxes come back "
                "together after it restarted; MaxStartups 100:30:200 in its sshd_config lets "
                "more through)" % (BEFORE_LOGIN, said))
    if "during banner exchange" in text:            # connected, and no banner in time
        return ("%s (%s): too busy, or too many logins at once for its MaxStartups"
                % (BUSY_BEFORE_LOGIN, said))
    version = _client_version(tunnel.ssh) if rc not in (0, 255) else "OpenSSH"
    if "Dropbear" in version:
        return ("%s is Dropbear's dbclient under another name, which ctunnel tells by its "
                "name: set ssh = a path or symlink named dbclient (it exited %d: %s)"
                % (tunnel.ssh, rc, said))
    if "OpenSSH" not in version:
        return ("%s is not OpenSSH's ssh client (it exited %d: %s); set ssh = the path of "
                "ssh" % (tunnel.ssh, rc, said))
    if "Could not resolve hostname" in said:
        return "%s (check host, or the network)" % said
    return said


def key_has_passphrase(path):
    """Is the private key at path encrypted? (OpenSSH's own format, or PEM.)"""
    import base64
    try:
        with open(path, "rb") as f:
            text = f.read(65536)
    except (OSError, TypeError):
        return False
    if b"ENCRYPTED" in text:
        return True
    body = b"".join(l for l in text.splitlines() if not l.startswith(b"-----"))
    try:
        blob = base64.b64decode(body)
    except ValueError:
        return False
    magic = b"openssh-key-v1\0"
    if not blob.startswith(magic):
        return False
    size = int.from_bytes(blob[len(magic):len(magic) + 4], "big")
    return blob[len(magic) + 4:len(magic) + 4 + size] != b"none"


def _client_version(program):
    """What program -V says (OpenSSH_9.2p1, Dropbear v2022.83); asked only after a
    launch failed."""
    from ..programs import run
    status, out, err = run([program, "-V"], 5)
    return out + err


# ---------------------------------------------------------------------------
# Asking the server over a fresh connection (a held -R port)
# ---------------------------------------------------------------------------

def probe_port(tunnel, address, port):
    """Does anything listen on address:port on the server? ssh -W there: refused or not."""
    from ..programs import first_line, run
    rc, _, err = run(build_probe_argv(tunnel, address, port), tunnel.check_timeout)
    if rc is not None and "Connection refused" in err:
        return Probe(NOTHING_LISTENS)
    if rc is None or rc == 0:
        return Probe(LISTENS)
    return Probe(CANNOT_TELL, first_line(err) or "ssh exited %d" % rc)


def run_command(tunnel, command, timeout):
    """Run command on the server over a fresh connection with the tunnel's key."""
    from ..programs import run
    return run(build_fresh_argv(tunnel, "-T", "--", tunnel.host, command), timeout)


def run_on_link(tunnel, command, timeout):
    """Run command on the server over the master's own connection."""
    from ..programs import run
    return run(build_mux_argv(tunnel, command), timeout)


def login_user(tunnel):
    """The user ssh logs in as: user, else what ssh_config says (ssh -G), else ours."""
    if tunnel.user:
        return tunnel.user
    from ..programs import run
    _, out, _ = run([tunnel.ssh, "-G"] + _target_args(tunnel) + ["--", tunnel.host], 5)
    said = [line.split(None, 1)[1] for line in out.splitlines() if line.startswith("user ")]
    return said[0] if said else Client.login_user(client, tunnel)


def dry_run(tunnel, out):
    from ..programs import quote_argv
    out.write("# %s: checks over the control socket %s (no program run)\n"
              % (tunnel.name, state_path(tunnel, "ctl")))
    for f in tunnel.forwards:
        if f.kind == "R" and tunnel.remote_check in ("auto", "nc"):
            out.write("# %s%s\n" % ("if the server forbids channels: " if
                                    tunnel.remote_check == "auto" else "",
                                    quote_argv(build_mux_argv(
                                        tunnel, remote_nc_command(f, tunnel.check_timeout)))))
    out.write("# if a check fails:\n" + quote_argv(build_launch_argv(tunnel)) + "\n")


class OpenSSH(Client):
    """OpenSSH's ssh, as a control master (see Client for the contract)."""

    name, link = "ssh", "master"
    owns = staticmethod(has_control_socket)
    launch = staticmethod(launch_tunnel)
    check_link = staticmethod(check_master)
    check_local = staticmethod(check_local_forward)
    check_remote = staticmethod(check_remote_forward)
    probe_port = staticmethod(probe_port)
    run_command = staticmethod(run_command)
    run_on_link = staticmethod(run_on_link)
    login_user = staticmethod(login_user)
    dry_run = staticmethod(dry_run)


client = OpenSSH()
