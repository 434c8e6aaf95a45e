"""The check journal (kb/journal.py) and the store's deferred writes (kb/store.py): durable before
the answer, applied exactly once, visible to every read at once."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kb.journal
import kb.store
from kb import DecisionRecord, EscalationRecord, Store
from kb.journal import Journal

REPO = Path(__file__).resolve().parents[1]


def _decision(decision_id: str) -> DecisionRecord:
    return DecisionRecord(
        decision_id=decision_id, event={"title": f"event {decision_id}"}, fingerprint="fp",
        service="db", severity="error", decision="review", score=0.5, is_novel=False,
        threshold=0.6, confidence=0.4, components={"distance": 0.5}, neighbor_ids=[1],
        neighbor_similarities=[0.9], reasons=["because"], resolution=None, policy_version=1,
        model_id="m")


def _escalation(escalation_id: str, fingerprint: str, decision_id: str) -> EscalationRecord:
    now = datetime.now(UTC)
    return EscalationRecord(
        escalation_id=escalation_id, decision_id=decision_id, kind="review", state="open",
        fingerprint=fingerprint, service="db", route={"name": "default"}, due_at=now,
        resolve_due_at=now + timedelta(hours=1), events=1, briefing={"summary": "s"},
        suggested_resolution=None, resolution=None, policy_version=1, created_at=now,
        last_event_at=now, acked_at=None, acked_by=None, resolved_at=None, resolved_by=None,
        breached_at=None, breaches=0)


@pytest.fixture
def slow_flush(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The flusher waits long, so what a test reads must come through the read barrier."""
    monkeypatch.setattr(kb.store, "FLUSH_DELAY", 60.0)
    monkeypatch.setattr(kb.store, "FLUSH_GROUPS", 10**9)
    yield


def _check(store: Store, n: int, vec: np.ndarray | None = None) -> None:
    """What one audited check writes: a decision, a handoff opened or joined, maybe a vector."""
    with store.deferred():
        if vec is not None:
            store.put_vectors("m", {f"fp-{n}": vec})
        store.add_decisions([_decision(f"dec-{n}")])
        active = store.active_escalation_ids(["fp"])
        if "fp" in active:
            store.join_escalation(active["fp"], [(f"dec-{n}", {"title": f"e{n}"})],
                                  datetime.now(UTC))
        else:
            store.add_escalation(_escalation("esc-1", "fp", f"dec-{n}"), {"title": f"e{n}"})


def test_deferred_writes_are_in_the_journal_and_read_at_once(tmp_path: Path,
                                                              slow_flush: None) -> None:
    store = Store(tmp_path / "kb.duckdb")
    vec = np.arange(8, dtype=np.float32) / 10
    for n in range(3):
        _check(store, n, vec + n)
    # Durable before anything reached DuckDB: three groups in the file, nothing applied.
    assert [seq for seq, _ in Journal(tmp_path / "kb.duckdb.journal").read()] == [1, 2, 3]
    assert store._raw_cur().execute("SELECT count(*) FROM decisions").fetchone() == (0,)
    # The vectors are served from the overlay, before and after they apply.
    assert np.array_equal(store.get_vectors("m", ["fp-2"])["fp-2"], vec + 2)
    # Any read applies what is pending first.
    assert store.get_decision("dec-1") is not None
    rec = store.get_escalation("esc-1")
    assert rec is not None and rec.events == 3
    assert [d for d, _ in store.escalation_events("esc-1")] == ["dec-0", "dec-1", "dec-2"]
    assert np.array_equal(store.get_vectors("m", ["fp-1"])["fp-1"], vec + 1)
    assert list(Journal(tmp_path / "kb.duckdb.journal").read()) == []
    store.close()


def test_a_transaction_after_deferred_writes_sees_them(tmp_path: Path, slow_flush: None) -> None:
    store = Store(tmp_path / "kb.duckdb")
    _check(store, 0)
    # The ack must find the row the check's journalled write opened.
    store.ack_escalation("esc-1", "ops", datetime.now(UTC))
    rec = store.get_escalation("esc-1")
    assert rec is not None and rec.state == "acked" and rec.acked_by == "ops"
    store.close()


def test_a_failing_check_writes_nothing(tmp_path: Path, slow_flush: None) -> None:
    store = Store(tmp_path / "kb.duckdb")
    with pytest.raises(RuntimeError), store.deferred():
        store.add_decisions([_decision("dec-doomed")])
        store.add_escalation(_escalation("esc-doomed", "fp", "dec-doomed"), {"title": "x"})
        raise RuntimeError("scoring failed")
    assert list(Journal(tmp_path / "kb.duckdb.journal").read()) == []
    assert store.get_decision("dec-doomed") is None
    assert store.active_escalation_ids(["fp"]) == {}
    store.close()


def test_no_transaction_inside_deferred_writes(tmp_path: Path) -> None:
    store = Store(tmp_path / "kb.duckdb")
    with pytest.raises(RuntimeError, match="deferred"), store.deferred(), store.transaction():
        pass
    store.close()


def test_the_flusher_applies_in_the_background(tmp_path: Path) -> None:
    store = Store(tmp_path / "kb.duckdb")
    for n in range(5):
        _check(store, n)
    assert store.wait_applied(timeout=10)
    assert store._raw_cur().execute("SELECT count(*) FROM decisions").fetchone() == (5,)
    assert store._raw_cur().execute(
        "SELECT events FROM escalations WHERE escalation_id = 'esc-1'").fetchone() == (5,)
    store.close()


def test_a_crash_loses_no_acknowledged_check_and_replays_each_once(tmp_path: Path) -> None:
    path = tmp_path / "kb.duckdb"
    # A process that checks, applies some of its checks, then dies without closing anything.
    child = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / "tests")!r})
        import kb.store
        kb.store.FLUSH_DELAY = 3600.0
        kb.store.FLUSH_GROUPS = 10**9
        from kb import Store
        from test_journal import _check
        store = Store({str(path)!r})
        for n in range(4):
            _check(store, n)
        store.sync()
        for n in range(4, 10):
            _check(store, n)
        os._exit(0)
    """)
    subprocess.run([sys.executable, "-c", child], check=True, timeout=120)
    journal = tmp_path / "kb.duckdb.journal"
    assert [seq for seq, _ in Journal(journal).read()] == list(range(5, 11))
    # A crash mid-append leaves a torn line: never acknowledged, so ignored.
    end = sum(len(line) for line in journal.read_bytes().splitlines(keepends=True)[:6])
    with journal.open("r+b") as f:
        f.seek(end)
        f.write(b"11 0badc0de [[\"decisions\"")
    store = Store(path)
    rows = store.sql("SELECT decision_id FROM decisions ORDER BY created_at")
    assert [r[0] for r in rows] == [f"dec-{n}" for n in range(10)]
    rec = store.get_escalation("esc-1")
    assert rec is not None and rec.events == 10
    assert len(store.escalation_events("esc-1")) == 10
    assert store.active_escalation_ids(["fp"]) == {"fp": "esc-1"}
    # Sequence numbers go on from the replayed ones.
    _check(store, 10)
    store.close()
    store = Store(path)
    assert store.get_escalation("esc-1").events == 11  # type: ignore[union-attr]
    store.close()


def test_groups_already_applied_are_skipped_on_replay(tmp_path: Path, slow_flush: None) -> None:
    path = tmp_path / "kb.duckdb"
    store = Store(path)
    for n in range(3):
        _check(store, n)
    saved = (tmp_path / "kb.duckdb.journal").read_bytes()
    store.close()
    # The file's emptying is not fsync'd: after a crash it may come back whole.
    (tmp_path / "kb.duckdb.journal").write_bytes(saved)
    store = Store(path)
    assert store.sql("SELECT count(*) FROM decisions") == [(3,)]
    assert store.get_escalation("esc-1").events == 3  # type: ignore[union-attr]
    store.close()


def test_a_corrupt_line_stops_the_replay(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.append(1, [("decisions", [])])
    journal.append(2, [("decisions", [])])
    journal.append(3, [("decisions", [])])
    journal.close()
    data = bytearray((tmp_path / "j").read_bytes())
    second = data.index(b"\n") + 1
    data[second + 15] ^= 0x01  # a flipped bit in group 2's payload
    (tmp_path / "j").write_bytes(bytes(data))
    assert [seq for seq, _ in Journal(tmp_path / "j").read()] == [1]


def test_recent_changes_from_memory_match_the_table(tmp_path: Path) -> None:
    store = Store(tmp_path / "kb.duckdb")
    now = datetime.now(UTC)
    for i in range(30):
        store.add_change("db" if i % 2 else "web", f"deploy {i}", now - timedelta(hours=i),
                         "ci", None)
    store.add_change("db", "old", now - timedelta(days=30), "ci", None)
    recent = store.recent_changes(["db"], now - timedelta(days=1), now)
    assert [c.summary for c in recent] == [f"deploy {i}" for i in range(1, 24, 2)]
    # Beyond the memory window the table answers, in the same order.
    wide = store.recent_changes(["db"], now - timedelta(days=60), now)
    assert [c.summary for c in wide][:12] == [c.summary for c in recent]
    assert "old" in [c.summary for c in store.recent_changes(["db", "x"], now - timedelta(
        days=60), now - timedelta(days=20))]
    store.close()
    reopened = Store(tmp_path / "kb.duckdb")
    assert reopened.recent_changes(["db"], now - timedelta(days=1), now) == recent
    reopened.close()


def test_vectors_written_in_bulk_are_found_after_forgetting_keys(tmp_path: Path) -> None:
    store = Store(tmp_path / "kb.duckdb")
    vec = np.ones(4, dtype=np.float32)
    store.put_vectors("m", {"a": vec})
    assert set(store.get_vectors("m", ["a", "b"])) == {"a"}  # loads the key set
    # Written around put_vectors (as a bulk load does): invisible until the set reloads.
    store.sql("INSERT INTO embeddings (fingerprint, model_id, vector) "
              "VALUES ('b', 'm', [1, 1, 1, 1])")
    assert set(store.get_vectors("m", ["a", "b"])) == {"a"}
    store.forget_stored_keys()
    assert set(store.get_vectors("m", ["a", "b"])) == {"a", "b"}
    store.close()


def test_handoffs_opened_by_many_checks_apply_in_one_batch_intact(tmp_path: Path,
                                                                  slow_flush: None) -> None:
    store = Store(tmp_path / "kb.duckdb")
    opened = [_escalation(f"esc-{i}", f"fp-{i}", f"dec-{i}") for i in range(3)]
    for rec in opened:
        with store.deferred():
            store.add_decisions([_decision(rec.decision_id)])
            store.add_escalation(rec, {"title": rec.fingerprint})
    assert store.active_escalation_ids([r.fingerprint for r in opened]) == {
        r.fingerprint: r.escalation_id for r in opened}
    later = datetime.now(UTC) + timedelta(minutes=5)
    with store.deferred():  # the first two are joined, twice and once, in one batch
        store.join_escalation("esc-0", [("dec-a", {"title": "a"}), ("dec-b", {"title": "b"})],
                              later)
        store.join_escalation("esc-1", [("dec-c", {"title": "c"})], later)
    for rec, joined in zip(opened, (2, 1, 0), strict=True):
        got = store.get_escalation(rec.escalation_id)
        assert got is not None and got.events == 1 + joined
        assert got.last_event_at == (later if joined else rec.last_event_at)
        assert len(store.escalation_events(rec.escalation_id)) == 1 + joined
    for rec in opened[2:]:
        assert store.get_escalation(rec.escalation_id) == rec
    for rec in opened[2:]:
        assert store.escalation_events(rec.escalation_id) == [
            (rec.decision_id, {"title": rec.fingerprint})]
    store.close()


def _ops(n: int, width: int) -> list[tuple[str, Any]]:
    return [("decisions", [[f"dec-{n}", "x" * width]])]


def test_appends_overwrite_space_written_ahead(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.reset()
    size = (tmp_path / "j").stat().st_size
    assert size >= kb.journal.CHUNK
    for n in range(1, 6):
        journal.append(n, _ops(n, 100))
    # No append changed the file's size: fdatasync has no metadata to write.
    assert (tmp_path / "j").stat().st_size == size
    assert [seq for seq, _ in Journal(tmp_path / "j").read()] == [1, 2, 3, 4, 5]
    journal.close()


def test_after_a_rewind_only_the_new_groups_are_read(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.reset()
    for n in range(1, 4):
        journal.append(n, _ops(n, 500))
    journal.reset()
    assert list(Journal(tmp_path / "j").read()) == []
    # Shorter than the group it overwrites (its tail is left behind), then exactly as long as
    # the next (an intact older group follows).
    journal.append(4, _ops(4, 10))
    assert [seq for seq, _ in Journal(tmp_path / "j").read()] == [4]
    journal.reset()
    journal.append(5, _ops(5, 500))
    assert [seq for seq, _ in Journal(tmp_path / "j").read()] == [5]
    journal.close()


def test_the_file_grows_for_a_burst_larger_than_written_ahead(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "j")
    journal.reset()
    width = kb.journal.CHUNK // 4
    for n in range(1, 10):
        journal.append(n, _ops(n, width))
    assert (tmp_path / "j").stat().st_size >= 9 * width
    got = list(Journal(tmp_path / "j").read())
    assert [seq for seq, _ in got] == list(range(1, 10))
    assert got[-1][1] == [("decisions", [["dec-9", "x" * width]])]
    journal.close()
