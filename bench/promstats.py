"""Read the server's Prometheus text: counters and histogram quantiles between two snapshots."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families


def scrape(base_url: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value), ...]} from GET /metrics; empty if the route is missing."""
    try:
        resp = httpx.get(base_url + "/metrics", timeout=10)
    except httpx.HTTPError:
        return {}
    if resp.status_code != 200:
        return {}
    return parse(resp.text)


def parse(text: str) -> dict[str, list[tuple[dict, float]]]:
    """{sample name: [(labels, value), ...]} of Prometheus text."""
    out: dict[str, list[tuple[dict, float]]] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out.setdefault(s.name, []).append((dict(s.labels), s.value))
    return out


def total(snap: dict, name: str, **match: str) -> float:
    """The sum of a sample over its label sets, or over those whose labels include ``match``."""
    return sum(v for labels, v in snap.get(name, []) if all(labels.get(k) == x for k, x in match.items()))


def histogram_buckets(snap: dict, name: str) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of a histogram, summed over its label sets."""
    acc: dict[float, float] = {}
    for labels, v in snap.get(name + "_bucket", []):
        le = float(labels["le"])
        acc[le] = acc.get(le, 0.0) + v
    return sorted(acc.items())


def histogram_delta(before: dict, after: dict, name: str) -> list[tuple[float, float]]:
    b = dict(histogram_buckets(before, name))
    return [(le, c - b.get(le, 0.0)) for le, c in histogram_buckets(after, name)]


def bucket_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Prometheus' histogram_quantile: linear interpolation inside the bucket holding rank q·n."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    n = buckets[-1][1]
    rank = q * n
    prev_le, prev_c = 0.0, 0.0
    for le, c in buckets:
        if c >= rank:
            if le == float("inf"):
                return prev_le  # above the largest finite bound: report that bound (a lower limit)
            if c == prev_c:
                return le
            return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
        prev_le, prev_c = le, c
    return prev_le


def bucket_upper_bound(buckets: list[tuple[float, float]], q: float) -> float | None:
    """The smallest bucket bound with at least q·n observations at or below it (a hard upper bound)."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    for le, c in buckets:
        if c >= rank:
            return le
    return float("inf")
