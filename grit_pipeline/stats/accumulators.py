"""Fixed-memory accumulators for the streaming pass: histograms, bounded top-k counters, a seeded bottom-k sample.

Each one takes a batch of values at a time (numpy or Arrow arrays) and holds a bounded amount of state however
many records flow through, so a corpus of any size is summarised in the same memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


class Histogram:
    """Counts of values in fixed bins ``[edges[i], edges[i+1])``, the last bin closed (like ``numpy.histogram``).

    Values below the first edge or above the last are counted apart (``underflow``/``overflow``), never dropped
    silently; NaNs are counted as ``invalid``. Exact sum, count, min and max ride along, so the mean is exact
    and quantiles are interpolated within a bin.
    """

    def __init__(self, edges: np.ndarray | list[float], unit: str = "", log: bool = False):
        self.edges = np.asarray(edges, dtype=np.float64)
        if self.edges.ndim != 1 or len(self.edges) < 2 or np.any(np.diff(self.edges) <= 0):
            raise ValueError("histogram edges must be a strictly increasing list of at least two values")
        self.counts = np.zeros(len(self.edges) - 1, dtype=np.int64)
        self.underflow = self.overflow = self.invalid = 0
        self.n = 0
        self.total = 0.0
        self.min = float("inf")
        self.max = float("-inf")
        self.unit = unit
        self.log = log

    def add(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.float64).ravel()
        if v.size == 0:
            return
        nan = np.isnan(v)
        if nan.any():
            self.invalid += int(nan.sum())
            v = v[~nan]
            if v.size == 0:
                return
        self.n += v.size
        self.total += float(v.sum())
        self.min = min(self.min, float(v.min()))
        self.max = max(self.max, float(v.max()))
        nbins = len(self.counts)
        idx = np.searchsorted(self.edges, v, side="right") - 1
        idx[v == self.edges[-1]] = nbins - 1  # the last bin is closed on the right
        self.underflow += int((idx < 0).sum())
        self.overflow += int((idx >= nbins).sum())
        inside = idx[(idx >= 0) & (idx < nbins)]
        self.counts += np.bincount(inside, minlength=nbins)

    def quantile(self, q: float) -> float | None:
        """Approximate quantile: linear inside the bin that holds it (exact at bin edges)."""
        if self.n == 0:
            return None
        target = q * self.n
        cum = self.underflow
        if target <= cum:
            return self.min
        for i, c in enumerate(self.counts):
            if c and cum + c >= target:
                lo, hi = self.edges[i], self.edges[i + 1]
                return float(lo + (hi - lo) * (target - cum) / c)
            cum += c
        return self.max

    def to_dict(self) -> dict[str, Any]:
        return {
            "edges": [float(e) for e in self.edges],
            "counts": self.counts.tolist(),
            "underflow": self.underflow,
            "overflow": self.overflow,
            "invalid": self.invalid,
            "n": self.n,
            "mean": self.total / self.n if self.n else None,
            "min": self.min if self.n else None,
            "max": self.max if self.n else None,
            "p50": self.quantile(0.5),
            "p90": self.quantile(0.9),
            "unit": self.unit,
            "log": self.log,
        }


class CountHistogram:
    """Distribution of a small non-negative integer (chunks per image, words per expression).

    Bins ``0, 1, ..., cap - 1`` and one ``cap+`` bin; sum and max are exact.
    """

    def __init__(self, cap: int, unit: str = ""):
        self.cap = cap
        self.counts = np.zeros(cap + 1, dtype=np.int64)
        self.n = 0
        self.total = 0
        self.max = 0
        self.unit = unit

    def add(self, values: Any) -> None:
        v = np.asarray(values, dtype=np.int64).ravel()
        if v.size == 0:
            return
        if (v < 0).any():
            raise ValueError("CountHistogram takes non-negative integers")
        self.n += v.size
        self.total += int(v.sum())
        self.max = max(self.max, int(v.max()))
        self.counts += np.bincount(np.minimum(v, self.cap), minlength=self.cap + 1)

    def to_dict(self) -> dict[str, Any]:
        return {
            "values": list(range(self.cap)) + [f"{self.cap}+"],
            "counts": self.counts.tolist(),
            "n": self.n,
            "total": self.total,
            "mean": self.total / self.n if self.n else None,
            "max": self.max if self.n else None,
            "unit": self.unit,
        }


class TopCounter:
    """Most frequent strings, in bounded memory.

    Counts merge batch by batch (Arrow's hash-based ``value_counts``); when more than ``2 * capacity`` distinct
    strings are held, the least frequent are pruned down to ``capacity``. Counts are exact as long as nothing
    was pruned (``exact``); after that they are lower bounds, off by at most ``max_pruned`` each, which is the
    usual trade of a bounded counter and leaves the heavy hitters in place.
    """

    def __init__(self, capacity: int = 50_000):
        self.capacity = capacity
        self.counts: dict[str, int] = {}
        self.n = 0
        self.max_pruned = 0

    @property
    def exact(self) -> bool:
        return self.max_pruned == 0

    def add(self, values: pa.Array | pa.ChunkedArray) -> None:
        values = values.drop_null() if hasattr(values, "drop_null") else values
        if len(values) == 0:
            return
        vc = pc.value_counts(values)
        keys = vc.field("values").to_pylist()
        ns = vc.field("counts").to_pylist()
        self.n += sum(ns)
        counts = self.counts
        for k, c in zip(keys, ns):
            counts[k] = counts.get(k, 0) + c
        if len(counts) > 2 * self.capacity:
            self._prune()

    def _prune(self) -> None:
        ordered = sorted(self.counts.items(), key=lambda kv: -kv[1])
        self.max_pruned = max(self.max_pruned, ordered[self.capacity][1])
        self.counts = dict(ordered[: self.capacity])

    def most_common(self, k: int) -> list[tuple[str, int]]:
        return sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def to_dict(self, k: int) -> dict[str, Any]:
        return {
            "top": [[s, c] for s, c in self.most_common(k)],
            "n": self.n,
            "distinct_held": len(self.counts),
            "exact": self.exact,
            "max_error": self.max_pruned,
        }


class BottomKSample:
    """A uniform random sample of ``k`` items from a stream: the ``k`` items with the smallest random priority.

    Priorities come from one seeded generator drawn batch by batch, so the same corpus read in the same order
    with the same seed gives the same sample. Only the chosen items are materialised.
    """

    def __init__(self, k: int, seed: int):
        self.k = k
        self.rng = np.random.default_rng(seed)
        self.items: list[tuple[float, Any]] = []

    def threshold(self) -> float:
        return self.items[-1][0] if len(self.items) >= self.k else float("inf")

    def offer(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Draw priorities for ``n`` candidates; return (indices that may enter, their priorities)."""
        prio = self.rng.random(n)
        if self.k <= 0:
            return np.empty(0, dtype=np.int64), np.empty(0)
        idx = np.flatnonzero(prio < self.threshold())
        if idx.size > self.k:
            idx = idx[np.argsort(prio[idx], kind="stable")[: self.k]]
        return idx, prio[idx]

    def add(self, priorities: np.ndarray, items: list[Any]) -> None:
        self.items.extend(zip(priorities.tolist(), items))
        self.items.sort(key=lambda pi: pi[0])
        del self.items[self.k :]

    def sample(self) -> list[Any]:
        return [item for _, item in self.items]
