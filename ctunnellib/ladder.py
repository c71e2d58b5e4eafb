"""The check ladder: the tunnel's process, its link, then each forward, cheapest first.

Each check returns a verdict and prints nothing. The first DOWN ends the
ladder: the caller (tick.py) repairs the tunnel. A healthy ladder runs no
program and writes nothing.
"""

import time

from .clients import client_of, find_tunnel_processes, is_tunnel_process
from .model import (CONFIG_CHANGED, DOWN, GONE, NOT_OURS, NOT_RUNNING, PROCESS, UP, Verdict,
                    changed_settings)
from .procfs import process_alive
from .statefiles import pidfile_names, read_launch, write_pidfile
from .tcp import TcpTable


FEW = 16                     # threads that check tunnels side by side, at first
PARALLEL = 32               # at most, while some tunnels take long (a thread each)
SLOW = 0.25                 # seconds a tunnel takes before it makes room for another thread


def check_process(tunnel, adopt=False, record=True):
    """Is the pidfile's PID alive, this tunnel's client, and launched as the config
    says now? Return (pid, Verdict).

    adopt: with no usable pidfile, look for this tunnel's client by its token
    (a launch whose pidfile could not be written: a full disk) and, if record,
    record it rather than start a second one.
    """
    launch = read_launch(tunnel)
    if launch is None:
        found = find_tunnel_processes(tunnel) if adopt else []
        if len(found) != 1:
            return None, Verdict("process", DOWN, NOT_RUNNING, PROCESS, NOT_RUNNING)
        try:
            if record:
                write_pidfile(tunnel, found[0])
        except OSError:
            pass                    # still full: adopted again next tick
        return found[0], Verdict("process", UP, "pid %d, adopted (it had no pidfile)"
                                 % found[0], PROCESS, pid=found[0])
    pid = launch.pid
    if not process_alive(pid):
        return None, Verdict("process", DOWN, "process %d gone" % pid, PROCESS, GONE)
    if not is_tunnel_process(pid, tunnel, launch):
        return None, Verdict("process", DOWN, "pidfile names PID %d, which is not this "
                             "tunnel's ssh" % pid, PROCESS, NOT_OURS)
    changed = changed_settings(launch.settings, tunnel) if launch.settings else []
    if changed:
        return None, Verdict("process", DOWN, "config changed (%s)" % ", ".join(changed),
                             PROCESS, CONFIG_CHANGED)
    return pid, Verdict("process", UP, "pid %d" % pid, PROCESS, pid=pid)


def run_ladder(tunnel, launched=None, table=None, adopt=False, record=True):
    """Run the checks cheapest first; stop at the first DOWN.

    Returns the list of verdicts reached; the tunnel is healthy if none is DOWN.
    launched: the PID of a client just launched; the ladder then starts at
    its link. table: the tick's TcpTable, shared by every tunnel of the tick.
    """
    table = table or TcpTable()
    table.enter()
    try:
        return _run_ladder(tunnel, launched, table, adopt, record)
    finally:
        table.leave()


def _run_ladder(tunnel, launched, table, adopt, record):
    client = client_of(tunnel)
    verdicts, expected = [], launched
    if not launched:
        expected, verdict = check_process(tunnel, adopt, record)
        verdicts.append(verdict)
        if expected is None:
            return verdicts
    pid, verdict = client.check_link(tunnel, expected, table)
    verdicts.append(verdict)
    if pid is None:
        return verdicts
    for forward in sorted(tunnel.forwards, key=lambda f: f.kind):    # -L first
        check = client.check_local if forward.kind == "L" else client.check_remote
        verdicts.append(check(tunnel, forward, pid, table))
        if verdicts[-1].state == DOWN:
            break
    return verdicts


def find_orphans(tunnels, names):
    """Tunnels no longer in the config whose client still runs: [(ghost, pid)].

    A pidfile in a state_dir of the config, of a name that is no section of it
    (names: all of them, bad ones too), whose process is that launch's client.
    The ghost is a tunnel of the config in the same state_dir under the
    orphan's name: which process is a tunnel's depends only on its state_dir,
    its name and its launch record.
    """
    found, seen = [], set()
    for tunnel in tunnels:
        if tunnel.state_dir in seen:
            continue
        seen.add(tunnel.state_dir)
        for name in sorted(pidfile_names(tunnel.state_dir)):
            if name in names:
                continue
            ghost = tunnel._replace(name=name)
            launch = read_launch(ghost)
            if launch and process_alive(launch.pid) and \
                    is_tunnel_process(launch.pid, ghost, launch):
                found.append((ghost, launch.pid))
    return found


def for_each(items, work):
    """Return [work(item) for item in items], side by side in a few threads.

    A few threads check a healthy fleet of tunnels at the least cost (more
    would spend the CPU handing Python's lock to one another). A tunnel that
    takes long (a silent server: up to check_timeout) makes room for one
    more thread, up to PARALLEL, so that one silent server cannot hold up
    the rest. One tunnel needs no thread at all.
    """
    if len(items) < 2:
        return [work(item) for item in items]
    import threading
    results, queue, workers = [None] * len(items), list(enumerate(items)), []
    failed = []             # what work raised: raised again here, in the caller's thread
    changed = threading.Condition()

    def worker(since):
        """since: [when this worker took its current item]."""
        try:
            while True:
                with changed:
                    if not queue or failed:
                        return
                    index, item = queue.pop()
                    since[0] = time.monotonic()
                results[index] = work(item)
        except Exception as e:
            failed.append(e)
        finally:
            with changed:
                workers.remove(since)
                changed.notify()

    def add_worker():
        since = [time.monotonic()]
        workers.append(since)
        # a daemon: Ctrl-C ends the tick at once, not after the slowest tunnel
        threading.Thread(target=worker, args=(since,), daemon=True).start()
    with changed:
        for _ in range(min(FEW, len(items))):
            add_worker()
        while workers:
            changed.wait(SLOW)
            if queue and len(workers) < PARALLEL and \
                    any(time.monotonic() - since[0] > SLOW for since in workers):
                add_worker()
    if failed:
        raise failed[0]
    return results
