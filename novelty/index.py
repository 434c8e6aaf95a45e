"""A FAISS inner-product index whose ids are the caller's ids, persisted with a manifest.

Vectors are L2-normalised, so inner product is cosine similarity. The index file is derived
data: it is written to a temporary file, fsynced and renamed, and its manifest says which model
made the vectors, how many there are, which KB rows they cover, the file's checksum, the index
kind and how it was built, so a reader can tell a current file from a stale, torn or foreign one.

Kinds (:data:`KINDS`), chosen by :meth:`VectorIndex.start_rebuild` from the number of vectors
and the memory budget:

- ``"flat"``: exact search (``IndexIDMap2(IndexFlatIP)``). Every new index starts flat, and it
  stays flat up to ``approximate_above`` vectors, where one single-query search still costs about
  a millisecond (docs/scaling.md has the measurement).
- ``"ivf-flat"``: an inverted file over k-means cells (nlist ≈ 4·√N), vectors kept in full, the
  number of cells probed per query (nprobe) tuned at build time until recall@10 against exact
  search reaches ``min_recall`` on a sample. Same memory as flat, 20–200× faster per query.
- ``"ivf-fp16"``: the same cells with each vector's residual to its cell's centroid stored as
  16-bit floats: half the memory of ivf-flat (784 MiB at 1M 384-d vectors, id hash included),
  and recall@10 as good as ivf-flat's (half-precision rounding, ~1e-4 per component, reorders
  nothing that matters). Chosen when ``memory_budget`` cannot hold ivf-flat but holds this.
- ``"ivf-sq8"``: the same with 8-bit scalar codes: a quarter of the memory, chosen only when
  ``memory_budget`` cannot hold ivf-fp16 either. The codes reorder near-ties, so recall@10
  plateaus just under 0.98 however many cells are probed.

The kind is chosen by :func:`choose_kind` from :func:`memory_estimate`: ivf-flat if it fits the
budget, else ivf-fp16 if that fits, else ivf-sq8. For the coded kinds
:meth:`VectorIndex.reconstruct` returns decoded vectors (max error ~1e-4 per component for fp16;
cosine ≥ 0.998 to the originals for sq8), not the originals.

Every IVF kind keeps a hash table from caller id to position (FAISS's direct map), so
``reconstruct`` works for every kind at ~40 bytes per vector instead of a side copy of the vectors.

Concurrency: a readers-writer lock. Searches, reconstructs, snapshots and saves are readers and run
concurrently with each other; adds and the swap at the end of a rebuild are writers. A rebuild
trains and fills the new index off the lock, on a background thread, from stored vectors (never by
re-embedding), and replays what was added meanwhile before swapping it in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["KINDS", "IndexManifest", "IndexUnusable", "VectorIndex", "choose_kind",
           "memory_estimate"]

log = logging.getLogger("deja.index")

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]
VectorsProvider = Callable[[], tuple[Ids, Vectors]]

#: From exact to most compact (rebuild_due relies on the order).
KINDS = ("flat", "ivf-flat", "ivf-fp16", "ivf-sq8")

#: Bytes of one stored vector's code per dimension, by kind.
_CODE_BYTES_PER_DIM = {"flat": 4, "ivf-flat": 4, "ivf-fp16": 2, "ivf-sq8": 1}
#: FAISS scalar-quantizer type of each coded kind.
_QTYPES = {"ivf-fp16": faiss.ScalarQuantizer.QT_fp16, "ivf-sq8": faiss.ScalarQuantizer.QT_8bit}

#: k of the recall figure kept in :meth:`VectorIndex.build_info`.
RECALL_K = 10
#: Stored vectors used as queries when measuring recall at build time; 500 puts the standard
#: error of a recall near 0.98 at ~0.002, and costs ~2 s of exact search at 1M vectors.
RECALL_SAMPLE = 500
#: Smallest recall@10 gain from quadrupling nprobe that counts as progress (see _tune_nprobe).
RECALL_PLATEAU = 0.002
#: k-means training points per IVF cell. FAISS warns below 39; 64 trains 1M vectors into 4,000
#: cells on 256k points, 4× faster than its default of 256 per cell, for the same recall at the
#: tuned nprobe (the nprobe search absorbs the small loss in cell quality).
TRAIN_PER_CELL = 64
#: Bytes per stored id in FAISS's id -> position hash table (a std::unordered_map node plus its
#: bucket), as measured from the process's resident size; only used to report memory.
_HASH_BYTES_PER_ID = 40
#: Seconds an automatic rebuild waits after a failed one (a rebuild that ran out of memory would
#: otherwise be retried on every addition).
RETRY_SECONDS = 300.0
#: An IVF index is rebuilt (with more cells) once it holds this many times the vectors it was
#: built with: by then each probed cell holds that many times more vectors to scan.
REBUILD_GROWTH = 2.0

# FAISS's DirectMap.Hashtable (its type stubs do not declare DirectMap).
_HASHTABLE = int(faiss.DirectMap.Hashtable)  # type: ignore[attr-defined]

# Thread count for batch searches: what OpenMP gave the importing thread (the machine's cores,
# unless OMP_NUM_THREADS says otherwise). Single queries use one thread, see VectorIndex.search.
_BATCH_THREADS = max(1, faiss.omp_get_max_threads())


class IndexUnusable(Exception):
    """The index file is missing, torn, or was built for another model; rebuild it."""


@dataclass(frozen=True)
class IndexManifest:
    """What an index file holds. ``build`` is the IVF build record (None for a flat index:
    exact search has no cells, nprobe or recall to record)."""

    model_id: str
    dim: int
    count: int
    last_kb_id: int
    sha256: str
    kind: str = "flat"
    build: dict[str, Any] | None = None


class _ReadWriteLock:
    """Many readers or one writer. Writer-preferring: once a writer waits, new readers queue
    behind it, so a stream of searches cannot starve an addition. Not reentrant."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writing = False
        self._writers_waiting = 0

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            while self._writing or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                if self._readers == 0:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._writers_waiting += 1
            try:
                while self._writing or self._readers:
                    self._cond.wait()
            finally:
                self._writers_waiting -= 1
            self._writing = True
        try:
            yield
        finally:
            with self._cond:
                self._writing = False
                self._cond.notify_all()


class RebuildThread(threading.Thread):
    """The background thread of :meth:`VectorIndex.start_rebuild`; ``error`` is set if the
    rebuild failed (the old index then stays in place)."""

    error: BaseException | None = None


class VectorIndex:
    """Inner-product search over id-mapped, L2-normalised vectors: exact while small, IVF above
    ``approximate_above`` vectors.

    ``approximate_above``: largest KB searched exactly. Above it a rebuild picks IVF, trading a
    measured recall@10 of ≥ ``min_recall`` for search time that stops growing with the KB; below
    it, exact search is already fast enough that approximation buys nothing.
    ``memory_budget``: bytes the index may use (see :func:`memory_estimate`); when ivf-flat
    would not fit, ivf-fp16 is built (half the memory, same recall, ``reconstruct`` exact to
    ~1e-4), and when that would not fit either, ivf-sq8 (a quarter, recall@10 just under 0.98).
    None: no limit.
    ``min_recall``: recall@10 against exact search the tuned nprobe must reach on a sample.
    ``auto_rebuild``: start a background rebuild from the index's own vectors when an addition
    makes one due (:attr:`rebuild_due`). Turn it off to decide yourself when to rebuild and from
    which vectors (a coded index's own vectors are its decoded codes).
    """

    def __init__(self, dim: int, *, approximate_above: int = 50_000,
                 memory_budget: int | None = None, min_recall: float = 0.98,
                 auto_rebuild: bool = True, seed: int = 0) -> None:
        if approximate_above < 0:
            raise ValueError("approximate_above must be >= 0")
        if not 0.0 < min_recall <= 1.0:
            raise ValueError("min_recall must be in (0, 1]")
        self.dim = dim
        self.approximate_above = approximate_above
        self.memory_budget = memory_budget
        self.min_recall = min_recall
        self.auto_rebuild = auto_rebuild
        self.seed = seed
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._kind = "flat"
        self._build: dict[str, Any] = _flat_record(0, 0.0)
        self._rw = _ReadWriteLock()
        # While a rebuild runs: every (ids, vectors) added since it started, replayed into the
        # new index before the swap. None when no rebuild runs.
        self._log: list[tuple[Ids, Vectors]] | None = None
        self._rebuild: RebuildThread | None = None
        self._last_error: str | None = None
        self._retry_after = 0.0

    # -- reading ----------------------------------------------------------------------------------
    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def kind(self) -> str:
        """One of :data:`KINDS`: the index searches are served from."""
        return self._kind

    @property
    def rebuilding(self) -> bool:
        rebuild = self._rebuild
        return rebuild is not None and rebuild.is_alive()

    @property
    def rebuild_due(self) -> bool:
        """True when the index has outgrown its kind, or its IVF cells are stale: a flat index
        past ``approximate_above``, an index past what ``memory_budget`` holds in its kind, or
        an IVF index grown :data:`REBUILD_GROWTH`× since built."""
        if self.rebuilding:
            return False
        n = self.ntotal
        wanted = choose_kind(n, self.dim, approximate_above=self.approximate_above,
                             memory_budget=self.memory_budget)
        # Only towards a more compact kind (KINDS is in that order): an index loaded under a
        # larger budget is not rebuilt into a roomier kind from its own decoded codes.
        if KINDS.index(wanted) > KINDS.index(self._kind):
            return True
        return (self._kind != "flat"
                and n > REBUILD_GROWTH * max(1, int(self._build.get("built_vectors", 0))))

    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], Ids]:
        """Top-``k`` cosine similarities and ids per query row; missing slots have id -1 and
        similarity -inf.

        Exact for a flat index; for IVF, recall@10 is :meth:`build_info`'s ``recall_at_10``.
        A single query runs on one OpenMP thread (set for the calling thread): on two cores that
        is 2–2.5× faster than two threads, and leaves the other core to a concurrent search.
        Batches use all cores.
        """
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(queries)
        with self._rw.read():
            index = self._index
            total = int(index.ntotal)
            if total == 0 or k <= 0:
                return (np.full((n, max(k, 0)), -np.inf, dtype=np.float32),
                        np.full((n, max(k, 0)), -1, dtype=np.int64))
            # Per calling thread (OpenMP keeps it per thread), so set on every call.
            faiss.omp_set_num_threads(1 if n == 1 else _BATCH_THREADS)
            sims, ids = index.search(queries, min(k, total))
        # IVF pads a short result list with -FLT_MAX; say -inf as the empty index does.
        sims[ids < 0] = -np.inf
        return sims, ids

    def reconstruct(self, ids: Ids) -> Vectors:
        """The stored vectors of ``ids`` (decoded codes for ivf-fp16 and ivf-sq8); an unknown id
        raises ``RuntimeError``."""
        keys = np.ascontiguousarray(ids, dtype=np.int64)
        if len(keys) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._rw.read():
            out = self._index.reconstruct_batch(keys)
        return np.asarray(out, dtype=np.float32).reshape(len(keys), self.dim)

    def snapshot(self) -> tuple[Ids, Vectors]:
        """Every stored id and its vector (as :meth:`reconstruct`), consistent at one instant.

        A copy: ~1.5 GB for 1M 384-d vectors.
        """
        with self._rw.read():
            ids = _stored_ids(self._index)
            vectors = (self._index.reconstruct_batch(ids) if len(ids)
                       else np.zeros((0, self.dim), dtype=np.float32))
        return ids, np.asarray(vectors, dtype=np.float32).reshape(len(ids), self.dim)

    def build_info(self) -> dict[str, Any]:
        """How the serving index was built, for ``/v1/stats``.

        ``kind``; ``vectors`` (now) and ``built_vectors`` (at build); ``recall_at_10`` against
        exact search, measured at build time on up to :data:`RECALL_SAMPLE` stored vectors used as
        queries (their own id left out), 1.0 for flat; ``build_seconds``; ``memory_bytes``
        (estimated from codes, ids, centroids and the id hash table); ``nprobe`` and ``nlist``
        (None for flat); ``rebuilding``, and ``rebuild_error`` of the last failed rebuild.
        """
        with self._rw.read():
            info = dict(self._build)
            info["vectors"] = self.ntotal
            info["memory_bytes"] = _memory_bytes(self._index, self.dim)
        info["kind"] = self._kind
        info["rebuilding"] = self.rebuilding
        info["rebuild_error"] = self._last_error
        return info

    # -- writing ----------------------------------------------------------------------------------
    def add(self, ids: Ids, vectors: Vectors) -> None:
        """Add vectors under the caller's ids, searchable when this returns (IVF assigns them to
        their nearest cell). Ids must be new: the index does not replace vectors.

        With ``auto_rebuild``, an addition that makes a rebuild due starts one in the background.
        """
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        keys = np.ascontiguousarray(ids, dtype=np.int64)
        with self._rw.write():
            self._index.add_with_ids(vectors, keys)
            if self._log is not None:
                # Copies: the caller may reuse its arrays before the rebuild replays them.
                self._log.append((keys.copy(), vectors.copy()))
        if self.auto_rebuild and self.rebuild_due and time.monotonic() >= self._retry_after:
            self.start_rebuild()

    def start_rebuild(self, vectors_provider: VectorsProvider | None = None) -> RebuildThread:
        """Build a new index from stored vectors on a background thread, then swap it in.

        The kind follows ``approximate_above`` and ``memory_budget`` for the number of vectors
        provided. ``vectors_provider`` returns ``(ids, vectors)``: at least everything stored when
        ``start_rebuild`` was called (default: :meth:`snapshot`, the index's own vectors; pass the
        KB's stored float32 vectors when a coded index holds only codes). Additions made from
        the moment this is called are logged and replayed into the new index (ids the provider
        already returned are skipped), and the swap happens under the write lock, so no addition
        is lost and no search sees a half-built index. Searches and adds continue meanwhile;
        peak memory is the old index, the provided arrays and the new index together.

        At most one rebuild runs at a time: while one runs, this returns that one's thread.
        A failed rebuild leaves the old index serving and sets the thread's ``error`` and
        :meth:`build_info`'s ``rebuild_error``.
        """
        with self._rw.write():
            running = self._rebuild
            if running is not None and running.is_alive():
                return running
            self._log = []
            thread = RebuildThread(target=self._run_rebuild,
                                   args=(vectors_provider or self.snapshot,),
                                   name="deja-index-rebuild", daemon=True)
            self._rebuild = thread
        thread.start()
        return thread

    def wait_for_rebuild(self, timeout: float | None = None) -> bool:
        """Wait for a running rebuild; True when none is running any more."""
        rebuild = self._rebuild
        if rebuild is not None:
            rebuild.join(timeout)
        return not self.rebuilding

    def _run_rebuild(self, provider: VectorsProvider) -> None:
        thread = threading.current_thread()
        try:
            ids, vectors = provider()
            ids = np.ascontiguousarray(ids, dtype=np.int64)
            vectors = np.ascontiguousarray(vectors, dtype=np.float32)
            if vectors.shape != (len(ids), self.dim):
                raise ValueError(f"provider returned {len(ids)} ids and vectors of shape "
                                 f"{vectors.shape}, expected ({len(ids)}, {self.dim})")
            index, kind, record = _build(ids, vectors, approximate_above=self.approximate_above,
                                         memory_budget=self.memory_budget,
                                         min_recall=self.min_recall, seed=self.seed)
            known = np.sort(ids)
            del vectors
            replayed = 0
            done = 0
            # Replay the bulk of the log off the write lock; only the tail that arrives during
            # the last pass is replayed while adds wait.
            while True:
                with self._rw.read():
                    assert self._log is not None
                    pending = self._log[done:]
                if len(pending) <= 8:
                    break
                replayed += _replay(index, pending, known)
                done += len(pending)
            with self._rw.write():
                assert self._log is not None
                replayed += _replay(index, self._log[done:], known)
                record["replayed"] = replayed
                self._index, self._kind, self._build = index, kind, record
                self._log = None
                self._last_error = None
            log.info("index rebuilt: %s, %d vectors, recall@10 %.4f, nprobe %s, %.1f s",
                     kind, index.ntotal, record["recall_at_10"], record["nprobe"],
                     record["build_seconds"])
        except BaseException as exc:  # the thread must not die silently: record and keep serving
            with self._rw.write():
                self._log = None
                self._last_error = f"{type(exc).__name__}: {exc}"
                self._retry_after = time.monotonic() + RETRY_SECONDS
            if isinstance(thread, RebuildThread):
                thread.error = exc
            log.exception("index rebuild failed; the old index keeps serving")

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path, *, model_id: str, last_kb_id: int) -> IndexManifest:
        """Write ``path`` and ``path.manifest.json`` atomically (temp file, fsync, rename).

        The manifest records the kind and, for IVF, the build record (nprobe, recall, ...).
        A rebuild running meanwhile is not waited for: the serving index is saved.
        """
        with self._rw.read():
            blob = faiss.serialize_index(self._index).tobytes()
            count = self.ntotal
            kind = self._kind
            build = None if kind == "flat" else _jsonable(self._build)
        manifest = IndexManifest(model_id=model_id, dim=self.dim, count=count,
                                 last_kb_id=last_kb_id, sha256=hashlib.sha256(blob).hexdigest(),
                                 kind=kind, build=build)
        _atomic_write(path, blob)
        fields = {k: v for k, v in asdict(manifest).items() if v is not None}
        _atomic_write(_manifest_path(path), json.dumps(fields, indent=2).encode())
        return manifest

    @classmethod
    def load(cls, path: Path, *, model_id: str, dim: int, approximate_above: int = 50_000,
             memory_budget: int | None = None, min_recall: float = 0.98,
             auto_rebuild: bool = True) -> tuple[VectorIndex, IndexManifest]:
        """Load a saved index of the kind its manifest names, refusing one that is torn, missing,
        from another model, or not the kind it claims. The keyword options are the constructor's
        and govern later rebuilds."""
        mpath = _manifest_path(path)
        if not path.exists() or not mpath.exists():
            raise IndexUnusable(f"no index at {path}")
        try:
            manifest = IndexManifest(**json.loads(mpath.read_text()))
        except (ValueError, TypeError) as exc:
            raise IndexUnusable(f"unreadable manifest {mpath}: {exc}") from exc
        if manifest.model_id != model_id or manifest.dim != dim:
            raise IndexUnusable(
                f"index was built with {manifest.model_id} (dim {manifest.dim}), "
                f"not {model_id} (dim {dim})")
        if manifest.kind not in KINDS:
            raise IndexUnusable(f"unknown index kind {manifest.kind!r} in {mpath}")
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise IndexUnusable(f"index file {path} does not match its manifest checksum")
        try:
            raw = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        except RuntimeError as exc:
            raise IndexUnusable(f"unreadable index file {path}: {exc}") from exc
        if not _is_kind(raw, manifest.kind):
            raise IndexUnusable(f"index file {path} is {type(raw).__name__}, "
                                f"not the {manifest.kind} its manifest says")
        if raw.ntotal != manifest.count:
            raise IndexUnusable(f"index holds {raw.ntotal} vectors, manifest says {manifest.count}")
        out = cls(dim, approximate_above=approximate_above, memory_budget=memory_budget,
                  min_recall=min_recall, auto_rebuild=auto_rebuild)
        out._index, out._kind = raw, manifest.kind
        if isinstance(raw, faiss.IndexIVF):
            out._build = dict(manifest.build or {})
            nprobe = out._build.get("nprobe")
            if isinstance(nprobe, int) and nprobe > 0:
                raw.nprobe = nprobe
            # Files written by this module have the id hash table; make sure of it anyway,
            # since reconstruct by id depends on it.
            if raw.direct_map.type != _HASHTABLE:
                raw.set_direct_map_type(_HASHTABLE)
        else:
            out._build = _flat_record(manifest.count, 0.0)
        return out, manifest


# -- building -------------------------------------------------------------------------------------


def choose_kind(n: int, dim: int, *, approximate_above: int,
                memory_budget: int | None) -> str:
    """The kind a rebuild makes for ``n`` vectors: flat up to ``approximate_above``, then the
    least lossy IVF kind whose :func:`memory_estimate` fits ``memory_budget`` (ivf-sq8, the
    smallest, when none does)."""
    if n <= approximate_above:
        return "flat"
    for kind in ("ivf-flat", "ivf-fp16"):
        if memory_budget is None or memory_estimate(kind, n, dim) <= memory_budget:
            return kind
    return "ivf-sq8"


def memory_estimate(kind: str, n: int, dim: int) -> int:
    """Bytes an index of ``kind`` holding ``n`` ``dim``-d vectors takes: codes, ids, the id hash
    table and, for IVF, the centroids of :func:`cells_for` cells (what :meth:`VectorIndex.
    build_info` reports as ``memory_bytes`` once built)."""
    if kind not in KINDS:
        raise ValueError(f"unknown index kind {kind!r}")
    per_vector = _CODE_BYTES_PER_DIM[kind] * dim + 8 + _HASH_BYTES_PER_ID
    centroids = 0 if kind == "flat" else cells_for(n) * 4 * dim
    return n * per_vector + centroids


def cells_for(n: int) -> int:
    """IVF cells for ``n`` vectors: 4·√n (the FAISS guideline's low end, which keeps a probed
    cell around √n/4 vectors), but no fewer than :data:`TRAIN_PER_CELL` vectors per cell so
    k-means has enough points to place every centroid."""
    return max(1, min(round(4 * math.sqrt(n)), n // TRAIN_PER_CELL))


def _build(ids: Ids, vectors: Vectors, *, approximate_above: int, memory_budget: int | None,
           min_recall: float, seed: int) -> tuple[faiss.Index, str, dict[str, Any]]:
    """A new index of the right kind holding ``vectors`` under ``ids``, and its build record."""
    start = time.perf_counter()
    n, dim = vectors.shape
    kind = choose_kind(n, dim, approximate_above=approximate_above, memory_budget=memory_budget)
    if kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        if n:
            index.add_with_ids(vectors, ids)
        return index, kind, _flat_record(n, time.perf_counter() - start)
    nlist = cells_for(n)
    quantizer = faiss.IndexFlatIP(dim)
    ivf: faiss.IndexIVF
    if kind == "ivf-flat":
        ivf = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
    else:
        # Codes of the residual to the cell's centroid (FAISS's default): for fp16 that keeps
        # more precision than coding the vector itself, for sq8 it narrows the coded range.
        ivf = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, _QTYPES[kind],
                                            faiss.METRIC_INNER_PRODUCT)
    ivf.cp.seed = seed
    ivf.cp.max_points_per_centroid = TRAIN_PER_CELL
    rng = np.random.default_rng(seed)
    train = min(n, nlist * TRAIN_PER_CELL)
    picked = vectors[np.sort(rng.choice(n, size=train, replace=False))] if train < n else vectors
    faiss.omp_set_num_threads(_BATCH_THREADS)
    ivf.train(np.ascontiguousarray(picked))
    # A hash table from caller id to (cell, offset): reconstruct by id without a side copy.
    ivf.set_direct_map_type(_HASHTABLE)
    _add_presized(ivf, ids, vectors)
    nprobe, recall, queries, met = _tune_nprobe(ivf, ids, vectors, min_recall, rng)
    ivf.nprobe = nprobe
    return ivf, kind, {
        "kind": kind, "built_vectors": n, "recall_at_10": round(recall, 4),
        "recall_target": min_recall, "recall_target_met": met, "recall_sample": queries,
        "build_seconds": round(time.perf_counter() - start, 3),
        "nprobe": nprobe, "nlist": nlist, "trained_on": train, "replayed": 0,
        "built_at": time.time(),
    }


def _add_presized(ivf: faiss.IndexIVF, ids: Ids, vectors: Vectors) -> None:
    """``ivf.add_with_ids`` with every cell's list allocated at its final size first.

    Adding grows each cell's list by doubling, which leaves ~45% of the codes' memory as unused
    capacity (327 MiB resident for 222 MiB of fp16 codes at 300k vectors); sizing the lists from
    the cell assignment, which the add needs anyway, leaves none and is no slower.
    """
    # add_core reads raw pointers: the arrays must be contiguous and of these types.
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    n = len(ids)
    _, cells = ivf.quantizer.search(vectors, 1)
    assign = np.ascontiguousarray(cells[:, 0], dtype=np.int64)
    lists = ivf.invlists
    assert lists is not None
    for cell, size in enumerate(np.bincount(assign, minlength=ivf.nlist).tolist()):
        if size:
            # Shrinking a std::vector keeps its capacity: the add then fills it in place.
            lists.resize(cell, size)
            lists.resize(cell, 0)
    ivf.add_core(n, faiss.swig_ptr(vectors), faiss.swig_ptr(ids), faiss.swig_ptr(assign))


def _tune_nprobe(ivf: faiss.IndexIVF, ids: Ids, vectors: Vectors, min_recall: float,
                 rng: np.random.Generator) -> tuple[int, float, int, bool]:
    """The smallest power-of-two nprobe whose recall@10 reaches ``min_recall``; its recall, the
    number of queries, and whether the target was met.

    Queries are stored vectors; each query's own id is left out of both result lists, so the
    figure is about finding its 10 nearest *other* vectors (what a fresh event near a known one
    needs), not the trivial self-match that would inflate it.

    When quadrupling nprobe stops raising recall by :data:`RECALL_PLATEAU`, the codes, not the
    cells, limit recall (8-bit codes reorder near-ties): probing more would only slow every
    search down, up to exhaustive scans, for nothing. The smallest nprobe within the plateau of
    the best recall seen is kept, and the target is reported as not met.
    """
    n = len(ids)
    m = min(RECALL_SAMPLE, n)
    rows = np.sort(rng.choice(n, size=m, replace=False))
    queries = np.ascontiguousarray(vectors[rows])
    k = min(RECALL_K + 1, n)
    _, exact_rows = faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)
    exact = [_without(ids[r], ids[q]) for r, q in zip(exact_rows, rows, strict=True)]
    tried: list[tuple[int, float]] = []
    nprobe = 1
    while True:
        ivf.nprobe = nprobe
        _, found = ivf.search(queries, k)
        hits = [len(set(_without(f, ids[q]).tolist()) & set(e.tolist())) / max(1, len(e))
                for f, q, e in zip(found, rows, exact, strict=True)]
        recall = float(np.mean(hits))
        if recall >= min_recall:
            return nprobe, recall, m, True
        tried.append((nprobe, recall))
        # Two doublings (4× the cells) without progress: a plateau, not a slow start.
        plateau = len(tried) >= 3 and recall - tried[-3][1] < RECALL_PLATEAU
        if plateau or nprobe >= ivf.nlist:
            break
        nprobe = min(2 * nprobe, ivf.nlist)
    best = max(r for _, r in tried)
    nprobe, recall = next((p, r) for p, r in tried if r >= best - RECALL_PLATEAU)
    log.warning("recall@10 %.4f < %.2f at any nprobe (best at nprobe %d): the %s codes limit it",
                recall, min_recall, nprobe, type(ivf).__name__)
    return nprobe, recall, m, False


def _without(row: Ids, own: np.int64) -> Ids:
    out: Ids = row[(row != own) & (row >= 0)][:RECALL_K]
    return out


def _replay(index: faiss.Index, entries: list[tuple[Ids, Vectors]], known: Ids) -> int:
    """Add logged additions the provider did not return (``known`` is sorted); their count."""
    added = 0
    for ids, vectors in entries:
        pos = np.searchsorted(known, ids)
        seen = (pos < len(known)) & (known[np.minimum(pos, len(known) - 1)] == ids) \
            if len(known) else np.zeros(len(ids), dtype=bool)
        fresh = ~seen
        if fresh.any():
            index.add_with_ids(np.ascontiguousarray(vectors[fresh]),
                               np.ascontiguousarray(ids[fresh]))
            added += int(fresh.sum())
    return added


def _flat_record(n: int, seconds: float) -> dict[str, Any]:
    return {"kind": "flat", "built_vectors": n, "recall_at_10": 1.0, "recall_target": None,
            "recall_target_met": True, "recall_sample": 0,
            "build_seconds": round(seconds, 3), "nprobe": None, "nlist": None,
            "trained_on": 0, "replayed": 0, "built_at": time.time()}


def _stored_ids(index: faiss.Index) -> Ids:
    if isinstance(index, faiss.IndexIDMap2):
        return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)
    assert isinstance(index, faiss.IndexIVF) and index.invlists is not None
    lists = index.invlists
    parts = [faiss.rev_swig_ptr(lists.get_ids(c), lists.list_size(c)).copy()
             for c in range(index.nlist) if lists.list_size(c)]
    return (np.concatenate(parts).astype(np.int64) if parts
            else np.zeros(0, dtype=np.int64))


def _memory_bytes(index: faiss.Index, dim: int) -> int:
    n = int(index.ntotal)
    if not isinstance(index, faiss.IndexIVF):
        return n * (4 * dim + 8 + _HASH_BYTES_PER_ID)
    return n * (int(index.code_size) + 8 + _HASH_BYTES_PER_ID) + int(index.nlist) * 4 * dim


def _is_kind(index: faiss.Index, kind: str) -> bool:
    if kind == "flat":
        return isinstance(index, faiss.IndexIDMap2) and isinstance(
            faiss.downcast_index(index.index), faiss.IndexFlat)
    if kind == "ivf-flat":
        return isinstance(index, faiss.IndexIVFFlat)
    return (isinstance(index, faiss.IndexIVFScalarQuantizer)
            and kind in _QTYPES and int(index.sq.qtype) == int(_QTYPES[kind]))


def _jsonable(record: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.item() if isinstance(v, np.generic) else v) for k, v in record.items()}


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _atomic_write(path: Path, data: bytes) -> None:
    # pid and thread: two writers never share a temp file.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
