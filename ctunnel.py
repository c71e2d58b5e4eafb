#!/usr/bin/env python3
"""ctunnel - keep SSH tunnels up from cron, with nothing but python3 and ssh.

This is the command cron runs (* * * * * /path/to/ctunnel.py); the code is
in the package ctunnellib/ beside it, loaded from cached bytecode. See
--help, or README.md.
"""

import os
import sys

MINIMUM = (3, 7)


def package_problem(folder):
    """Why the package beside this script cannot be used, or None.

    Its cached bytecode is code: a __pycache__ that others may write could
    run anything as the cron user, so it is trusted as the config is (owned
    by this user or root, nobody else may write it), before any of it loads.
    """
    package = os.path.join(folder, "ctunnellib")
    if not os.path.isfile(os.path.join(package, "__init__.py")):
        return "%s is missing: install ctunnel.py together with its folder ctunnellib" \
            % package
    for part in (package, os.path.join(package, "clients")):
        cache = os.path.join(part, "__pycache__")
        try:
            cached = [cache] + [os.path.join(cache, name) for name in sorted(os.listdir(cache))]
        except OSError:
            cached = []                 # nothing cached (yet)
        for path in [part] + cached:
            try:
                st = os.stat(path)
            except OSError:
                continue
            if st.st_uid not in (os.geteuid(), 0):
                return "%s: owned by uid %d, not by this user or root (chown %d %s)" \
                    % (path, st.st_uid, os.geteuid(), path)
            if st.st_mode & 0o022:
                return "%s: group or others may write it (chmod go-w %s)" % (path, path)
    return None


def run():
    if sys.version_info < MINIMUM:
        sys.stderr.write("ctunnel: needs Python %d.%d or newer; this is %d.%d\n"
                         % (MINIMUM + tuple(sys.version_info[:2])))
        return 2
    # what this process writes (bytecode, state) is never group- or world-writable
    os.umask(os.umask(0o022) | 0o022)
    folder = os.path.dirname(os.path.realpath(__file__))
    problem = package_problem(folder)
    if problem:
        sys.stderr.write("ctunnel: %s\n" % problem)
        return 2
    sys.path.insert(0, folder)
    from ctunnellib.cli import main
    return main(script=__file__)


if __name__ == "__main__":
    sys.exit(run())
