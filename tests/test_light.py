"""ctunnel.py runs on OpenWrt's python3-light, which leaves out whole packages.

A real tick runs in a subprocess whose import system refuses every package
python3-light does not ship; the tick must still bring the tunnel up.
"""

import ast
import subprocess
import sys

from conftest import CTUNNEL, connect_read, free_port

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


def test_source_is_python_3_7_syntax():
    for path in (CTUNNEL, CTUNNEL.replace("ctunnel.py", "install.py")):
        ast.parse(open(path).read(), filename=path, feature_version=(3, 7))


def test_python_3_7_is_enough_for_every_module_and_call():
    """vermin reads which modules, functions and arguments each line needs."""
    paths = [CTUNNEL, CTUNNEL.replace("ctunnel.py", "install.py")]
    vermin = [sys.executable, "-c", "import sys, vermin; sys.exit(vermin.main())"]
    result = subprocess.run(vermin + ["--no-tips", "--violations", "-t=3.7-"] + paths,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    summary = subprocess.run(vermin + ["--no-tips"] + paths, capture_output=True, text=True,
                             timeout=120).stdout
    assert "Minimum required versions: 3.7" in summary, summary


def test_install_py_starts_without_the_missing_packages():
    hook = HOOK.replace(repr(CTUNNEL), repr(CTUNNEL.replace("ctunnel.py", "install.py")))
    result = subprocess.run([sys.executable, "-c", hook, "--yes"], capture_output=True,
                            text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "install.py: missing answer: ssh server" in result.stderr
