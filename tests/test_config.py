"""Config and command line: bad input is one line and exit 2, never a traceback.

Also the pure pieces (forward specs, ports, argv building) as input/output tables.
"""

import os
import re
import shutil
import socket
import stat
import tempfile
import subprocess
import sys

import pytest

from harness import (CTUNNEL, ROOT, good_section, install_copy, make_tunnel,
                     run_ctunnel as run)

from ctunnellib import __version__, cli, clients, config, model, procfs
from ctunnellib.clients import dbclient, openssh


BAD_CONFIGS = [
    # (name, config text with {good} for a valid tunnel body, words the line must hold)
    ("malformed", "this is not ini\n", ["malformed config"]),
    ("no section header", "host = x\n", ["malformed config"]),
    ("duplicate section", "[a]\n{good}[a]\n{good}", ["malformed config", "already exists"]),
    ("no tunnels", "[DEFAULT]\nport = 22\n", ["no tunnels"]),
    ("unknown key", "[pi]\n{good}remote_fowrard = 1:a:2\n", ["[pi]", 'unknown key "remote_fowrard"']),
    ("unknown default key", "[DEFAULT]\nprot = 22\n[pi]\n{good}", ["[DEFAULT]", '"prot"']),
    ("missing host", "[pi]\n{good|host}", ["[pi]", "host is missing"]),
    ("host as option", "[pi]\n{good|host=-oProxyCommand=x}", ["host", "not a valid host"]),
    ("bad port", "[pi]\n{good}port = 80a\n", ["[pi]", 'port "80a" is not a port (use 1-65535)']),
    ("port out of range", "[pi]\n{good}port = 70000\n", ['"70000" is not a port']),
    ("bad forward", "[pi]\n{good|remote_forward=1122-127.0.0.1-22}",
     ["remote_forward", '"1122-127.0.0.1-22" is not [bind:]port:host:hostport']),
    ("forward port", "[pi]\n{good}local_forward = 99999:127.0.0.1:22\n",
     ["local_forward", '"99999" is not a port']),
    ("shell in forward", "[pi]\n{good|remote_forward=1122:127.0.0.1:22;reboot}",
     ["remote_forward", "is not [bind:]port:host:hostport"]),
    ("no forward", "[pi]\nhost = h\n", ["no forwards"]),
    ("missing identity", "[pi]\n{good|identity_file=/nonexistent/key}",
     ['identity_file "/nonexistent/key" is not a readable file']),
    ("identity is a dir", "[pi]\n{good|identity_file=/tmp}", ['"/tmp" is not a readable file']),
    ("missing ssh_config", "[pi]\n{good}ssh_config = /nonexistent/cfg\n", ["ssh_config"]),
    ("bad option", "[pi]\n{good}ssh_options = Compression yes\n",
     ["ssh_options", '"Compression yes" is not Key=Value']),
    ("bad timeout", "[pi]\n{good}check_timeout = soon\n", ["check_timeout", "positive"]),
    ("nan timeout", "[pi]\n{good}check_timeout = nan\n", ["check_timeout"]),
    ("bad interval", "[pi]\n{good}server_alive_interval = 0\n", ["server_alive_interval"]),
    ("bad remote_check", "[pi]\n{good}remote_check = maybe\n",
     ["remote_check", '"maybe" is not one of auto, channel, nc, none']),
    ("no ssh", "[pi]\n{good}ssh = /nonexistent/ssh\n", ['ssh "/nonexistent/ssh" not found']),
    ("state_dir under a file", "[pi]\n{good|state_dir=/etc/hostname/sub}",
     ['state_dir "/etc/hostname/sub" cannot be created']),
    ("state_dir too long", "[pi]\n{good|state_dir=/tmp/%s}" % ("d" * 120), ["too long"]),
    ("bad name", "[my tunnel]\n{good}", ['tunnel name "my tunnel"']),
    ("indented key", "[pi]\n{good}port = 22\n  user = pi\n",
     ['port has a second line "user = pi": is it indented by mistake?']),
    ("inline comment", "[pi]\n{good}port = 22 # the default\n",
     ['port "22 # the default" is not a port', "a comment must be on a line of its own"]),
    # what Dropbear's dbclient cannot do
    ("dbclient ssh_config", "[pi]\n{good}ssh = dbclient\nssh_config = /etc/hostname\n",
     ["ssh_config: dbclient reads no ssh_config file"]),
    ("dbclient option", "[pi]\n{good}ssh = dbclient\nssh_options = ServerAliveInterval=5\n",
     ['ssh_options "ServerAliveInterval=5": dbclient knows only DisableTrivialAuth']),
    ("dbclient nc", "[pi]\n{good}ssh = dbclient\nremote_check = nc\n",
     ["remote_check = nc needs OpenSSH's ssh"]),
    ("dbclient hops", "[pi]\n{good|host=a,b}ssh = dbclient\n", ['"," and "/" as hops']),
    ("dbclient IPv6", "[pi]\n{good|remote_forward=[::1]:1122:127.0.0.1:22}ssh = dbclient\n",
     ["IPv4 only"]),
]


@pytest.mark.parametrize("name,text,words", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_one_line_and_exit_2(tmp_path, keyfile, name, text, words):
    conf = tmp_path / "rstunnel.conf"
    m = re.search(r"\{good\|(\w+)(?:=(.*))?\}", text)
    if m:   # {good|key=value}: the valid body with one key replaced (or dropped)
        text = text.replace(m.group(0), good_section(tmp_path, keyfile,
                                                    **{m.group(1): m.group(2)}))
    conf.write_text(text.replace("{good}", good_section(tmp_path, keyfile)))
    result = run("-c", str(conf))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("ctunnel: %s" % conf), lines[0]
    for word in words:
        assert word in lines[0]
    assert not os.path.exists("/tmp/" + "d" * 120)     # a rejected state_dir is not made


def test_missing_config_file(tmp_path):
    result = run("-c", str(tmp_path / "nope.conf"))
    assert result.returncode == 2
    assert result.stderr == "ctunnel: %s: cannot read config: No such file or directory\n" \
        % (tmp_path / "nope.conf")


def test_a_byte_order_mark_is_no_problem(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_bytes(b"\xef\xbb\xbf" + ("[pi]\n" + good_section(tmp_path, keyfile)).encode())
    result = run("-c", str(conf), "-n")
    assert result.returncode == 0, result.stderr


def test_binary_config_file(tmp_path):
    conf = tmp_path / "c"
    conf.write_bytes(b"\xff\xfe\x00garbage")
    result = run("-c", str(conf))
    assert (result.returncode, result.stderr.count("\n")) == (2, 1)
    assert "not a text file" in result.stderr


def test_unreadable_identity_file_as_non_root(tmp_path):
    """Root reads any file, so drop to nobody to see a mode-000 key refused."""
    top = tempfile.mkdtemp(prefix="ctperm", dir="/tmp")   # reachable by nobody
    try:
        os.chmod(top, 0o755)
        key = os.path.join(top, "key")
        with open(key, "w") as f:
            f.write("k")
        os.chmod(key, 0)
        conf = os.path.join(top, "c.conf")
        with open(conf, "w") as f:
            f.write("[pi]\nhost = h\nremote_forward = 1:a:2\nidentity_file = %s\n"
                    "state_dir = /tmp\n" % key)
        os.chmod(conf, 0o644)
        result = run("-c", conf, user=65534 if os.geteuid() == 0 else None)
    finally:
        shutil.rmtree(top)
    assert result.returncode == 2, result.stderr
    assert 'identity_file "%s" is not a readable file' % key in result.stderr


def test_unknown_tunnel_name(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    result = run("-c", str(conf), "status", "cam")
    assert result.returncode == 2
    assert result.stderr == 'ctunnel: no tunnel named "cam" in %s (have: pi; commands: ' \
        'check, status, stop)\n' % conf


@pytest.mark.parametrize("argv,words", [
    (["--bogus"], 'unknown option "--bogus" (see --help)'),
    (["check", "--json"], "--json goes with status"),
    (["-n", "status"], "-n goes with check: it prints what a tick would run"),
    (["-v", "-q"], "-v and -q do not go together"),
    (["-c"], "-c needs a config file"),
])
def test_usage_errors_are_one_line(argv, words):
    result = run(*argv)
    assert (result.returncode, result.stderr) == (2, "ctunnel: %s\n" % words)


def test_options_may_follow_the_command_and_names(tmp_path, keyfile):
    """`status --json NAME` and `status NAME --json` both work, as documented."""
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    for argv in (["status", "--json", "pi"], ["status", "pi", "--json"],
                 ["--json", "status", "pi"]):
        result = run("-c", str(conf), *argv)
        assert result.returncode == 1 and result.stdout.startswith('{\n  "config": "%s"'
                                                                 % conf), argv


def test_usage_errors_exit_2_and_help_exits_0():
    assert run("--bogus").returncode == 2
    assert run("check", "--json").returncode == 2
    helped = run("--help")
    assert helped.returncode == 0 and "exit status:" in helped.stdout
    assert run("--version").stdout.startswith("ctunnel ")


def test_help_lists_every_option_long_and_short_and_the_version_is_readmes():
    helped = run("--help").stdout
    for flag, option in cli.FLAGS.items():
        assert flag in helped, flag
    assert "-c CONF, --config CONF" in helped
    version = run("--version").stdout.strip()
    assert version == "ctunnel %s" % __version__
    with open(os.path.join(ROOT, "README.md")) as f:
        assert "`%s`" % version in f.read()


BAD_SECTIONS = [
    # (what, the section's text past {good}, the one line it gets)
    ("public key", "identity_file = {key}.pub\n",
     'identity_file "{key}.pub" is the public half of a key: name its private key ({key})'),
    ("port in host", "host = 127.0.0.1:36201\n",
     'host "127.0.0.1:36201" names a port: the port goes in a key of its own (host = '
     '127.0.0.1 and port = 36201)'),
]


@pytest.mark.parametrize("what,text,line", BAD_SECTIONS, ids=[b[0] for b in BAD_SECTIONS])
def test_a_mistake_gets_advice_that_is_right(tmp_path, keyfile, what, text, line):
    (tmp_path / "key.pub").write_text("ssh-ed25519 AAAA me@box\n")
    conf = tmp_path / "c.conf"
    body = good_section(tmp_path, keyfile, identity_file=None, host=None)
    conf.write_text("[pi]\n" + body + ("" if "identity" in text else "identity_file = %s\n"
                                        % keyfile) + ("" if "host" in text else
                                                      "host = example.invalid\n") +
                    text.format(key=keyfile))
    result = run("-c", str(conf), "-n")
    assert (result.returncode, result.stderr) == (
        2, "ctunnel: %s [pi]: %s\n" % (conf, line.format(key=keyfile)))


def test_a_key_given_twice_says_how_to_give_several_values(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile) +
                    "remote_forward = 2122:127.0.0.1:22\n")
    result = run("-c", str(conf), "-n")
    assert (result.returncode, result.stderr) == (
        2, "ctunnel: %s: malformed config: line 6: remote_forward is set twice in [pi] (first "
           "on line 3): give it once; several values (forwards, options) go one per line, the "
           "further lines indented\n" % conf)


def test_two_sections_with_one_server_port_are_an_error_naming_both(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[a]\n" + good_section(tmp_path, keyfile) + "[b]\n" +
                    good_section(tmp_path, keyfile, remote_forward="0.0.0.0:1122:127.0.0.1:80") +
                    "[c]\n" + good_section(tmp_path, keyfile, host="other.invalid"))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2
    (line,) = [l for l in result.stderr.splitlines() if "[b]" in l]
    assert line == ("ctunnel: %s [b]: remote_forward 0.0.0.0:1122:127.0.0.1:80: port 1122 on "
                    "example.invalid is [a]'s already (remote_forward 1122:127.0.0.1:22); two "
                    "tunnels cannot both hold it: give one of them another port" % conf)
    assert result.stdout.count("checks over the control socket") == 2     # a and c still run


def test_config_search_order(tmp_path):
    env_conf = str(tmp_path / "env.conf")
    assert config.find_config("/x.conf", environ={"CTUNNEL_CONFIG": env_conf}) == "/x.conf"
    assert config.find_config(None, environ={"CTUNNEL_CONFIG": env_conf}) == env_conf
    beside = tmp_path / "opt"
    beside.mkdir()
    (beside / "rstunnel.conf").write_text("")
    assert config.find_config(None, environ={}, script=str(beside / "ctunnel.py")) == \
        str(beside / "rstunnel.conf")


def test_no_config_anywhere_names_the_places(tmp_path):
    env = {"HOME": str(tmp_path), "PATH": os.environ["PATH"]}
    script = install_copy(str(tmp_path))       # a copy: nothing beside it, no config
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                            env=env, timeout=30)
    if os.path.exists("/etc/ctunnel/rstunnel.conf"):
        pytest.fail("this machine has /etc/ctunnel/rstunnel.conf; the test needs it absent")
    assert result.returncode == 2
    assert "no config found" in result.stderr and "-c FILE" in result.stderr


def test_defaults_are_inherited_and_sections_override(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[DEFAULT]\nhost = vps\nuser = pi\ncheck_timeout = 7\nstate_dir = %s\n"
                    "[a]\nremote_forward = 1122:127.0.0.1:22\n"
                    "[b]\nhost = other\nlocal_forward =\n  8080:127.0.0.1:80\n"
                    "  127.0.0.1:8443:[::1]:443\nssh_options = Compression=yes\n  ConnectionAttempts=2\n"
                    % (tmp_path / "st"))
    a, b = config.load_config(str(conf))
    assert (a.host, a.user, a.check_timeout, b.host) == ("vps", "pi", 7.0, "other")
    assert [f.spec for f in b.forwards] == ["8080:127.0.0.1:80", "127.0.0.1:8443:[::1]:443"]
    assert b.ssh_options == ("Compression=yes", "ConnectionAttempts=2")
    assert not os.path.exists(str(tmp_path / "st"))          # loading makes nothing


def test_status_and_dry_run_make_nothing_and_a_tick_makes_state_dir_0700(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    state = tmp_path / "deep" / "st"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile, state_dir=str(state),
                                           host="127.0.0.1", port="1"))
    for argv in (["-n"], ["status"], ["status", "--json"]):
        result = run("-c", str(conf), *argv)
        assert "Traceback" not in result.stderr, result.stderr
        assert not os.path.exists(str(tmp_path / "deep")), argv
    tick = run("-c", str(conf))
    assert tick.returncode == 1            # nothing listens on port 1
    assert stat.S_IMODE(os.stat(str(state)).st_mode) == 0o700


def test_relative_paths_are_relative_to_the_config_file(tmp_path):
    """cron runs in HOME, a user by hand anywhere: both must mean the same files."""
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "k").write_text("k")
    (tmp_path / "etc").mkdir()
    conf = tmp_path / "etc" / "c.conf"
    conf.write_text("[pi]\nhost = h\nremote_forward = 1122:127.0.0.1:22\n"
                    "identity_file = ../keys/k\nstate_dir = st\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    result = run("-c", str(conf), "-n", cwd=str(elsewhere))
    assert result.returncode == 0, result.stderr
    assert "-i %s" % (tmp_path / "keys" / "k") in result.stdout
    assert "-S %s" % (tmp_path / "etc" / "st" / "pi.ctl") in result.stdout


def test_control_socket_length_counts_what_ssh_adds(tmp_path, keyfile):
    """ssh binds NAME.ctl plus 17 bytes first: a 95-byte path must be refused."""
    room = config.SOCKET_PATH_MAX - len("/pi.ctl") - 10
    state = "/tmp/" + "d" * (room - len("/tmp/"))
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile, state_dir=state))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 2 and "the 17 bytes ssh adds" in result.stderr


@pytest.mark.parametrize("spec,expected", [
    ("1122:127.0.0.1:22", ("", 1122, "127.0.0.1", 22)),
    ("0.0.0.0:8080:localhost:80", ("0.0.0.0", 8080, "localhost", 80)),
    ("*:8080:cam.lan:80", ("*", 8080, "cam.lan", 80)),
    ("[::1]:2222:[fe80::1]:22", ("[::1]", 2222, "[fe80::1]", 22)),
    (" 1122:127.0.0.1:22 ", ("", 1122, "127.0.0.1", 22)),
])
def test_parse_forward_accepts(spec, expected):
    f = config.parse_forward(spec)
    assert (f.bind, f.port, f.host, f.hostport) == expected


@pytest.mark.parametrize("spec", ["1122", "1122:22", "a:b:c:d", "0:127.0.0.1:22",
                                  "1122:127.0.0.1:65536", "1122:127.0.0.1:22 ; id",
                                  "$(id):1122:h:22", "1122:h:22:33:44", ""])
def test_parse_forward_rejects(spec):
    with pytest.raises(ValueError):
        config.parse_forward(spec)


@pytest.mark.parametrize("bind,address", [("", "127.0.0.1"), ("*", "127.0.0.1"),
                                          ("0.0.0.0", "127.0.0.1"),
                                          ("localhost", "127.0.0.1"), ("[::]", "::1"),
                                          ("10.0.0.5", "10.0.0.5"), ("[::1]", "::1")])
def test_check_address(bind, address):
    spec = ("%s:1122:h:22" % bind) if bind else "1122:h:22"
    assert model.check_address(config.parse_forward(spec)) == address


def test_launch_argv_keeps_our_options_first_and_never_a_shell(tmp_path):
    t = make_tunnel(tmp_path, user="pi", port=2222, identity_file="/k",
                    ssh_options=("ExitOnForwardFailure=no", "Compression=yes"),
                    local_forward=(config.parse_forward("8080:127.0.0.1:80", "L"),))
    argv = openssh.build_launch_argv(t)
    assert argv[:3] == ["/usr/bin/ssh", "-f", "-N"]
    # ssh takes the first value of an option: ours come before the user's
    assert argv.index("ExitOnForwardFailure=yes") < argv.index("ExitOnForwardFailure=no")
    assert "BatchMode=yes" in argv and "StrictHostKeyChecking=no" not in argv
    assert argv[-2:] == ["--", "vps"]
    # a forward without a bind address is sent with 127.0.0.1, never "localhost"
    assert ["-R", "127.0.0.1:1122:127.0.0.1:22"] == argv[argv.index("-R"):argv.index("-R") + 2]
    assert ["-L", "127.0.0.1:8080:127.0.0.1:80"] == argv[argv.index("-L"):argv.index("-L") + 2]
    assert ["-p", "2222", "-l", "pi"] == argv[argv.index("-p"):argv.index("-p") + 4]


def test_mux_argv_cannot_fall_back_to_a_new_connection(tmp_path):
    t = make_tunnel(tmp_path)
    argv = openssh.build_mux_argv(t, "nc", "-z", "127.0.0.1", "1122")
    assert "ProxyCommand=false" in argv
    assert argv[argv.index("-S") + 1] == str(tmp_path / "pi.ctl")
    assert argv[-6:] == ["--", "vps", "nc", "-z", "127.0.0.1", "1122"]
    assert openssh.remote_check_command(t.forwards[0], t.check_timeout) == \
        ["nc", "-z", "-w", "4", "--", "127.0.0.1", "1122"]


@pytest.mark.parametrize("spec,arg", [
    ("1122:127.0.0.1:22", "127.0.0.1:1122:127.0.0.1:22"),
    ("*:8080:cam.lan:80", "*:8080:cam.lan:80"),
    ("localhost:1122:h:22", "localhost:1122:h:22"),          # said by the user: kept
    ("[::1]:2222:[fe80::1]:22", "[::1]:2222:[fe80::1]:22"),
])
def test_forward_arg_always_names_a_bind_address(spec, arg):
    assert model.forward_arg(config.parse_forward(spec)) == arg


def test_nc_fallback_is_quoted_for_the_servers_shell():
    fwd = config.parse_forward("*:1122:h:22")
    assert openssh.remote_nc_command(fwd, 5) == \
        "echo ctunnel-nc; nc -z -w 4 -- 127.0.0.1 1122 2>&1; echo ctunnel-nc=$?"
    fwd = config.parse_forward("[::1]:1122:h:22")
    assert "-- ::1 1122 2>&1" in openssh.remote_nc_command(fwd, 5)


def test_dry_run_prints_commands_and_runs_nothing(tmp_path, keyfile):
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    result = run("-c", str(conf), "-n")
    assert result.returncode == 0 and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "# pi: checks over the control socket %s (no program run)" \
        % (tmp_path / "st" / "pi.ctl")
    assert lines[1].startswith("# if the server forbids channels: ")
    assert lines[1].endswith("-- example.invalid 'echo ctunnel-nc; nc -z -w 4 -- 127.0.0.1 1122 "
                             "2>&1; echo ctunnel-nc=$?'")
    assert lines[2] == "# if a check fails:"
    assert "ExitOnForwardFailure=yes" in lines[3] and len(lines) == 4
    assert not os.path.exists(str(tmp_path / "st" / "pi.pid"))
    assert not os.path.exists(str(tmp_path / "st" / "pi.log"))


def test_process_identity_is_the_control_socket_in_argv(tmp_path):
    """Only a live ssh whose argv names this tunnel's control socket is ours.

    Every process is exec'd before Popen returns (it waits on the exec), so
    nothing here races; each negative case fails if the identity check goes.
    """
    t = make_tunnel(tmp_path)
    ctl = str(tmp_path / "pi.ctl")
    silent = socket.socket()                    # a server that never says its banner
    silent.bind(("127.0.0.1", 0))
    silent.listen(4)
    ssh = ["/usr/bin/ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "ConnectTimeout=60",
           "-p", str(silent.getsockname()[1])]
    ours = subprocess.Popen(ssh + ["-S", ctl, "-M", "-N", "127.0.0.1"],
                            stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    other_ctl = subprocess.Popen(ssh + ["-S", ctl + "x", "-M", "-N", "127.0.0.1"],
                                 stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    not_ssh = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)",
                                "-S", ctl])                   # our path, but not ssh
    try:
        assert clients.is_tunnel_process(ours.pid, t)
        assert not clients.is_tunnel_process(other_ctl.pid, t)     # ssh, but not our socket
        assert not clients.is_tunnel_process(not_ssh.pid, t)
        assert not clients.is_tunnel_process(os.getpid(), t)
        assert all(procfs.process_alive(p.pid) for p in (ours, other_ctl, not_ssh))
    finally:
        for p in (ours, other_ctl, not_ssh):
            p.kill()
            p.wait()
        silent.close()
    assert not procfs.process_alive(ours.pid)
    assert not clients.is_tunnel_process(ours.pid, t)


def test_example_config_is_valid():
    """rstunnel.conf.example parses once its key exists ("~" stands for a temp home:
    ctunnel takes ~ from the password database, so HOME cannot move it)."""
    home = tempfile.mkdtemp(prefix="cth", dir="/tmp")     # short: the socket path counts
    try:
        os.makedirs(os.path.join(home, ".ssh"))
        with open(os.path.join(home, ".ssh", "ctunnel_ed25519"), "w") as f:
            f.write("k")
        example = os.path.join(os.path.dirname(CTUNNEL), "rstunnel.conf.example")
        copy = os.path.join(home, "example.conf")
        with open(example) as src, open(copy, "w") as dst:
            dst.write(src.read().replace("~/", home + "/"))
        result = run("-c", copy, "-n")
    finally:
        shutil.rmtree(home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("checks over the control socket") == 2    # the two tunnels
    assert "-R 127.0.0.1:8080:192.168.1.20:80 -R 127.0.0.1:8554:192.168.1.20:554 " \
        "-L 127.0.0.1:1883:127.0.0.1:1883" in result.stdout
    assert "-p 2222" in result.stdout


def test_status_and_stop_without_their_state_dir_say_so_in_one_line(tmp_path, keyfile):
    """The state_dir vanishes between loading and acting (a tmp cleaner): no traceback."""
    conf = tmp_path / "c.conf"
    conf.write_text("[pi]\n" + good_section(tmp_path, keyfile))
    hook = ("import os, runpy, sys; real = os.open\n"
            "def gone(path, *a, **k):\n"
            "    if str(path).endswith('.lock'): raise FileNotFoundError(2, 'No such file "
            "or directory', path)\n"
            "    return real(path, *a, **k)\n"
            "os.open = gone; sys.argv = sys.argv[1:]\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", hook, CTUNNEL, "-c", str(conf), "stop"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("ctunnel: [Errno 2] No such file or directory") and "pi.lock" in line


@pytest.mark.parametrize("path,kind", [("/usr/bin/ssh", "openssh"), ("/usr/bin/dbclient", "dbclient"),
                                       ("/usr/sbin/dropbearmulti", "dbclient")])
def test_the_client_is_told_by_its_name(path, kind):
    assert clients.kind_of(path) == kind


def test_dbclient_argv_puts_a_loopback_after_the_forwards(tmp_path):
    t = make_tunnel(tmp_path, client="dbclient", port=2222, user="pi", identity_file="/k",
                    local_forward=(config.parse_forward("8080:10.0.0.9:80", "L"),))
    assert dbclient.build_argv(t, [40001]) == [
        "/usr/bin/ssh", "-p", "2222", "-l", "pi", "-i", "/k", "-N", "-T", "-K", "10",
        "-o", "ExitOnForwardFailure=yes", "-R", "127.0.0.1:1122:127.0.0.1:22",
        "-L", "127.0.0.1:8080:10.0.0.9:80", "-L", "127.0.0.1:40001:127.0.0.1:1122", "vps"]
    assert "--" not in dbclient.build_argv(t, [1])      # dbclient takes no --
