"""pytest fixtures over the harness (tests/harness.py): servers, services, rigs."""

import os
import shutil
import subprocess
import tempfile

import pytest

from harness import Rig, Service, SshServer, ThrowawayUser, end_pids, pids_with_arg


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    server = SshServer(str(tmp_path_factory.mktemp("sshd")))
    yield server
    server.stop()


@pytest.fixture(scope="session")
def sshd_without_nc(tmp_path_factory):
    """A server where every command runs with a PATH that has no nc."""
    server = SshServer(str(tmp_path_factory.mktemp("sshd-nonc")), session_path="/nonexistent")
    yield server
    server.stop()


@pytest.fixture
def make_user_server():
    """make(**kw): a real sshd whose login is an ordinary throwaway user, as on most
    VPSes (not root, which sees every session). All are stopped after the test."""
    made = []

    def make(**kw):
        top = tempfile.mkdtemp(prefix="ctu", dir="/tmp")
        os.chmod(top, 0o755)                # sshd reads authorized_keys as that user
        user = ThrowawayUser(os.path.join(top, "home"))
        os.makedirs(os.path.join(top, "sshd"))
        made.append((top, user, None))
        server = SshServer(os.path.join(top, "sshd"), user=user.name, **kw)
        server.account = user
        made[-1] = (top, user, server)
        return server
    yield make
    for top, user, server in made:
        if server:
            server.stop()
        user.remove()
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
def firewall():
    """drop(*match) adds an INPUT DROP rule on loopback; lift(rule) removes it."""
    rules = []

    def drop(*match):
        rule = ["-i", "lo", "-p", "tcp"] + list(match) + \
            ["-m", "comment", "--comment", "ctunnel-test-%d" % os.getpid(), "-j", "DROP"]
        subprocess.run(["iptables", "-w", "-I", "INPUT"] + rule, check=True)
        rules.append(rule)
        return rule

    def lift(rule):
        subprocess.run(["iptables", "-w", "-D", "INPUT"] + rule, check=True)
        rules.remove(rule)
    yield drop, lift
    for rule in rules:
        subprocess.run(["iptables", "-w", "-D", "INPUT"] + rule)


@pytest.fixture
def full_disk():
    """A tmpfs of 256 KB, filled: the state_dir of the test. Unmounted after."""
    mount = tempfile.mkdtemp(prefix="ctf", dir="/tmp")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", mount],
                   check=True)
    try:
        state = os.path.join(mount, "st")
        os.makedirs(state, mode=0o700)
        yield mount, state
    finally:
        end_pids(pids_with_arg(mount))      # the tunnel's ssh, before its dir goes
        subprocess.run(["umount", "-l", mount], check=True)
        os.rmdir(mount)


@pytest.fixture
def keyfile(tmp_path):
    """A file that stands for a key (the config only needs it readable)."""
    key = tmp_path / "key"
    key.write_text("not really a key\n")
    return str(key)


@pytest.fixture
def service():
    svc = Service(b"hello from the box %d\n" % os.getpid())
    yield svc
    svc.close()


@pytest.fixture
def silent_service():
    svc = Service(None)
    yield svc
    svc.close()


@pytest.fixture
def make_rig():
    """Make rigs on a server; end every ssh they launched afterwards."""
    rigs = []

    def make(server):
        # short path: the control socket must stay under ~104 bytes
        rig = Rig(server, tempfile.mkdtemp(prefix="ct", dir="/tmp"))
        rigs.append(rig)
        return rig

    yield make
    for rig in rigs:
        end_pids(pids_with_arg(rig.state_dir))
        shutil.rmtree(rig.state_dir, ignore_errors=True)


@pytest.fixture
def rig(sshd, make_rig):
    return make_rig(sshd)


# --- the real HOME stays untouched ---------------------------------------------

WATCHED = ("~/.local/state/ctunnel", "~/.config/ctunnel", "~/.ssh")


def _home_snapshot():
    snapshot = {}
    for path in map(os.path.expanduser, WATCHED):
        for top, dirs, files in os.walk(path):
            for name in [top] + [os.path.join(top, f) for f in files]:
                try:
                    snapshot[name] = os.stat(name).st_mtime_ns
                except OSError:
                    pass
    return snapshot


@pytest.fixture(scope="session", autouse=True)
def real_home_untouched():
    """Tests write only in their own temp dirs: fail the run if they changed HOME."""
    before = _home_snapshot()
    yield
    after = _home_snapshot()
    assert after == before, "the tests changed the real HOME: %s" % sorted(
        set(after.items()) ^ set(before.items()))
