"""The FAISS index and its manifest (novelty/index.py), and how Deja loads, catches up and
rebuilds it (api/deja.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deja import DB_FILE, INDEX_FILE, Deja
from api.schemas import EventIn, ResolutionIn
from api.settings import Settings
from embeddings import HashingEncoder, fingerprint, mask
from kb import NewIncident, Store
from novelty import IndexManifest, IndexUnusable, VectorIndex
from novelty.index import memory_estimate


def _unit(*values: float) -> np.ndarray:
    v = np.asarray(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def _toy_index() -> VectorIndex:
    index = VectorIndex(3)
    index.add(np.array([101, 202, 303], dtype=np.int64),
              np.stack([_unit(1, 0, 0), _unit(0, 1, 0), _unit(1, 1, 0)]))
    return index


def test_search_returns_the_callers_ids_in_cosine_order() -> None:
    index = _toy_index()
    assert index.ntotal == 3
    sims, ids = index.search(np.stack([_unit(1, 0, 0), _unit(0, 1, 0.2)]), 3)
    assert ids.tolist() == [[101, 303, 202], [202, 303, 101]]
    np.testing.assert_allclose(sims[0], [1.0, math.sqrt(0.5), 0.0], atol=1e-6)
    q = _unit(0, 1, 0.2)
    np.testing.assert_allclose(sims[1], [q[1], (q[0] + q[1]) / math.sqrt(2), q[0]], atol=1e-6)


def test_search_caps_k_at_the_index_size() -> None:
    sims, ids = _toy_index().search(_unit(1, 0, 0)[None, :], 10)
    assert ids.shape == (1, 3) and sims.shape == (1, 3)


@pytest.mark.parametrize(("empty", "k"), [(True, 3), (False, 0), (True, 0)])
def test_search_on_an_empty_index_or_with_k_zero_finds_nothing(empty: bool, k: int) -> None:
    index = VectorIndex(3) if empty else _toy_index()
    sims, ids = index.search(np.stack([_unit(1, 0, 0)] * 2), k)
    assert ids.shape == sims.shape == (2, k)
    assert (ids == -1).all() and np.isneginf(sims).all()


@pytest.mark.parametrize("shape", [(2, 4), (3,), (2, 2)])
def test_add_refuses_vectors_of_the_wrong_shape(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="shape"):
        VectorIndex(3).add(np.arange(2, dtype=np.int64), np.ones(shape, dtype=np.float32))


def test_reconstruct_by_caller_id() -> None:
    np.testing.assert_allclose(_toy_index().reconstruct(np.array([202, 101])),
                               [[0, 1, 0], [1, 0, 0]], atol=1e-7)


# -- persistence ------------------------------------------------------------------------------


def test_save_load_round_trip_with_manifest(tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    manifest = _toy_index().save(path, model_id="toy@1", last_kb_id=303)
    assert manifest == IndexManifest(model_id="toy@1", dim=3, count=3, last_kb_id=303,
                                     sha256=manifest.sha256)
    on_disk = json.loads((tmp_path / "index.faiss.manifest.json").read_text())
    assert on_disk == {"model_id": "toy@1", "dim": 3, "count": 3, "last_kb_id": 303,
                       "sha256": manifest.sha256, "kind": "flat"}
    # Written through a temp file and renamed: nothing else is left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index.faiss",
                                                          "index.faiss.manifest.json"]

    loaded, got = VectorIndex.load(path, model_id="toy@1", dim=3)
    assert got == manifest
    query = np.stack([_unit(1, 0.1, 0), _unit(0, 1, 0)])
    want_sims, want_ids = _toy_index().search(query, 3)
    sims, ids = loaded.search(query, 3)
    assert ids.tolist() == want_ids.tolist()
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)
    # A loaded index keeps growing.
    loaded.add(np.array([404], dtype=np.int64), _unit(0, 0, 1)[None, :])
    assert loaded.search(_unit(0, 0, 1)[None, :], 1)[1].tolist() == [[404]]


@pytest.mark.parametrize(("model_id", "dim"), [("other@1", 3), ("toy@1", 4)])
def test_load_refuses_another_model(tmp_path: Path, model_id: str, dim: int) -> None:
    path = tmp_path / "index.faiss"
    _toy_index().save(path, model_id="toy@1", last_kb_id=3)
    with pytest.raises(IndexUnusable, match="built with"):
        VectorIndex.load(path, model_id=model_id, dim=dim)


def test_load_refuses_a_truncated_file(tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    _toy_index().save(path, model_id="toy@1", last_kb_id=3)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(IndexUnusable, match="checksum"):
        VectorIndex.load(path, model_id="toy@1", dim=3)


def test_load_refuses_a_changed_file_of_the_same_length(tmp_path: Path) -> None:
    path = tmp_path / "index.faiss"
    _toy_index().save(path, model_id="toy@1", last_kb_id=3)
    blob = bytearray(path.read_bytes())
    blob[-1] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(IndexUnusable, match="checksum"):
        VectorIndex.load(path, model_id="toy@1", dim=3)


@pytest.mark.parametrize("missing", ["index.faiss", "index.faiss.manifest.json"])
def test_load_refuses_a_missing_file_or_manifest(tmp_path: Path, missing: str) -> None:
    path = tmp_path / "index.faiss"
    _toy_index().save(path, model_id="toy@1", last_kb_id=3)
    (tmp_path / missing).unlink()
    with pytest.raises(IndexUnusable):
        VectorIndex.load(path, model_id="toy@1", dim=3)


@pytest.mark.parametrize("manifest", ["not json", "{}", '{"model_id": "toy@1"}', "[1, 2]"])
def test_load_refuses_an_unreadable_manifest(tmp_path: Path, manifest: str) -> None:
    path = tmp_path / "index.faiss"
    _toy_index().save(path, model_id="toy@1", last_kb_id=3)
    (tmp_path / "index.faiss.manifest.json").write_text(manifest)
    with pytest.raises(IndexUnusable):
        VectorIndex.load(path, model_id="toy@1", dim=3)


# -- Deja: load, catch up, rebuild ----------------------------------------------------------------

_TITLES = [f"{kind} on db-{i}" for kind in ("Disk full", "CPU hot", "Replica lag", "OOM killed")
           for i in range(3)] + ["Certificate expiring for api", "DNS lookup failed"]


def _fill(data_dir: Path, encoder: HashingEncoder) -> int:
    with Deja.open(data_dir, encoder=encoder) as deja:
        assert deja.index_status == "new"
        deja.ingest([EventIn(id=f"e{i}", title=t, resolution=ResolutionIn(action="restart"),
                             outcome="resolved") for i, t in enumerate(_TITLES)])
        return deja.stats().indexed


def test_reopen_loads_the_saved_index(tmp_path: Path) -> None:
    encoder = HashingEncoder(64)
    indexed = _fill(tmp_path, encoder)
    assert indexed == len(_TITLES)
    assert (tmp_path / INDEX_FILE).exists()
    calls = encoder.calls
    with Deja.open(tmp_path, encoder=encoder) as deja:
        assert deja.index_status == "loaded"
        stats = deja.stats()
        assert stats.incidents == stats.indexed == indexed
        assert deja.similar("Disk full on db-7", 1)[0].title.startswith("Disk full")
    assert encoder.calls == calls


@pytest.mark.parametrize("damage", ["delete", "truncate", "drop manifest"])
def test_reopen_rebuilds_a_lost_index_without_re_embedding(tmp_path: Path, damage: str) -> None:
    encoder = HashingEncoder(64)
    indexed = _fill(tmp_path, encoder)
    index_file = tmp_path / INDEX_FILE
    if damage == "delete":
        index_file.unlink()
    elif damage == "truncate":
        index_file.write_bytes(index_file.read_bytes()[:100])
    else:
        (tmp_path / f"{INDEX_FILE}.manifest.json").unlink()
    calls = encoder.calls

    with Deja.open(tmp_path, encoder=encoder) as deja:
        assert deja.index_status != "loaded"
        stats = deja.stats()
        assert stats.incidents == stats.indexed == indexed
        assert stats.index["vectors"] == len({fingerprint(mask(t)) for t in _TITLES})
        assert encoder.calls == calls, "stored fingerprints were embedded again"
        assert deja.similar("Replica lag on db-9", 1)[0].title.startswith("Replica lag")
    # The rebuilt index was saved: the next open loads it.
    with Deja.open(tmp_path, encoder=encoder) as deja:
        assert deja.index_status == "loaded"


def test_reopen_catches_up_rows_the_index_does_not_hold(tmp_path: Path) -> None:
    encoder = HashingEncoder(64)
    indexed = _fill(tmp_path, encoder)
    # Rows committed after the index was last saved (as after a crash).
    store = Store(tmp_path / DB_FILE)
    late = ["Queue backlog on broker-1", "Disk full on db-0"]
    store.add_incidents([NewIncident(title=t, masked=mask(t), fingerprint=fingerprint(mask(t)))
                         for t in late])
    store.close()
    calls = encoder.calls

    with Deja.open(tmp_path, encoder=encoder) as deja:
        assert deja.index_status == "caught up 2 incidents"
        stats = deja.stats()
        assert stats.incidents == stats.indexed == indexed + 2
        # Only the one fingerprint never seen before paid for the encoder.
        assert encoder.calls == calls + 1
        assert deja.similar("Queue backlog on broker-9", 1)[0].title == late[0]


def test_reopen_with_another_model_rebuilds_for_that_model(tmp_path: Path) -> None:
    indexed = _fill(tmp_path, HashingEncoder(64))
    other = HashingEncoder(32)
    with Deja.open(tmp_path, encoder=other) as deja:
        assert deja.index_status.startswith("rebuilt")
        assert deja.stats().indexed == indexed
        assert deja.index.dim == 32
        assert other.calls == len({fingerprint(mask(t)) for t in _TITLES})


# -- /v1/stats: the serving index and how it was built ---------------------------------------------

_SYLLABLES = ["ka", "lo", "mi", "nu", "pe", "ra", "si", "to", "vu", "ze", "bo", "da"]
# 144 made-up words (digits would be masked away and merge fingerprints).
_WORDS = [a + b + c for a in _SYLLABLES for b in _SYLLABLES for c in ("n", "x")]


def _distinct_events(n: int, seed: int = 0) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    return [{"id": f"s{i}", "title": " ".join(rng.choice(_WORDS, size=10).tolist()),
             "resolution": {"action": "restart"}, "outcome": "resolved"} for i in range(n)]


def _index_stats(http: TestClient) -> dict[str, Any]:
    r = http.get("/v1/stats")
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()["index"]
    return out


def test_stats_report_the_serving_index_kind_and_its_build_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    encoder = HashingEncoder(384)
    # 1 MiB holds ~650 384-d vectors as ivf-flat and ~1,250 as ivf-fp16.
    monkeypatch.setenv("DEJA_INDEX_MEMORY_MIB", "1")
    settings = Settings(sweep_seconds=0)
    events = _distinct_events(1001)
    with Deja.open(tmp_path, encoder=encoder, settings=settings) as deja, \
            TestClient(create_app(deja), headers=_auth(tmp_path)) as http:
        empty = _index_stats(http)
        assert (empty["kind"], empty["vectors"], empty["recall_at_10"], empty["nprobe"]) == (
            "flat", 0, 1.0, None)
        assert empty["memory_budget_bytes"] == 2**20 and empty["status"] == "new"
        assert http.post("/v1/events", json={"events": events[:1000]}).status_code == 201
        assert _index_stats(http)["kind"] == "flat"  # below approximate_above (50,000)
        # Stand-in for a KB past 50,000 incidents: the next addition makes the rebuild due.
        deja.index.approximate_above = 500
        assert http.post("/v1/events", json={"events": events[1000:]}).status_code == 201
        assert deja.index.wait_for_rebuild(120)
        stats = _index_stats(http)
        info = deja.index.build_info()
        assert stats["kind"] == deja.index.kind == "ivf-fp16"
        assert stats["vectors"] == deja.index.ntotal == deja.stats().indexed == 1001
        for key in ("nlist", "nprobe", "recall_at_10", "recall_target_met", "recall_sample",
                    "build_seconds", "built_vectors", "memory_bytes", "rebuild_error"):
            assert stats[key] == info[key], key
        assert stats["nlist"] > 1 and 1 <= stats["nprobe"] <= stats["nlist"]
        # Bag-of-words vectors tie a lot, so recall here says little about the kind; what
        # matters is that the figure measured at build is the one reported.
        assert stats["recall_sample"] == 500 and 0.0 < stats["recall_at_10"] <= 1.0
        assert stats["recall_target_met"] == (stats["recall_at_10"] >= 0.98)
        assert stats["memory_bytes"] <= 2**20 < memory_estimate("ivf-flat", 1001, 384)
        assert stats["last_kb_id"] == 1001 and not stats["rebuilding"]
    # The build record is saved with the index and reported again after a restart.
    with Deja.open(tmp_path, encoder=encoder, settings=settings) as deja, \
            TestClient(create_app(deja), headers=_auth(tmp_path)) as http:
        again = _index_stats(http)
        assert again["status"] == "loaded" and again["kind"] == "ivf-fp16"
        for key in ("nlist", "nprobe", "recall_at_10", "built_vectors", "vectors"):
            assert again[key] == stats[key], key


def _auth(data_dir: Path) -> dict[str, str]:
    # The admin key written on the data dir's first start.
    return {"Authorization": f"Bearer {(data_dir / 'admin.key').read_text().strip()}"}
