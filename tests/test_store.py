"""The DuckDB knowledge base (kb/store.py, kb/migrations.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kb import (
    DecisionRecord,
    DejaError,
    EscalationRecord,
    IncidentNotFound,
    NewIncident,
    Store,
    kb_ref,
    parse_kb_ref,
)
from kb.migrations import MIGRATIONS


def _incident(title: str = "Disk full", *, client_id: str | None = None,
              fingerprint: str | None = None, **kw: object) -> NewIncident:
    return NewIncident(title=title, masked=title, fingerprint=fingerprint or f"fp-{title}",
                       client_id=client_id, **kw)  # type: ignore[arg-type]


def _decision(decision_id: str, decision: str = "escalate", **kw: object) -> DecisionRecord:
    values: dict[str, object] = {
        "decision_id": decision_id, "event": {"title": f"event {decision_id}"},
        "fingerprint": "fp", "service": "db", "severity": "error", "decision": decision,
        "score": 0.75, "is_novel": decision == "escalate", "threshold": 0.5,
        "confidence": 0.25, "components": {"distance": 0.5}, "neighbor_ids": [1, 2],
        "neighbor_similarities": [0.5, 0.25], "reasons": ["because"], "resolution": None,
        "policy_version": 1, "model_id": "hashing-64"}
    values.update(kw)
    return DecisionRecord(**values)  # type: ignore[arg-type]


# -- migrations -------------------------------------------------------------------------------


def test_migrations_are_recorded(store: Store) -> None:
    rows = store.sql("SELECT version, name FROM schema_migrations ORDER BY version")
    assert rows == [(n, name) for n, name, _ in sorted(MIGRATIONS, key=lambda m: m[0])]


def test_reopening_a_file_keeps_data_and_applies_no_migration_twice(tmp_path: Path) -> None:
    path = tmp_path / "kb.duckdb"
    first = Store(path)
    first.add_incidents([_incident("Disk full", client_id="a")])
    applied_at = first.sql("SELECT version, applied_at FROM schema_migrations")
    first.close()

    second = Store(path)
    try:
        assert second.sql("SELECT version, applied_at FROM schema_migrations") == applied_at
        assert second.count_incidents() == 1
        assert second.get_incident("a").title == "Disk full"
    finally:
        second.close()


# -- incidents ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shared_store() -> Iterator[Store]:
    s = Store(":memory:")
    try:
        yield s
    finally:
        s.close()


_LABELS = st.dictionaries(st.text(min_size=1, max_size=20), st.text(max_size=40), max_size=5)


@settings(max_examples=60)
@given(title=st.text(min_size=1, max_size=300), labels=_LABELS,
       text=st.none() | st.text(max_size=300),
       severity=st.none() | st.sampled_from(["critical", "error", "warning", "info"]))
def test_incident_round_trip(shared_store: Store, title: str, labels: dict[str, str],
                             text: str | None, severity: str | None) -> None:
    client_id = f"c-{uuid.uuid4().hex}"
    occurred = datetime(2024, 3, 1, 12, 34, 56, tzinfo=UTC)
    new = NewIncident(
        title=title, masked=title.lower(), fingerprint=f"fp-{client_id}", client_id=client_id,
        text=text, service="db", severity=severity, source="prometheus", labels=labels,
        occurred_at=occurred, resolution={"action": "restart", "automatable": False},
        resolution_key="restart", outcome="resolved", origin="ingest")
    [(kb_id, created)] = shared_store.add_incidents([new])
    assert created

    for ref in (client_id, kb_ref(kb_id)):
        got = shared_store.get_incident(ref)
        assert got.kb_id == kb_id
        assert got.client_id == client_id
        assert got.title == title
        assert got.text == text
        assert got.labels == labels
        assert got.severity == severity
        assert got.masked == title.lower()
        assert got.fingerprint == f"fp-{client_id}"
        assert got.occurred_at == occurred
        assert got.resolution == {"action": "restart", "automatable": False}
        assert (got.resolution_key, got.outcome, got.origin) == ("restart", "resolved", "ingest")
        assert got.ref == client_id


def test_add_incidents_returns_ids_in_order(store: Store) -> None:
    out = store.add_incidents([_incident("a"), _incident("b"), _incident("c")])
    assert [created for _, created in out] == [True, True, True]
    ids = [kb_id for kb_id, _ in out]
    assert ids == sorted(ids) and len(set(ids)) == 3
    assert [store.get_incident(kb_ref(i)).title for i in ids] == ["a", "b", "c"]


def test_client_id_dedupe_within_a_batch(store: Store) -> None:
    out = store.add_incidents([_incident("first", client_id="x"), _incident("other"),
                               _incident("second", client_id="x")])
    assert out[0][1] is True and out[1][1] is True
    assert out[2] == (out[0][0], False)
    assert store.count_incidents() == 2
    assert store.get_incident("x").title == "first"


def test_client_id_dedupe_across_batches(store: Store) -> None:
    [(kb_id, _)] = store.add_incidents([_incident("first", client_id="x")])
    again = store.add_incidents([_incident("changed", client_id="x"),
                                 _incident("new", client_id="y")])
    assert again[0] == (kb_id, False)
    assert again[1][1] is True
    assert store.count_incidents() == 2
    assert store.get_incident("x").title == "first"


def test_incidents_without_client_id_are_never_deduplicated(store: Store) -> None:
    store.add_incidents([_incident("same"), _incident("same")])
    store.add_incidents([_incident("same")])
    assert store.count_incidents() == 3


def test_get_incident_by_kb_ref_and_ref_property(store: Store) -> None:
    [(kb_id, _)] = store.add_incidents([_incident("no client id")])
    inc = store.get_incident(kb_ref(kb_id))
    assert inc.client_id is None
    assert inc.ref == kb_ref(kb_id) == f"kb-{kb_id}"


@pytest.mark.parametrize("ref", ["nope", "kb-999", "kb-", "kb-x", "", "KB-1"])
def test_unknown_incident_raises_incident_not_found(store: Store, ref: str) -> None:
    store.add_incidents([_incident("one", client_id="one")])
    with pytest.raises(IncidentNotFound) as info:
        store.get_incident(ref)
    assert isinstance(info.value, DejaError)


@pytest.mark.parametrize(("ref", "expected"),
                         [("kb-1", 1), ("kb-42", 42), ("kb-", None), ("kb-1a", None),
                          ("1", None), ("xkb-1", None)])
def test_parse_kb_ref(ref: str, expected: int | None) -> None:
    assert parse_kb_ref(ref) == expected


def test_incidents_after_and_max_kb_id(store: Store) -> None:
    ids = [i for i, _ in store.add_incidents(
        [_incident("a", service="db", resolution_key="r"), _incident("b")])]
    assert store.max_kb_id() == ids[-1]
    rows = store.incidents_after(ids[0])
    assert rows == [(ids[1], "fp-b", "b", None, None)]
    assert store.incidents_after(0)[0] == (ids[0], "fp-a", "a", "db", "r")
    assert sorted(store.incidents_by_id(ids)) == ids


# -- embedding cache ------------------------------------------------------------------------


def test_vector_cache_put_get(store: Store) -> None:
    a = np.array([0.6, 0.8, 0.0], dtype=np.float32)
    b = np.array([0.0, 0.0, 1.0], dtype=np.float32)
    store.put_vectors("m1", {"fa": a, "fb": b})
    got = store.get_vectors("m1", ["fa", "fb", "missing"])
    assert set(got) == {"fa", "fb"}
    np.testing.assert_array_equal(got["fa"], a)
    np.testing.assert_array_equal(got["fb"], b)
    assert got["fa"].dtype == np.float32
    assert store.get_vectors("m2", ["fa"]) == {}
    assert store.get_vectors("m1", []) == {}


def test_vector_cache_on_conflict_keeps_the_first(store: Store) -> None:
    first = np.array([1.0, 0.0], dtype=np.float32)
    store.put_vectors("m", {"k": first})
    store.put_vectors("m", {"k": np.array([0.0, 1.0], dtype=np.float32),
                            "other": np.array([0.0, 1.0], dtype=np.float32)})
    got = store.get_vectors("m", ["k", "other"])
    np.testing.assert_array_equal(got["k"], first)
    assert "other" in got
    assert store.sql("SELECT count(*) FROM embeddings")[0][0] == 2


def test_vectors_for_incidents_returns_stored_and_missing(store: Store) -> None:
    ids = [i for i, _ in store.add_incidents(
        [_incident("a", fingerprint="fa"), _incident("b", fingerprint="fb"),
         _incident("a again", fingerprint="fa"), _incident("c", fingerprint="fc")])]
    store.put_vectors("m", {"fa": np.array([1.0, 0.0], dtype=np.float32),
                            "fc": np.array([0.0, 1.0], dtype=np.float32)})
    kb_ids, vectors, missing = store.vectors_for_incidents("m")
    assert kb_ids.tolist() == [ids[0], ids[2], ids[3]]
    np.testing.assert_array_equal(vectors, [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert missing == ["fb"]

    kb_ids, vectors, missing = store.vectors_for_incidents("m", after_kb_id=ids[2])
    assert kb_ids.tolist() == [ids[3]] and missing == []

    kb_ids, vectors, missing = store.vectors_for_incidents("other-model")
    assert len(kb_ids) == 0 and vectors.size == 0
    assert sorted(missing) == ["fa", "fb", "fc"]


# -- decisions, feedback, track records -----------------------------------------------------


def test_decision_round_trip(store: Store) -> None:
    rec = _decision("d1", "replay", resolution={"action": "restart"})
    store.add_decisions([rec])
    got = store.get_decision("d1")
    assert got is not None
    assert got.created_at is not None
    assert {**got.__dict__, "created_at": None} == {**rec.__dict__, "created_at": None}
    assert store.get_decision("nope") is None
    assert store.count_decisions() == 1


def test_decisions_list_newest_first_with_filter_and_limit(store: Store) -> None:
    kinds = ["escalate", "replay", "review", "escalate", "replay"]
    for i, kind in enumerate(kinds):
        store.add_decisions([_decision(f"d{i}", kind)])  # one transaction each: distinct times
    assert [d.decision_id for d in store.list_decisions()] == ["d4", "d3", "d2", "d1", "d0"]
    assert [d.decision_id for d in store.list_decisions(decision="escalate")] == ["d3", "d0"]
    assert [d.decision_id for d in store.list_decisions(limit=2)] == ["d4", "d3"]
    assert store.list_decisions(decision="replay", limit=1)[0].decision_id == "d4"
    assert store.count_decisions() == 5


def test_track_records_count_incident_outcomes(store: Store) -> None:
    store.add_incidents([
        _incident("a", resolution_key="restart", outcome="resolved"),
        _incident("b", resolution_key="restart", outcome="resolved"),
        _incident("c", resolution_key="restart", outcome="failed"),
        _incident("d", resolution_key="rollback", outcome="unknown"),
        _incident("e", outcome="resolved"),
    ])
    assert store.track_records() == {"restart": (2, 1), "rollback": (0, 0)}


def test_feedback_with_outcome_only_adds_to_the_track_record(store: Store) -> None:
    store.add_incidents([_incident("a", resolution_key="restart", outcome="resolved")])
    fb_id, kb_id, _ = store.add_feedback("d1", correct=True, novel=False, resolution=None,
                                      resolution_key="restart", outcome="failed", note="no",
                                      incident=None)
    assert fb_id.startswith("fb-") and kb_id is None
    assert store.track_records() == {"restart": (1, 1)}
    assert store.count_incidents() == 1
    row = store.sql("SELECT decision_id, correct, novel, outcome, note, kb_id FROM feedback")
    assert row == [("d1", True, False, "failed", "no", None)]


def test_feedback_with_incident_creates_it_and_counts_its_outcome_once(store: Store) -> None:
    new = _incident("taught", resolution={"action": "rotate"}, resolution_key="rotate",
                    outcome="resolved", origin="feedback", decision_id="d1")
    _, kb_id, _ = store.add_feedback("d1", correct=False, novel=True,
                                  resolution={"action": "rotate"}, resolution_key="rotate",
                                  outcome="resolved", note=None, incident=new)
    assert kb_id is not None
    inc = store.get_incident(kb_ref(kb_id))
    assert (inc.title, inc.origin, inc.resolution) == ("taught", "feedback", {"action": "rotate"})
    assert store.track_records() == {"rotate": (1, 0)}
    assert store.sql("SELECT kb_id FROM feedback") == [(kb_id,)]


# -- transactions ---------------------------------------------------------------------------


def test_a_failing_transaction_writes_nothing(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        store.add_incidents([_incident("half", client_id="half")])
        store.add_decisions([_decision("d-half")])
        raise RuntimeError("boom")
    assert store.count_incidents() == 0
    assert store.count_decisions() == 0
    with pytest.raises(IncidentNotFound):
        store.get_incident("half")
    # The store is usable afterwards, and the rolled-back client id is free again.
    store.add_incidents([_incident("whole", client_id="half")])
    assert store.get_incident("half").title == "whole"


def test_a_failing_statement_rolls_back_the_whole_batch(store: Store) -> None:
    store.add_decisions([_decision("dup")])
    with pytest.raises(Exception):  # noqa: B017 - DuckDB's constraint error type
        store.add_decisions([_decision("fresh"), _decision("dup")])
    assert store.get_decision("fresh") is None
    assert store.count_decisions() == 1


def test_nested_transactions_commit_as_one(store: Store) -> None:
    with store.transaction():
        store.add_incidents([_incident("outer")])
        with store.transaction():
            store.add_incidents([_incident("inner")])
    assert store.count_incidents() == 2

    with pytest.raises(ValueError), store.transaction():
        store.add_incidents([_incident("outer 2")])
        with store.transaction():
            store.add_incidents([_incident("inner 2")])
        raise ValueError("late failure")
    assert store.count_incidents() == 2


# -- hot-path forms and in-memory mirrors ---------------------------------------------------------


@pytest.mark.parametrize("n", [1, 3, 200])
def test_vectors_round_trip_exactly_at_every_batch_size(store: Store, n: int) -> None:
    # Small batches and large ones are written by different statements; both must store the
    # model's float32 values bit for bit.
    rng = np.random.default_rng(n)
    items = {f"fp-{i}": rng.standard_normal(384).astype(np.float32) for i in range(n)}
    store.put_vectors("m", items)
    got = store.get_vectors("m", list(items))
    assert set(got) == set(items)
    for key, vec in items.items():
        np.testing.assert_array_equal(got[key], vec)


def test_one_decision_and_a_batch_store_the_same_row(store: Store) -> None:
    kw = {"resolution": {"action": "restart"}, "evidence": {"p": 0.5}, "actor": "ops",
          "event": {"title": "disk full", "labels": {"host": "db-1"}}}
    store.add_decisions([_decision("single", "review", **kw)])
    store.add_decisions([_decision("batch-1", "review", **kw), _decision("batch-2")])
    single, batched = store.get_decision("single"), store.get_decision("batch-1")
    assert single is not None and batched is not None
    skip = {"decision_id": None, "created_at": None}
    assert {**single.__dict__, **skip} == {**batched.__dict__, **skip}
    assert single.evidence == {"p": 0.5} and single.actor == "ops"


def test_incidents_by_id_never_caches_a_rolled_back_row(store: Store) -> None:
    with pytest.raises(RuntimeError), store.transaction():
        (kb_id, _), = store.add_incidents([_incident("doomed")])
        assert store.incidents_by_id([kb_id])[kb_id].title == "doomed"
        raise RuntimeError("rollback")
    assert store.incidents_by_id([kb_id]) == {}


def test_incidents_by_id_serves_committed_rows_from_memory(store: Store) -> None:
    ids = [i for i, _ in store.add_incidents([_incident("a"), _incident("b")])]
    first = store.incidents_by_id(ids)
    # Rows are never updated once written, so a second read needs no query: prove it by
    # removing the rows behind the cache's back.
    store.sql("DELETE FROM incidents")
    assert store.incidents_by_id(ids) == first
    assert store.incidents_by_id([ids[0], 10_000]) == {ids[0]: first[ids[0]]}


def _escalation(escalation_id: str, fingerprint: str) -> EscalationRecord:
    now = datetime.now(UTC)
    return EscalationRecord(
        escalation_id=escalation_id, decision_id=f"d-{escalation_id}", kind="review",
        state="open", fingerprint=fingerprint, service="db", route={"name": "default"},
        due_at=now, resolve_due_at=now, events=1, briefing={}, suggested_resolution=None,
        resolution=None, policy_version=1, created_at=now, last_event_at=now, acked_at=None,
        acked_by=None, resolved_at=None, resolved_by=None, breached_at=None, breaches=0)


def test_active_escalations_mirror_only_committed_changes(tmp_path: Path) -> None:
    store = Store(tmp_path / "kb.duckdb")
    with pytest.raises(RuntimeError), store.transaction():
        store.add_escalation(_escalation("esc-rolled-back", "fp-a"), {"title": "a"})
        raise RuntimeError("rollback")
    assert store.active_escalation_ids(["fp-a"]) == {}

    store.add_escalation(_escalation("esc-a", "fp-a"), {"title": "a"})
    store.add_escalation(_escalation("esc-b", "fp-b"), {"title": "b"})
    assert store.active_escalation_ids(["fp-a", "fp-b", "fp-c"]) == {"fp-a": "esc-a",
                                                                      "fp-b": "esc-b"}
    with pytest.raises(RuntimeError), store.transaction():
        store.resolve_escalation("esc-a", {"action": "x"}, "ops", datetime.now(UTC))
        raise RuntimeError("rollback")
    assert store.active_escalation_ids(["fp-a"]) == {"fp-a": "esc-a"}

    store.resolve_escalation("esc-a", {"action": "x"}, "ops", datetime.now(UTC))
    store.ack_escalation("esc-b", "ops", datetime.now(UTC))
    store.mark_breached("esc-b", datetime.now(UTC))
    assert store.active_escalation_ids(["fp-a", "fp-b"]) == {"fp-b": "esc-b"}
    store.close()
    # A reopened store rebuilds the mirror from the table.
    store = Store(tmp_path / "kb.duckdb")
    assert store.active_escalation_ids(["fp-a", "fp-b"]) == {"fp-b": "esc-b"}
    store.close()
