"""Prometheus metrics: observations move the series, bound callables are read at scrape time."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from api.deja import Deja
from api.metrics import Metrics
from api.scenarios import demo_checks, demo_kb
from api.schemas import EventIn, Novelty, Verdict
from embeddings import HashingEncoder

NAMES = [
    "deja_decisions_total", "deja_dry_run_checks_total", "deja_check_duration_seconds",
    "deja_novelty_score", "deja_escalations_open", "deja_handoff_ack_seconds",
    "deja_handoff_resolve_seconds", "deja_kb_incidents", "deja_index_vectors",
    "deja_embedding_cache_hits_total", "deja_embedding_cache_misses_total",
]


def verdict(decision: str, score: float, *, dry_run: bool = False) -> Verdict:
    return Verdict.model_validate({
        "decision_id": None if dry_run else f"dec-{decision}-{score}", "decision": decision,
        "novelty": Novelty(score=score, is_novel=decision == "escalate", threshold=0.5,
                           nearest_similarity=1 - score, components={}),
        "confidence": 0.9, "resolution": None, "neighbors": [], "reasons": [],
        "policy_version": 1, "model": "fake", "dry_run": dry_run})


def value(m: Metrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def bound(m: Metrics, **overrides: object) -> Metrics:
    sources = {"incidents": lambda: 450, "vectors": lambda: 382,
               "open_escalations": lambda: 7, "cache": lambda: (12, 3)}
    m.bind(**{**sources, **overrides})  # type: ignore[arg-type]
    return m


def test_every_series_is_exposed() -> None:
    body, content_type = bound(Metrics()).render()
    text = body.decode()
    assert content_type.startswith("text/plain; version=0.0.4")
    for name in NAMES:
        assert f"\n{name}" in f"\n{text}", name
    # The exposition parses as Prometheus text.
    families = {f.name for f in text_string_to_metric_families(text)}
    assert {"deja_decisions", "deja_novelty_score", "deja_kb_incidents"} <= families


def test_decisions_start_at_zero_for_every_decision() -> None:
    m = Metrics()
    for decision in ("replay", "review", "escalate"):
        assert value(m, "deja_decisions_total", decision=decision) == 0.0


def test_observe_verdicts_counts_decisions_and_scores() -> None:
    m = Metrics()
    m.observe_verdicts([verdict("replay", 0.1), verdict("escalate", 0.97),
                        verdict("escalate", 0.91), verdict("review", 0.4)], 0.2)
    assert value(m, "deja_decisions_total", decision="escalate") == 2.0
    assert value(m, "deja_decisions_total", decision="replay") == 1.0
    assert value(m, "deja_decisions_total", decision="review") == 1.0
    assert value(m, "deja_novelty_score_count") == 4.0
    assert value(m, "deja_novelty_score_sum") == pytest.approx(0.1 + 0.97 + 0.91 + 0.4)
    assert value(m, "deja_novelty_score_bucket", le="0.1") == 1.0
    assert value(m, "deja_novelty_score_bucket", le="0.5") == 2.0
    assert value(m, "deja_novelty_score_bucket", le="0.95") == 3.0
    assert value(m, "deja_novelty_score_bucket", le="1.0") == 4.0
    # One check call, one duration, whatever the batch size.
    assert value(m, "deja_check_duration_seconds_count") == 1.0
    assert value(m, "deja_check_duration_seconds_sum") == pytest.approx(0.2)
    assert value(m, "deja_check_duration_seconds_bucket", le="0.25") == 1.0
    assert value(m, "deja_check_duration_seconds_bucket", le="0.1") == 0.0


def test_dry_runs_are_counted_apart_from_decisions() -> None:
    m = Metrics()
    m.observe_verdicts([verdict("replay", 0.1, dry_run=True),
                        verdict("escalate", 0.9, dry_run=True)], 0.05)
    assert value(m, "deja_dry_run_checks_total") == 2.0
    assert value(m, "deja_decisions_total", decision="replay") == 0.0
    assert value(m, "deja_novelty_score_count") == 0.0
    assert value(m, "deja_check_duration_seconds_count") == 1.0


@pytest.mark.parametrize(("ack", "resolve", "acks", "resolves"), [
    (45.0, None, 1, 0), (None, 3600.0, 0, 1), (30.0, 900.0, 1, 1), (None, None, 0, 0),
    (math.nan, math.inf, 0, 0),
])
def test_observe_handoff(ack: float | None, resolve: float | None, acks: int,
                         resolves: int) -> None:
    m = Metrics()
    m.observe_handoff(ack, resolve)
    assert value(m, "deja_handoff_ack_seconds_count") == acks
    assert value(m, "deja_handoff_resolve_seconds_count") == resolves


def test_negative_handoff_durations_count_as_zero() -> None:
    m = Metrics()
    m.observe_handoff(-2.0, None)
    assert value(m, "deja_handoff_ack_seconds_sum") == 0.0
    assert value(m, "deja_handoff_ack_seconds_bucket", le="30.0") == 1.0


def test_bound_sources_are_read_at_every_scrape() -> None:
    state = {"incidents": 10, "hits": 0}
    m = Metrics()
    assert value(m, "deja_kb_incidents") is None  # absent until bound
    bound(m, incidents=lambda: state["incidents"], cache=lambda: (state["hits"], 4))
    assert value(m, "deja_kb_incidents") == 10.0
    state["incidents"], state["hits"] = 11, 5
    assert value(m, "deja_kb_incidents") == 11.0
    assert value(m, "deja_embedding_cache_hits_total") == 5.0
    assert value(m, "deja_embedding_cache_misses_total") == 4.0
    assert value(m, "deja_index_vectors") == 382.0
    assert value(m, "deja_escalations_open") == 7.0


def test_a_failing_source_drops_only_its_series(caplog: pytest.LogCaptureFixture) -> None:
    def closed() -> int:
        raise RuntimeError("store is closed")

    m = bound(Metrics(), open_escalations=closed)
    text = m.render()[0].decode()
    assert "deja_escalations_open" not in text
    assert "deja_kb_incidents 450.0" in text
    assert "reading deja_escalations_open failed" in caplog.text


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics()
    a.observe_verdicts([verdict("review", 0.3)], 0.01)
    assert value(a, "deja_decisions_total", decision="review") == 1.0
    assert value(b, "deja_decisions_total", decision="review") == 0.0


def test_metrics_bound_to_a_deja(tmp_path: Path) -> None:
    deja = Deja.open(tmp_path, encoder=HashingEncoder(64))
    try:
        m = Metrics()
        m.bind(incidents=deja.store.count_incidents, vectors=lambda: deja.index.ntotal,
               open_escalations=deja.store.count_active_escalations,
               cache=lambda: (deja.cache.stats.hits, deja.cache.stats.misses))
        deja.ingest([EventIn.model_validate(e) for e in demo_kb(0)[:60]])
        verdicts = deja.check([EventIn.model_validate(e) for e in demo_checks(0)])
        m.observe_verdicts(verdicts, 0.3)
        stats = deja.stats()
        assert value(m, "deja_kb_incidents") == stats.incidents == 60
        assert value(m, "deja_index_vectors") == stats.index["vectors"]
        assert value(m, "deja_escalations_open") == stats.open_escalations
        assert value(m, "deja_embedding_cache_misses_total") == stats.cache["misses"]
        total = sum(value(m, "deja_decisions_total", decision=d) or 0.0
                    for d in ("replay", "review", "escalate"))
        assert total == len(verdicts) == stats.decisions
    finally:
        deja.close()
