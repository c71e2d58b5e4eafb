"""Dropbear's dbclient: the same ladder without a control master.

Stock OpenWrt has no OpenSSH client: its ssh is Dropbear's dbclient, which
has no control master, no BatchMode and no pidfile, and whose -f returns
before the server has answered the forwards. So ctunnel runs it in the
foreground, as a child of the tick in a session of its own (it outlives
the tick), and takes its PID from the launch. Each -R forward is proven
through a "loopback" -L in the same client: a connection to 127.0.0.1:C on
the box goes to the server's listener of the -R forward, and comes back
through this client to the target. No program runs and no new login.
"""

import _socket
import os
import time

from ..model import (BEFORE_LOGIN, CANNOT_TELL, DOWN, LINK, LISTENS, NOTHING_LISTENS,
                     TARGET_DOWN, UNKNOWN, UP, Probe, Verdict, check_address, expand_home,
                     forward_arg)
from ..probes import (CLOSED, CONNECTING, LOOP, SILENT, TARGET_REFUSED, await_loop,
                      check_listener, launch_time, ms, no_answer, still_connecting,
                      target_listens)
from ..procfs import cmdline, has_environ, kill_processes, process_stopped, socket_inodes
from ..statefiles import log_since, log_size, open_launch_log, write_pidfile
from . import Client

DBCLIENT_TOKEN = "CTUNNEL_TUNNEL"   # in dbclient's environment: whose it is
DBCLIENT_OPTIONS = ("DisableTrivialAuth", "UseSyslog")   # -o options ctunnel leaves to you
# dbclient's stdin. Where it would ask (an unknown host key, a password) it
# reads stdin when it has no terminal; /dev/null makes it spin at 100% CPU on
# the question or send empty passwords. Ctrl-C is "no": it exits instead.
NO_ANSWER = b"\x03\n"
EXIT_GRACE = 0.5            # a dbclient refused a -R forward exits this soon after


def validate(tunnel):
    """What in a section dbclient cannot do ("" if nothing): said at load, exit 2."""
    if tunnel.ssh_config:
        return "ssh_config: dbclient reads no ssh_config file; give host, port and user here"
    for option in tunnel.ssh_options:
        if option.split("=")[0] not in DBCLIENT_OPTIONS:
            return ('ssh_options "%s": dbclient knows only %s (ctunnel sets '
                    'ExitOnForwardFailure and Port itself)' % (option, ", ".join(DBCLIENT_OPTIONS)))
    if tunnel.remote_check == "nc":
        return ("remote_check = nc needs OpenSSH's ssh (a control master); dbclient is "
                "checked through a loopback forward: use auto")
    if "," in tunnel.host or "/" in tunnel.host:
        return 'host "%s": dbclient would read "," and "/" as hops and ports' % tunnel.host
    for forward in tunnel.forwards:
        if ":" in check_address(forward) + forward.host.strip("[]"):
            return ("%s: ctunnel drives dbclient over IPv4 only; use an IPv4 address"
                    % forward.spec)
    return ""


# ---------------------------------------------------------------------------
# Command lines, and the token
# ---------------------------------------------------------------------------

def _login(tunnel):
    argv = [tunnel.ssh]
    for flag, value in (("-p", tunnel.port), ("-l", tunnel.user),
                        ("-i", tunnel.identity_file)):
        if value:
            argv += [flag, str(value)]
    return argv


def build_argv(tunnel, loopbacks):
    """Return dbclient's argv: the forwards, then one loopback -L per -R forward.

    loopbacks: a free box port for each (see remotes), in order.
    """
    argv = _login(tunnel) + [
        "-N", "-T",
        # a silent server is given up after about three keepalives
        "-K", str(tunnel.server_alive_interval),
        "-o", "ExitOnForwardFailure=yes"]
    for option in tunnel.ssh_options:
        argv += ["-o", option]
    for fwd in tunnel.forwards:
        argv += ["-" + fwd.kind, forward_arg(fwd)]
    for fwd, port in zip(remotes(tunnel), loopbacks):
        argv += ["-L", "127.0.0.1:%s:%s:%d" % (port, check_address(fwd), fwd.port)]
    return argv + [tunnel.host]


def remotes(tunnel):
    """The -R forwards, each with a loopback: the launch needs it to know the forward
    is up, also when remote_check = none leaves it out of the ticks' checks."""
    return [f for f in tunnel.forwards if f.kind == "R"]


def environment(tunnel):
    """dbclient's environment: the home ssh would use (never $HOME), and PATH."""
    return {"HOME": expand_home("~"), "PATH": os.environ.get("PATH", os.defpath)}


def tunnel_token(tunnel):
    """The path only this tunnel has; dbclient gets it as $CTUNNEL_TUNNEL."""
    return os.path.join(tunnel.state_dir, tunnel.name)


def has_tunnel_token(pid, tunnel):
    """dbclient's token: ctunnel put this tunnel's path in its environment.

    dbclient takes no option that could carry it without a warning; its
    environment stays readable by its owner (Dropbear does not make itself
    undumpable, as OpenSSH does).
    """
    return has_environ(pid, "%s=%s" % (DBCLIENT_TOKEN, tunnel_token(tunnel)))


def loopbacks_of(pid, tunnel):
    """Return {-R forward: its loopback port, or None}, read from dbclient's argv."""
    args = cmdline(pid)
    configured = {forward_arg(f) for f in tunnel.forwards if f.kind == "L"}
    ports = {}
    for flag, spec in zip(args, args[1:]):
        parts = spec.split(":")
        if flag == "-L" and spec not in configured and len(parts) == 4 and \
                parts[0] == "127.0.0.1" and parts[1].isdigit() and parts[3].isdigit():
            ports[parts[2], int(parts[3])] = int(parts[1])
    return {f: ports.get((check_address(f), f.port)) for f in remotes(tunnel)}


# ---------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------

def check_running(tunnel, expected, table):
    """dbclient has no master to ask: is it running, not frozen?

    Whether its connection still carries anything, the forwards' checks
    prove (a dbclient whose connection closes exits).
    """
    pid = expected
    if process_stopped(pid):
        return None, Verdict("connection", DOWN, "dbclient (pid %d) is stopped: frozen" % pid,
                             LINK)
    return pid, Verdict("connection", UP, "pid %d running" % pid, LINK)


class Loopback:
    """A connection to dbclient's loopback port: what mux.Channel is to a master."""

    def __init__(self, port, until):
        self.output = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
        self.output.settimeout(max(0.001, until - time.monotonic()))
        try:
            self.output.connect(("127.0.0.1", port))
        except OSError:
            self.output.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.output.close()


def probe_loopback(tunnel, forward, pid, port, table, until):
    """Send one connection round the loop; return await_loop's outcome."""
    before = socket_inodes(pid)
    with Loopback(port, until) as loopback:
        return await_loop(tunnel, forward, pid, before, loopback.output, log_size(tunnel),
                          until, table, own_port=port)


def check_loopback(tunnel, forward, pid, table):
    """Prove a -R forward through dbclient's loopback: box C -> server -> box target."""
    name, address = "remote forward %d" % forward.port, check_address(forward)
    where, target = "%s:%d" % (address, forward.port), "%s:%d" % (forward.host,
                                                                   forward.hostport)
    if tunnel.remote_check == "none":
        return Verdict(name, UP, "not checked (remote_check = none)")
    port = loopbacks_of(pid, tunnel).get(forward)
    if port is None:
        return Verdict(name, DOWN, "dbclient runs without the loopback that checks it "
                       "(started from another config?)")
    problem = check_listener(pid, table, "127.0.0.1", port, "dbclient")
    if problem:
        return Verdict(name, DOWN, "its loopback: %s" % problem)
    began = time.monotonic()
    try:
        outcome = probe_loopback(tunnel, forward, pid, port, table, began + tunnel.check_timeout)
    except OSError as e:
        return Verdict(name, DOWN, "its loopback 127.0.0.1:%d: %s" % (port, e.strerror or e))
    if outcome == CLOSED and target_listens(forward, table) is False:
        outcome = TARGET_REFUSED
    return {
        LOOP: Verdict(name, UP, "data path %s -> box %s proven in %s (loopback %d)"
                      % (where, target, ms(began), port), took=time.monotonic() - began),
        TARGET_REFUSED: Verdict(name, TARGET_DOWN, "the connection answers, but nothing "
                                "listens on %s on the box" % target),
        CONNECTING: Verdict(name, TARGET_DOWN, "the tunnel works, but %s on the box does "
                            "not answer" % target),
        CLOSED: Verdict(name, UNKNOWN, "the server closed the loopback's channel to %s at "
                        "once: it forbids it (permitopen), nothing listens there, or %s "
                        "refused; dbclient does not say which" % (where, target)),
        SILENT: no_answer(name, tunnel, pid, table, "no answer through the loopback",
                          idle=Verdict(name, DOWN, "no answer through the loopback within "
                                       "%gs: the server's session is hung, or another program "
                                       "holds port %d on the server"
                                       % (tunnel.check_timeout, forward.port)))
        if outcome == SILENT else None,
    }[outcome]


def check_local(tunnel, forward, pid, table):
    """Does this tunnel's dbclient own the -L listener? (dbclient cannot ask the far end)"""
    address = check_address(forward)
    problem = check_listener(pid, table, address, forward.port, "dbclient")
    return Verdict("local forward %d" % forward.port, DOWN if problem else UP, problem or
                   "listening on %s:%d (dbclient: the far end is not checked)"
                   % (address, forward.port))


# ---------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------

def knows_host(tunnel):
    """Is the server in ~/.ssh/known_hosts as dbclient looks it up ("HOST TYPE KEY")?"""
    try:
        with open(expand_home("~/.ssh/known_hosts"), "rb") as f:
            text = f.read(1 << 20)
    except OSError:
        return False
    return any(line.startswith(tunnel.host.encode() + b" ") for line in text.splitlines())


def _free_loopback_port():
    sock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
    finally:
        sock.close()


def launch(tunnel):
    """Start dbclient in the foreground, detached; return (pid, None) once it is up.

    Up: each -R forward's loopback came back (or the server answered it while
    dbclient lived on: it exits when a forward is refused), each -L listens.
    Anything else within the launch time is (None, reason); dbclient is ended.
    """
    import subprocess
    from ..programs import lines_said
    if not knows_host(tunnel):
        return None, ("the server's host key is not in %s in dbclient's form (HOST TYPE "
                      "KEY, no port), and dbclient would ask a question cron cannot answer: "
                      "not starting it. Check the key's "
                      "fingerprint with the server's admin and accept it once by hand: "
                      "dbclient %s%s%s true" % (
                          expand_home("~/.ssh/known_hosts"),
                          "-p %d " % tunnel.port if tunnel.port else "",
                          "-i %s " % tunnel.identity_file if tunnel.identity_file else "",
                          "%s@%s" % (tunnel.user, tunnel.host) if tunnel.user
                          else tunnel.host))
    argv = build_argv(tunnel, [_free_loopback_port() for _ in remotes(tunnel)])
    log, start = open_launch_log(tunnel, "dbclient")
    answers, ours = os.pipe()
    os.write(ours, NO_ANSWER)
    os.close(ours)
    try:
        proc = subprocess.Popen(argv, stdin=answers, stdout=log, stderr=log,
                                env=dict(environment(tunnel),
                                         **{DBCLIENT_TOKEN: tunnel_token(tunnel)}),
                                start_new_session=True)
    except OSError as e:
        return None, "cannot run %s: %s" % (tunnel.ssh, e.strerror)
    finally:
        os.close(log)
        os.close(answers)
    began = time.monotonic()
    until = began + launch_time(tunnel)
    problem = "it did not connect"
    while proc.poll() is None and (time.monotonic() < until or
                                   still_connecting(tunnel, proc.pid, began)):
        problem = _not_ready(tunnel, proc.pid, max(until, time.monotonic() + 1))
        if problem is None or problem == CLOSED:
            try:            # a refused forward makes it exit right after the answer
                proc.wait(EXIT_GRACE if problem else 0)
            except subprocess.TimeoutExpired:
                pass
            if proc.poll() is None:
                break
        time.sleep(0.05)
    if proc.poll() is not None:
        said = lines_said(log_since(tunnel, start, 16384)[-8192:])
        return None, explain_failure(tunnel, said, proc.returncode)
    if problem not in (None, CLOSED):
        kill_processes([proc.pid])
        proc.wait()
        return None, "dbclient did not set up its forwards within %ds: %s" % (
            round(time.monotonic() - began), problem)
    try:
        write_pidfile(tunnel, proc.pid)
    except OSError:
        pass            # the next tick adopts it by its token (see ladder)
    return proc.pid, None


def _not_ready(tunnel, pid, until):
    """None when every forward is set up; CLOSED when a loopback's channel was
    closed at once (the server answered: up, if dbclient lives on); else why not."""
    from ..tcp import TcpTable
    table, closed = TcpTable(), False
    loopbacks = loopbacks_of(pid, tunnel)
    if None in loopbacks.values():
        return "it is gone"             # exited as we looked: the caller reads why
    for forward in tunnel.forwards:
        address, port = (("127.0.0.1", loopbacks[forward]) if forward in loopbacks
                         else (check_address(forward), forward.port))
        problem = check_listener(pid, table, address, port, "dbclient")
        if problem:
            return problem
        if forward in loopbacks:
            try:
                outcome = probe_loopback(tunnel, forward, pid, port, table,
                                         min(until, time.monotonic() + tunnel.check_timeout))
            except OSError as e:
                return "its loopback 127.0.0.1:%d: %s" % (port, e.strerror or e)
            if outcome == SILENT:
                return "no answer through its loopback for -R %s" % forward.spec
            closed = closed or outcome == CLOSED
    return CLOSED if closed else None


def explain_failure(tunnel, lines, rc):
    """Turn what a dbclient that exited said into one line the user can act on."""
    import re
    said = lines[-1] if lines else "dbclient exited %d without a message" % rc
    text = "\n".join(lines)
    login = "%s@%s" % (tunnel.user, tunnel.host) if tunnel.user else tunnel.host
    known_hosts = expand_home("~/.ssh/known_hosts")
    fingerprint = re.search(r"\((\S+) fingerprint (\S+)\)", text)
    if "host key mismatch" in text:
        return ("the server's host key has CHANGED since it was accepted: this may be an "
                "attack by someone between this box and %s. Not connecting. If the server "
                "was reinstalled, check its new key's fingerprint with its admin, then remove "
                "the line starting '%s ' from %s and accept the new key by hand"
                % (tunnel.host, tunnel.host, known_hosts))
    if fingerprint:
        return ("dbclient does not trust the server's %s host key (%s): accept it once by "
                "hand, after checking the fingerprint with the server's admin: dbclient %s%s "
                "true" % (fingerprint.group(1), fingerprint.group(2),
                          "-p %d " % tunnel.port if tunnel.port else "", login))
    if "String too long" in text or key_is_openssh_format(tunnel.identity_file):
        return ("%s (dbclient cannot read the key %s, which is in OpenSSH's format: convert "
                "it with dropbearconvert openssh dropbear %s %s.dropbear and set "
                "identity_file to the new file)" % (said, tunnel.identity_file,
                                                    tunnel.identity_file, tunnel.identity_file))
    if "password:" in text or said.endswith("Interrupted."):
        return ("the server refused the key for %s and asked for a password, which ctunnel "
                "never gives: put the key's public line (dropbearkey -y -f %s) in that user's "
                "~/.ssh/authorized_keys on the server" % (login, tunnel.identity_file or "KEY"))
    if "Error reading: Connection reset" in text or "Remote closed the connection" in text:
        return ("%s (%s): too many logins at once for its MaxStartups (many boxes come back "
                "together after it restarted; MaxStartups 100:30:200 in its sshd_config lets "
                "more through)" % (BEFORE_LOGIN, said))
    if "No auth methods could be used" in said:
        return ("%s (the server refused the key for %s: check user, and that the key's public "
                "line is in that user's ~/.ssh/authorized_keys on the server)" % (said, login))
    return said                 # a refused -R forward: the repair looks into it


def key_is_openssh_format(path):
    try:
        with open(path, "rb") as f:
            return f.read(64).startswith(b"-----BEGIN OPENSSH PRIVATE KEY")
    except (OSError, TypeError):
        return False


# ---------------------------------------------------------------------------
# Asking the server over a fresh connection (a held -R port)
# ---------------------------------------------------------------------------

def probe_port(tunnel, address, port):
    """dbclient -B address:port, its input held open: a refused channel ends it at once
    ("Connection ... closed.", exit 0); one that opened stays until our timeout, or
    brings what the listener says. (At the end of its input dbclient exits 0 either
    way: the input must stay open while it tells.)"""
    from ..programs import last_line, run
    rc, out, err = run(_login(tunnel) + ["-B", "%s:%d" % (address, port), tunnel.host],
                       tunnel.check_timeout, NO_ANSWER, environment(tunnel), hold_input=True)
    if rc is None or out:
        return Probe(LISTENS)
    if rc == 0 and "closed" in err:
        return Probe(NOTHING_LISTENS)
    return Probe(CANNOT_TELL, last_line(err) or "dbclient exited %d" % rc)


def run_command(tunnel, command, timeout):
    from ..programs import run
    return run(_login(tunnel) + ["-T", tunnel.host, command], timeout, NO_ANSWER,
               environment(tunnel))


def dry_run(tunnel, out):
    from ..programs import quote_argv
    out.write("# %s: dbclient, checked through its own connection: each -R forward by a "
              "loopback -L 127.0.0.1:Cn (no program run; Cn: a free port chosen at launch)\n"
              % tunnel.name)
    out.write("# if a check fails (with HOME=%s, in its own session, stdin answering no):\n%s\n"
              % (expand_home("~"), quote_argv(build_argv(
                  tunnel, ["C%d" % n for n, _ in enumerate(remotes(tunnel), 1)]))))


class Dbclient(Client):
    """Dropbear's dbclient, in the foreground of a session of its own (see Client)."""

    name, link = "dbclient", "connection"
    validate = staticmethod(validate)
    owns = staticmethod(has_tunnel_token)
    launch = staticmethod(launch)
    check_link = staticmethod(check_running)
    check_local = staticmethod(check_local)
    check_remote = staticmethod(check_loopback)
    probe_port = staticmethod(probe_port)
    run_command = staticmethod(run_command)
    dry_run = staticmethod(dry_run)


client = Dbclient()
