"""The package as cron runs it: what a healthy tick loads, and whose bytecode it trusts.

A healthy tick must load only what it needs (the module budget below), from
cached bytecode that nobody but the user and root may write.
"""

import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from harness import (BOX_PYTHON, ROOT, ThrowawayUser, as_user, install_copy,
                     run_recording_modules)

# never in a healthy OpenSSH tick: the repair, the other client, the
# commands that look, and the costly parts of the standard library
NOT_IN_A_HEALTHY_TICK = {
    "ctunnellib.repair", "ctunnellib.status", "ctunnellib.programs",
    "ctunnellib.clients.dbclient", "subprocess", "json", "argparse", "tempfile", "re",
    "configparser", "socket", "collections", "threading", "enum", "shlex", "selectors"}


def test_a_healthy_openssh_tick_loads_only_what_it_needs(rig, service):
    rig.start_reverse(service)
    tick, loaded = run_recording_modules("-c", rig.conf)
    assert tick.returncode == 0, tick.stderr
    # the recording works: the modules that do the checks are there
    assert {"ctunnellib.tick", "ctunnellib.clients.openssh", "ctunnellib.mux",
            "ctunnellib.tcp"} <= loaded, sorted(loaded)
    assert not loaded & NOT_IN_A_HEALTHY_TICK, sorted(loaded & NOT_IN_A_HEALTHY_TICK)


def test_a_repairing_tick_loads_the_repair(rig, service):
    """The budget test above can fail: a tick that repairs loads what it forbids."""
    rig.write_config(remote_forward="1:127.0.0.1:%d" % service.port, check_timeout=1,
                     host="127.0.0.1", port="1")
    tick, loaded = run_recording_modules("-c", rig.conf)
    assert tick.returncode == 1
    assert {"ctunnellib.repair", "subprocess"} <= loaded


# --- cached bytecode ---------------------------------------------------------------

@pytest.fixture
def installed():
    """A copy of the install, as root put it in /opt: (folder, its ctunnel.py).

    In a folder every user may enter (pytest's own temp folder is root's alone).
    """
    top = tempfile.mkdtemp(prefix="cti", dir="/tmp")
    os.chmod(top, 0o755)
    folder = os.path.join(top, "opt")
    os.mkdir(folder)
    yield folder, install_copy(folder)
    shutil.rmtree(top)


def test_bytecode_others_may_write_is_refused_before_it_runs(installed, rig, service):
    """A planted pyc (unchecked-hash: Python runs it whatever the source says) in a
    __pycache__ that others may write: one line, exit 2, and its code never runs."""
    folder, script = installed
    rig.start_reverse(service)
    cache = os.path.join(folder, "ctunnellib", "__pycache__")
    evil = os.path.join(folder, "evil.py")
    with open(evil, "w") as f:
        f.write("import sys\nsys.stderr.write('PLANTED CODE RAN\\n')\n"
                "def main(script=None):\n    return 0\n")
    version = subprocess.run([BOX_PYTHON, "-c", "import sys; print('%d%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    pyc = os.path.join(cache, "cli.cpython-%s.pyc" % version)
    os.makedirs(cache, exist_ok=True)
    subprocess.run([BOX_PYTHON, "-c", "import py_compile, sys; py_compile.compile(sys.argv[1], "
                    "cfile=sys.argv[2], invalidation_mode=py_compile.PycInvalidationMode."
                    "UNCHECKED_HASH)", evil, pyc], check=True)
    env = dict(os.environ)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # the attack is real: where the cache is safe, the planted code runs
    planted = subprocess.run([BOX_PYTHON, script, "-c", rig.conf], capture_output=True,
                             text=True, timeout=60, env=env)
    assert "PLANTED CODE RAN" in planted.stderr
    for how in ("group-writable folder", "group-writable file"):
        path = cache if how.endswith("folder") else pyc
        os.chmod(path, os.stat(path).st_mode | 0o020)
        tick = subprocess.run([BOX_PYTHON, script, "-c", rig.conf], capture_output=True,
                              text=True, timeout=60, env=env)
        os.chmod(path, os.stat(path).st_mode & ~0o020)
        assert tick.returncode == 2, how
        assert tick.stderr == "ctunnel: %s: group or others may write it (chmod go-w %s)\n" \
            % (path, path), how


def test_a_cron_user_who_cannot_write_the_install_uses_its_precompiled_bytecode(installed):
    """After README's precompile step (as the owner), a user's tick compiles nothing."""
    folder, script = installed
    home = os.path.join(os.path.dirname(folder), "home")
    user = ThrowawayUser(home)
    try:
        conf = os.path.join(home, "c.conf")
        with open(conf, "w") as f:
            f.write("[pi]\nhost = 127.0.0.1\nport = 1\nremote_forward = 1122:127.0.0.1:22\n"
                    "state_dir = %s\n" % os.path.join(home, "st"))
        os.chown(conf, user.uid, user.gid)

        def code_loaded():
            """Where the user's tick took each of ctunnellib's modules from."""
            tick = subprocess.run(as_user(user) + [BOX_PYTHON, script, "-n", "-c", conf],
                                  capture_output=True, text=True, timeout=60,
                                  env={"PATH": "/usr/bin:/bin", "PYTHONVERBOSE": "1"})
            assert tick.returncode == 0, tick.stderr[-2000:]
            # "# code object from /x/cli.py" (compiled) or "from '/x/__pycache__/cli...pyc'"
            return [line[len("# code object from "):].strip("'") for line in
                    tick.stderr.splitlines()
                    if line.startswith("# code object from ") and "/ctunnellib/" in line]
        before = code_loaded()
        assert before and all(path.endswith(".py") for path in before)   # compiled each time
        subprocess.run([BOX_PYTHON, "-m", "compileall", "-q",
                        os.path.join(folder, "ctunnellib")], check=True)
        after = code_loaded()
        assert len(after) == len(before) and all(path.endswith(".pyc") for path in after), after
    finally:
        user.remove()


def test_a_missing_package_and_an_old_python_are_one_line(installed):
    folder, script = installed
    old = subprocess.run([BOX_PYTHON, "-c",
                          "import sys; sys.version_info = (3, 6, 9, 'final', 0); "
                          "sys.argv = sys.argv[1:]; path = sys.argv[0]; "
                          "exec(compile(open(path).read(), path, 'exec'), "
                          "{'__name__': '__main__', '__file__': path})", script, "--version"],
                         capture_output=True, text=True, timeout=30)
    assert (old.returncode, old.stderr) == (2, "ctunnel: needs Python 3.7 or newer; this is "
                                               "3.6\n")
    shutil.rmtree(os.path.join(folder, "ctunnellib"))
    missing = subprocess.run([BOX_PYTHON, script], capture_output=True, text=True,
                             timeout=30)
    assert missing.returncode == 2
    assert missing.stderr == ("ctunnel: %s/ctunnellib is missing: install ctunnel.py together "
                              "with its folder ctunnellib\n" % folder)


def test_the_suite_runs_from_a_clone_no_other_user_can_read(tmp_path):
    """A clone under a 0700 folder (pytest's own temp folder is one): the tests that run
    ctunnel as throwaway users still pass, through the shared readable install."""
    clone = tmp_path / "clone"
    files = subprocess.run(["git", "-C", ROOT, "ls-files"], capture_output=True, text=True,
                           check=True).stdout.split()
    for name in files:
        os.makedirs(str((clone / name).parent), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, name), str(clone / name))
    os.chmod(str(tmp_path), 0o700)              # no other user may enter
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/test_story.py::test_stop_with_another_ssh_first_on_PATH_stops_the_tunnel_it_"
         "launched", "tests/test_dbclient.py::test_a_healthy_dbclient_tick_loads_neither_the_"
         "mux_client_nor_openssh"], cwd=str(clone), capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
