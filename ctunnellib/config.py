"""The config: where it is, whether to trust it, and its keys, each parsed and checked.

One table (KEYS) says everything about a key: its default, its parser and
how its text is taken. The defaults, the known keys and the fields of a
Tunnel are built from it: a new key is one row (and its lines in README.md
and rstunnel.conf.example).

The ini file is read here, without configparser: a tick reads it every
minute, and configparser with the re module it needs costs more than the
rest of a healthy tick. It reads what configparser reads (strict, no
interpolation): sections, [DEFAULT], key = value or key: value, indented
continuation lines, # and ; comments on lines of their own.
"""

import os
import stat

from . import clients
from .model import ConfigError, Forward, check_address, expand_home, record
from .statefiles import untrusted

CONFIG_NAME = "rstunnel.conf"
CONFIG_ENV = "CTUNNEL_CONFIG"
CONFIG_MAX = 1 << 20        # bytes a config may have
SOCKET_PATH_MAX = 104       # sun_path is 104-108 bytes depending on the OS
CTL_TEMP_SUFFIX = 17        # ssh binds NAME.ctl.XXXXXXXXXXXXXXXX first, then renames it
REMOTE_CHECKS = ("auto", "channel", "nc", "none")

_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_NAME_CHARS = frozenset(_LETTERS + "0123456789_.-")
_ADDRESS_CHARS = frozenset(_LETTERS + "0123456789_.*-")
_IPV6_CHARS = frozenset("0123456789ABCDEFabcdef:.")
_HOST_FORBIDDEN = frozenset("@'\"\\;|&$`")


# ---------------------------------------------------------------------------
# Values: each parser takes the stripped text and returns it checked, or
# raises ValueError with the problem ("is missing ...", '"x" is not ...')
# ---------------------------------------------------------------------------

def parse_port(text):
    """Return text as a TCP port number 1-65535, or raise ValueError."""
    text = str(text).strip()
    if not _is_number(text) or not 1 <= int(text) <= 65535:
        raise ValueError('"%s" is not a port (use 1-65535)' % text)
    return int(text)


def parse_forward(spec, kind="R"):
    """Parse "[bind:]port:host:hostport" into a Forward.

    kind is "R" (remote, -R) or "L" (local, -L). Addresses are names, IPv4,
    "*" or a bracketed IPv6. The character set is kept strict on purpose:
    a bind address ends up in the command line of the nc fallback.
    """
    spec = spec.strip()
    parts = _split_outside_brackets(spec)
    if len(parts) == 3:
        parts.insert(0, "")
    bind, port, host, hostport = parts if len(parts) == 4 else ("", "", "", "")
    if (bind and not _is_address(bind)) or not _is_address(host) or \
            not _is_number(port) or not _is_number(hostport):
        raise ValueError('"%s" is not [bind:]port:host:hostport' % spec)
    return Forward(kind, bind, parse_port(port), host, parse_port(hostport), spec)


def _split_outside_brackets(spec):
    parts, current, inside = [], "", False
    for char in spec:
        if char == ":" and not inside:
            parts.append(current)
            current = ""
            continue
        current += char
        inside = (inside or char == "[") and char != "]"
    return parts + [current]


def _is_number(text):
    return text.isdigit() and text.isascii()


def _is_address(text):
    if text.startswith("[") and text.endswith("]"):
        return len(text) > 2 and set(text[1:-1]) <= _IPV6_CHARS
    return bool(text) and set(text) <= _ADDRESS_CHARS


def parse_host(text, what="host"):
    """Return text as an ssh destination (or user) name, or raise ValueError.

    It becomes an argv element of ssh, so it may not look like an option.
    """
    text = text.strip()
    if not text or text.startswith("-") or \
            any(c.isspace() or c in _HOST_FORBIDDEN for c in text):
        raise ValueError('"%s" is not a valid %s name' % (text, what))
    return text


def parse_tunnel_name(text):
    """Return text as a tunnel name (it names files in state_dir), or raise ValueError."""
    text = text.strip()
    if not text or text[0] in ".-" or not set(text) <= _NAME_CHARS:
        raise ValueError('tunnel name "%s" may use only letters, digits, "_", "." and "-"'
                         % text)
    return text


def parse_server(text):
    """The host key: an ssh destination, required, without a port in it."""
    if not text:
        raise ValueError("is missing (the ssh server or its ssh_config alias)")
    name, colon, port = text.rpartition(":")
    if colon and name and ":" not in name and _is_number(port):
        raise ValueError('"%s" names a port: the port goes in a key of its own (host = %s and '
                         'port = %s)' % (text, name, port))
    return parse_host(text)


def _user(text):
    return parse_host(text, "user") if text else ""


def _optional(parse):
    return lambda text: parse(text) if text else None


def _forwards(kind):
    return lambda text: tuple(parse_forward(line, kind) for line in _lines(text))


def _ssh_options(text):
    options = _lines(text)
    for option in options:
        key, equals, value = option.partition("=")
        if not (key and key[0] in _LETTERS and key.isalnum() and key.isascii() and equals
                and value and not value[0].isspace()):
            raise ValueError('"%s" is not Key=Value' % option)
    return tuple(options)


def _one_of(choices):
    def parse(value):
        if value not in choices:
            raise ValueError('"%s" is not one of %s' % (value, ", ".join(choices)))
        return value
    return parse


def _yes_no(value):
    return _one_of(("yes", "no"))(value) == "yes"


def _lines(value):
    return [line.strip() for line in value.splitlines() if line.strip()]


def _readable_file(value):
    if not value:
        return ""
    path = expand_home(value)
    if not os.path.isfile(path) or not os.access(path, os.R_OK):
        raise ValueError('"%s" is not a readable file' % value)
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise ValueError('"%s" cannot be read: %s' % (value, e.strerror))
    return path


def _private_key(value):
    """identity_file: a readable file that is not the public half of a key."""
    path = _readable_file(value)
    if path:
        with open(path, "rb") as f:
            head = f.read(64)
        if path.endswith(".pub") or head.startswith((b"ssh-", b"ecdsa-", b"sk-")):
            private = path[:-4] if path.endswith(".pub") else "the key without .pub"
            raise ValueError('"%s" is the public half of a key: name its private key (%s)'
                             % (value, private))
    return path


def _find_program(value):
    if not value:
        raise ValueError("is empty (the ssh client to run, e.g. ssh)")
    path = expand_home(value)
    dirs = [""] if os.sep in path else os.environ.get("PATH", os.defpath).split(os.pathsep)
    for d in dirs:
        candidate = os.path.join(d, path) if d else path
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise ValueError('"%s" not found or not executable (install the OpenSSH client or '
                     'give its full path)' % value)


def _trusted_program(value):
    """on_event: a program of this user's or root's that nobody else may write, in a
    folder nobody else may write: it runs with the tunnel's rights, as the config's
    own ProxyCommand would."""
    if not value:
        return ""
    if not os.path.isfile(value) or not os.access(value, os.X_OK):
        raise ValueError('"%s" is not a program (an executable file)' % value)
    for path in (value, os.path.dirname(value)):
        problem = untrusted(os.stat(path))
        if problem:
            raise ValueError('"%s": %s' % (path, problem % {"path": path}))
    return value


def _metrics_path(value):
    """metrics_file: a file in a folder that exists and that this user may write."""
    if not value:
        return ""
    folder = os.path.dirname(value)
    if not os.path.isdir(folder):
        raise ValueError('"%s": its folder %s does not exist' % (value, folder))
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError('"%s": its folder %s is not writable' % (value, folder))
    return value


def _positive(integer):
    def parse(value):
        try:
            number = int(value) if integer else float(value)
        except ValueError:
            number = 0
        if not 0 < number <= 3600:
            raise ValueError('"%s" is not a positive %s (1-3600)'
                             % (value, "whole number" if integer else "number"))
        return number
    return parse


# ---------------------------------------------------------------------------
# The keys
# ---------------------------------------------------------------------------

# how: "" the text as it is; "path": relative to the config's folder, ~
# expanded; "program": a path only when it has a "/", else looked up in
# PATH; "lines": several values, one per line
Key = record("Key", "name default parse how")
KEYS = (
    Key("host", "", parse_server, ""),
    Key("user", "", _user, ""),
    Key("port", "", _optional(parse_port), ""),
    Key("identity_file", "", _private_key, "path"),
    Key("ssh_config", "", _readable_file, "path"),
    Key("remote_forward", "", _forwards("R"), "lines"),
    Key("local_forward", "", _forwards("L"), "lines"),
    Key("ssh_options", "", _ssh_options, "lines"),
    Key("ssh", "ssh", _find_program, "program"),
    Key("server_alive_interval", "10", _positive(integer=True), ""),
    Key("server_alive_count_max", "3", _positive(integer=True), ""),
    Key("check_timeout", "5", _positive(integer=False), ""),
    Key("remote_check", "auto", _one_of(REMOTE_CHECKS), ""),
    Key("reclaim", "yes", _yes_no, ""),
    Key("state_dir", "~/.local/state/ctunnel", str, "path"),
    Key("on_event", "", _trusted_program, "path"),
    Key("metrics_file", "", _metrics_path, "path"),
)
DEFAULTS = {key.name: key.default for key in KEYS}
KNOWN_KEYS = frozenset(DEFAULTS)


class Tunnel(record("Tunnel", " ".join(("name",) + tuple(DEFAULTS) + ("client",)))):
    """One section of the config, checked: a key's field holds its parsed value.

    client: the kind of ssh client ("openssh", "dbclient"), told from ssh.
    """

    __slots__ = ()

    @property
    def forwards(self):
        return self.remote_forward + self.local_forward


# ---------------------------------------------------------------------------
# Finding and reading the file
# ---------------------------------------------------------------------------

def config_candidates(script):
    """The places a config is looked for when neither -c nor $CTUNNEL_CONFIG says.

    script: the path of ctunnel.py: "beside ctunnel.py" means beside the
    command cron runs (through symlinks), not beside this package.
    """
    return [
        os.path.join(os.path.dirname(os.path.realpath(script)), CONFIG_NAME),
        expand_home("~/.config/ctunnel/" + CONFIG_NAME),
        "/etc/ctunnel/" + CONFIG_NAME,
    ]


def ignored_configs(path, explicit=None, environ=None, script=None):
    """The configs of the search path that exist besides path, the one in use.

    None when the config was named (-c, $CTUNNEL_CONFIG): nothing was searched.
    """
    environ = os.environ if environ is None else environ
    if explicit or environ.get(CONFIG_ENV):
        return []
    return [c for c in config_candidates(script) if c != path and os.path.exists(c)]


def find_config(explicit=None, environ=None, script=None):
    """Return the config path to use, following the documented search order."""
    environ = os.environ if environ is None else environ
    if explicit:
        return explicit
    if environ.get(CONFIG_ENV):
        return environ[CONFIG_ENV]
    candidates = config_candidates(script)
    for path in candidates:
        if os.path.exists(path):
            return path
    raise ConfigError("no config found (looked in %s); pass -c FILE or set $%s"
                      % (", ".join(candidates), CONFIG_ENV))


def read_trusted(path, limit):
    """Return the bytes of a file that only this user (or root) may write.

    Opened without blocking (a FIFO cannot hang the tick), then checked on
    the open file itself. Raises ConfigError naming the fix, or OSError.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError("%s: not a regular file" % path)
        problem = untrusted(st)
        if problem:
            raise ConfigError("%s: %s" % (path, problem % {"path": path}))
        if st.st_size > limit:
            raise ConfigError("%s: %d bytes is too big for a config (at most %d)"
                              % (path, st.st_size, limit))
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def read_config(path):
    """Read the config at path: return (defaults, sections), or raise ConfigError.

    The config is trusted as ssh trusts ~/.ssh/config (its ssh_options may
    name a ProxyCommand): it must be a regular file of this user or root
    that nobody else may write. sections: [(name, {key: text})], in order.
    """
    try:
        text = read_trusted(path, CONFIG_MAX).decode("utf-8-sig")
    except OSError as e:
        raise ConfigError("%s: cannot read config: %s" % (path, e.strerror or e))
    except UnicodeDecodeError:
        raise ConfigError("%s: not a text file (expected UTF-8 ini)" % path)
    try:
        return parse_ini(text)
    except ValueError as e:
        raise ConfigError("%s: malformed config: %s" % (path, e))


def parse_ini(text):
    """Parse ini text: return (defaults, sections) or raise ValueError("line N: ...").

    A line indented deeper than the key line above it continues that key's
    value; an empty line or a comment ends it. A section or a key given
    twice is an error, as in configparser's strict mode.
    """
    defaults, sections, section_lines, key_lines = {}, [], {}, {}
    values, key, indent, where = None, None, None, ""
    for number, line in enumerate(text.split("\n"), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            indent = None
            continue
        level = len(line) - len(line.lstrip())
        if key is not None and indent is not None and level > indent:
            values[key] += "\n" + stripped
            continue
        indent, key = level, None
        if stripped.startswith("[") and stripped.rfind("]") > 1:
            name = stripped[1:stripped.rfind("]")]
            if name in section_lines:
                raise ValueError("line %d: section [%s] already exists (line %d): give each "
                                 "tunnel one section" % (number, name, section_lines[name]))
            where = "[%s]" % name
            section_lines[name] = number
            values = defaults if name == "DEFAULT" else {}
            if name != "DEFAULT":
                sections.append((name, values))
            continue
        if values is None:
            raise ValueError('line %d: "%s" comes before any [section] line: start with '
                             '[NAME], one section per tunnel' % (number, stripped))
        split = min(i for i in (stripped.find("="), stripped.find(":"), len(stripped))
                    if i >= 0)
        name = stripped[:split].strip().lower()
        if not name or split == len(stripped):
            raise ValueError('line %d: "%s" is not key = value' % (number, stripped))
        if (where, name) in key_lines:
            raise ValueError("line %d: %s is set twice in %s (first on line %d): give it "
                             "once; several values (forwards, options) go one per line, "
                             "the further lines indented"
                             % (number, name, where, key_lines[where, name]))
        key_lines[where, name] = number
        key, values[name] = name, stripped[split + 1:].strip()
    return defaults, sections


# ---------------------------------------------------------------------------
# Loading tunnels
# ---------------------------------------------------------------------------

def load_config(path, problems=None):
    """Load and check every tunnel of the config at path; return a list of Tunnel.

    Raises ConfigError naming file, section and key. With a problems dict, a
    bad section is put there ({name: message}) and the others are still
    returned: one typo must not stop every tunnel.
    """
    defaults, sections = read_config(path)
    for key in defaults:
        if key not in KNOWN_KEYS:
            raise ConfigError("%s [DEFAULT]: unknown key \"%s\" (known: %s)"
                              % (path, key, ", ".join(sorted(KNOWN_KEYS))))
    tunnels, memo = [], {}
    for name, values in sections:
        try:
            tunnels.append(load_tunnel(path, name, dict(defaults, **values), memo))
        except ConfigError as e:
            if problems is None:
                raise
            problems[name] = str(e)
    tunnels = _one_port_one_tunnel(path, tunnels, problems)
    if not tunnels and not problems:
        raise ConfigError("%s: no tunnels: add a [NAME] section with host and "
                          "remote_forward or local_forward" % path)
    return tunnels


_WIDE_BINDS = ("*", "0.0.0.0", "::", "[::]")


def _one_port_one_tunnel(path, tunnels, problems):
    """Two sections cannot both listen on one port of one server: the later is a
    problem (or the error) that names the earlier."""
    held, kept = {}, []
    for tunnel in tunnels:
        clash = None
        for forward in tunnel.remote_forward:
            for other, theirs in held.get((tunnel.host, forward.port), ()):
                if forward.bind in _WIDE_BINDS or theirs.bind in _WIDE_BINDS or \
                        check_address(forward) == check_address(theirs):
                    clash = clash or (forward, other, theirs)
        if clash:
            forward, other, theirs = clash
            message = ("%s [%s]: remote_forward %s: port %d on %s is [%s]'s already "
                       "(remote_forward %s); two tunnels cannot both hold it: give one of "
                       "them another port" % (path, tunnel.name, forward.spec, forward.port,
                                              tunnel.host, other.name, theirs.spec))
            if problems is None:
                raise ConfigError(message)
            problems[tunnel.name] = message
            continue
        for forward in tunnel.remote_forward:
            held.setdefault((tunnel.host, forward.port), []).append((tunnel, forward))
        kept.append(tunnel)
    return kept


def load_tunnel(path, name, texts, memo=None):
    """Check one section ({key: text}, [DEFAULT] included) into a Tunnel.

    memo: {(key, text): its value or error}, shared by the sections of one
    load, so that a hundred tunnels of one [DEFAULT] check one key file and
    look up one ssh, not a hundred.
    """
    memo = {} if memo is None else memo
    where = "%s [%s]" % (path, name)
    try:
        if name != name.strip():
            raise ValueError('tunnel name "%s" has blanks around it' % name)
        parse_tunnel_name(name)
    except ValueError as e:
        raise ConfigError("%s: %s" % (where, e))
    for key in texts:
        if key not in KNOWN_KEYS:
            raise ConfigError('%s: unknown key "%s" (known: %s)'
                              % (where, key, ", ".join(sorted(KNOWN_KEYS))))
    values = {}
    for key in KEYS:
        text = texts.get(key.name, key.default).strip()
        if (key.name, text) not in memo:
            memo[key.name, text] = _parse(path, key, text)
        value = memo[key.name, text]
        if isinstance(value, ValueError):
            hint = " (a comment must be on a line of its own)" \
                if " #" in text or " ;" in text or "\t#" in text else ""
            raise ConfigError("%s: %s %s%s" % (where, key.name, value, hint))
        values[key.name] = value
    if not values["remote_forward"] + values["local_forward"]:
        raise ConfigError("%s: no forwards: set remote_forward or local_forward" % where)
    try:
        values["state_dir"] = check_state_dir(values["state_dir"], name, memo)
    except ValueError as e:
        raise ConfigError("%s: state_dir %s" % (where, e))
    tunnel = Tunnel(name=name, client=clients.kind_of(values["ssh"]), **values)
    problem = clients.load(tunnel.client).validate(tunnel)
    if problem:
        raise ConfigError("%s: %s" % (where, problem))
    return tunnel


def _parse(path, key, text):
    """Return the value of key's text, or the ValueError that says what is wrong."""
    try:
        return key.parse(_key_text(path, key, text))
    except ValueError as e:
        return e


def _key_text(path, key, text):
    """The text of a key as its parser takes it; raise ValueError for what no key takes."""
    if text and (key.how == "path" or key.how == "program" and os.sep in text):
        # cron runs in HOME, a user by hand anywhere: relative to the config file
        text = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(path)),
                                             expand_home(text)))
    if not text.isprintable() and any(c < " " and c not in "\t\n" or c == "\x7f"
                                      for c in text):
        raise ValueError("contains a control character (%r)" % text)
    if "\n" in text and key.how != "lines":
        raise ValueError('has a second line "%s": is it indented by mistake? (an indented '
                         'line continues the key above)' % text.splitlines()[1].strip())
    return text


def check_state_dir(value, name, memo=None):
    """Check that state_dir can hold the control socket and be made; make nothing.

    A tick creates it (0700); status and -n only look. memo: as load_tunnel's.
    """
    path = os.path.normpath(value)
    ctl = os.path.join(path, name + ".ctl")
    if len(ctl.encode()) + CTL_TEMP_SUFFIX >= SOCKET_PATH_MAX:
        raise ValueError('"%s" is too long: the control socket %s, plus the %d bytes ssh adds '
                         'while it creates it, must stay under %d bytes'
                         % (value, ctl, CTL_TEMP_SUFFIX, SOCKET_PATH_MAX))
    memo = {} if memo is None else memo
    known = ("usable folder", path)         # not a key's name: no clash with load_tunnel's
    if known not in memo:
        try:
            memo[known] = _usable_folder(value, path)
        except ValueError as e:
            memo[known] = e
    if isinstance(memo[known], ValueError):
        raise memo[known]
    return path


def _usable_folder(value, path):
    """path (value, as the config wrote it) is a trusted folder, or one that can be made."""
    if os.path.isdir(path):
        problem = untrusted(os.stat(path))
        if problem:
            raise ValueError('"%s": %s' % (value, problem % {"path": path}))
    existing = path
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError('"%s" cannot be created: %s is not a directory' % (value, existing))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError('"%s" %s' % (value, "is not writable" if existing == path else
                                      "cannot be created: %s is not writable" % existing))
    return path
