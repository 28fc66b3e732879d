"""A fixed-bucket histogram, cheap to update and to publish (Prometheus style).

Buckets are counted separately (not cumulatively), one per bound plus one
for values above the last bound, so that histograms of several processes
add up element by element.
"""
from __future__ import annotations

import bisect

# Seconds from a message's arrival to the delivery of a recipient.
DELIVERY_LATENCY_BOUNDS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
                           900.0, 3600.0, 14400.0, 86400.0)


class Histogram:
    def __init__(self, bounds: tuple[float, ...] = DELIVERY_LATENCY_BOUNDS) -> None:
        self.bounds = bounds
        self.buckets = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        """Count `value` in the first bucket whose bound is >= it."""
        self.buckets[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> dict:
        """What a worker publishes in its stats (see workers.metrics)."""
        return {"buckets": list(self.buckets), "sum": self.sum, "count": self.count}


def cumulative(buckets: list[int], bounds: tuple[float, ...]) -> list[tuple[str, int]]:
    """(le label, cumulative count) pairs, ending with +Inf, as Prometheus wants them."""
    labels = [_bound_label(bound) for bound in bounds] + ["+Inf"]
    total = 0
    result = []
    for label, count in zip(labels, buckets):
        total += count
        result.append((label, total))
    return result


def _bound_label(bound: float) -> str:
    return f"{bound:g}"
