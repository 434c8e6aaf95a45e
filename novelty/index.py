"""A FAISS inner-product index whose ids are the caller's ids, persisted with a manifest.

Vectors are L2-normalised, so inner product is cosine similarity. The index file is derived
data: it is written to a temporary file, fsynced and renamed, and its manifest says which model
made the vectors, how many there are, which KB rows they cover and the file's checksum, so a
reader can tell a current file from a stale, torn or foreign one.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt

__all__ = ["IndexManifest", "IndexUnusable", "VectorIndex"]

Vectors = npt.NDArray[np.float32]
Ids = npt.NDArray[np.int64]


class IndexUnusable(Exception):
    """The index file is missing, torn, or was built for another model; rebuild it."""


@dataclass(frozen=True)
class IndexManifest:
    model_id: str
    dim: int
    count: int
    last_kb_id: int
    sha256: str
    kind: str = "flat"


class VectorIndex:
    """Exact (flat) inner-product search over id-mapped vectors.

    Additions are serialised by a lock; searches run concurrently with each other (FAISS search is
    read-only), but not with an addition.
    """

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self._index: faiss.Index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
        self._lock = threading.RLock()

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: Ids, vectors: Vectors) -> None:
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise ValueError(f"expected vectors of shape (n, {self.dim}), got {vectors.shape}")
        with self._lock:
            self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def search(self, queries: Vectors, k: int) -> tuple[npt.NDArray[np.float32], Ids]:
        """Top-``k`` cosine similarities and ids per query row; missing slots have id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if self.ntotal == 0 or k <= 0:
            n = len(queries)
            return (np.full((n, max(k, 0)), -np.inf, dtype=np.float32),
                    np.full((n, max(k, 0)), -1, dtype=np.int64))
        with self._lock:
            sims, ids = self._index.search(queries, min(k, self.ntotal))
        return sims, ids

    def reconstruct(self, ids: Ids) -> Vectors:
        with self._lock:
            return np.stack([self._index.reconstruct(int(i)) for i in ids]).astype(np.float32)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, path: Path, *, model_id: str, last_kb_id: int) -> IndexManifest:
        """Write ``path`` and ``path.manifest.json`` atomically (temp file, fsync, rename)."""
        with self._lock:
            blob = faiss.serialize_index(self._index).tobytes()
            count = self.ntotal
        manifest = IndexManifest(model_id=model_id, dim=self.dim, count=count,
                                 last_kb_id=last_kb_id, sha256=hashlib.sha256(blob).hexdigest())
        _atomic_write(path, blob)
        _atomic_write(_manifest_path(path), json.dumps(asdict(manifest), indent=2).encode())
        return manifest

    @classmethod
    def load(cls, path: Path, *, model_id: str, dim: int) -> tuple[VectorIndex, IndexManifest]:
        """Load a saved index, refusing one that is torn, missing, or from another model."""
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
        blob = path.read_bytes()
        if hashlib.sha256(blob).hexdigest() != manifest.sha256:
            raise IndexUnusable(f"index file {path} does not match its manifest checksum")
        raw = faiss.deserialize_index(np.frombuffer(blob, dtype=np.uint8))
        if raw.ntotal != manifest.count:
            raise IndexUnusable(f"index holds {raw.ntotal} vectors, manifest says {manifest.count}")
        out = cls(dim)
        out._index = raw
        return out, manifest


def _manifest_path(path: Path) -> Path:
    return path.with_name(path.name + ".manifest.json")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
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
