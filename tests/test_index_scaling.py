"""The index past its exact range (novelty/index.py): the switch to IVF above
``approximate_above``, recall measured at build time, ivf-fp16 and ivf-sq8 under a memory budget,
persistence of the kind, reconstruct on every kind, and background rebuilds under concurrent
searches and adds.

Small KBs with a low ``approximate_above`` exercise the IVF paths in a second or two.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from novelty import IndexUnusable, VectorIndex
from novelty.index import (
    _BATCH_THREADS,
    KINDS,
    _ReadWriteLock,
    cells_for,
    choose_kind,
    memory_estimate,
)

DIM = 32


def clustered(n: int, *, seed: int = 0, centres_seed: int = 0, clusters: int = 60,
              dim: int = DIM) -> np.ndarray:
    """Unit vectors around ``clusters`` centres (cosine ~0.8 within a cluster, ~0 across); the
    centres depend on ``centres_seed`` only, so other seeds draw new points of the same KB."""
    centres = np.random.default_rng(centres_seed).standard_normal((clusters, dim))
    rng = np.random.default_rng(seed)
    x = centres[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _ids(n: int, start: int = 0) -> np.ndarray:
    # Sparse, caller-chosen ids: nothing may assume they are positions.
    return (np.arange(start, start + n, dtype=np.int64) * 7) + 1000


def _built(n: int, **options: object) -> tuple[VectorIndex, np.ndarray, np.ndarray]:
    vectors = clustered(n)
    ids = _ids(n)
    index = VectorIndex(DIM, auto_rebuild=False, **options)  # type: ignore[arg-type]
    thread = index.start_rebuild(lambda: (ids, vectors))
    thread.join(60)
    assert thread.error is None
    return index, ids, vectors


def _exact(ids: np.ndarray, vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    _, rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    return ids[rows]


def _budget(kind: str, n: int) -> int | None:
    """The memory budget under which a rebuild of ``n`` vectors makes ``kind``: no limit for
    ivf-flat, else exactly that kind's estimate (the roomier kinds' estimates are larger)."""
    return None if kind == "ivf-flat" else memory_estimate(kind, n, DIM)


# -- choosing the kind ---------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "budget", "kind"), [
    (500, None, "flat"), (501, None, "ivf-flat"), (5000, None, "ivf-flat"),
    (5000, 10**9, "ivf-flat"), (5000, 100_000, "ivf-sq8"), (500, 1, "flat"),
    # 5000 32-d vectors: ivf-flat 0.89 MB, ivf-fp16 0.57 MB, ivf-sq8 0.41 MB.
    (5000, 700_000, "ivf-fp16"), (5000, 500_000, "ivf-sq8")])
def test_kind_follows_size_and_memory_budget(n: int, budget: int | None, kind: str) -> None:
    assert choose_kind(n, DIM, approximate_above=500, memory_budget=budget) == kind


def test_the_least_lossy_kind_that_fits_is_chosen_at_its_exact_estimate() -> None:
    n = 5000
    flat, fp16, sq8 = (memory_estimate(k, n, DIM) for k in ("ivf-flat", "ivf-fp16", "ivf-sq8"))
    assert flat > fp16 > sq8
    for budget, kind in [(flat, "ivf-flat"), (flat - 1, "ivf-fp16"), (fp16, "ivf-fp16"),
                         (fp16 - 1, "ivf-sq8"), (1, "ivf-sq8")]:
        assert choose_kind(n, DIM, approximate_above=500, memory_budget=budget) == kind, budget


def test_at_1m_384d_vectors_a_1_gib_budget_picks_ivf_fp16() -> None:
    # Deja's default budget (DEJA_INDEX_MEMORY_MIB=1024) at issue 7's size.
    mib = {k: memory_estimate(k, 1_000_000, 384) / 2**20 for k in KINDS}
    assert 1500 < mib["ivf-flat"] < 1530 and 770 < mib["ivf-fp16"] < 800
    assert choose_kind(1_000_000, 384, approximate_above=50_000, memory_budget=2**30) == "ivf-fp16"
    with pytest.raises(ValueError, match="kind"):
        memory_estimate("hnsw", 10, 384)


@pytest.mark.parametrize("n", [1, 100, 5_000, 50_000, 1_000_000])
def test_cells_are_about_four_root_n_with_enough_points_to_train(n: int) -> None:
    nlist = cells_for(n)
    assert 1 <= nlist <= max(1, round(4 * n ** 0.5))
    assert nlist == 1 or n / nlist >= 64


def test_a_new_index_is_flat_and_exact() -> None:
    index = VectorIndex(DIM)
    info = index.build_info()
    assert (index.kind, info["kind"], info["recall_at_10"], info["nprobe"]) == ("flat", "flat",
                                                                                  1.0, None)


def test_stays_flat_up_to_the_threshold_then_switches_to_ivf_by_itself() -> None:
    vectors = clustered(3000)
    ids = _ids(3000)
    index = VectorIndex(DIM, approximate_above=1000)
    index.add(ids[:1000], vectors[:1000])
    assert index.kind == "flat" and not index.rebuilding and not index.rebuild_due
    index.add(ids[1000:2000], vectors[1000:2000])  # crosses the threshold: rebuild starts
    index.add(ids[2000:], vectors[2000:])  # during or after the rebuild: never lost
    assert index.wait_for_rebuild(60)
    info = index.build_info()
    assert index.kind == info["kind"] == "ivf-flat"
    assert index.ntotal == info["vectors"] == 3000
    assert info["recall_at_10"] >= 0.98 and info["recall_sample"] == 500
    assert info["nlist"] == cells_for(info["built_vectors"]) and 1 <= info["nprobe"] <= 64
    assert info["rebuild_error"] is None and not info["rebuilding"]
    assert info["memory_bytes"] > 3000 * DIM * 4
    # Every vector, including those added while the rebuild ran, finds itself.
    _, found = index.search(vectors, 1)
    assert (found[:, 0] == ids).all()


def test_a_rebuild_below_the_threshold_stays_exact() -> None:
    index, ids, vectors = _built(800, approximate_above=1000)
    assert index.kind == "flat" and index.build_info()["recall_at_10"] == 1.0
    sims, found = index.search(vectors[:5], 3)
    assert (found[:, 0] == ids[:5]).all()
    np.testing.assert_allclose(sims[:, 0], 1.0, atol=1e-5)


# -- IVF quality ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "fresh_recall"), [
    ("ivf-flat", 0.99), ("ivf-fp16", 0.99), ("ivf-sq8", 0.95)])
def test_ivf_recall_against_exact_search_on_fresh_queries(kind: str, fresh_recall: float) -> None:
    index, ids, vectors = _built(4000, approximate_above=500, memory_budget=_budget(kind, 4000))
    info = index.build_info()
    assert index.kind == info["kind"] == kind
    assert info["recall_at_10"] >= 0.98
    assert info["memory_bytes"] == memory_estimate(kind, 4000, DIM)
    queries = clustered(300, seed=7)  # same centres, new points: near the KB, not in it
    _, got = index.search(queries, 10)
    want = _exact(ids, vectors, queries, 10)
    recall = np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got, want, strict=True)])
    assert recall >= fresh_recall


def test_an_unreachable_recall_target_stops_at_the_plateau_not_at_exhaustive_search() -> None:
    # 8-bit codes reorder near-ties, so no nprobe reaches recall 1.0; probing every cell would
    # make each search a slow scan for nothing.
    sq8, _, _ = _built(4000, approximate_above=500, memory_budget=1, min_recall=1.0)
    info = sq8.build_info()
    assert info["kind"] == "ivf-sq8" and not info["recall_target_met"]
    assert info["nprobe"] < info["nlist"] and info["recall_at_10"] >= 0.95
    exact, _, _ = _built(4000, approximate_above=500, min_recall=1.0)
    assert exact.build_info()["recall_target_met"] and exact.build_info()["recall_at_10"] == 1.0


def test_ivf_pads_a_short_result_with_minus_one_and_minus_inf() -> None:
    index, _, vectors = _built(2000, approximate_above=500)
    sims, found = index.search(vectors[:2], 2000)
    assert found.shape == sims.shape == (2, 2000)
    assert ((found == -1) == np.isneginf(sims)).all()
    assert (found[:, 0] >= 0).all()


def test_reconstruct_on_ivf_returns_the_stored_vectors() -> None:
    index, ids, vectors = _built(2000, approximate_above=500)
    rows = np.array([3, 1999, 0, 512])
    np.testing.assert_array_equal(index.reconstruct(ids[rows]), vectors[rows])
    assert index.reconstruct(np.zeros(0, dtype=np.int64)).shape == (0, DIM)
    with pytest.raises(RuntimeError):
        index.reconstruct(np.array([-5]))


def test_reconstruct_on_ivf_fp16_is_exact_to_half_precision() -> None:
    index, ids, vectors = _built(2000, approximate_above=500,
                                 memory_budget=_budget("ivf-fp16", 2000))
    assert index.kind == "ivf-fp16"
    got = index.reconstruct(ids[:200])
    assert np.abs(got - vectors[:200]).max() < 5e-4
    # The snapshot a later rebuild starts from is these decoded vectors, under every id.
    snap_ids, snap = index.snapshot()
    order = np.argsort(snap_ids)
    np.testing.assert_array_equal(snap_ids[order], ids)
    assert np.abs(snap[order] - vectors).max() < 5e-4


def test_reconstruct_on_ivf_sq8_returns_close_decoded_vectors() -> None:
    index, ids, vectors = _built(2000, approximate_above=500, memory_budget=1)
    assert index.kind == "ivf-sq8"
    got = index.reconstruct(ids[:50])
    cos = (got * vectors[:50]).sum(axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() >= 0.99


def test_snapshot_returns_every_id_with_its_vector() -> None:
    index, ids, vectors = _built(1500, approximate_above=500)
    got_ids, got_vectors = index.snapshot()
    order = np.argsort(got_ids)
    np.testing.assert_array_equal(got_ids[order], ids)  # ids were generated ascending
    np.testing.assert_array_equal(got_vectors[order], vectors)


def test_an_ivf_index_grown_past_twice_its_build_size_is_due_for_a_rebuild() -> None:
    index, _, _ = _built(1000, approximate_above=500)
    extra = clustered(1001, seed=3)
    index.add(_ids(1000, start=5000), extra[:1000])
    assert not index.rebuild_due
    index.add(_ids(1, start=9000), extra[1000:])
    assert index.rebuild_due


def test_outgrowing_the_memory_budget_makes_a_rebuild_due_into_a_smaller_kind() -> None:
    # Budget for 1500 vectors as ivf-flat: built at 1000, the index outgrows it long before it
    # doubles, and the rebuild that then runs makes ivf-fp16.
    index, _, _ = _built(1000, approximate_above=500,
                         memory_budget=memory_estimate("ivf-flat", 1500, DIM))
    assert index.kind == "ivf-flat" and not index.rebuild_due
    extra = clustered(600, seed=3)
    extra_ids = _ids(600, start=5000)
    index.add(extra_ids[:500], extra[:500])
    assert not index.rebuild_due
    index.add(extra_ids[500:], extra[500:])
    assert index.rebuild_due and index.build_info()["built_vectors"] == 1000
    index.start_rebuild().join(60)
    assert index.kind == "ivf-fp16" and index.ntotal == 1600
    assert index.build_info()["memory_bytes"] <= memory_estimate("ivf-flat", 1500, DIM)
    _, found = index.search(extra, 1)
    assert (found[:, 0] == extra_ids).all()


def test_a_larger_budget_never_makes_a_rebuild_due_into_a_roomier_kind(tmp_path: Path) -> None:
    # Rebuilding ivf-sq8 into ivf-flat from its own decoded codes would cost memory for nothing.
    sq8, _, _ = _built(1000, approximate_above=500, memory_budget=1)
    path = tmp_path / "index.faiss"
    sq8.save(path, model_id="toy@1", last_kb_id=1)
    loaded, _ = VectorIndex.load(path, model_id="toy@1", dim=DIM, approximate_above=500)
    assert loaded.kind == "ivf-sq8" and loaded.memory_budget is None
    loaded.add(_ids(1, start=9000), clustered(1, seed=4))
    assert not loaded.rebuild_due and not loaded.rebuilding


def test_adds_on_ivf_are_searchable_at_once() -> None:
    index, _, _ = _built(2000, approximate_above=500)
    fresh = clustered(5, seed=11)
    index.add(_ids(5, start=10_000), fresh)
    _, found = index.search(fresh, 1)
    assert found[:, 0].tolist() == _ids(5, start=10_000).tolist()


# -- persistence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["ivf-flat", "ivf-fp16", "ivf-sq8"])
def test_save_load_round_trip_keeps_the_kind_and_build(tmp_path: Path, kind: str) -> None:
    index, ids, _ = _built(2000, approximate_above=500, memory_budget=_budget(kind, 2000))
    assert index.kind == kind
    path = tmp_path / "index.faiss"
    manifest = index.save(path, model_id="toy@1", last_kb_id=int(ids[-1]))
    on_disk = json.loads((tmp_path / "index.faiss.manifest.json").read_text())
    assert on_disk["kind"] == manifest.kind == index.kind
    assert on_disk["build"]["nprobe"] == index.build_info()["nprobe"]

    loaded, got = VectorIndex.load(path, model_id="toy@1", dim=DIM, approximate_above=500)
    assert got == manifest and loaded.kind == index.kind
    info, before = loaded.build_info(), index.build_info()
    for key in ("kind", "nprobe", "nlist", "recall_at_10", "built_vectors", "vectors",
                "memory_bytes"):
        assert info[key] == before[key], key
    queries = clustered(20, seed=5)
    np.testing.assert_array_equal(loaded.search(queries, 10)[1], index.search(queries, 10)[1])
    np.testing.assert_array_equal(loaded.reconstruct(ids[:3]), index.reconstruct(ids[:3]))
    loaded.add(_ids(1, start=50_000), queries[:1])
    assert loaded.search(queries[:1], 1)[1].tolist() == [_ids(1, start=50_000).tolist()]


@pytest.mark.parametrize(("kind", "claimed"), [
    ("ivf-flat", ("flat", "ivf-fp16", "hnsw")), ("ivf-fp16", ("ivf-sq8", "ivf-flat")),
    ("ivf-sq8", ("ivf-fp16", "flat"))])
def test_load_refuses_a_file_that_is_not_the_kind_its_manifest_says(
        tmp_path: Path, kind: str, claimed: tuple[str, ...]) -> None:
    index, _, _ = _built(1000, approximate_above=500, memory_budget=_budget(kind, 1000))
    assert index.kind == kind
    path = tmp_path / "index.faiss"
    index.save(path, model_id="toy@1", last_kb_id=1)
    mpath = tmp_path / "index.faiss.manifest.json"
    for other in claimed:
        manifest = json.loads(mpath.read_text())
        mpath.write_text(json.dumps({**manifest, "kind": other}))
        with pytest.raises(IndexUnusable, match="manifest"):
            VectorIndex.load(path, model_id="toy@1", dim=DIM)


# -- background rebuilds --------------------------------------------------------------------------


def test_rebuild_swaps_atomically_while_searches_and_adds_run() -> None:
    base = clustered(3000)
    base_ids = _ids(3000)
    extra = clustered(1200, seed=1)
    extra_ids = _ids(1200, start=3000)
    known = set(base_ids.tolist()) | set(extra_ids.tolist())
    index = VectorIndex(DIM, approximate_above=1000, auto_rebuild=False)
    index.add(base_ids, base)
    provider_called = threading.Event()
    go_on = threading.Event()

    def provider() -> tuple[np.ndarray, np.ndarray]:
        snapshot = index.snapshot()
        provider_called.set()
        go_on.wait(10)  # hold the rebuild until the adds below are under way
        return snapshot

    stop = threading.Event()
    failures: list[str] = []
    kinds: set[str] = set()
    searches = [0]

    def searcher(seed: int) -> None:
        queries = clustered(50, seed=seed)
        while not stop.is_set():
            for q in queries:
                sims, found = index.search(q[None, :], 10)
                kinds.add(index.kind)
                searches[0] += 1
                row = found[0]
                if not set(row.tolist()) <= known or len(set(row.tolist())) != 10:
                    failures.append(f"bad ids {row}")
                if not (np.diff(sims[0]) <= 1e-6).all():
                    failures.append(f"unsorted {sims[0]}")

    def adder() -> None:
        for start in range(0, 1200, 50):
            index.add(extra_ids[start:start + 50], extra[start:start + 50])
            if start == 400:
                go_on.set()  # the rest lands while the new index is built and swapped
            time.sleep(0.002)

    readers = [threading.Thread(target=searcher, args=(s,)) for s in (21, 22)]
    for t in readers:
        t.start()
    rebuild = index.start_rebuild(provider)
    assert provider_called.wait(10)
    assert index.rebuilding and index.start_rebuild(provider) is rebuild  # one at a time
    writer = threading.Thread(target=adder)
    writer.start()
    writer.join(60)
    go_on.set()
    rebuild.join(60)
    time.sleep(0.05)
    stop.set()
    for t in readers:
        t.join(10)

    assert not failures, failures[:3]
    assert rebuild.error is None and index.kind == "ivf-flat"
    assert kinds == {"flat", "ivf-flat"} and searches[0] > 0
    assert index.ntotal == 4200, "an addition was lost or replayed twice"
    ids, _ = index.snapshot()
    assert sorted(ids.tolist()) == sorted(known)
    info = index.build_info()
    assert info["replayed"] >= 1 and info["built_vectors"] + info["replayed"] <= 4200
    _, found = index.search(extra, 1)
    assert (found[:, 0] == extra_ids).all()


def test_additions_the_provider_already_returned_are_not_replayed_twice() -> None:
    vectors = clustered(1500)
    ids = _ids(1500)
    index = VectorIndex(DIM, approximate_above=500, auto_rebuild=False)
    index.add(ids[:1000], vectors[:1000])
    # The provider reads after these adds were logged, so it returns them too.
    release = threading.Event()

    def provider() -> tuple[np.ndarray, np.ndarray]:
        release.wait(10)
        return index.snapshot()

    rebuild = index.start_rebuild(provider)
    index.add(ids[1000:], vectors[1000:])
    release.set()
    rebuild.join(60)
    assert rebuild.error is None
    assert index.ntotal == 1500 and index.build_info()["replayed"] == 0
    assert len(set(index.snapshot()[0].tolist())) == 1500


def test_a_failed_rebuild_leaves_the_old_index_serving() -> None:
    vectors = clustered(1000)
    index = VectorIndex(DIM, approximate_above=100, auto_rebuild=False)
    index.add(_ids(1000), vectors)

    def broken() -> tuple[np.ndarray, np.ndarray]:
        raise MemoryError("no room")

    rebuild = index.start_rebuild(broken)
    rebuild.join(10)
    assert isinstance(rebuild.error, MemoryError)
    info = index.build_info()
    assert index.kind == "flat" and "no room" in info["rebuild_error"]
    index.add(_ids(1, start=7000), vectors[:1])  # no longer logged: nothing grows unbounded
    assert index._log is None and index.ntotal == 1001
    # A later rebuild works and clears the error.
    index.start_rebuild().join(60)
    assert index.kind == "ivf-flat" and index.build_info()["rebuild_error"] is None


def test_a_provider_of_the_wrong_shape_fails_the_rebuild() -> None:
    index = VectorIndex(DIM, auto_rebuild=False)
    rebuild = index.start_rebuild(lambda: (_ids(3), np.zeros((3, DIM + 1), dtype=np.float32)))
    rebuild.join(10)
    assert isinstance(rebuild.error, ValueError) and index.ntotal == 0


# -- concurrency primitives -----------------------------------------------------------------------


def test_single_queries_run_on_one_openmp_thread_batches_on_all() -> None:
    index, _, vectors = _built(600, approximate_above=500)
    seen: dict[str, int] = {}

    def run() -> None:
        index.search(vectors[:1], 5)
        seen["single"] = faiss.omp_get_max_threads()
        index.search(vectors[:8], 5)
        seen["batch"] = faiss.omp_get_max_threads()

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert seen["single"] == 1
    assert seen["batch"] == _BATCH_THREADS


def test_readers_share_the_lock_and_a_writer_waits_for_them() -> None:
    lock = _ReadWriteLock()
    inside = threading.Barrier(2, timeout=5)
    order: list[str] = []

    def reader(name: str) -> None:
        with lock.read():
            inside.wait()  # both readers are inside at once, or this times out
            time.sleep(0.05)
            order.append(name)

    def writer() -> None:
        time.sleep(0.01)
        with lock.write():
            order.append("writer")

    threads = [threading.Thread(target=reader, args=(n,)) for n in ("r1", "r2")]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert order[-1] == "writer" and sorted(order[:2]) == ["r1", "r2"]


def test_a_waiting_writer_goes_before_later_readers() -> None:
    lock = _ReadWriteLock()
    order: list[str] = []
    first_in = threading.Event()

    def first() -> None:
        with lock.read():
            first_in.set()
            time.sleep(0.1)
            order.append("first reader")

    def writer() -> None:
        with lock.write():
            order.append("writer")

    def late() -> None:
        with lock.read():
            order.append("late reader")

    t1 = threading.Thread(target=first)
    t1.start()
    first_in.wait(5)
    t2 = threading.Thread(target=writer)
    t2.start()
    time.sleep(0.03)  # the writer is now waiting
    t3 = threading.Thread(target=late)
    t3.start()
    for t in (t1, t2, t3):
        t.join(5)
    assert order == ["first reader", "writer", "late reader"]


def test_kinds_are_exported() -> None:
    assert KINDS == ("flat", "ivf-flat", "ivf-fp16", "ivf-sq8")
