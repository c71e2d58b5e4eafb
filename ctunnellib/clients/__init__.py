"""The ssh client programs ctunnel drives: the contract each one fills, and which is which.

A tunnel's client kind is told from its `ssh` key by name: OpenSSH's ssh
("openssh") or Dropbear's dbclient ("dbclient"). Each kind is a module
here (openssh.py, dbclient.py) whose `client` fills the contract below,
loaded only when a tunnel of that kind is checked. The tick, the repair,
status and stop call only the contract; nothing outside this folder asks
which kind a tunnel is.

A new kind: a module NAME.py with `client = SomeClient()` (a subclass of
Client), a name in KINDS, and how kind_of tells it.
"""

import os

from ..procfs import find_processes, runs_program

KINDS = ("openssh", "dbclient")
DROPBEAR_NAMES = ("dbclient", "dropbear", "dropbearmulti")


class Client:
    """What ctunnel needs of an ssh client program. Every method takes the Tunnel.

    The checks return verdicts (model.Verdict) and print nothing; a check
    that cannot tell says UNKNOWN, never DOWN.
    """

    name = "ssh"                # the program, as lines name it
    link = "master"             # the name of the check after the process check

    def validate(self, tunnel):
        """What of the tunnel's config this client cannot do ("" if nothing).

        Called once the section parsed; the problem is a config error (exit 2).
        """
        return ""

    def owns(self, pid, tunnel):
        """Does pid (this user's, running the client binary) carry this tunnel's token?

        The token is what only this tunnel's client has, so that a recycled
        PID or an admin's own ssh to the same server never matches.
        """
        raise NotImplementedError

    def launch(self, tunnel):
        """Start the client; return (pid, None) once its forwards are up, else
        (None, why) in words the user can act on. Nothing of it is left running
        on failure."""
        raise NotImplementedError

    def check_link(self, tunnel, pid, table):
        """Does the running client's connection answer? Return (pid, Verdict).

        pid None in the answer: DOWN, the ladder stops.
        """
        raise NotImplementedError

    def check_local(self, tunnel, forward, pid, table):
        """Check a -L forward: its listener is the client's; the server reaches its target."""
        raise NotImplementedError

    def check_remote(self, tunnel, forward, pid, table):
        """Check a -R forward end to end, as remote_check says."""
        raise NotImplementedError

    def probe_port(self, tunnel, address, port):
        """Does anything listen on address:port on the server? Over a fresh connection
        with the tunnel's key. Returns a model.Probe."""
        raise NotImplementedError

    def run_command(self, tunnel, command, timeout):
        """Run a shell command on the server over a fresh connection with the
        tunnel's key; return (status or None, stdout, stderr) as programs.run."""
        raise NotImplementedError

    def run_on_link(self, tunnel, command, timeout):
        """Run a shell command on the server over the running client's own connection
        (its session there is the tunnel's); as run_command, or None if it cannot."""
        return None

    def login_user(self, tunnel):
        """The user the tunnel logs in as on the server."""
        import pwd
        return tunnel.user or pwd.getpwuid(os.geteuid()).pw_name

    def dry_run(self, tunnel, out):
        """Write what a tick would run for this tunnel (for -n)."""
        raise NotImplementedError


def kind_of(program):
    """Is program OpenSSH's ssh or Dropbear's dbclient? Told by name, not by running it.

    OpenWrt's /usr/bin/ssh is a symlink to the dropbear multi-call binary,
    which acts as the client when called as ssh or dbclient.
    """
    names = {os.path.basename(program), os.path.basename(os.path.realpath(program))}
    return "dbclient" if names & set(DROPBEAR_NAMES) else "openssh"


_loaded = {}


def load(kind):
    """Return the client of a kind (its module is imported on first use)."""
    if kind not in _loaded:
        if kind not in KINDS:
            raise ValueError("no client kind %r" % kind)
        module = __import__("%s.%s" % (__name__, kind), fromlist=["client"])
        _loaded[kind] = module.client
    return _loaded[kind]


def client_of(tunnel):
    return load(tunnel.client)


def is_tunnel_process(pid, tunnel, launch=None):
    """Is pid this tunnel's client: ours, the client binary, this tunnel's token?

    The owner and /proc/PID/exe keep another user's look-alike, or a program
    that only calls itself ssh, from matching; the token a recycled PID.
    launch: the pidfile's record (statefiles.Launch): the kind and program it
    was launched as count, not those the config (or PATH) names now.
    """
    kind = launch.client if launch and launch.client in KINDS else tunnel.client
    program = launch.program if launch and launch.program else tunnel.ssh
    return runs_program(pid, program) and load(kind).owns(pid, tunnel)


def find_tunnel_processes(tunnel, launch=None):
    """Return the PIDs of every live client that is this tunnel's (scans /proc).

    Only the repair, stop and adoption need this: it finds a client whose
    pidfile was lost, which would otherwise hold the server's port forever.
    """
    return find_processes(lambda pid: is_tunnel_process(pid, tunnel, launch))
