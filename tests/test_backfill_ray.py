"""`deja backfill --engine ray` on a real local Ray cluster, with the real model.

The behaviour under test is the bulk pipeline (validate, mask, dedupe, embed on actors, Parquet,
one DuckDB transaction), so it runs end to end: LogHub lines in, a KB out that must match what
`Deja.ingest` builds from the same events, and what `--engine local` builds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pytest
import ray
from typer.testing import CliRunner

from api.backfill import BackfillError, backfill, iter_events
from api.cli import app
from api.deja import Deja
from api.settings import Settings
from bench import loghub
from embeddings import SentenceTransformerEncoder

pytestmark = pytest.mark.slow

SYSTEMS = {"HDFS": 150, "Linux": 150}
# Ingest (and so the backfill) skips a client id it has already seen: the input re-sends one.
RESENT = 1


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    # A local cluster of this machine's two cores; no usage report leaves the machine.
    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _events() -> list[dict[str, Any]]:
    out = []
    for system, n in SYSTEMS.items():
        for i, line in enumerate(loghub.load_system(system)[:n]):
            e: dict[str, Any] = dict(loghub.to_event(line, system, idx=i, with_resolution=True))
            # Every other event has no time: the load stamps it, as ingest does.
            if i % 2:
                e["occurred_at"] = f"2024-03-{1 + i % 28:02d}T{i % 24:02d}:00:00+02:00"
            e["labels"] = {"system": system, "line": str(line.line_no)}
            out.append(e)
    return out


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of two JSONL files (one per system) with a blank line and a re-sent id."""
    root = tmp_path_factory.mktemp("history")
    events = _events()
    (root / "a-hdfs.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in events[:150]) + "\n", encoding="utf-8")
    (root / "b-linux.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in [*events[150:], events[3]]), encoding="utf-8")
    return root


def _rows(data_dir: Path) -> list[tuple[Any, ...]]:
    # created_at is when the row was written; origin says which path wrote it.
    with duckdb.connect(str(data_dir / "deja.duckdb"), read_only=True) as con:
        return con.execute("SELECT * EXCLUDE (created_at, origin, occurred_at), "
                           "occurred_at IS NULL FROM incidents ORDER BY kb_id").fetchall()


def _stamped(data_dir: Path) -> list[Any]:
    with duckdb.connect(str(data_dir / "deja.duckdb"), read_only=True) as con:
        return [r[0] for r in con.execute(
            "SELECT occurred_at FROM incidents WHERE client_id IN (SELECT unnest($1)) "
            "ORDER BY kb_id", [[e["id"] for e in _events() if "occurred_at" in e]]).fetchall()]


def _vectors(data_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """fingerprint -> (the masked text ingest's cache would embed for it, stored vector)."""
    with duckdb.connect(str(data_dir / "deja.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT e.fingerprint, arg_min(i.masked, i.kb_id), any_value(e.vector) "
            "FROM embeddings e JOIN incidents i USING (fingerprint) GROUP BY e.fingerprint"
        ).fetchall()
    return {r[0]: (r[1], np.asarray(r[2], dtype=np.float32)) for r in rows}


def _snapshot(data_dir: Path) -> tuple[Any, ...]:
    with duckdb.connect(str(data_dir / "deja.duckdb"), read_only=True) as con:
        return tuple(con.execute(f"SELECT count(*), hash(list(t ORDER BY t)) FROM {table} t"
                                 ).fetchone() for table in ("incidents", "embeddings", "audit"))


@pytest.fixture(scope="module")
def ray_kb(ray_cluster: None, history: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The history backfilled through the CLI with the Ray engine."""
    data_dir = tmp_path_factory.mktemp("ray-kb")
    result = CliRunner().invoke(app, ["backfill", str(history), "--engine", "ray",
                                      "--data-dir", str(data_dir)])
    assert result.exit_code == 0, result.output
    assert f"{sum(SYSTEMS.values())} new incidents ({RESENT} already known)" in result.output
    return data_dir


def test_ray_backfill_embeds_as_the_service_does_and_is_served(
        ray_kb: Path, history: Path, real_encoder: SentenceTransformerEncoder) -> None:
    vectors = _vectors(ray_kb)
    # Far fewer texts than events: each distinct fingerprint was embedded once.
    assert 20 < len(vectors) < sum(SYSTEMS.values()) / 2
    keys = sorted(vectors)
    expected = real_encoder.encode([vectors[k][0] for k in keys])
    got = np.stack([vectors[k][1] for k in keys])
    cosines = np.sum(expected * got, axis=1)
    assert cosines.min() >= 0.9999, (cosines.min(), keys[int(cosines.argmin())])

    deja = Deja.open(ray_kb, encoder=real_encoder, settings=Settings(sweep_seconds=0))
    try:
        stats = deja.stats()
        assert stats.incidents == sum(SYSTEMS.values())
        assert stats.indexed == stats.incidents
        # The backfill's catch-up built the index; this open only loaded it.
        assert deja.index_status == "loaded"
        event = next(iter_events(history / "b-linux.jsonl"))
        misses = deja.cache.stats.misses
        verdict = deja.check([event], dry_run=True)[0]
        assert deja.cache.stats.misses == misses  # served from the backfilled cache
        # Nearest is its own fingerprint group (whose representative is the latest occurrence).
        nearest = deja.store.get_incident(verdict.neighbors[0].id)
        assert nearest.fingerprint == deja.store.get_incident(event.id or "").fingerprint
        assert verdict.neighbors[0].similarity == pytest.approx(1.0, abs=1e-6)
        assert not verdict.novelty.is_novel
        assert verdict.decision == "replay"
    finally:
        deja.close()


def test_local_engine_and_ingest_build_the_same_kb(
        ray_kb: Path, history: Path, tmp_path: Path,
        real_encoder: SentenceTransformerEncoder) -> None:
    local = tmp_path / "local"
    report = backfill(history, local, engine="local", settings=Settings(data_dir=local))
    assert (report.created, report.skipped) == (sum(SYSTEMS.values()), RESENT)
    assert report.indexed == report.created
    assert _rows(local) == _rows(ray_kb)
    assert _stamped(local) == _stamped(ray_kb)
    ray_vectors, local_vectors = _vectors(ray_kb), _vectors(local)
    assert ray_vectors.keys() == local_vectors.keys()
    for key, (_, vec) in ray_vectors.items():
        assert float(vec @ local_vectors[key][1]) >= 0.9999

    ingested = tmp_path / "ingested"
    deja = Deja.open(ingested, encoder=real_encoder, settings=Settings(sweep_seconds=0))
    try:
        deja.ingest(list(iter_events(history)))
    finally:
        deja.close()
    assert _rows(ingested) == _rows(local)
    assert _stamped(ingested) == _stamped(local)
    assert _vectors(ingested).keys() == local_vectors.keys()

    # Again: every id is known and every text cached, so nothing is written or embedded.
    before = _snapshot(local)
    again = backfill(history, local, engine="local", settings=Settings(data_dir=local))
    assert (again.created, again.embedded) == (0, 0)
    assert _snapshot(local)[:2] == before[:2]


def test_a_bad_record_leaves_the_kb_unchanged_and_is_named(
        ray_kb: Path, history: Path, tmp_path: Path) -> None:
    lines = (history / "b-linux.jsonl").read_text(encoding="utf-8").splitlines()
    bad = dict(json.loads(lines[99]), id="fresh-99", severity="catastrophic")
    fresh = [json.dumps(dict(json.loads(x), id=f"fresh-{i}")) for i, x in enumerate(lines)]
    fresh[99] = json.dumps(bad)
    path = tmp_path / "late.jsonl"
    path.write_text("\n".join(fresh) + "\n", encoding="utf-8")

    before = _snapshot(ray_kb)
    with pytest.raises(BackfillError) as err:
        backfill(path, ray_kb, engine="ray", settings=Settings(data_dir=ray_kb))
    assert f"{path}:100: severity" in str(err.value)
    assert _snapshot(ray_kb) == before
    assert not list(ray_kb.glob(".backfill-*"))  # staging cleaned up

    result = CliRunner().invoke(app, ["backfill", str(path), "--engine", "ray",
                                      "--data-dir", str(ray_kb)])
    assert result.exit_code == 1
    assert f"{path}:100: severity" in result.output
    assert _snapshot(ray_kb) == before
