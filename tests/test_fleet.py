"""For the owner of many boxes: the on_event hook, the metrics file, and the login storm
after a server restart. End to end against a real sshd; the metrics are read by
prometheus_client's own parser and served by a real node_exporter.
"""

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest

from harness import (SshServer, connect_read, ctunnel_argv, fill, free_port,
                     pid_alive, wait_for)

HOOK = """#!/bin/sh
# appends what it was told, one JSON line per event
exec %s -c 'import json, os, sys
keys = [k for k in os.environ if k.startswith("CTUNNEL_")]
with open(sys.argv[1], "a") as f:
    f.write(json.dumps({k: os.environ[k] for k in keys}) + "\\n")' %s
"""


@pytest.fixture
def hook_dir():
    """A folder for hooks, as an owner would keep them (not shared, not others')."""
    folder = tempfile.mkdtemp(prefix="cth", dir="/tmp")
    os.chmod(folder, 0o755)
    yield folder
    shutil.rmtree(folder)


def write_hook(folder, text, name="hook"):
    path = os.path.join(folder, name)
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o755)
    return path


def told(path):
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f]


# --- the hook ------------------------------------------------------------------------

def test_a_hook_hears_each_kind_of_event_once_with_its_facts(rig, service, hook_dir):
    log = os.path.join(hook_dir, "told.jsonl")
    hook = write_hook(hook_dir, HOOK % (sys.executable, log))
    remote, _ = rig.start_reverse(service, on_event=hook)
    first = rig.pid()
    os.kill(first, signal.SIGKILL)                               # restarted
    wait_for(lambda: not pid_alive(first), what="ssh to die")
    assert rig.run().returncode == 0
    second = rig.pid()
    other = _listener(free_port())                               # config changed
    target = other.getsockname()[1]
    rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, target), on_event=hook)
    assert rig.run().returncode == 0
    other.close()                                                # target down, then back
    assert rig.run().returncode == 0
    other = wait_for(lambda: _listener(target), what="the target's port")
    try:
        assert rig.run().returncode == 0
        os.kill(rig.pid(), signal.SIGKILL)                       # failed: the port is held
        squatter = wait_for(lambda: _listener(remote), what="the server to let the port go")
        try:
            assert rig.run().returncode == 1
        finally:
            squatter.close()
        assert rig.run().returncode == 0                         # back after 1 attempt
        assert rig.run("stop").returncode == 0                   # stopped
    finally:
        other.close()
    events = told(log)
    kinds = [e["CTUNNEL_EVENT"] for e in events]
    assert kinds == ["started", "restarted", "config-changed", "target-down", "target-back",
                     "port-held", "back", "stopped"], kinds
    for event in events:
        assert event["CTUNNEL_TUNNEL"] == "pi" and event["CTUNNEL_HOST"] == "127.0.0.1"
        assert event["CTUNNEL_CONFIG"] == rig.conf and event["CTUNNEL_LINE"].startswith("pi: ")
    by = {e["CTUNNEL_EVENT"]: e for e in events}
    assert by["started"]["CTUNNEL_PID"] == str(first)
    assert by["restarted"]["CTUNNEL_PID"] == str(second)
    assert by["restarted"]["CTUNNEL_REASON"] == "process %d gone" % first
    assert by["config-changed"]["CTUNNEL_REASON"] == "config changed (remote_forward)"
    assert by["port-held"]["CTUNNEL_REASON"].startswith(
        "Error: remote port forwarding failed for listen port %d" % remote)
    assert by["back"]["CTUNNEL_ATTEMPTS"] == "1"
    assert by["target-down"]["CTUNNEL_FORWARDS"] == "-R %d:127.0.0.1:%d" % (remote, target)


def _listener(port):
    """A socket listening on 127.0.0.1:port (accepting nothing: the kernel completes the
    handshakes), or None while the port is taken."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(("127.0.0.1", port))
        sock.listen(1)
        return sock
    except OSError:
        sock.close()
        return None


def test_a_hook_that_hangs_is_killed_and_delays_no_tunnel(rig, service, hook_dir):
    hangs = write_hook(hook_dir, "#!/bin/sh\nsleep 600\n", "hangs")
    ports = [free_port(), free_port()]
    with open(rig.conf, "w") as f:
        f.write("[DEFAULT]\nhost = 127.0.0.1\nport = %d\nuser = %s\nidentity_file = %s\n"
                "ssh_config = %s\nstate_dir = %s\n"
                % (rig.server.port, rig.server.user, rig.server.user_key,
                   rig.server.ssh_config, os.path.join(rig.state_dir, "state")))
        f.write("[a]\non_event = %s\nremote_forward = %d:127.0.0.1:%d\n" % (hangs, ports[0],
                                                                           service.port))
        f.write("[b]\nremote_forward = %d:127.0.0.1:%d\n" % (ports[1], service.port))
    began = time.monotonic()
    tick = subprocess.Popen(ctunnel_argv("-c", rig.conf), stdin=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    seen = []
    while len([l for l in seen if "started" in l]) < 2:     # both tunnels up, and said
        seen.append(tick.stderr.readline())
        assert seen[-1], seen
    assert time.monotonic() - began < 8
    rest = tick.stderr.read()
    tick.wait(30)
    took = time.monotonic() - began
    assert "a: on_event %s (started) did not end within 10s: killed" % hangs in rest, rest
    assert 10 <= took < 20
    assert [p for p in _pids_of(hangs)] == []                 # killed, with its session
    for port in ports:
        assert connect_read(port) == service.greeting


def _pids_of(program):
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                if program.encode() in f.read():
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


def test_a_hook_others_may_write_is_refused(rig, hook_dir):
    hook = write_hook(hook_dir, "#!/bin/sh\n")
    os.chmod(hook, 0o775)
    rig.write_config(remote_forward="1122:127.0.0.1:22", on_event=hook)
    result = rig.run()
    assert result.returncode == 2
    assert result.stderr == 'ctunnel: %s [pi]: on_event "%s": group or others may write it ' \
        '(chmod go-w %s)\n' % (rig.conf, hook, hook)


# --- the metrics -------------------------------------------------------------------

def parse_metrics(path):
    from prometheus_client.parser import text_string_to_metric_families
    with open(path) as f:
        return {family.name: family for family in text_string_to_metric_families(f.read())}


def sample(families, name, **labels):
    family = families[name.replace("_total", "")] if name.endswith("_total") else \
        families[name]
    for s in family.samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError("no %s%s" % (name, labels))


def test_the_metrics_file_parses_is_typed_and_its_counters_never_go_down(rig, service,
                                                                        tmp_path):
    metrics = str(tmp_path / "ctunnel.prom")
    remote, _ = rig.start_reverse(service, metrics_file=metrics)
    families = parse_metrics(metrics)
    assert stat.S_IMODE(os.stat(metrics).st_mode) == 0o644    # node_exporter reads it
    for family in families.values():
        assert family.type in ("gauge", "counter") and family.documentation
    assert sample(families, "ctunnel_up", tunnel="pi") == 1
    assert sample(families, "ctunnel_check", tunnel="pi", check="remote forward %d" % remote,
                  verdict="UP") == 1
    assert 0 < sample(families, "ctunnel_forward_proof_seconds", tunnel="pi") < 5
    assert sample(families, "ctunnel_last_restart_reason", tunnel="pi",
                  reason="first_start") == 1
    counters = []
    for step in ("healthy", "killed", "healthy", "down", "healthy"):
        if step == "killed":
            os.kill(rig.pid(), signal.SIGKILL)
        if step == "down":                      # a failed launch: a failure is counted
            os.kill(rig.pid(), signal.SIGKILL)
            rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                             metrics_file=metrics, port="1")
        elif step == "healthy":
            rig.write_config(remote_forward="%d:127.0.0.1:%d" % (remote, service.port),
                             metrics_file=metrics)
        rig.run()
        families = parse_metrics(metrics)
        counters.append((sample(families, "ctunnel_restarts_total", tunnel="pi"),
                         sample(families, "ctunnel_failures_total", tunnel="pi")))
        assert sample(families, "ctunnel_up", tunnel="pi") == (0 if step == "down" else 1)
    assert counters == sorted(counters) and counters[-1][0] >= 2 and counters[-1][1] >= 1, \
        counters


def test_node_exporter_serves_the_metrics(rig, service):
    folder = tempfile.mkdtemp(prefix="ctn", dir="/tmp")
    os.chmod(folder, 0o755)
    port = free_port()
    exporter = subprocess.Popen(
        ["prometheus-node-exporter", "--web.listen-address=127.0.0.1:%d" % port,
         "--collector.disable-defaults", "--collector.textfile",
         "--collector.textfile.directory=%s" % folder],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        rig.start_reverse(service, metrics_file=os.path.join(folder, "ctunnel.prom"))

        def page():
            try:
                with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port,
                                            timeout=2) as r:
                    return r.read().decode()
            except OSError:
                return ""
        text = wait_for(lambda: "ctunnel_up" in page() and page(), what="node_exporter")
        assert 'ctunnel_up{tunnel="pi"} 1' in text
        assert "node_textfile_scrape_error 0" in text
    finally:
        exporter.kill()
        exporter.wait()
        shutil.rmtree(folder)


def test_a_tick_that_cannot_write_the_metrics_leaves_the_last_file_whole(rig, service,
                                                                        full_disk):
    mount, _ = full_disk
    metrics = os.path.join(mount, "ctunnel.prom")
    remote, _ = rig.start_reverse(service, metrics_file=metrics)
    before = open(metrics).read()
    fill(mount)
    tick = rig.run()
    assert tick.returncode == 0
    assert tick.stderr.strip().endswith("ctunnel: cannot write the metrics file %s: No space "
                                        "left on device" % metrics), tick.stderr
    assert open(metrics).read() == before
    assert sorted(os.listdir(mount)) == ["ctunnel.prom", "filler", "st"]


# --- the login storm -----------------------------------------------------------------

def test_logins_the_server_drops_are_tried_again_in_the_same_tick(make_rig, service, tmp_path):
    """sshd lets one unauthenticated login in at a time (MaxStartups 1:100:1), and a
    client that never logs in holds that place: every box's login is dropped before
    authentication, as when a fleet comes back together after a server restart. When
    it lets go, each box is up within the same tick, and cron mails one line each."""
    server = SshServer(str(tmp_path), extra=["MaxStartups 1:100:1"])
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(str(tmp_path / "log"))
    blocker = wait_for(lambda: _unauthenticated(server.port), what="a place at the server")
    try:
        rigs = [make_rig(server) for _ in range(4)]
        for rig in rigs:
            rig.write_config(remote_forward="%d:127.0.0.1:%d" % (free_port(), service.port))
        env = dict(os.environ, CTUNNEL_SYSLOG=str(tmp_path / "log"))
        ticks = [subprocess.Popen(ctunnel_argv("-c", rig.conf), stdin=subprocess.DEVNULL,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=env) for rig in rigs]
        wait_for(lambda: open(server.log).read().count("past MaxStartups") >= 4,
                 what="the server to drop the boxes' logins")
        blocker.close()
        results = [(t.wait(60), t.stderr.read()) for t in ticks]
        for t in ticks:
            t.stdout.close()
            t.stderr.close()
        for rc, err in results:
            assert rc == 0, err
            lines = err.splitlines()
            assert len(lines) == 1 and "pi: started" in lines[0], err
        sink.settimeout(1)
        heard = []
        while True:
            try:
                heard.append(sink.recv(4096).decode())
            except socket.timeout:
                break
        assert any("the server dropped the connection before the login" in line and
                   "MaxStartups" in line and "trying again" in line for line in heard), heard
    finally:
        blocker.close()
        sink.close()
        server.stop()


def _unauthenticated(port):
    """A connection to sshd that got its banner and stays short of the login (or None
    while sshd still drops new ones: its readiness probe may hold the place)."""
    sock = socket.create_connection(("127.0.0.1", port))
    if sock.recv(64).startswith(b"SSH-"):
        return sock
    sock.close()
    return None
