"""ctunnel.py runs on OpenWrt's python3-light, which leaves out whole packages.

A real tick runs in a subprocess whose import system refuses every package
python3-light does not ship; the tick must still bring the tunnel up.
"""

import ast
import glob
import os
import subprocess
import sys

from harness import CTUNNEL, INSTALL, ROOT, connect_read, free_port, run_ctunnel

# Packages OpenWrt splits out of python3-light (and a few more to be safe).
ABSENT = ["logging", "unittest", "email", "urllib", "xml", "sqlite3", "multiprocessing",
          "ctypes", "asyncio", "ssl", "uuid", "decimal", "curses", "lzma", "bz2", "dbm",
          "pydoc", "distutils", "readline", "concurrent", "syslog"]

HOOK = """
import sys, runpy
ABSENT = set(%r)
for name in list(sys.modules):
    if name.split(".")[0] in ABSENT:
        del sys.modules[name]
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ImportError("No module named %%r (python3-light)" %% name)
        return None
sys.meta_path.insert(0, Absent())
sys.argv = [%r] + sys.argv[1:]
runpy.run_path(%r, run_name="__main__")
""" % (ABSENT, CTUNNEL, CTUNNEL)


def run_light(*args):
    return subprocess.run([sys.executable, "-c", HOOK] + list(args), capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=60)


def test_hook_really_blocks():
    probe = subprocess.run([sys.executable, "-c", HOOK.split("sys.argv")[0] + "import logging"],
                           capture_output=True, text=True)
    assert probe.returncode == 1 and "python3-light" in probe.stderr


def test_tick_status_and_stop_run_without_the_missing_packages(rig, service):
    remote = free_port()
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port))
    tick = run_light("-c", rig.conf)
    assert tick.returncode == 0, tick.stderr
    assert "pi: started" in tick.stderr
    assert connect_read(remote) == service.greeting
    status = run_light("-c", rig.conf, "status", "--json")
    assert status.returncode == 0 and '"healthy": true' in status.stdout
    stop = run_light("-c", rig.conf, "stop")
    assert stop.returncode == 0 and "stopped" in stop.stderr


def shipped_sources():
    """Every Python file a box runs: the entry, the wizard, the whole package."""
    package = glob.glob(os.path.join(ROOT, "ctunnellib", "**", "*.py"), recursive=True)
    assert len(package) > 10, package
    return [CTUNNEL, INSTALL] + sorted(package)


def test_source_is_python_3_7_syntax():
    for path in shipped_sources():
        ast.parse(open(path).read(), filename=path, feature_version=(3, 7))


def test_python_3_7_is_enough_for_every_module_and_call():
    """vermin reads which modules, functions and arguments each line needs."""
    paths = shipped_sources()
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
    result = subprocess.run(vermin + ["--no-tips", "--violations", "-t=3.7-"] + paths,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = subprocess.run(vermin + ["--no-tips"] + paths, capture_output=True, text=True,
                             timeout=120).stdout
    assert "Minimum required versions: 3.7" in summary, summary


def test_install_py_starts_without_the_missing_packages():
    hook = HOOK.replace(repr(CTUNNEL), repr(INSTALL))
    result = subprocess.run([sys.executable, "-c", hook, "--yes"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "install.py: missing answer: ssh server" in result.stderr


def test_home_is_the_password_databases_not_HOME(sshd, service, tmp_path):
    """OpenWrt boots with HOME=/. A tick then and a cron tick later, as a user
    (not root), use one key and one state: the second finds the tunnel healthy."""
    import shutil
    import tempfile
    from harness import ThrowawayUser, end_pids, pids_with_arg
    top = tempfile.mkdtemp(prefix="cth", dir="/tmp")
    os.chmod(top, 0o755)
    user = ThrowawayUser(os.path.join(top, "h"))
    try:
        dot_ssh = os.path.join(user.home, ".ssh")
        os.makedirs(dot_ssh, mode=0o700)
        shutil.copy(sshd.user_key, os.path.join(dot_ssh, "tunnel"))
        shutil.copy(sshd.known_hosts, os.path.join(dot_ssh, "known_hosts"))
        with open(os.path.join(dot_ssh, "config"), "w") as f:
            f.write("Host *\n  UserKnownHostsFile %s\n  GlobalKnownHostsFile /dev/null\n"
                    % os.path.join(dot_ssh, "known_hosts"))
        remote = free_port()
        conf = os.path.join(user.home, "c.conf")
        with open(conf, "w") as f:
            f.write("[pi]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = "
                    "~/.ssh/tunnel\nssh_config = ~/.ssh/config\nremote_forward = "
                    "%d:127.0.0.1:%d\n" % (sshd.port, sshd.user, remote, service.port))
        for top_dir, dirs, files in os.walk(user.home):
            for name in [top_dir] + [os.path.join(top_dir, n) for n in files]:
                os.chown(name, user.uid, user.gid)
        os.chmod(os.path.join(dot_ssh, "tunnel"), 0o600)

        def tick(home, *args):
            return run_ctunnel("-c", conf, *args, user=user,
                               env={"HOME": home, "PATH": "/usr/bin:/bin"})
        boot = tick("/")
        assert boot.returncode == 0, boot.stderr
        assert "pi: started" in boot.stderr
        assert os.path.exists(os.path.join(user.home, ".local/state/ctunnel/pi.pid"))
        assert connect_read(remote) == service.greeting
        later = tick(user.home)
        assert (later.returncode, later.stderr) == (0, "")      # the same tunnel, healthy
        assert "pi: stopped" in tick("/", "stop").stderr
    finally:
        end_pids(pids_with_arg(user.home))
        user.remove()
        subprocess.run(["rm", "-rf", top])
