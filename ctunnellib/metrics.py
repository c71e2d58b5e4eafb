"""The metrics file: each tick's outcome for node_exporter's textfile collector.

A tunnel with metrics_file = PATH (usually in [DEFAULT]) is written, with
every tunnel that names the same file, into PATH after each tick, in the
Prometheus text format: replaced whole (a temp file, then a rename), so a
scrape never reads half of one, and a tick that dies half way leaves the last
one. Counters come from the tunnels' state records, which only grow.
"""

from .model import UP
from .statefiles import read_state, write_atomic

FAMILIES = (
    ("ctunnel_up", "gauge", "Whether the tunnel is up at the end of the last tick."),
    ("ctunnel_check", "gauge", "The verdict each check reached in the last tick (1 for it)."),
    ("ctunnel_restarts_total", "counter", "Restarts of the tunnel, one per outage."),
    ("ctunnel_failures_total", "counter", "Launches of the tunnel that failed."),
    ("ctunnel_last_restart_timestamp_seconds", "gauge",
     "When the tunnel was last started or restarted."),
    ("ctunnel_last_restart_reason", "gauge",
     "Why the tunnel was last started or restarted (1 for the reason)."),
    ("ctunnel_forward_proof_seconds", "gauge",
     "How long the last proof of a forward's data path took."),
    ("ctunnel_tick_duration_seconds", "gauge", "How long the last tick took."),
    ("ctunnel_tick_timestamp_seconds", "gauge", "When the last tick ended."),
)


def write_metrics(tunnels, outcomes, began, ended):
    """Write each metrics_file the tunnels name, with the outcome of each of its tunnels.

    Returns [(path, error)] for the files that could not be written.
    """
    by_file = {}
    for tunnel, outcome in zip(tunnels, outcomes):
        if tunnel.metrics_file:
            by_file.setdefault(tunnel.metrics_file, []).append((tunnel, outcome))
    failed = []
    for path, pairs in sorted(by_file.items()):
        try:
            write_atomic(path, render(pairs, ended - began, ended), mode=0o644)
        except OSError as e:
            failed.append((path, e.strerror or str(e)))
    return failed


def render(pairs, took, ended):
    """The text of a metrics file for [(tunnel, outcome)]."""
    samples = {name: [] for name, _, _ in FAMILIES}
    for tunnel, outcome in pairs:
        state = read_state(tunnel)
        name = {"tunnel": tunnel.name}
        samples["ctunnel_up"].append((name, int(bool(outcome.healthy))))
        for v in outcome.verdicts:
            samples["ctunnel_check"].append((dict(name, check=v.check, verdict=v.state), 1))
            if v.took is not None and v.state == UP:
                samples["ctunnel_forward_proof_seconds"].append(
                    (dict(name, check=v.check), round(v.took, 6)))
        samples["ctunnel_restarts_total"].append((name, state.get("restarts", 0)))
        samples["ctunnel_failures_total"].append((name, state.get("failures_total", 0)))
        if state.get("last_restart"):
            samples["ctunnel_last_restart_timestamp_seconds"].append(
                (name, state["last_restart"]))
            samples["ctunnel_last_restart_reason"].append(
                (dict(name, reason=state.get("reason_code", "unknown")), 1))
    samples["ctunnel_tick_duration_seconds"].append(({}, round(took, 3)))
    samples["ctunnel_tick_timestamp_seconds"].append(({}, int(ended)))
    lines = []
    for family, kind, help_text in FAMILIES:
        lines += ["# HELP %s %s" % (family, help_text), "# TYPE %s %s" % (family, kind)]
        lines += ["%s%s %s" % (family, _labels(labels), value)
                  for labels, value in samples[family]]
    return "\n".join(lines) + "\n"


def _labels(labels):
    if not labels:
        return ""
    return "{%s}" % ",".join('%s="%s"' % (key, str(value).replace("\\", "\\\\").replace(
        '"', '\\"').replace("\n", "\\n")) for key, value in sorted(labels.items()))
