"""Reporting: one line per event on stderr (which cron mails) and in syslog.

No logging module (OpenWrt's python3-light has none) and no syslog module
(missing on some minimal Pythons): a datagram to /dev/log is all syslog needs.
"""

import os
import sys
import time

from .model import LOG_ERR, LOG_INFO

SYSLOG_ENV = "CTUNNEL_SYSLOG"          # socket path, for tests; default /dev/log
SYSLOG_PATH = "/dev/log"
LOG_USER = 1                           # syslog facility "user"


def printable(text):
    """Escape control characters: what a server, ssh or a config says can neither
    steer a terminal nor start a second, forged log line."""
    return "".join("\\x%02x" % ord(c) if c < " " or "\x7f" <= c <= "\x9f" else c
                   for c in text)


class Reporter:
    """Write event lines to stderr and to syslog."""

    def __init__(self, quiet=False, stream=None, syslog_path=None):
        self.quiet = quiet
        self.stream = stream or sys.stderr
        # at a terminal every failure is shown; only cron mail is spared repeats
        self.tty = self.stream.isatty()
        self.syslog_path = syslog_path or os.environ.get(SYSLOG_ENV, SYSLOG_PATH)

    def event(self, level, text, stderr=True, stamp=True):
        """Report one event: syslog, and stderr unless told not (or quiet and no error)."""
        text = printable(text)
        if (stderr or self.tty) and (not self.quiet or level <= LOG_ERR):
            prefix = "%s ctunnel[%d]: " % (time.strftime("%Y/%m/%d %H:%M:%S"), os.getpid())
            self.stream.write("%s%s\n" % (prefix if stamp else "", text))
            self.stream.flush()
        if level < LOG_INFO:
            self._syslog(level, text)

    def _syslog(self, level, text):
        # a datagram to /dev/log; a box without syslogd simply has no socket
        if not os.path.exists(self.syslog_path):
            return
        import _socket
        message = "<%d>ctunnel[%d]: %s" % (LOG_USER * 8 + level, os.getpid(), text)
        try:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM)
            try:
                sock.connect(self.syslog_path)
                sock.send(message.encode("utf-8", "replace"))
            finally:
                sock.close()
        except OSError:
            pass
