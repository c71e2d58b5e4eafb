#!/usr/bin/env python3
"""install.py - set up a self-healing ctunnel tunnel, from a fresh box to a running tunnel.

usage: python3 install.py                 (asks; defaults in [brackets])
       python3 install.py --yes --host vps.example.com --remote-forward 1122:127.0.0.1:22

It asks for the server (and checks at once that it answers), the forwards
and the key (one per tunnel), then:
  1. makes sure the server's host key is known (shows its fingerprint first)
  2. makes a dedicated ed25519 key without passphrase, if asked to
  3. installs the public key on the server (ssh-copy-id) and proves that a
     non-interactive login works
  4. checks that the server's reverse ports are free
  5. writes the tunnel's section into the config (atomically, mode 0600,
     keeping the other tunnels and their comments)
  6. adds the crontab line, once
  7. prints the settings the server needs, then runs one tick and shows status

With Dropbear's dbclient as the client (--ssh dbclient, or when ssh is
Dropbear, as on OpenWrt) it does the same with Dropbear's tools: dropbearkey
makes the key, dbclient shows and records the host key and installs the key.

Every answer has a flag; with --yes nothing is asked, and a missing required
answer exits 2 naming its flag. A tunnel of the same name in the config is
replaced only after a yes, or with --replace.

exit status:
  0    the tunnel is set up and up, and cron keeps it
  1    setup stopped, or the first tick failed (the reason is printed)
  2    usage error or a missing or bad answer with --yes
  3    the tunnel is up, but nothing keeps it yet: there is no crontab program, or
       adding the line failed; do what the wizard printed
  130  interrupted
"""

import argparse
import glob
import os
import pwd
import re
import select
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.realpath(__file__)))
# ctunnel's own package, beside this file: its parsing and checks are reused
from ctunnellib import clients, config, model  # noqa: E402
from ctunnellib.clients import dbclient  # noqa: E402
from ctunnellib.probes import packed_ip  # noqa: E402

CTUNNEL_PY = os.path.join(os.path.dirname(os.path.realpath(__file__)), "ctunnel.py")
DEFAULT_KEY = "~/.ssh/ctunnel_%s_ed25519"     # one key per tunnel, by its name
DEFAULT_REMOTE_PORT = "1122"
DEFAULT_TARGET = "127.0.0.1:22"
CRON_COMMENT = "# ctunnel: check the SSH tunnels every minute (added by install.py)"
PORT_CHECK_TIMEOUT = 3    # seconds a free port takes to refuse at most
REACH_TIMEOUT = 5         # seconds the server's ssh port may take to answer
SSH_TIMEOUT = 20          # seconds for one non-interactive ssh to the server
LOOPBACK_BINDS = ("", "localhost", "127.0.0.1", "[::1]")

KEY_WHY = """\
The tunnel logs in with a key of its own, without a passphrase: cron cannot
type one. Keep it for this tunnel only. The server can then restrict it to
just these forwards, and you can revoke it without touching your own logins."""


# ---------------------------------------------------------------------------
# Errors and asking
# ---------------------------------------------------------------------------

class Abort(Exception):
    """Stop the wizard with one line and an exit status."""

    def __init__(self, message, status=1):
        Exception.__init__(self, message)
        self.status = status


class Asker:
    """Ask questions on the terminal, or answer them from flags with --yes."""

    def __init__(self, interactive, out=sys.stdout):
        self.interactive = interactive
        self.out = out
        self.written = None    # the config file, once it is written

    def say(self, text=""):
        self.out.write(text + "\n")
        self.out.flush()

    def ask(self, question, default=None, parse=str, preset=None, flag=None):
        """Return parse(answer). A preset (from a flag) is used as the answer.

        Interactive: a bad answer is explained and asked again. With --yes: the
        default is taken, and a missing answer with no default exits 2.
        """
        if preset is not None:
            try:
                return parse(str(preset))
            except ValueError as e:
                raise Abort("%s: %s" % (flag, e), 2)
        if not self.interactive:
            if default is None:
                raise Abort("missing answer: %s (give %s)" % (question, flag), 2)
            return parse(default)
        prompt = "%s [%s]: " % (question, default) if default else "%s: " % question
        while True:
            answer = self._input(prompt, question).strip()
            if not answer and default is not None:
                answer = default
            try:
                return parse(answer)
            except ValueError as e:
                self.say("  %s; try again." % e)

    def confirm(self, question, default=True, preset=None):
        """Ask a yes/no question; preset (True/False from a flag) answers it."""
        if preset is not None:
            return preset
        if not self.interactive:
            return default
        hint = "Y/n" if default else "y/N"
        while True:
            answer = self._input("%s [%s]: " % (question, hint), question).strip().lower()
            if not answer:
                return default
            if answer in ("y", "yes", "n", "no"):
                return answer.startswith("y")
            self.say("  please answer y or n.")

    def _input(self, prompt, question):
        self.out.write(prompt)
        self.out.flush()
        line = sys.stdin.readline()
        if not line:
            raise Abort("end of input at \"%s\"" % question)
        return line


# ---------------------------------------------------------------------------
# Answers: parsing, with ctunnel's own rules
# ---------------------------------------------------------------------------

def parse_target(text):
    """host:port on this side of a reverse forward (e.g. 127.0.0.1:22)."""
    host, colon, port = text.strip().rpartition(":")
    if colon and port.isdigit():
        config.parse_port(port)             # says "is not a port (use 1-65535)"
    try:
        return config.parse_forward("1:" + text.strip()).spec[2:]
    except ValueError:
        raise ValueError('"%s" is not host:port (e.g. 127.0.0.1:22)' % text.strip())


def parse_forward_or_empty(text):
    return config.parse_forward(text).spec if text.strip() else ""


def _file_path(text):
    """An absolute path for a file name answer (~ expanded), not a folder."""
    if not text.strip():
        raise ValueError("give a file name")
    path = os.path.abspath(os.path.expanduser(text.strip()))
    if os.path.isdir(path):
        raise ValueError('"%s" is a folder' % text.strip())
    return path


def parse_key_path(text):
    """A private key without passphrase, or a path where one can be made."""
    path = _file_path(text)
    if os.path.exists(path):
        probe = subprocess.run(["ssh-keygen", "-y", "-P", "", "-f", path],
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if probe.returncode != 0:
            raise ValueError('"%s" is not a private key without passphrase (cron cannot '
                             'type one); name a new file to create one' % text.strip())
    return path


def parse_config_path(text):
    """A config file to create, or an existing one that is valid ini."""
    path = _file_path(text)
    if os.path.exists(path):
        try:
            config.read_config(path)
        except model.ConfigError as e:
            raise ValueError("%s: fix it or choose another file" % e)
    return path


def default_config_path():
    """Where ctunnel.py looks first; or the config it already uses, if any."""
    if os.environ.get(config.CONFIG_ENV):
        return os.environ[config.CONFIG_ENV]
    candidates = config.config_candidates(CTUNNEL_PY)
    return next((p for p in candidates if os.path.exists(p)), candidates[0])


def default_name(host, taken=()):
    """A name from the host (tunnel-10-0-0-5 for an address), unique in the config."""
    if packed_ip(host.strip("[]")):
        label = "tunnel-" + re.sub(r"[^0-9A-Fa-f]+", "-", host.strip("[]")).strip("-")
    else:
        label = re.sub(r"[^A-Za-z0-9_-]", "-", host.split(".")[0]) or "tunnel"
    try:
        config.parse_tunnel_name(label)
    except ValueError:
        label = "tunnel"
    name, n = label, 1
    while name in taken:
        n += 1
        name = "%s-%d" % (label, n)
    return name


def configured_tunnels(path):
    """The tunnels of the config at path, by name ({} if none or unreadable)."""
    if not path or not os.path.exists(path):
        return {}
    try:
        return {t.name: t for t in config.load_config(path, problems={})}
    except model.ConfigError:
        return {}


def local_user():
    return pwd.getpwuid(os.getuid()).pw_name


def state_dir_of(path):
    """The state_dir the config at path gives its tunnels ([DEFAULT], else ctunnel's)."""
    value = config.DEFAULTS["state_dir"]
    if path and os.path.exists(path):
        try:
            value = config.read_config(path)[0].get("state_dir", value) or value
        except model.ConfigError:
            pass
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path or ".")),
                                         model.expand_home(value)))


def name_parser(plan):
    """A tunnel name, as the config will take it: its files must fit in its state_dir."""
    def parse(text):
        name = config.parse_tunnel_name(text)
        try:
            config.check_state_dir(state_dir_of(plan.config), name)
        except ValueError as e:
            if "too long" not in str(e):
                return name                 # state_dir itself: said when the config is read
            raise ValueError('"%s" is too long for state_dir %s: its control socket would '
                             'pass the %d bytes a socket path may have; choose a shorter '
                             'name' % (name, state_dir_of(plan.config),
                                       config.SOCKET_PATH_MAX))
        return name
    return parse


def free_server_port(plan, port):
    """Return port, or raise ValueError when another tunnel of the config to this server
    holds it (the tunnel this run replaces may keep its own)."""
    for t in configured_tunnels(plan.config).values():
        if t.name != plan.name and t.host == plan.host and \
                port in [f.port for f in t.remote_forward]:
            raise ValueError("port %d on %s is [%s]'s already: choose another port"
                             % (port, plan.host, t.name))
    return port


def reverse_spec_parser(plan):
    """A -R spec (or nothing) whose server port is free in the config."""
    def parse(text):
        if not text.strip():
            return ""
        forward = config.parse_forward(text)
        free_server_port(plan, forward.port)
        return forward.spec
    return parse


def last_tunnel(path):
    """The config's last tunnel (its server, port and user are a re-run's defaults)."""
    tunnels = list(configured_tunnels(path).values())
    return tunnels[-1] if tunnels else None


# ---------------------------------------------------------------------------
# The questions
# ---------------------------------------------------------------------------

def ask_plan(args, asker):
    """Ask everything that needs no network; return the answers as a Namespace."""
    p = argparse.Namespace(ssh_config=args.ssh_config, replaced=set())
    p.ssh = shutil.which(args.ssh or "ssh") or (None if args.ssh else shutil.which("dbclient"))
    if not p.ssh:
        raise Abort("%s: no such program (give --ssh, the path of ssh or dbclient)"
                    % (args.ssh or "ssh"), 2)
    p.client = clients.kind_of(p.ssh)
    if p.client == "dbclient" and args.ssh_config:
        raise Abort("--ssh-config: %s is Dropbear's dbclient, which reads no ssh_config"
                    % p.ssh, 2)
    asker.say("ctunnel setup: a tunnel from this box to an ssh server, kept up by cron.\n")
    p.config = args.config or default_config_path()     # asked below; known for defaults
    last = last_tunnel(p.config)                        # a re-run: its server by default
    while True:
        p.host = asker.ask("ssh server (name, IP or ssh_config alias)",
                           last.host if last else None, config.parse_server, args.host,
                           "--host")
        p.port = asker.ask("its ssh port", str(last.port or 22) if last else "22",
                           config.parse_port, args.port, "--port")
        if not asker.interactive or args.host is not None:
            break                   # checked once every flag is known to be good
        problem, _ = reach_server(p)
        if not problem:
            break
        asker.say("  %s; try again." % problem)
    p.user = asker.ask("login user on the server", last.user or local_user() if last and
                       last.host == p.host else local_user(),
                       lambda s: config.parse_host(s, "user"), args.user, "--user")
    taken = configured_tunnels(p.config)
    p.name = asker.ask("name of this tunnel", default_name(p.host, taken), name_parser(p),
                       args.name, "--name")
    confirm_replace(p, args, asker)
    p.remote, p.local = ask_forwards(args, asker, p)
    if asker.interactive and args.identity_file is None:
        asker.say("\n" + KEY_WHY)
    p.key = asker.ask("key file, existing or to be created", DEFAULT_KEY % p.name,
                      parse_key_path, args.identity_file, "--identity-file")
    p.config = asker.ask("write the config to", p.config, parse_config_path,
                         args.config, "--config")
    confirm_replace(p, args, asker)             # again, if another file was chosen
    name_parser(p)(p.name)                      # and its state_dir
    p.cron = None                               # no crontab program: said at the end
    if args.cron is False:
        p.cron = False                          # --no-cron: the user keeps it otherwise
    elif shutil.which("crontab"):
        p.cron = asker.confirm("add the crontab line that checks the tunnel every minute?",
                               True, args.cron)
    elif args.cron:
        raise Abort("--cron: there is no crontab program here (see cron/ for systemd)", 2)
    return p


def confirm_replace(p, args, asker):
    """A tunnel of the same name is replaced only when the user says so."""
    while p.name in configured_tunnels(p.config) and p.name not in p.replaced:
        old = configured_tunnels(p.config)[p.name]
        what = "[%s] is in %s already (%s, %s)" % (
            p.name, p.config, old.host, " ".join("-%s %s" % (f.kind, f.spec)
                                                 for f in old.forwards))
        if args.replace or (asker.interactive and asker.confirm(
                "%s. Replace it?" % what, False)):
            p.replaced.add(p.name)
            return
        if not asker.interactive or args.name is not None:
            raise Abort("%s; give --replace to replace it, or another --name" % what, 2)
        taken = configured_tunnels(p.config)
        p.name = asker.ask("name of this tunnel", default_name(p.host, taken), name_parser(p))


def reach_server(plan):
    """Connect to the server's ssh port: return (why it cannot, in words, or None; its banner)."""
    try:
        host = plan.host if getattr(plan, "client", "") == "dbclient" else \
            resolved_ssh(plan)["hostname"]
    except Abort as e:
        return str(e), b""
    split = re.match(r"^([^:]+):(\d+)$", host)
    try:
        with socket.create_connection((host, plan.port), timeout=REACH_TIMEOUT) as sock:
            return None, sock.recv(256)
    except socket.gaierror:
        hint = " (did you mean server %s, port %s?)" % split.groups() if split else ""
        return "the name %s does not resolve%s" % (host, hint), b""
    except ConnectionRefusedError:
        return ("%s refused a connection on port %d: nothing listens there"
                % (host, plan.port)), b""
    except socket.timeout:
        return "no answer from %s port %d within %ds" % (host, plan.port, REACH_TIMEOUT), b""
    except OSError as e:
        return "cannot reach %s port %d: %s" % (host, plan.port, e.strerror or e), b""


def server_kind(banner):
    """openssh or dropbear, from the server's banner (SSH-2.0-dropbear_2022.83)."""
    return "dropbear" if banner.lower().startswith(b"ssh-2.0-dropbear") else "openssh"


def ask_forwards(args, asker, plan):
    """Return (remote specs, local specs); at least one forward in all."""
    if args.remote_forward or args.local_forward:
        return (_flag_specs(asker, "--remote-forward", args.remote_forward,
                            reverse_spec_parser(plan)),
                _flag_specs(asker, "--local-forward", args.local_forward,
                            lambda text: config.parse_forward(text, "L").spec))
    if not asker.interactive:
        raise Abort("missing answer: what to forward (give --remote-forward or "
                    "--local-forward)", 2)
    while True:
        remote, local = [], []
        asker.say("\nA reverse forward makes a port on the server lead to this side, e.g. "
                  "the server's 1122 to this box's ssh (127.0.0.1:22).")
        if asker.confirm("expose a port of this box on the server (reverse forward)?", True):
            port = asker.ask("  port on the server", DEFAULT_REMOTE_PORT,
                             lambda text: free_server_port(plan, config.parse_port(text)))
            target = asker.ask("  leads to host:port on this side", DEFAULT_TARGET,
                               parse_target)
            remote.append("%d:%s" % (port, target))
            remote += _more_specs(asker, "  another reverse forward [bind:]port:host:hostport"
                                         " (empty: done)", reverse_spec_parser(plan))
        local += _more_specs(asker, "local forward [bind:]port:host:hostport (empty: none)",
                             parse_forward_or_empty)
        if remote or local:
            return remote, local
        asker.say("  A tunnel needs at least one forward.")


def _flag_specs(asker, flag, specs, parse):
    return [asker.ask(flag, parse=parse, preset=spec, flag=flag) for spec in specs or []]


def _more_specs(asker, question, parse):
    specs = []
    while True:
        spec = asker.ask(question, "", parse)
        if not spec:
            return specs
        specs.append(spec)


# ---------------------------------------------------------------------------
# Talking to the server
# ---------------------------------------------------------------------------

def ssh_base(plan, batch=True):
    """ssh argv up to the destination options, for this plan's server."""
    argv = ["ssh"]
    if plan.ssh_config:
        argv += ["-F", plan.ssh_config]
    argv += ["-p", str(plan.port), "-l", plan.user]
    if batch:
        argv += ["-o", "BatchMode=yes", "-i", plan.key, "-o", "IdentitiesOnly=yes",
                 "-o", "ConnectTimeout=10"]
    return argv


def ssh_run(plan, *command):
    """Run a command on the server with the tunnel's key; return (status, stderr)."""
    argv = ssh_base(plan) + ["--", plan.host] + list(command)
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=SSH_TIMEOUT)
    except subprocess.TimeoutExpired:
        return None, "no answer within %ds" % SSH_TIMEOUT
    return proc.returncode, proc.stderr.strip()


def resolved_ssh(plan):
    """What ssh makes of host/port/user (ssh -G): a dict of lowercase keys."""
    argv = ["ssh", "-G"] + (["-F", plan.ssh_config] if plan.ssh_config else []) + \
        ["-p", str(plan.port)] + (["-l", plan.user] if getattr(plan, "user", None) else []) + \
        ["--", plan.host]
    proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SSH_TIMEOUT)
    if proc.returncode != 0:
        raise Abort("ssh cannot use these settings: %s"
                    % (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1])
    settings = {}
    for line in proc.stdout.splitlines():
        key, _, value = line.partition(" ")
        settings.setdefault(key, value)
    return settings


def ensure_host_key(plan, asker, accept):
    """Make sure the server's host key is known, asking before trusting a new one."""
    s = resolved_ssh(plan)
    host, port = s.get("hostkeyalias", "none"), s["port"]
    host = s["hostname"] if host == "none" else host
    entry = host if port == "22" else "[%s]:%s" % (host, port)
    files = [os.path.expanduser(f) for f in s.get("userknownhostsfile", "").split()]
    for f in files:
        if os.path.exists(f) and subprocess.run(
                ["ssh-keygen", "-F", entry, "-f", f], capture_output=True).returncode == 0:
            return
    scan = subprocess.run(["ssh-keyscan", "-T", "10", "-p", port, s["hostname"]],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=SSH_TIMEOUT)
    lines = [l for l in scan.stdout.splitlines() if l and not l.startswith("#")]
    if not lines:
        said = scan.stderr.strip().splitlines()
        raise Abort("cannot read the host key of %s port %s: %s"
                    % (s["hostname"], port, said[-1] if said else "no answer"))
    if host != s["hostname"] or port != "22":
        lines = [entry + " " + l.split(None, 1)[1] for l in lines]
    with tempfile.NamedTemporaryFile("w", suffix=".pub") as tmp:
        tmp.write("\n".join(lines) + "\n")
        tmp.flush()
        prints = subprocess.run(["ssh-keygen", "-l", "-f", tmp.name], capture_output=True,
                                text=True).stdout
    asker.say("\nThe server %s is not in known_hosts yet. It says its keys are:" % entry)
    for line in prints.splitlines():
        asker.say("  " + line)
    asker.say("Compare on the server: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub")
    if not asker.confirm("is this the server's key?", False, True if accept else None):
        raise Abort("host key not trusted; run again when you have checked it "
                    "(or pass --accept-host-key)")
    known = files[0]
    os.makedirs(os.path.dirname(known), mode=0o700, exist_ok=True)
    with open(known, "a") as f:
        f.write("\n".join(lines) + "\n")
    asker.say("  added to %s" % known)


def ensure_key(plan, asker):
    if os.path.exists(plan.key):
        return
    os.makedirs(os.path.dirname(plan.key), mode=0o700, exist_ok=True)
    comment = "ctunnel %s@%s" % (plan.name, socket.gethostname())
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", plan.key], stdin=subprocess.DEVNULL, check=True)
    asker.say("Made a new key: %s (public half: %s.pub)" % (plan.key, plan.key))


def wants_key_installed(asker, preset, logs_in):
    """False when the key logs in already, or when the user says no."""
    if logs_in:
        asker.say("The key already logs in to the server.")
        return False
    return asker.confirm("install the public key on the server now (you may be asked "
                         "for your password there)?", True, preset)


def install_key(plan, asker, preset):
    """Put the public key on the server unless the key already logs in."""
    if not wants_key_installed(asker, preset, ssh_run(plan, "true")[0] == 0):
        return
    batch = [] if asker.interactive else ["-o", "BatchMode=yes"]
    # ssh-copy-id keeps its temp files in ~/.ssh: a fresh box may have none
    os.makedirs(os.path.expanduser("~/.ssh"), mode=0o700, exist_ok=True)
    # ssh-copy-id takes any Dropbear server for OpenWrt's root and writes
    # /etc/dropbear/authorized_keys: a plain user there gets "Permission denied"
    if shutil.which("ssh-copy-id") and getattr(plan, "server", "") != "dropbear":
        argv = ["ssh-copy-id", "-i", plan.key + ".pub", "-p", str(plan.port)] + \
            (["-F", plan.ssh_config] if plan.ssh_config else []) + batch + \
            ["%s@%s" % (plan.user, plan.host)]
        stdin = None if asker.interactive else subprocess.DEVNULL
    else:
        # the same as ssh-copy-id does: the key travels on stdin, never in argv
        argv = ssh_base(plan, batch=False) + batch + \
            ["--", plan.host, "umask 077; mkdir -p .ssh && cat >> .ssh/authorized_keys"]
        stdin = open(plan.key + ".pub")
    leftovers = set(glob.glob(os.path.expanduser("~/.ssh/ssh-copy-id.*")))
    try:
        done = subprocess.run(argv, stdin=stdin, stderr=subprocess.PIPE, text=True)
    finally:
        if stdin is not None and stdin is not subprocess.DEVNULL:
            stdin.close()
        # ssh-copy-id interrupted (Ctrl-C at its password prompt) leaves its temp folder
        for path in set(glob.glob(os.path.expanduser("~/.ssh/ssh-copy-id.*"))) - leftovers:
            shutil.rmtree(path, ignore_errors=True)
    if done.returncode != 0:
        said = [l for l in done.stderr.splitlines() if l.strip()]
        raise Abort("%s failed (exit %d): %s" % (os.path.basename(argv[0]), done.returncode,
                                                  said[-1] if said else "no message"))


def prove_login(plan):
    status, err = ssh_run(plan, "true")
    if status == 0:
        return
    hints = (("Permission denied", "the server does not accept the key: put %s.pub into "
              "~%s/.ssh/authorized_keys there (mode 600, the folder 700)" % (plan.key, plan.user)),
             ("Host key verification failed", "the server's key is not in known_hosts"),
             ("Connection refused", "nothing listens on port %s there" % plan.port),
             ("Could not resolve", "check the server's name"))
    hint = next((h for needle, h in hints if needle in err), "run ssh -v by hand to see why")
    raise Abort("a non-interactive login with %s fails: %s; %s"
                % (plan.key, (err or "no answer").splitlines()[-1], hint))


def check_server(plan, asker):
    """Warn about a reverse port that something on the server holds already.

    Asks the server for a channel to the port, as ctunnel's own check does
    (ssh -W): refused means it is free; a connection means it is taken.
    """
    for spec in plan.remote:
        fwd = config.parse_forward(spec)
        argv = ssh_base(plan) + ["-W", "%s:%d" % (model.check_address(fwd), fwd.port),
                                 "--", plan.host]
        try:
            done = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, timeout=PORT_CHECK_TIMEOUT)
            status, said = done.returncode, done.stderr
        except subprocess.TimeoutExpired:
            status, said = 0, ""           # something took the connection and held it
        if "prohibited" in said:
            asker.say("Note: the server forbids ctunnel's data-path check (AllowTcpForwarding "
                      "or permitopen); it will ask nc on the server instead, so install "
                      "netcat-openbsd there.")
            return
        if status == 0:
            asker.say("Warning: port %d on the server is in use already (an earlier tunnel "
                      "of this box? another program?). The tunnel cannot start while it is."
                      % fwd.port)


# ---------------------------------------------------------------------------
# The same steps with Dropbear's dbclient (stock OpenWrt: no ssh-keygen,
# ssh-keyscan or ssh-copy-id)
# ---------------------------------------------------------------------------

def dbclient_run(plan, *command, stdin=b"", terminal=False, agent=False, key=True):
    """Run dbclient once; return (status or None on timeout, what it said).

    Its stdin starts with ctunnel's "no" (Ctrl-C): without a terminal, every
    question dbclient would ask (a host key, a password) is answered no.
    terminal: keep this one's terminal, for a password the user types.
    """
    argv = [plan.ssh, "-p", str(plan.port), "-l", plan.user] + \
        (["-i", plan.key] if key else []) + [plan.host] + list(command)
    env = dict(os.environ, HOME=model.expand_home("~"))
    env.pop("DROPBEAR_PASSWORD", None)
    if not agent:
        env.pop("SSH_AUTH_SOCK", None)
    try:
        done = subprocess.run(argv, input=dbclient.NO_ANSWER + stdin, capture_output=True,
                              env=env, timeout=SSH_TIMEOUT, start_new_session=not terminal)
    except subprocess.TimeoutExpired:
        return None, "no answer within %ds" % SSH_TIMEOUT
    return done.returncode, done.stderr.decode("utf-8", "replace").strip()


def _as_tunnel(plan):
    return argparse.Namespace(host=plan.host, port=plan.port, user=plan.user,
                              identity_file=plan.key)


def dbclient_host_key(plan, asker, accept):
    """Show the server's host key as dbclient sees it; on a yes, dbclient records it."""
    if dbclient.knows_host(plan):
        return
    env = dict(os.environ, HOME=model.expand_home("~"))
    for name in ("SSH_AUTH_SOCK", "DROPBEAR_PASSWORD"):
        env.pop(name, None)
    proc = subprocess.Popen([plan.ssh, "-p", str(plan.port), "-l", plan.user, plan.host,
                             "true"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env, start_new_session=True)
    try:
        said, deadline = b"", time.monotonic() + SSH_TIMEOUT
        while b"(y/n)" not in said and time.monotonic() < deadline:
            if select.select([proc.stderr], [], [], 1)[0]:
                chunk = os.read(proc.stderr.fileno(), 4096)
                if not chunk:
                    break
                said += chunk
        m = re.search(r"\((\S+) fingerprint (\S+)\)", said.decode("utf-8", "replace"))
        if not m:
            lines = [l for l in said.decode("utf-8", "replace").splitlines() if l.strip()]
            raise Abort("cannot read the host key of %s port %d: %s"
                        % (plan.host, plan.port, lines[-1] if lines else "no answer"))
        asker.say("\nThe server %s is not in %s yet. dbclient sees its key as:"
                  % (plan.host, model.expand_home("~/.ssh/known_hosts")))
        asker.say("  %s %s" % (m.group(1), m.group(2)))
        asker.say("Compare on the server: ssh-keygen -lf /etc/ssh/ssh_host_ed25519_key.pub "
                  "(Dropbear: dropbearkey -y -f /etc/dropbear/dropbear_ed25519_host_key)")
        trusted = asker.confirm("is this the server's key?", False, True if accept else None)
        # "y" to the question; a password prompt that may follow gets the "no"
        proc.stdin.write(b"y\n" + dbclient.NO_ANSWER if trusted else dbclient.NO_ANSWER)
        proc.stdin.close()
        proc.wait(SSH_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if not trusted:
        raise Abort("host key not trusted; run again when you have checked it "
                    "(or pass --accept-host-key)")
    if not dbclient.knows_host(plan):
        raise Abort("dbclient did not record the host key in %s"
                    % model.expand_home("~/.ssh/known_hosts"))
    asker.say("  added to %s" % model.expand_home("~/.ssh/known_hosts"))


def dbclient_key(plan, asker):
    """A Dropbear-format key (dropbearkey), with its public line in KEY.pub."""
    if os.path.exists(plan.key) and dbclient.key_is_openssh_format(plan.key):
        converted = plan.key + ".dropbear"
        if not os.path.exists(converted):
            subprocess.run(["dropbearconvert", "openssh", "dropbear", plan.key, converted],
                           stdin=subprocess.DEVNULL, capture_output=True, check=True)
        asker.say("%s is in OpenSSH's format, which dbclient cannot read: using its "
                  "Dropbear copy %s" % (plan.key, converted))
        plan.key = converted
    made = not os.path.exists(plan.key)
    if made:
        os.makedirs(os.path.dirname(plan.key), mode=0o700, exist_ok=True)
        subprocess.run(["dropbearkey", "-t", "ed25519", "-f", plan.key],
                       stdin=subprocess.DEVNULL, capture_output=True, check=True)
    if made or not os.path.exists(plan.key + ".pub"):
        public = subprocess.run(["dropbearkey", "-y", "-f", plan.key], capture_output=True,
                                text=True, stdin=subprocess.DEVNULL, check=True).stdout
        line = next((l for l in public.splitlines() if l.startswith(("ssh-", "ecdsa-"))), "")
        if not line:
            raise Abort("dropbearkey -y -f %s printed no public key" % plan.key)
        with open(plan.key + ".pub", "w") as f:
            f.write(" ".join(line.split()[:2] + ["ctunnel %s@%s" % (plan.name,
                                                                   socket.gethostname())])
                    + "\n")
    if made:
        asker.say("Made a new key: %s (public half: %s.pub)" % (plan.key, plan.key))


def dbclient_install_key(plan, asker, preset):
    """Put the public key on the server with dbclient, unless the key logs in already."""
    if not wants_key_installed(asker, preset, dbclient_run(plan, "true")[0] == 0):
        return
    with open(plan.key + ".pub", "rb") as f:
        public = f.read()
    # the first line of stdin is the "no" for questions; the server skips it
    status, said = dbclient_run(
        plan, "umask 077; mkdir -p .ssh && { read -r _; cat >> .ssh/authorized_keys; }",
        stdin=public, terminal=asker.interactive, agent=True, key=False)
    if status != 0:
        raise Abort("installing the key with dbclient failed: %s"
                    % (said.splitlines() or ["exit %s" % status])[-1])


def dbclient_prove_login(plan):
    status, said = dbclient_run(plan, "true")
    if status != 0:
        raise Abort("a non-interactive login with %s fails: %s" % (plan.key, (
            dbclient.explain_failure(_as_tunnel(plan), said.splitlines(), status)
            if status is not None else said)))


# The setup steps of each client kind (ctunnellib.clients.KINDS), by the kind
# the tick itself tells from the program (clients.kind_of).
Steps = argparse.Namespace
STEPS = {
    "openssh": Steps(ensure_host_key=ensure_host_key, ensure_key=ensure_key,
                     install_key=install_key, prove_login=prove_login,
                     check_server=check_server),
    # the first tick says whether a reverse port is taken (dbclient has no ssh -W)
    "dbclient": Steps(ensure_host_key=dbclient_host_key, ensure_key=dbclient_key,
                      install_key=dbclient_install_key, prove_login=dbclient_prove_login,
                      check_server=lambda plan, asker: None),
}


# ---------------------------------------------------------------------------
# The config file: one section replaced, the rest kept
# ---------------------------------------------------------------------------

def section_text(plan):
    """The tunnel's config section, a comment above each key."""
    lines = ["[%s]" % plan.name,
             "# ssh server: name, IP or ssh_config alias", "host = %s" % plan.host,
             "# the server's ssh port", "port = %d" % plan.port,
             "# login user on the server", "user = %s" % plan.user,
             "# this tunnel's own key, without passphrase (cron cannot type one)",
             "identity_file = %s" % plan.key]
    if getattr(plan, "client", "") == "dbclient":
        lines += ["# the ssh client: Dropbear's dbclient", "ssh = %s" % plan.ssh]
    if plan.ssh_config:
        lines += ["# ssh_config file, passed as ssh -F", "ssh_config = %s" % plan.ssh_config]
    if plan.remote:
        lines += ["# reverse forwards: [bind:]port on the server -> host:port on this side"]
        lines += _multi("remote_forward", plan.remote)
    if plan.local:
        lines += ["# local forwards: [bind:]port on this box -> host:port seen from the server"]
        lines += _multi("local_forward", plan.local)
    return "\n".join(lines) + "\n"


def _multi(key, values):
    return ["%s = %s" % (key, values[0])] + ["    " + v for v in values[1:]]


_HEADER = re.compile(r"^\[([^\]]*)\]")


def merge_section(text, name, section):
    """Return config text with section [name] replaced by section (or added).

    The comment lines right above the next section's header (no blank line
    between) belong to that section and are kept; everything outside [name]
    is kept as it was.
    """
    lines = text.splitlines()
    starts = [i for i, l in enumerate(lines) if _HEADER.match(l)]
    mine = [i for i in starts if _HEADER.match(lines[i]).group(1).strip() == name]
    new = section.rstrip("\n").splitlines()
    if not mine:
        body = "\n".join(lines).rstrip("\n")
        return (body + "\n\n" if body else "") + "\n".join(new) + "\n"
    start = mine[0]
    end = next((i for i in starts if i > start), len(lines))
    while end < len(lines) and end - 1 > start and lines[end - 1].lstrip().startswith(("#", ";")):
        end -= 1
    tail = lines[end:]
    return "\n".join(lines[:start] + new + ([""] if tail else []) + tail).rstrip("\n") + "\n"


def write_config(plan):
    """Merge the section into the config, validate it all, replace atomically (0600)."""
    old = ""
    if os.path.exists(plan.config):
        with open(plan.config, encoding="utf-8") as f:
            old = f.read()
    text = merge_section(old, plan.name, section_text(plan))
    folder = os.path.dirname(plan.config)
    os.makedirs(folder, mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".rstunnel.", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o600)
        config.load_config(tmp)
        os.replace(tmp, plan.config)
    except model.ConfigError as e:
        raise Abort("the config would not be valid: %s" % str(e).replace(tmp, plan.config))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# ---------------------------------------------------------------------------
# cron
# ---------------------------------------------------------------------------

def cron_line(path):
    """The crontab line; -c only when ctunnel would not find the config at path by itself."""
    command = shlex.quote(CTUNNEL_PY)
    try:
        found = config.find_config(None, environ={}, script=CTUNNEL_PY)
    except model.ConfigError:
        found = None
    if found != path:
        command += " -c " + shlex.quote(path)
    return "* * * * * " + command


def keep(plan, asker):
    """The step that keeps the tunnel up: the crontab line. Return whether it is done
    (or the user chose to do it otherwise); if it cannot be, say what to do instead."""
    line = cron_line(plan.config)
    if plan.cron is False:
        asker.say("No crontab line, as you said. ctunnel keeps the tunnel only while "
                  "something runs it every minute, e.g. this crontab line: %s" % line)
        return True
    problem = "there is no crontab program here" if plan.cron is None else None
    if not problem:
        try:
            install_cron(line, asker)
            return True
        except Abort as e:
            problem = str(e)
    asker.say("\nNothing keeps the tunnel up yet: %s. To keep it, on this box:" % problem)
    for way in ways_to_keep(line):
        asker.say("  - " + way)
    return False


def ways_to_keep(line):
    """What runs a tick every minute on this box, where there is no crontab program."""
    command = line.split(None, 5)[5]
    user = local_user()
    ways = ["add this line to your crontab by hand: %s" % line]
    if os.path.exists("/etc/openwrt_release"):
        ways.append("OpenWrt: add it to /etc/crontabs/%s, then enable and start crond: "
                    "/etc/init.d/cron enable && /etc/init.d/cron start (see "
                    "cron/openwrt-crontab)" % user)
    if os.path.isdir("/run/systemd/system"):
        folder = os.path.join(os.path.dirname(CTUNNEL_PY), "cron")
        ways.append("systemd: copy %s/ctunnel.service and ctunnel.timer to "
                    "/etc/systemd/system/, set ExecStart=%s and User=%s in the service, then "
                    "systemctl enable --now ctunnel.timer" % (folder, command, user))
    return ways


def install_cron(line, asker):
    """Add line to the user's crontab unless it is there already; Abort if it cannot."""
    current = subprocess.run(["crontab", "-l"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True)
    if current.returncode != 0 and "no crontab" not in current.stderr.lower():
        raise Abort("crontab -l failed: %s" % current.stderr.strip())
    text = current.stdout if current.returncode == 0 else ""
    if any(l.strip() == line for l in text.splitlines()):
        asker.say("The crontab line is there already.")
        return
    text = (text.rstrip("\n") + "\n" if text.strip() else "") + CRON_COMMENT + "\n" + line + "\n"
    done = subprocess.run(["crontab", "-"], input=text, capture_output=True, text=True)
    if done.returncode != 0:
        raise Abort("crontab - failed: %s" % done.stderr.strip())
    asker.say("Added to your crontab: %s" % line)


def precompile(asker):
    """Compile ctunnel's package once, so that no tick compiles it every minute.

    cron runs ctunnel.py as a script, and Python caches bytecode only for
    what it imports, where the user may write: a cron user who cannot write
    the install folder would compile the package on every tick.
    """
    import compileall
    package = os.path.join(os.path.dirname(CTUNNEL_PY), "ctunnellib")
    if not compileall.compile_dir(package, quiet=2):
        asker.say("Note: %s is not yours to write, so its bytecode cannot be cached there and "
                  "every tick would compile it. Ask its owner to run once: python3 -m "
                  "compileall -q %s" % (package, package))


# ---------------------------------------------------------------------------
# What the server needs
# ---------------------------------------------------------------------------

def server_advice(plan):
    """The server-side settings this setup needs, with why, as text."""
    remote = [config.parse_forward(s) for s in plan.remote]
    local = [config.parse_forward(s, "L") for s in plan.local]
    # a key shared with other tunnels to the same account must allow their ports too
    sharing = [t for t in configured_tunnels(getattr(plan, "config", None)).values()
               if t.name != plan.name and t.identity_file == plan.key and
               t.host == plan.host and t.user in ("", plan.user)]
    remote += [f for t in sharing for f in t.forwards if f.kind == "R"]
    local += [f for t in sharing for f in t.forwards if f.kind == "L"]
    if getattr(plan, "server", "openssh") == "dropbear":
        return "\n".join(_dropbear_advice(plan, remote, local, sharing))
    out = ["", "On the server, as root: in /etc/ssh/sshd_config, then reload sshd:",
           "    ClientAliveInterval 10", "    ClientAliveCountMax 3",
           "  Why: a box that loses power or its line sends no TCP reset. Without these the",
           "  server keeps the dead session, and its ports, for hours, and every restart",
           "  fails with \"remote port forwarding failed\". With them it lets go in 30 s."]
    wide = [f for f in remote if f.bind not in LOOPBACK_BINDS]
    if wide:
        out += ["    GatewayPorts clientspecified",
                "  Why: %s must listen on more than the server's loopback."
                % ", ".join(f.spec for f in wide)]
    options = ["restrict", "port-forwarding"]
    options += ['permitlisten="%s:%d"' % (f.bind or model.DEFAULT_BIND, f.port) for f in remote]
    if local:   # once any permitopen is given, the data-path check needs its own
        options += ['permitopen="%s:%d"' % (f.host, f.hostport) for f in local]
        options += ['permitopen="%s:%d"' % (model.check_address(f), f.port) for f in remote]
    with open(plan.key + ".pub") as f:
        key = f.read().strip()
    out += ["", "In ~%s/.ssh/authorized_keys on the server, make the key's line:" % plan.user,
            "    %s %s" % (",".join(options), key),
            "  Allows: %s; ctunnel's data-path check; commands without a terminal." % _allowed(
                remote, local),
            "  Forbids: a terminal, agent and X11 forwarding, ~/.ssh/rc%s." %
            (", listening on any other port" if remote else "")]
    if sharing:
        out += ["  This key is also used by %s: the line allows their forwards too, or "
                "those tunnels would stop." % ", ".join("[%s]" % t.name for t in sharing)]
    if not local:
        out += ["  Note: it does not limit connections opened from the server side (ssh -L);"
                " add permitopen=\"host:port\" entries if you want that too."]
    return "\n".join(out)


def _dropbear_advice(plan, remote, local, sharing):
    """The same advice for a Dropbear server: its options, and what it cannot limit."""
    options = ["no-pty", "no-agent-forwarding", "no-X11-forwarding"]
    if local:   # once any permitopen is given, the data-path check needs its own
        options += ['permitopen="%s:%d"' % (f.host, f.hostport) for f in local]
        options += ['permitopen="%s:%d"' % (model.check_address(f), f.port) for f in remote]
    with open(plan.key + ".pub") as f:
        key = f.read().strip()
    out = ["", "The server is Dropbear. Start it with a keepalive: dropbear -K 10 ...",
           "  Why: a box that loses power sends no TCP reset; without a keepalive the",
           "  server keeps the dead session and its ports.",
           "", "In ~%s/.ssh/authorized_keys on the server, make the key's line:" % plan.user,
           "    %s %s" % (",".join(options), key),
           "  Allows: %s; ctunnel's data-path check." % _allowed(remote, local),
           "  Forbids: a terminal, agent and X11 forwarding. Dropbear cannot limit the ports",
           "  a key may listen on (it has no permitlisten), and its restrict option forbids",
           "  reverse forwards altogether."]
    if sharing:
        out += ["  This key is also used by %s: the line allows their forwards too."
                % ", ".join("[%s]" % t.name for t in sharing)]
    return out


def _allowed(remote, local):
    parts = ["reverse forward %s" % ", ".join(str(f.port) for f in remote)] if remote else []
    if local:
        parts.append("local forwards to %s" % ", ".join("%s:%d" % (f.host, f.hostport)
                                                         for f in local))
    return " and ".join(parts)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def parse_args(argv):
    parser = argparse.ArgumentParser(prog="install.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     usage=argparse.SUPPRESS)
    parser.add_argument("--host", help="ssh server: name, IP or ssh_config alias")
    parser.add_argument("--port", help="its ssh port (default 22)")
    parser.add_argument("--user", help="login user on the server (default: yours)")
    parser.add_argument("--name", help="the tunnel's name (default: from --host)")
    parser.add_argument("--remote-forward", action="append", metavar="SPEC",
                        help="reverse forward [bind:]port:host:hostport (repeatable)")
    parser.add_argument("--local-forward", action="append", metavar="SPEC",
                        help="local forward [bind:]port:host:hostport (repeatable)")
    parser.add_argument("--identity-file", help="key to use, made if missing (default %s)"
                        % (DEFAULT_KEY % "NAME"))
    parser.add_argument("--ssh-config", help="ssh_config file for ssh -F (default: none)")
    parser.add_argument("--ssh", metavar="PROGRAM", help="the ssh client the tunnel runs: ssh "
                        "or Dropbear's dbclient (default: ssh, else dbclient)")
    parser.add_argument("--config", help="config file to write (default: where ctunnel.py "
                        "looks first)")
    cron = parser.add_mutually_exclusive_group()
    cron.add_argument("--cron", dest="cron", action="store_true", default=None,
                      help="add the crontab line")
    cron.add_argument("--no-cron", dest="cron", action="store_false",
                      help="do not touch the crontab")
    parser.add_argument("--install-key", dest="install_key", action="store_true",
                        default=None, help="install the public key without asking")
    parser.add_argument("--accept-host-key", action="store_true",
                        help="trust the server's host key if it is new (check it first)")
    parser.add_argument("--yes", action="store_true",
                        help="ask nothing: take flags, then defaults")
    parser.add_argument("--replace", action="store_true",
                        help="replace a tunnel of the same name in the config")
    args = parser.parse_args(argv)
    if args.ssh_config:
        args.ssh_config = os.path.abspath(os.path.expanduser(args.ssh_config))
        if not os.path.isfile(args.ssh_config):
            parser.error("--ssh-config %s: no such file" % args.ssh_config)
    return args


def setup(args, asker):
    plan = ask_plan(args, asker)
    asker.say("")
    problem, banner = reach_server(plan)
    if problem:
        raise Abort(problem)
    plan.server = server_kind(banner)
    steps = STEPS[plan.client]
    steps.ensure_host_key(plan, asker, args.accept_host_key)
    steps.ensure_key(plan, asker)
    log_in(plan, asker, steps, args)
    steps.check_server(plan, asker)
    write_config(plan)
    asker.written = plan.config
    asker.say("Wrote [%s] to %s (mode 600)." % (plan.name, plan.config))
    kept = keep(plan, asker)
    precompile(asker)
    asker.say(server_advice(plan))
    asker.say("\nFirst tick:")
    tick = subprocess.run([sys.executable, CTUNNEL_PY, "-c", plan.config, "check", plan.name])
    subprocess.run([sys.executable, CTUNNEL_PY, "-c", plan.config, "status", plan.name])
    asker.say("\nCheck it any time with: %s -c %s status" % (CTUNNEL_PY, plan.config))
    if tick.returncode != 0:
        return 1
    if not kept:
        asker.say("\nThe tunnel is up, but nothing keeps it up yet: see above.")
        return 3
    return 0


def log_in(plan, asker, steps, args):
    """Install the key and prove a login with it. A refused login at a terminal asks
    for the login user again (the other answers stand), and tries once more."""
    for attempt in range(3):
        try:
            steps.install_key(plan, asker, args.install_key)
            steps.prove_login(plan)
            asker.say("Login with the key works.")
            return
        except Abort as e:
            if not asker.interactive or args.user is not None or attempt == 2:
                raise
            asker.say("  %s" % e)
            plan.user = asker.ask("login user on the server (the other answers stand)",
                                  plan.user, lambda s: config.parse_host(s, "user"))


def main(argv=None):
    # what the wizard writes (config, keys, bytecode) is never group- or world-writable
    os.umask(os.umask(0o022) | 0o022)
    args = parse_args(argv)
    asker = Asker(interactive=not args.yes)
    try:
        return setup(args, asker)
    except Abort as e:
        sys.stderr.write("install.py: %s%s\n" % (e, _written(asker) if e.status != 2 else ""))
        return e.status
    except KeyboardInterrupt:
        sys.stderr.write("\ninstall.py: interrupted%s\n" % _written(asker))
        return 130
    except (OSError, subprocess.SubprocessError) as e:
        # a tool that hung or failed (ssh-keygen, ssh-keyscan): one line, no traceback
        sys.stderr.write("install.py: %s%s\n" % (e, _written(asker)))
        return 1


def _written(asker):
    if asker.written:
        return " (the config %s was written)" % asker.written
    return "; the config was not written"


if __name__ == "__main__":
    sys.exit(main())
