"""Counters across processes, and their Prometheus text exposition.

Every worker publishes `ctx.stats` in its status file each second (see
workers/process.py).  Counters there are per process; the master adds the
last published counters of every worker that exits to its own
`retired` totals (in master.status), so that a sum over the live workers
plus the retired totals only grows, across reloads and respawns.

Everything here is pure: `add_counters` folds stats, `render` turns a
snapshot (master status, worker statuses, queue size, ratelimit fill)
into the text format (version 0.0.4) that Prometheus scrapes.
"""
from __future__ import annotations

from typing import Any, Iterable

from mta.histogram import DELIVERY_LATENCY_BOUNDS, cumulative

# Stats that are levels, not counts: never summed into the retired totals.
GAUGE_KEYS = frozenset({"connections", "deliveries_in_flight", "queued", "idle_connections",
                        "hosts_in_retry", "slot", "socks_proxies"})

# (metric name, stats key, help) for plain counters.
COUNTERS = (
    ("mta_smtp_connections_total", "connections_total", "SMTP connections accepted"),
    ("mta_proxy_sessions_total", "proxy_sessions", "PROXY protocol headers read successfully"),
    ("mta_proxy_failures_total", "proxy_failures", "PROXY protocol negotiations that failed"),
    ("mta_ratelimit_defers_total", "ratelimit_defers", "ACL defers decided by a statement with a ratelimit condition"),
    ("mta_messages_received_total", "received", "messages accepted and spooled (250 sent)"),
    ("mta_runner_notifications_dropped_total", "notify_dropped", "new-message notices a queue runner's inbox refused"),
    ("mta_recipients_delivered_total", "delivered", "recipients delivered"),
    ("mta_recipients_deferred_total", "deferred", "recipient delivery attempts deferred"),
    ("mta_recipients_failed_total", "failed", "recipients failed permanently"),
    ("mta_messages_completed_total", "completed", "messages with every recipient done (removed from the spool)"),
    ("mta_bounces_total", "bounces", "delivery status notifications generated"),
    ("mta_queue_scans_total", "scans", "spool scans by the queue runners"),
    ("mta_metrics_scrapes_total", "scrapes", "metrics requests served"),
)


def add_counters(total: dict, stats: dict) -> dict:
    """Add the counters in `stats` to `total` (in place; returned).

    Numbers add; dicts (counters by label) add key by key; lists (histogram
    buckets) add element by element.  GAUGE_KEYS and other values are left out.
    """
    for key, value in stats.items():
        if key in GAUGE_KEYS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            total[key] = total.get(key, 0) + value
        elif isinstance(value, dict):
            add_counters(total.setdefault(key, {}), value)
        elif isinstance(value, list) and all(isinstance(item, (int, float)) for item in value):
            total[key] = _add_lists(total.get(key, []), value)
    return total


def _add_lists(left: list, right: list) -> list:
    longer, shorter = (left, right) if len(left) >= len(right) else (right, left)
    return [a + (shorter[i] if i < len(shorter) else 0) for i, a in enumerate(longer)]


def live_workers(master: dict, statuses: dict[int, dict]) -> list[tuple[dict, dict]]:
    """(the master's record, the worker's own status or {}) per worker."""
    return [(worker, statuses.get(worker["pid"], {})) for worker in master.get("workers", [])]


def totals(master: dict, workers: list[tuple[dict, dict]]) -> dict:
    """Retired totals plus every live worker's counters."""
    total = add_counters({}, master.get("retired", {}))
    for _, status in workers:
        add_counters(total, status.get("stats", {}))
    return total


def render(master: dict, statuses: dict[int, dict], queue_size: int,
           ratelimit_fill: tuple[int, int] | None, socks_proxies: list[dict]) -> str:
    """The whole exposition; `statuses` maps worker pid to its status record,
    `socks_proxies` is the shared proxy pool's snapshot (shared.proxypool)."""
    workers = live_workers(master, statuses)
    counted = totals(master, workers)
    out = _Exposition()
    for name, key, help_text in COUNTERS:
        out.metric(name, "counter", help_text, [({}, counted.get(key, 0))])
    out.metric("mta_acl_verdicts_total", "counter", "policy verdicts by SMTP stage (ACL or built-in rule)",
               [(dict(zip(("stage", "verdict"), key.split(":", 1))), value)
                for key, value in sorted(counted.get("acl", {}).items())])
    if counted.get("proxy_failure_reasons"):
        out.metric("mta_proxy_failure_reasons_total", "counter", "PROXY protocol failures by reason",
                   [({"reason": reason}, value) for reason, value in sorted(counted["proxy_failure_reasons"].items())])
    _latency(out, counted.get("delivery_latency"))
    _gauges(out, master, workers, queue_size, ratelimit_fill)
    _socks(out, socks_proxies)
    return out.text()


def _latency(out: "_Exposition", histogram: dict | None) -> None:
    if not histogram:
        return
    rows = [({"le": le}, count) for le, count in cumulative(histogram.get("buckets", []), DELIVERY_LATENCY_BOUNDS)]
    out.histogram("mta_delivery_latency_seconds", "time from a message's arrival to a recipient's delivery",
                  rows, histogram.get("sum", 0), histogram.get("count", 0))


def _gauges(out: "_Exposition", master: dict, workers: list[tuple[dict, dict]], queue_size: int,
            ratelimit_fill: tuple[int, int] | None) -> None:
    out.metric("mta_master_generation", "gauge", "configuration generation (bumped by each reload)",
               [({}, master.get("generation", 0))])
    by_kind: dict[tuple[str, str], int] = {}
    for worker, _ in workers:
        state = "retiring" if worker.get("retiring") else "serving"
        by_kind[(worker["kind"], state)] = by_kind.get((worker["kind"], state), 0) + 1
    out.metric("mta_workers", "gauge", "worker processes by kind and state",
               [({"kind": kind, "state": state}, count) for (kind, state), count in sorted(by_kind.items())])
    out.metric("mta_smtp_sessions", "gauge", "SMTP connections open now",
               [({}, sum(status.get("stats", {}).get("connections", 0) for _, status in workers))])
    out.metric("mta_deliveries_in_flight", "gauge", "deliveries running now",
               [({}, sum(status.get("stats", {}).get("deliveries_in_flight", 0) for _, status in workers))])
    out.metric("mta_queue_messages", "gauge", "messages in the spool", [({}, queue_size)])
    if ratelimit_fill is not None:
        out.metric("mta_ratelimit_records", "gauge", "records in use in the ratelimit table",
                   [({}, ratelimit_fill[0])])
        out.metric("mta_ratelimit_slots", "gauge", "records the ratelimit table holds", [({}, ratelimit_fill[1])])


def _socks(out: "_Exposition", rows: list[dict]) -> None:
    labelled = [({"proxy": f"{row.get('ip')}:{row.get('port')}"}, row) for row in rows]
    out.metric("mta_socks_dials_total", "counter", "connections attempted through each SOCKS5 proxy",
               [(labels, row.get("dials", 0)) for labels, row in labelled])
    out.metric("mta_socks_failures_total", "counter", "failed attempts through each SOCKS5 proxy",
               [(labels, row.get("failures", 0)) for labels, row in labelled])
    out.metric("mta_socks_in_use", "gauge", "connections open through each SOCKS5 proxy",
               [(labels, row.get("in_use", 0)) for labels, row in labelled])
    out.metric("mta_socks_down", "gauge", "1 while a SOCKS5 proxy is held down after failures",
               [(labels, 1 if row.get("down_until") else 0) for labels, row in labelled])


class _Exposition:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def metric(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict, Any]]) -> None:
        self.lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} {kind}"]
        self.lines += [f"{name}{_labels(labels)} {_number(value)}" for labels, value in samples]

    def histogram(self, name: str, help_text: str, buckets: list[tuple[dict, int]], total: float,
                  count: int) -> None:
        self.lines += [f"# HELP {name} {help_text}.", f"# TYPE {name} histogram"]
        self.lines += [f"{name}_bucket{_labels(labels)} {value}" for labels, value in buckets]
        self.lines += [f"{name}_sum {_number(total)}", f"{name}_count {count}"]

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape(str(value))}"' for key, value in labels.items()) + "}"


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: Any) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(int(value))
