"""usage: ctunnel.py [-c CONF] [-n] [-v | -q] [check] [NAME ...]
       ctunnel.py [-c CONF] status [--json] [NAME ...]
       ctunnel.py [-c CONF] stop [NAME ...]

Each run ("tick") reads the config, checks every tunnel (or the NAMEs given)
and repairs what is broken. A healthy tick runs no program: it asks the
tunnel's own ssh client, over its own connection.

  1. process  the pidfile names a live ssh client that is this tunnel's own
  2. link     OpenSSH: the control master answers on its socket (mux protocol);
              Dropbear's dbclient: it runs and is not stopped
  3. local    each -L listen port belongs to this client; OpenSSH: the
              server reaches the forward's target
  4. remote   each -R forward carries a connection end to end: from the
              server's listener, back through this tunnel, to the target

The first check that fails ends the ladder: the tunnel's client is stopped
and started again (OpenSSH: `ssh -f -M -o ExitOnForwardFailure=yes -o
BatchMode=yes`; dbclient: in the foreground of a session of its own). A check
that cannot tell, or a target that is down while the tunnel works, is
reported once and never causes a restart.

A healthy tick prints nothing. Every event is one line on stderr and in syslog.

commands:
  check       one tick (the default)
  status      show each tunnel's state and checks; change nothing
  stop        stop tunnels (the next tick starts them again)

options:
  -c CONF, --config CONF  the config file
  -n, --dry-run           print what a tick would run; run and change nothing
  -v, --verbose           say what every check concluded, also when healthy
  -q, --quiet             print only failures (syslog still gets every event)
  --json                  with status: print JSON
  --version               print the version
  -h, --help              print this text

config: -c CONF, else $CTUNNEL_CONFIG, else the first that exists of
  rstunnel.conf beside ctunnel.py, ~/.config/ctunnel/rstunnel.conf,
  /etc/ctunnel/rstunnel.conf

exit status:
  0  every tunnel is up (a target reported down is not the tunnel's failure)
  1  some tunnel is still down
  2  usage or config error

crontab:
  * * * * * /path/to/ctunnel.py
"""

import sys

from . import __version__
from .config import find_config, ignored_configs, load_config
from .model import EXIT_DOWN, EXIT_OK, EXIT_USAGE, LOG_ERR, CtunnelError, UsageError
from .report import Reporter

COMMANDS = ("check", "status", "stop")
FLAGS = {"-n": "dry_run", "--dry-run": "dry_run", "-v": "verbose", "--verbose": "verbose",
         "-q": "quiet", "--quiet": "quiet", "--json": "json", "-h": "help", "--help": "help",
         "--version": "version"}


class Args:
    """The parsed command line, and what main learns of the config for the commands:
    its path, the configs the search path also found (ignored), every section name."""
    command, names, config, config_path = "check", (), None, None
    dry_run = verbose = quiet = json = help = version = False
    ignored, sections = (), ()


def parse_args(argv):
    """Parse the command line; raise UsageError for anything it does not know.

    By hand: argparse alone would add milliseconds to every tick.
    """
    args, words, names = Args(), list(argv), []
    while words:
        word = words.pop(0)
        if word in ("-c", "--config") or word.startswith("--config="):
            args.config = word.split("=", 1)[1] if "=" in word else (words.pop(0) if words
                                                                     else None)
            if not args.config:
                raise UsageError("%s needs a config file" % word.split("=")[0])
        elif word in FLAGS:
            setattr(args, FLAGS[word], True)
        elif word == "--":
            names += words
            break
        elif word.startswith("-") and word != "-":
            raise UsageError('unknown option "%s" (see --help)' % word)
        else:
            names.append(word)
    if names and names[0] in COMMANDS:
        args.command = names.pop(0)
    args.names = names
    if args.verbose and args.quiet:
        raise UsageError("-v and -q do not go together")
    if args.json and args.command != "status":
        raise UsageError("--json goes with status")
    if args.dry_run and args.command != "check":
        raise UsageError("-n goes with check: it prints what a tick would run")
    return args


def select_tunnels(tunnels, names, path, bad=(), orphans=()):
    """Return the tunnels named (all when none), or raise UsageError.

    A name in bad (a section with a config error, already reported) is left out.
    orphans: tunnels no longer in the config that may be named too (for stop).
    """
    if not names:
        return tunnels
    by_name = {t.name: t for t in list(orphans) + list(tunnels)}
    names = [n for n in names if n not in bad]
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise UsageError('no tunnel named "%s" in %s (have: %s; commands: %s)'
                         % (unknown[0], path, ", ".join(sorted(by_name)), ", ".join(COMMANDS)))
    return [by_name[n] for n in names]


def main(argv=None, script=None):
    """Run ctunnel; return its exit status. script: the path of ctunnel.py."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv)
    except UsageError as e:
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_USAGE
    if args.help or args.version:
        sys.stdout.write(__doc__ if args.help else "ctunnel %s\n" % __version__)
        return EXIT_OK
    reporter = Reporter(quiet=args.quiet)
    problems = {}
    script = script or sys.argv[0]
    try:
        path = find_config(args.config, script=script)
        tunnels = load_config(path, problems)
        for name in sorted(problems):           # every tick: cron mails it until fixed
            reporter.event(LOG_ERR, "ctunnel: %s" % problems[name], stamp=False)
        args.config_path = path
        args.ignored = ignored_configs(path, args.config, script=script)
        args.sections = {t.name for t in tunnels} | set(problems)
        orphans = ()
        if args.command == "stop" and set(args.names) - args.sections:
            from .ladder import find_orphans
            orphans = [ghost for ghost, _ in find_orphans(tunnels, args.sections)]
        tunnels = select_tunnels(tunnels, args.names, path, problems, orphans)
    except CtunnelError as e:
        sys.stderr.write("ctunnel: %s\n" % e)
        return EXIT_USAGE
    try:
        status = run_command(args, tunnels, reporter) if tunnels else EXIT_OK
    except OSError as e:      # e.g. state_dir removed after loading: one line, no traceback
        sys.stderr.write("ctunnel: %s\n" % e)
        status = EXIT_DOWN
    except KeyboardInterrupt:
        # what a tunnel's thread was launching runs on in a session of its own,
        # and the next tick adopts it by its token
        sys.stderr.write("ctunnel: interrupted\n")
        status = EXIT_DOWN
    return EXIT_USAGE if problems else status


def run_command(args, tunnels, reporter):
    if args.dry_run:
        from .status import cmd_dry_run
        return cmd_dry_run(tunnels, sys.stdout)
    if args.command == "status":
        from .status import cmd_status
        return cmd_status(tunnels, args, sys.stdout)
    if args.command == "stop":
        from .status import cmd_stop
        return cmd_stop(tunnels, args, reporter)
    from .tick import cmd_check
    return cmd_check(tunnels, args, reporter)
