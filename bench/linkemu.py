#!/usr/bin/env python3
"""A bad link in user space: delay, jitter, loss, a rate limit and outages for
the TCP and UDP packets of chosen ports, through iptables NFQUEUE.

usage: python3 bench/linkemu.py [--links NAME,...] [--seconds N] [--seed N]

Run as root. It enters a network namespace of its own (gone when it exits),
proves that NFQUEUE works in this kernel (a queued packet nobody reads is
lost; one held for 0.3 s arrives 0.3 s late), then shapes one port of the
namespace's loopback as each link of LINKS says and measures what it
delivers, against what was asked:

  RTT    a ping-like TCP exchange (one connection, a few bytes each way), and
         UDP echoes (no retransmission: the link's own spread)
  loss   UDP datagrams, each direction
  rate   a UDP stream each way that offers 1.5 times the link's rate
  gap    the longest silence of the UDP echoes (an outage)

Why in user space: this kernel has no sch_netem, so `tc qdisc ... netem`
fails ("Specified qdisc kind is unknown"). Instead, iptables rules in the
namespace's INPUT chain send every packet to and from a shaped port to an
NFQUEUE; one thread here reads them over netlink (nfnetlink_queue, with the
standard library's socket module) and gives each its verdict: dropped now
(loss, outage, a full queue), or accepted when the link would deliver it.
Loopback packets pass INPUT once, so each direction is shaped once. The
link bench, bench_link.py, imports this module.
"""

import argparse
import collections
import ctypes
import errno
import heapq
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

# --- nfnetlink_queue, from <linux/netfilter/nfnetlink_queue.h> --------------

NETLINK_NETFILTER = 12
SO_RCVBUFFORCE = 33
NLMSG_ERROR = 2
NLM_F_REQUEST, NLM_F_ACK = 1, 4
QUEUE_MSG = 3 << 8                      # NFNL_SUBSYS_QUEUE
MSG_PACKET, MSG_VERDICT, MSG_CONFIG = QUEUE_MSG | 0, QUEUE_MSG | 1, QUEUE_MSG | 2
CFG_CMD, CFG_PARAMS, CFG_QUEUE_MAXLEN = 1, 2, 3
CMD_BIND, CMD_UNBIND = 1, 2
COPY_PACKET = 2
ATTR_PACKET_HDR, ATTR_VERDICT_HDR, ATTR_PAYLOAD = 1, 2, 10
NF_DROP, NF_ACCEPT = 0, 1
CLONE_NEWNET = 0x40000000

COPY_BYTES = 64         # enough for the IP header and the ports; the rest stays in the kernel
KERNEL_QUEUE = 20000    # packets the kernel may hold for us; beyond, it drops them


def _attr(kind, data):
    """One netlink attribute, padded to 4 bytes."""
    return struct.pack("=HH", 4 + len(data), kind) + data + b"\0" * (-len(data) % 4)


def _attrs(data):
    """Parse netlink attributes into {type: bytes}."""
    out, offset = {}, 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("=HH", data, offset)
        if length < 4:
            break
        out[kind & 0x3fff] = data[offset + 4:offset + length]
        offset += (length + 3) & ~3
    return out


class NfQueue:
    """One NFQUEUE, read and answered over a netlink socket.

    Bind before any rule sends packets here: a queue with no reader drops them.
    """

    def __init__(self, number):
        self.number = number
        self.seq = 0
        self.overruns = 0       # times the socket overflowed (packets we never saw)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        # a slow tick of ours must not overflow the socket: a packet whose
        # message is lost is never answered and sits in the kernel forever
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 16 << 20)
        self.sock.bind((0, 0))
        self._config(_attr(CFG_CMD, struct.pack(">BxH", CMD_BIND, socket.AF_INET)))
        self._config(_attr(CFG_PARAMS, struct.pack(">IB", COPY_BYTES, COPY_PACKET)))
        self._config(_attr(CFG_QUEUE_MAXLEN, struct.pack(">I", KERNEL_QUEUE)))

    def fileno(self):
        return self.sock.fileno()

    def _message(self, kind, flags, payload):
        self.seq += 1
        head = struct.pack("=IHHII", 16 + 4 + len(payload), kind, flags, self.seq, 0)
        nfgen = struct.pack("=BB", socket.AF_UNSPEC, 0) + struct.pack(">H", self.number)
        self.sock.sendto(head + nfgen + payload, (0, 0))

    def _config(self, payload):
        """Send a config request and wait for the kernel's acknowledgement."""
        self._message(MSG_CONFIG, NLM_F_REQUEST | NLM_F_ACK, payload)
        while True:
            data = self.sock.recv(65536)
            length, kind, _, seq, _ = struct.unpack_from("=IHHII", data)
            if kind == NLMSG_ERROR and seq == self.seq:
                code = struct.unpack_from("=i", data, 16)[0]
                if code:
                    raise OSError(-code, "nfqueue %d config: %s" % (self.number,
                                                                      errno.errorcode.get(-code)))
                return

    def receive(self):
        """Read what the kernel has queued: [(packet id, first bytes of the packet)]."""
        try:
            data = self.sock.recv(1 << 18)
        except OSError as e:
            if e.errno != errno.ENOBUFS:
                raise
            self.overruns += 1
            return []
        packets, offset = [], 0
        while offset + 16 <= len(data):
            length, kind = struct.unpack_from("=IH", data, offset)
            if length < 16:
                break
            if kind == MSG_PACKET:
                attrs = _attrs(data[offset + 20:offset + length])
                packet_id = struct.unpack(">I", attrs[ATTR_PACKET_HDR][:4])[0]
                packets.append((packet_id, attrs.get(ATTR_PAYLOAD, b"")))
            offset += (length + 3) & ~3
        return packets

    def verdict(self, packet_id, verdict):
        self._message(MSG_VERDICT, NLM_F_REQUEST,
                      _attr(ATTR_VERDICT_HDR, struct.pack(">II", verdict, packet_id)))

    def close(self):
        try:
            self._config(_attr(CFG_CMD, struct.pack(">BxH", CMD_UNBIND, socket.AF_INET)))
        except OSError:
            pass
        self.sock.close()


class Rules:
    """The iptables rules that send a port's packets (TCP and UDP, both ways) to a queue."""

    def __init__(self, queue_number, ports):
        self.specs = [["INPUT", "-p", proto, way, str(port), "-j", "NFQUEUE",
                       "--queue-num", str(queue_number)]
                      for port in ports for proto in ("tcp", "udp")
                      for way in ("--dport", "--sport")]
        self.added = []

    def add(self):
        for spec in self.specs:
            subprocess.run(["iptables", "-w", "-A"] + spec, check=True,
                           stdin=subprocess.DEVNULL, capture_output=True)
            self.added.append(spec)

    def remove(self):
        """Remove every rule this added (also after a partial add)."""
        while self.added:
            subprocess.run(["iptables", "-w", "-D"] + self.added.pop(),
                           stdin=subprocess.DEVNULL, capture_output=True)


# --- links ------------------------------------------------------------------

class Link:
    """What a link does to each packet, the same in each direction.

    rtt: seconds, half of it each way. jitter: the RTT wanders by up to
    +- this (each way +- half). loss: the chance that a packet is lost, each
    way. rate: bit/s each way (None: unlimited), with a queue of `limit`
    packets in front (netem's default). outage: (seconds down, every seconds,
    first at seconds after the epoch): nothing passes while it is down.
    """

    JITTER_STEP = 0.5     # the delay drifts to a new random value every this many seconds

    def __init__(self, name, rtt, jitter=0.0, loss=0.0, rate=None, outage=None, limit=1000):
        self.name, self.rtt, self.jitter, self.loss = name, rtt, jitter, loss
        self.rate, self.outage, self.limit = rate, outage, limit

    def down(self, t):
        """Whether the link is out at t seconds after the epoch."""
        if not self.outage or t < self.outage[2]:
            return False
        length, period, first = self.outage
        return (t - first) % period < length

    def outages(self, until):
        """The outages [(start, end)] that begin before `until` (seconds after the epoch)."""
        if not self.outage:
            return []
        length, period, first = self.outage
        return [(s, s + length) for s in _frange(first, until, period)]

    def describe(self):
        parts = ["RTT %d ms" % round(self.rtt * 1000)]
        if self.jitter:
            parts[0] += " +- %d ms" % round(self.jitter * 1000)
        if self.loss:
            parts.append("%g %% loss" % (self.loss * 100))
        if self.rate:
            parts.append("%g kbit/s" % (self.rate / 1000))
        if self.outage:
            parts.append("%g s outage every %g s (first at %g s)" % self.outage)
        return ", ".join(parts)


def _frange(start, stop, step):
    while start < stop:
        yield start
        start += step


# The links of issue 16. The flapping link is good between its outages.
LINKS = collections.OrderedDict((link.name, link) for link in [
    Link("cellular", rtt=0.6, loss=0.02),
    Link("satellite", rtt=0.7, loss=0.01, rate=256000),
    Link("bad-cellular", rtt=1.2, jitter=0.6, loss=0.08),
    Link("flapping", rtt=0.05, outage=(8, 25, 15)),
])


# --- the emulator -----------------------------------------------------------

class _Way:
    """One direction's state: its bottleneck, its release order, its delay's drift."""

    def __init__(self):
        self.free_at = 0.0                   # when the bottleneck has sent all it holds
        self.backlog = collections.deque()   # when each packet in the bottleneck is sent
        self.last = 0.0                      # the latest release: a link keeps order
        self.drift = {}                      # jitter step -> its random offset


class Emulator:
    """Shapes the packets of `ports`, both ways, as `link` says, until stopped.

    Use as a context manager, or start() and stop(). `epoch` (a monotonic
    time) anchors the outages; set it to restart their schedule.
    """

    def __init__(self, link, ports, queue_number=0, seed=None):
        self.link = link
        self.ports = set(ports)
        self.queue_number = queue_number
        self.random = random.Random(seed)
        self.epoch = time.monotonic()
        self.ways = {True: _Way(), False: _Way()}      # True: to a shaped port
        self.counts = collections.Counter()
        self.held = []                # heap of (release time, order, packet id)
        self.error = None             # what stopped the thread, if it failed
        self._order = 0
        self._stopping = False
        self.queue = self.rules = self.thread = None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self):
        self.queue = NfQueue(self.queue_number)     # bind first: unread, a queue drops
        self.rules = Rules(self.queue_number, sorted(self.ports))
        try:
            self.rules.add()
        except (OSError, subprocess.CalledProcessError):
            self.rules.remove()
            self.queue.close()
            raise
        self.thread = threading.Thread(target=self._run, name="linkemu", daemon=True)
        self.thread.start()

    def stop(self):
        """Remove the rules, deliver what is in flight, unbind."""
        if self.rules:
            self.rules.remove()
        self._stopping = True
        if self.thread:
            self.thread.join()
        if self.queue:
            for _, _, packet_id in self.held:
                self.queue.verdict(packet_id, NF_ACCEPT)
            self.held = []
            self.queue.close()
            self.queue = None

    def _run(self):
        try:
            while not self._stopping:
                wait = self.held[0][0] - time.monotonic() if self.held else 0.2
                ready, _, _ = select.select([self.queue], [], [], min(max(wait, 0), 0.2))
                if ready:
                    now = time.monotonic()
                    for packet_id, head in self.queue.receive():
                        self._admit(now, packet_id, head)
                self._release(time.monotonic())
        except Exception as e:      # the bench must hear that its link went dark
            self.error = "%s: %s" % (type(e).__name__, e)

    def _admit(self, now, packet_id, head):
        """Decide a new packet's fate: dropped now, or held until its release."""
        size, inbound = self._classify(head)
        way = self.ways[inbound]
        link = self.link
        if link.down(now - self.epoch):
            return self._drop(packet_id, "outage")
        if link.loss and self.random.random() < link.loss:
            return self._drop(packet_id, "lost")
        sent = now
        if link.rate:
            while way.backlog and way.backlog[0] <= now:
                way.backlog.popleft()
            if len(way.backlog) >= link.limit:
                return self._drop(packet_id, "queue full")
            way.free_at = max(now, way.free_at) + size * 8.0 / link.rate
            way.backlog.append(way.free_at)
            sent = way.free_at
        way.last = max(sent + self._delay(way, now), way.last)
        self._order += 1
        heapq.heappush(self.held, (way.last, self._order, packet_id))
        self.counts["bytes"] += size

    def _delay(self, way, now):
        """One way's delay at `now`: half the RTT, plus a drift that moves
        smoothly between random points (a bursty flow sees nearly one delay,
        as on a cellular link, and is not reordered)."""
        base = self.link.rtt / 2
        if not self.link.jitter:
            return base
        step, frac = divmod(now / Link.JITTER_STEP, 1)
        spread = self.link.jitter / 2
        ends = [way.drift.setdefault(int(step) + i, self.random.uniform(-spread, spread))
                for i in (0, 1)]
        way.drift.pop(int(step) - 2, None)
        return max(0.0, base + ends[0] + (ends[1] - ends[0]) * frac)

    def _release(self, now):
        while self.held and self.held[0][0] <= now:
            at, _, packet_id = heapq.heappop(self.held)
            if self.link.down(at - self.epoch):       # the line went down while in flight
                self._drop(packet_id, "outage")
            else:
                self.queue.verdict(packet_id, NF_ACCEPT)
                self.counts["passed"] += 1

    def _drop(self, packet_id, why):
        self.queue.verdict(packet_id, NF_DROP)
        self.counts[why] += 1

    def _classify(self, head):
        """(IP length, whether it goes to a shaped port) from a packet's first bytes."""
        if head[0] >> 4 == 6:
            size, header = struct.unpack_from(">H", head, 4)[0] + 40, 40
        else:
            size, header = struct.unpack_from(">H", head, 2)[0], (head[0] & 15) * 4
        dport = struct.unpack_from(">H", head, header + 2)[0]
        return size, dport in self.ports

    def stats(self):
        """What the link did so far: packets passed, lost, dropped in outages or a full queue."""
        out = dict(self.counts)
        out["overruns"] = self.queue.overruns if self.queue else 0
        return out


# --- a network namespace ----------------------------------------------------

def enter_new_netns():
    """Move this process into a new network namespace with its loopback up.

    Call it before any thread starts: a namespace belongs to a thread, and
    only threads and children made afterwards inherit it. The namespace, and
    the iptables rules in it, go away with its last process. Loopback gets an
    Ethernet MTU, so that the link carries packets of a real line's size.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWNET) failed")
    subprocess.run(["ip", "link", "set", "lo", "up", "mtu", "1500"], check=True)


def free_port(kinds=(socket.SOCK_STREAM, socket.SOCK_DGRAM)):
    """A port number free on 127.0.0.1 for TCP and for UDP."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            for kind in kinds:
                with socket.socket(socket.AF_INET, kind) as s:
                    s.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue


# --- proofs and measurements ------------------------------------------------

def prove_nfqueue(queue_number=7, hold=0.3):
    """Prove that NFQUEUE works in this kernel, inside the current namespace.

    Returns (whether a packet queued with no reader was lost, how late a
    packet arrived that a reader held for `hold` seconds).
    """
    port = free_port()
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", port))
    rx.settimeout(1.0)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rules = Rules(queue_number, [port])
    try:
        rules.add()
        tx.sendto(b"unread", ("127.0.0.1", port))
        try:
            rx.recv(64)
            lost = False
        except socket.timeout:
            lost = True
        rules.remove()
        with Emulator(Link("hold", rtt=2 * hold), [port], queue_number):
            began = time.monotonic()
            tx.sendto(b"held", ("127.0.0.1", port))
            rx.recv(64)
            late = time.monotonic() - began
        return lost, late
    finally:
        rules.remove()
        rx.close()
        tx.close()


class _Echo:
    """The far end of a measurement: a TCP echo and a UDP echo on one port.

    UDP datagrams starting with b"p" are counted and sent back; those with
    b"f" (a flood) are only timed, and send_flood() floods the client back.
    """

    def __init__(self, port):
        self.tcp = socket.socket()
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("127.0.0.1", port))
        self.tcp.listen(4)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", port))
        self.reached = set()        # numbers of the pings that arrived
        self.flood = []             # (arrival, IP length)
        for target in (self._tcp, self._udp):
            threading.Thread(target=target, daemon=True).start()

    def _tcp(self):
        try:
            conn, _ = self.tcp.accept()
            with conn:
                while True:
                    data = conn.recv(64)
                    if not data:
                        return
                    conn.sendall(data)
        except OSError:
            return

    def _udp(self):
        try:
            while True:
                data, peer = self.udp.recvfrom(4096)
                if data[:1] == b"p":
                    self.reached.add(struct.unpack_from("=I", data, 1)[0])
                    self.udp.sendto(data, peer)
                elif data[:1] == b"f":
                    self.flood.append((time.monotonic(), len(data) + 28))
        except OSError:         # closed: the measurement is over
            return

    def send_flood(self, peer, rate, seconds):
        threading.Thread(target=_flood, args=(self.udp, peer, rate, seconds),
                         daemon=True).start()

    def close(self):
        self.tcp.close()
        self.udp.close()


def _flood(sock, peer, rate, seconds, size=1000):
    """Send datagrams of `size` bytes to peer at `rate` bit/s (IP length counted)."""
    gap = (size + 28) * 8.0 / rate
    began = time.monotonic()
    n = 0
    while time.monotonic() - began < seconds:
        try:
            sock.sendto(b"f" * size, peer)
        except OSError:
            return
        n += 1
        time.sleep(max(0.0, began + n * gap - time.monotonic()))


def _arrival_rate(arrivals):
    """bit/s of datagrams [(time, bytes)] that arrived back to back."""
    if len(arrivals) < 3:
        return None
    span = arrivals[-1][0] - arrivals[0][0]
    return sum(size for _, size in arrivals[1:]) * 8.0 / span if span > 0 else None


def _tcp_pings(port, until, interval, rtts):
    """One TCP connection; send 8 bytes, time the echo, again every interval."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            while time.monotonic() < until:
                began = time.monotonic()
                s.sendall(b"12345678")
                got = b""
                while len(got) < 8:
                    got += s.recv(8 - len(got))
                rtts.append(time.monotonic() - began)
                time.sleep(max(0.0, began + interval - time.monotonic()))
    except OSError:
        pass


def _udp_pings(port, seconds, per_second):
    """Send numbered UDP pings; return ([send time of each], {number: (arrival, rtt)})."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sent, echoes = [], {}
    began = time.monotonic()
    end = began + seconds + 3.0             # then wait for the slowest link's stragglers
    while True:
        now = time.monotonic()
        if now > end:
            break
        next_send = began + len(sent) / per_second
        if now >= next_send and now - began < seconds:
            sock.sendto(b"p" + struct.pack("=Id", len(sent), now), ("127.0.0.1", port))
            sent.append(now)
            continue
        wait = next_send - now if now - began < seconds else end - now
        if select.select([sock], [], [], max(0.0, wait))[0]:
            number, at = struct.unpack_from("=Id", sock.recv(64), 1)
            arrived = time.monotonic()
            echoes[number] = (arrived, arrived - at)
    sock.close()
    return sent, echoes


def _percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100.0 * len(values)))] if values else None


def measure(link, seconds=8.0, queue_number=1, seed=None):
    """Shape a port of its own as `link` says and measure what it delivers.

    Returns a dict: RTT of TCP and UDP pings (seconds), loss each way, the
    rate each way (bit/s) and the longest silence of the echoes (an outage).
    For a link with outages, the measurement starts 1 s before one.
    """
    port = free_port()
    echo = _Echo(port)
    out = {"asked": link.describe()}
    try:
        with Emulator(link, [port], queue_number, seed) as emu:
            if link.outage:
                emu.epoch = time.monotonic() - link.outage[2] + 1.0
                seconds = max(seconds, 1.0 + link.outage[0] + 2.0)
            tcp_rtts = []
            pinger = threading.Thread(target=_tcp_pings, daemon=True, args=(
                port, time.monotonic() + seconds, 0.25, tcp_rtts))
            pinger.start()
            sent, echoes = _udp_pings(port, seconds, per_second=200)
            pinger.join(timeout=10)
            # a ping that met an outage on its way tells of the outage, not of loss
            clear = [n for n, t in enumerate(sent)
                     if not any(link.down(x - emu.epoch)
                                for x in (t, t + link.rtt + link.jitter + 0.1))]
            out.update(_ping_figures(clear, echo.reached, echoes, tcp_rtts))
            if link.rate:
                out.update(_rate_figures(link, port, echo))
            out["emulator"] = emu.stats()
    finally:
        echo.close()
    return out


def _ping_figures(clear, reached, echoes, tcp_rtts):
    """Figures of the pings; loss counts only those sent clear of an outage."""
    rtts = [rtt for _, rtt in echoes.values()]
    arrivals = sorted(t for t, _ in echoes.values())
    up = [n for n in clear if n in reached]
    down = [n for n in up if n in echoes]
    return {
        "tcp_rtt_median": statistics.median(tcp_rtts) if tcp_rtts else None,
        "tcp_pings": len(tcp_rtts),
        "udp_rtt_p10": _percentile(rtts, 10),
        "udp_rtt_median": statistics.median(rtts) if rtts else None,
        "udp_rtt_p90": _percentile(rtts, 90),
        "loss_up": 1 - len(up) / len(clear) if clear else None,
        "loss_down": 1 - len(down) / len(up) if up else None,
        "udp_pings": len(clear),
        "longest_gap": max((b - a for a, b in zip(arrivals, arrivals[1:])), default=None),
    }


def _rate_figures(link, port, echo, seconds=4.0):
    """Flood both ways at 1.5 times the rate; time what arrives back to back."""
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    down = []

    def receive():
        client.settimeout(link.rtt + link.jitter + 3.0)
        try:
            while True:
                data = client.recv(4096)
                down.append((time.monotonic(), len(data) + 28))
        except OSError:
            pass

    reader = threading.Thread(target=receive, daemon=True)
    reader.start()
    echo.send_flood(client.getsockname(), 1.5 * link.rate, seconds)
    _flood(client, ("127.0.0.1", port), 1.5 * link.rate, seconds)
    reader.join()
    client.close()
    return {"rate_up": _arrival_rate(echo.flood), "rate_down": _arrival_rate(down)}


def format_measurement(m):
    """One line of what a link delivered."""
    ms = lambda s: "-" if s is None else "%d" % round(s * 1000)     # noqa: E731
    pct = lambda f: "-" if f is None else "%.1f %%" % (f * 100)     # noqa: E731
    line = ("measured: RTT %s ms (TCP ping, median of %d); UDP RTT p10/median/p90 "
            "%s/%s/%s ms; loss %s up, %s down (of %d)" % (
                ms(m["tcp_rtt_median"]), m["tcp_pings"], ms(m["udp_rtt_p10"]),
                ms(m["udp_rtt_median"]), ms(m["udp_rtt_p90"]), pct(m["loss_up"]),
                pct(m["loss_down"]), m["udp_pings"]))
    if "rate_up" in m:
        kbit = lambda r: "-" if r is None else "%.0f" % (r / 1000)  # noqa: E731
        line += "; rate %s up, %s down kbit/s" % (kbit(m["rate_up"]), kbit(m["rate_down"]))
    if m["longest_gap"] is not None and m["longest_gap"] > 1:
        line += "; longest silence %.1f s" % m["longest_gap"]
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--links", default=",".join(LINKS),
                        help="links to measure, comma-separated (default: all)")
    parser.add_argument("--seconds", type=float, default=8.0, help="ping time per link")
    parser.add_argument("--seed", type=int, default=1, help="the emulator's random seed")
    args = parser.parse_args(argv)
    names = args.links.split(",")
    unknown = [n for n in names if n not in LINKS]
    if unknown:
        parser.error("unknown link %s (known: %s)" % (", ".join(unknown), ", ".join(LINKS)))
    enter_new_netns()
    lost, late = prove_nfqueue()
    print("nfqueue: a packet queued with no reader %s; one held 300 ms arrived after %d ms"
          % ("was lost" if lost else "PASSED (queue bypassed?)", round(late * 1000)))
    for name in names:
        print("%s: asked %s" % (name, LINKS[name].describe()))
        print("  " + format_measurement(measure(LINKS[name], args.seconds, seed=args.seed)),
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
