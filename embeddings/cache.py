"""The embedding cache: a fingerprint is embedded once, ever, per model.

Two layers: a bounded in-process LRU for the hot path, and a persistent store (the KB's
``embeddings`` table, reached through the :class:`VectorStore` protocol so this package knows
nothing of DuckDB).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from embeddings.encoder import Encoder, Vectors

__all__ = ["CacheStats", "CachedEncoder", "VectorStore"]


class VectorStore(Protocol):
    def get_vectors(self, model_id: str, keys: Sequence[str]) -> dict[str, Vectors]:
        """Vectors already stored for these keys (missing keys are absent)."""
        ...

    def put_vectors(self, model_id: str, items: dict[str, Vectors]) -> None:
        """Store vectors; keys already present are left as they are."""
        ...


class CacheStats:
    def __init__(self) -> None:
        self.hits = 0
        self.misses = 0

    def as_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "misses": self.misses}


class CachedEncoder:
    """Embeds masked texts keyed by fingerprint, paying the model only for unseen fingerprints.

    ``memory_items`` bounds the LRU (each 384-d vector is 1.5 kB; 100k items ≈ 150 MB).
    """

    def __init__(self, encoder: Encoder, store: VectorStore | None = None, *,
                 memory_items: int = 100_000) -> None:
        self.encoder = encoder
        self.store = store
        self.memory_items = memory_items
        self.stats = CacheStats()
        self._lru: OrderedDict[str, Vectors] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self.encoder.model_id

    @property
    def dim(self) -> int:
        return self.encoder.dim

    def embed(self, keys: Sequence[str], texts: Sequence[str]) -> Vectors:
        """Vectors for ``texts`` (masked), in order; ``keys`` are their fingerprints.

        Duplicate keys in one call are embedded once.
        """
        out, fresh = self.embed_unsaved(keys, texts)
        if fresh and self.store is not None:
            self.store.put_vectors(self.model_id, fresh)
        return out

    def embed_unsaved(self, keys: Sequence[str], texts: Sequence[str]
                      ) -> tuple[Vectors, dict[str, Vectors]]:
        """As :meth:`embed`, but the vectors the model made are returned for the caller to store
        (``Store.put_vectors``) in a transaction it commits anyway: a check then pays one
        commit, not two."""
        out = np.empty((len(keys), self.dim), dtype=np.float32)
        missing: dict[str, list[int]] = {}
        with self._lock:
            for i, key in enumerate(keys):
                vec = self._lru.get(key)
                if vec is not None:
                    self._lru.move_to_end(key)
                    out[i] = vec
                else:
                    missing.setdefault(key, []).append(i)
        if missing and self.store is not None:
            for key, vec in self.store.get_vectors(self.model_id, list(missing)).items():
                for i in missing.pop(key):
                    out[i] = vec
                self._remember(key, vec)
        self.stats.hits += len(keys) - sum(len(v) for v in missing.values())
        self.stats.misses += sum(len(v) for v in missing.values())
        if missing:
            order = list(missing)
            vecs = self.encoder.encode([texts[missing[k][0]] for k in order])
            fresh: dict[str, Vectors] = {}
            for key, vec in zip(order, vecs, strict=True):
                out[missing[key]] = vec
                fresh[key] = vec
                self._remember(key, vec)
            return out, fresh
        return out, {}

    def _remember(self, key: str, vec: Vectors) -> None:
        with self._lock:
            self._lru[key] = vec
            self._lru.move_to_end(key)
            while len(self._lru) > self.memory_items:
                self._lru.popitem(last=False)
