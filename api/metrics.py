"""Prometheus metrics for ``GET /metrics``.

:class:`Metrics` owns its own ``CollectorRegistry``, so several apps (and tests) in one process
never share or collide on series. Two kinds of series:

- observed by the caller: ``deja_decisions_total{decision}``, ``deja_dry_run_checks_total``,
  ``deja_check_duration_seconds``, ``deja_novelty_score``, ``deja_handoff_ack_seconds``,
  ``deja_handoff_resolve_seconds``;
- read at scrape time from callables given to :meth:`Metrics.bind`: ``deja_kb_incidents``,
  ``deja_index_vectors``, ``deja_escalations_open``, ``deja_embedding_cache_hits_total``,
  ``deja_embedding_cache_misses_total``. State that lives elsewhere (the KB, the index, the cache's
  own counters) is read where it lives, never mirrored, so it cannot drift.

The only label is ``decision`` (replay | review | escalate): no ids, services or texts, whose
cardinality grows without bound.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from api.schemas import Verdict

__all__ = [
    "CHECK_BUCKETS",
    "CONTENT_TYPE",
    "DECISIONS",
    "HANDOFF_BUCKETS",
    "NOVELTY_BUCKETS",
    "Metrics",
]

log = logging.getLogger("deja.metrics")
_T = TypeVar("_T")

DECISIONS = ("replay", "review", "escalate")
# generate_latest writes text format 0.0.4 (legacy names), so the header says so; recent releases
# of the library point CONTENT_TYPE_LATEST at format 1.0.0 instead, which older scrapers predate.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Seconds per check call: a cached single check takes milliseconds, a 1,000-event batch that
#: pays the model takes tens of seconds.
CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Novelty scores live in [0, 1]; twenty equal buckets show where the threshold cuts.
NOVELTY_BUCKETS = tuple(round(i / 20, 2) for i in range(1, 21))
#: Handoff SLAs run from minutes (critical acks) to days (resolving a review).
HANDOFF_BUCKETS = (30.0, 60.0, 120.0, 300.0, 600.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0,
                   28800.0, 86400.0, 259200.0)


@dataclass(frozen=True)
class _Sources:
    incidents: Callable[[], int]
    vectors: Callable[[], int]
    open_escalations: Callable[[], int]
    cache: Callable[[], tuple[int, int]]


class _ScrapeTimeCollector(Collector):
    """Series read from the bound callables at each scrape.

    A callable that raises (the store closing during shutdown) drops its series from that
    scrape and logs a warning, instead of failing the whole scrape.
    """

    _GAUGES = (
        ("deja_kb_incidents", "Incidents in the knowledge base.", "incidents"),
        ("deja_index_vectors", "Vectors in the similarity index.", "vectors"),
        ("deja_escalations_open", "Escalations and reviews not yet resolved.",
         "open_escalations"),
    )
    _CACHE = (
        ("deja_embedding_cache_hits", "Embeddings served from the cache."),
        ("deja_embedding_cache_misses", "Embeddings the model had to compute."),
    )

    def __init__(self) -> None:
        self.sources: _Sources | None = None

    def describe(self) -> Iterable[Metric]:
        # Names only, so the registry can refuse duplicates without calling the sources.
        yield from (GaugeMetricFamily(name, doc) for name, doc, _ in self._GAUGES)
        yield from (CounterMetricFamily(name, doc) for name, doc in self._CACHE)

    def collect(self) -> Iterable[Metric]:
        sources = self.sources
        if sources is None:
            return
        for name, doc, attr in self._GAUGES:
            value = _read(name, getattr(sources, attr))
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        counts = _read("deja_embedding_cache", sources.cache)
        if counts is not None:
            for (name, doc), value in zip(self._CACHE, counts, strict=True):
                yield CounterMetricFamily(name, doc, value=value)


def _read(name: str, source: Callable[[], _T]) -> _T | None:
    try:
        return source()
    except Exception:
        log.warning("metrics: reading %s failed; left out of this scrape", name, exc_info=True)
        return None


class Metrics:
    """Deja's Prometheus series in a registry of their own.

    Thread-safe: observations may come from any request thread while a scrape renders.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.decisions = Counter("deja_decisions", "Audited verdicts by decision.",
                                 ["decision"], registry=r)
        for decision in DECISIONS:
            # Every decision shows from the first scrape, so rate() sees a 0 → 1 step.
            self.decisions.labels(decision)
        self.dry_runs = Counter("deja_dry_run_checks", "Dry-run checks (no audit, no handoff).",
                                registry=r)
        self.check_seconds = Histogram("deja_check_duration_seconds",
                                       "Wall time of one check call (single event or batch).",
                                       buckets=CHECK_BUCKETS, registry=r)
        self.novelty = Histogram("deja_novelty_score",
                                 "Novelty score of audited checks (higher is more novel).",
                                 buckets=NOVELTY_BUCKETS, registry=r)
        self.ack_seconds = Histogram("deja_handoff_ack_seconds",
                                     "Seconds from opening a handoff to its acknowledgement.",
                                     buckets=HANDOFF_BUCKETS, registry=r)
        self.resolve_seconds = Histogram("deja_handoff_resolve_seconds",
                                         "Seconds from opening a handoff to its resolution.",
                                         buckets=HANDOFF_BUCKETS, registry=r)
        self._scrape_time = _ScrapeTimeCollector()
        r.register(self._scrape_time)

    def observe_verdicts(self, verdicts: Sequence[Verdict], seconds: float) -> None:
        """Record one check call that took ``seconds`` and returned ``verdicts``.

        The call's duration is observed once, whatever the batch size. Each audited verdict adds
        to ``deja_decisions_total`` and ``deja_novelty_score``; dry runs only to
        ``deja_dry_run_checks_total``, so that the decision counts match the audit trail.
        """
        if math.isfinite(seconds):
            self.check_seconds.observe(max(seconds, 0.0))
        for v in verdicts:
            if v.dry_run:
                self.dry_runs.inc()
                continue
            self.decisions.labels(v.decision).inc()
            if math.isfinite(v.novelty.score):
                self.novelty.observe(v.novelty.score)

    def observe_handoff(self, ack_seconds: float | None, resolve_seconds: float | None) -> None:
        """Record how long a handoff took to be acknowledged and/or resolved (from its opening).

        ``None`` skips that histogram; so does NaN or infinity. A negative duration (clock skew
        between the stored and the current time) counts as zero.
        """
        if ack_seconds is not None and math.isfinite(ack_seconds):
            self.ack_seconds.observe(max(ack_seconds, 0.0))
        if resolve_seconds is not None and math.isfinite(resolve_seconds):
            self.resolve_seconds.observe(max(resolve_seconds, 0.0))

    def bind(self, *, incidents: Callable[[], int], vectors: Callable[[], int],
             open_escalations: Callable[[], int], cache: Callable[[], tuple[int, int]]) -> None:
        """Read these at every scrape: KB incidents, index vectors, open escalations and the
        embedding cache's cumulative ``(hits, misses)``. Binding again replaces the sources;
        until the first bind those series are absent."""
        # One attribute assignment: a concurrent scrape sees the old sources or the new ones.
        self._scrape_time.sources = _Sources(incidents, vectors, open_escalations, cache)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type (Prometheus text format 0.0.4)."""
        return generate_latest(self.registry), CONTENT_TYPE
