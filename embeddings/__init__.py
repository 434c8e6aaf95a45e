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
from embeddings.onnx_encoder import BACKENDS, OnnxEncoder, create_encoder

__all__ = [
    "BACKENDS",
    "DEFAULT_MODEL",
    "CachedEncoder",
    "Encoder",
    "HashingEncoder",
    "ModelIntegrityError",
    "OnnxEncoder",
    "SentenceTransformerEncoder",
    "VectorStore",
    "canonical_text",
    "create_encoder",
    "fingerprint",
    "lexical_tokens",
    "mask",
    "normalize",
]
