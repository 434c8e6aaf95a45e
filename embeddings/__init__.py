"""Text normalisation, fingerprints and the cached sentence encoder."""

from embeddings.cache import CachedEncoder, VectorStore
from embeddings.encoder import (
    DEFAULT_MODEL,
    Encoder,
    HashingEncoder,
    ModelIntegrityError,
    SentenceTransformerEncoder,
)
from embeddings.normalize import canonical_text, fingerprint, lexical_tokens, mask, normalize

__all__ = [
    "DEFAULT_MODEL",
    "CachedEncoder",
    "Encoder",
    "HashingEncoder",
    "ModelIntegrityError",
    "SentenceTransformerEncoder",
    "VectorStore",
    "canonical_text",
    "fingerprint",
    "lexical_tokens",
    "mask",
    "normalize",
]
