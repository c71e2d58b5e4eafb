"""pytest fixtures over the harness (tests/harness.py): servers, services, rigs."""

import os
import shutil
import tempfile

import pytest

from harness import Rig, Service, SshServer, end_pids, pids_with_arg


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
