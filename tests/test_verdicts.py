"""The remote check's exit-status table, with a fake ssh (pure logic).

Each row is what the mux client exits with and says on stderr; the real
cases are proven end to end in test_tick.py, these cover the rest.
"""

import os
import stat
import sys

import pytest

from test_config import ctunnel, make_tunnel

FAKE_SSH = """#!/bin/sh
# exits and speaks as told by the files beside it
[ -f "$0.sleep" ] && sleep "$(cat "$0.sleep")"
cat "$0.stderr" >&2
exit "$(cat "$0.rc")"
"""


@pytest.fixture
def fake_ssh(tmp_path):
    path = tmp_path / "ssh"
    path.write_text(FAKE_SSH)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)

    def behave(rc, stderr="", sleep=None):
        (tmp_path / "ssh.rc").write_text(str(rc))
        (tmp_path / "ssh.stderr").write_text(stderr)
        if sleep:
            (tmp_path / "ssh.sleep").write_text(str(sleep))
        return make_tunnel(tmp_path, ssh=str(path), check_timeout=1.0)
    return behave


@pytest.mark.parametrize("rc,stderr,state,detail", [
    (0, "", "UP", "listening on server"),
    (1, "", "DOWN", "no listener on server"),
    (124, "", "DOWN", "check timed out on the server"),
    (127, "sh: 1: nc: not found", "UNKNOWN", "cannot check: no nc on the server"),
    (126, "nc: Permission denied", "UNKNOWN", "cannot check: no nc on the server"),
    (255, "mux_client_request_session: session request failed", "DOWN",
     "ssh failed: mux_client_request_session: session request failed"),
    (255, "channel 1: open failed: administratively prohibited", "UNKNOWN",
     "cannot check: the server refuses command sessions (channel 1: open failed"),
    (255, "Control socket connect(/x/pi.ctl): Connection refused\n"
          "kex_exchange_identification: Connection closed by remote host\n"
          "Connection closed by UNKNOWN port 65535", "DOWN",
     "ssh failed: Control socket connect(/x/pi.ctl): Connection refused"),
    (1, "nc: invalid option -- 'z'\nusage: nc [OPTIONS] HOST PORT", "UNKNOWN",
     "cannot check: server answered exit 1: usage: nc [OPTIONS] HOST PORT"),
    (2, "", "UNKNOWN", "cannot check: server answered exit 2"),
])
def test_remote_check_exit_statuses(fake_ssh, rc, stderr, state, detail):
    tunnel = fake_ssh(rc, stderr)
    verdict = ctunnel.check_remote_forward(tunnel, tunnel.forwards[0])
    assert verdict.state == state
    assert verdict.detail.startswith(detail), verdict.detail


def test_remote_check_that_hangs_is_down_after_check_timeout(fake_ssh):
    tunnel = fake_ssh(0, sleep=5)
    verdict = ctunnel.check_remote_forward(tunnel, tunnel.forwards[0])
    assert (verdict.state, verdict.detail) == ("DOWN",
                                               "check hung for 1s: the connection is dead")


def test_master_check_verdicts(fake_ssh):
    up = fake_ssh(0, "Master running (pid=4242)\n")
    assert ctunnel.check_master(up) == ctunnel.Verdict("master", "UP", "pid 4242")
    gone = fake_ssh(255, "Control socket connect(/x/pi.ctl): No such file or directory\n")
    assert ctunnel.check_master(gone) == ctunnel.Verdict(
        "master", "DOWN", "control master: Control socket connect(/x/pi.ctl): "
                          "No such file or directory")


@pytest.mark.parametrize("said,hint", [
    ("Error: remote port forwarding failed for listen port 1122", "stale session"),
    ("root@vps: Permission denied (publickey).", "check identity_file"),
    ("Host key verification failed.", "known_hosts"),
    ("ssh: Could not resolve hostname vps: Name or service not known", "check host"),
    ("kex_exchange_identification: read: Connection reset by peer", None),
])
def test_launch_failures_get_a_hint(said, hint):
    text = ctunnel.explain_ssh_failure(said, 255)
    assert text.startswith(said)
    assert (hint in text) if hint else text == said
    assert ctunnel.explain_ssh_failure("", 255) == "ssh exited 255 without a message"


def test_a_tick_that_cannot_use_its_state_dir_says_so_in_one_line(tmp_path, capsys):
    gone = make_tunnel(tmp_path / "vanished")          # state_dir removed after loading
    reporter = ctunnel.Reporter(stream=sys.stderr, syslog_path=str(tmp_path / "nolog"))
    args = ctunnel.parse_args([])
    assert ctunnel.cmd_check([gone], args, reporter) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "pi: [Errno 2] No such file or directory" in err[0]
