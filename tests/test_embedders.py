"""The ONNX Runtime encoders against the torch model they are exported from.

One real export per module (fp32 and int8) into a temp cache; every test reads that cache.
"""

from __future__ import annotations

import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest

import embeddings.onnx_encoder as onnx_encoder
from api.deja import Deja
from api.settings import Settings
from bench import loghub
from embeddings import (
    DEFAULT_MODEL,
    ModelIntegrityError,
    OnnxEncoder,
    SentenceTransformerEncoder,
    create_encoder,
    normalize,
)
from embeddings.encoder import OFFICIAL_SHA256, resolve_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def int8(cache_dir: Path) -> OnnxEncoder:
    """Built first: exports fp32 and int8 into the empty cache."""
    enc = OnnxEncoder(quantize=True, cache_dir=cache_dir)
    assert enc.exports == 2
    return enc


@pytest.fixture(scope="module")
def fp32(int8: OnnxEncoder, cache_dir: Path) -> OnnxEncoder:
    return OnnxEncoder(cache_dir=cache_dir)


@pytest.fixture(scope="module")
def lines() -> list[str]:
    """Masked lines of every LogHub system (as Deja embeds them) plus raw ones (with numbers)."""
    rng = random.Random(3)
    out: list[str] = []
    for system in loghub.SYSTEMS:
        sample = rng.sample(loghub.load_system(system), 25)
        out += [normalize({"title": x.content}) for x in sample]
        out += [x.content for x in sample[:10]]
    assert len(out) >= 200
    return out


@pytest.fixture(scope="module")
def reference(real_encoder: SentenceTransformerEncoder, lines: list[str]) -> np.ndarray:
    return real_encoder.encode(lines)


def test_fp32_reproduces_torch_on_loghub(fp32: OnnxEncoder, reference: np.ndarray,
                                         lines: list[str]) -> None:
    got = fp32.encode(lines)
    assert got.dtype == np.float32 and got.shape == reference.shape
    cos = np.einsum("ij,ij->i", got, reference)
    assert cos.min() >= 0.9999, lines[int(cos.argmin())]
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_single_text_path_matches_batch_path(fp32: OnnxEncoder, lines: list[str]) -> None:
    # Singles are not padded, batches are: padding must not move a vector.
    batch = fp32.encode(lines[:40])
    singles = np.concatenate([fp32.encode([t]) for t in lines[:40]])
    assert np.einsum("ij,ij->i", batch, singles).min() >= 0.99999


def test_int8_stays_close_to_torch(int8: OnnxEncoder, reference: np.ndarray,
                                   lines: list[str]) -> None:
    cos = np.einsum("ij,ij->i", int8.encode(lines), reference)
    assert cos.mean() >= 0.98
    assert cos.min() >= 0.9


def test_long_text_is_truncated_like_torch(fp32: OnnxEncoder,
                                           real_encoder: SentenceTransformerEncoder) -> None:
    text = " ".join(f"disk{i} full on node" for i in range(400))  # far past 256 word pieces
    cos = float(fp32.encode([text])[0] @ real_encoder.encode([text])[0])
    assert cos >= 0.9999


def test_model_ids(fp32: OnnxEncoder, int8: OnnxEncoder,
                   real_encoder: SentenceTransformerEncoder) -> None:
    # fp32 is the torch vector space; int8 is another one and must never share an index with it.
    assert fp32.model_id == real_encoder.model_id
    assert int8.model_id != real_encoder.model_id
    assert int8.model_id.endswith("+onnx-int8")
    assert fp32.dim == int8.dim == real_encoder.dim == 384


def test_empty_list(fp32: OnnxEncoder, int8: OnnxEncoder) -> None:
    for enc in (fp32, int8):
        out = enc.encode([])
        assert out.shape == (0, 384) and out.dtype == np.float32


def test_cache_is_reused(fp32: OnnxEncoder, int8: OnnxEncoder, cache_dir: Path) -> None:
    files = sorted(cache_dir.rglob("*.onnx"))
    assert [p.name for p in files] == ["model-int8.onnx", "model.onnx"]
    before = {p: p.stat().st_mtime_ns for p in files}
    again = OnnxEncoder(quantize=True, cache_dir=cache_dir)
    assert again.exports == 0
    assert {p: p.stat().st_mtime_ns for p in files} == before
    assert fp32.exports == 0
    # No temp files left behind by the atomic writes.
    assert not [p for p in cache_dir.rglob("*") if p.name.endswith(".tmp")]
    assert OFFICIAL_SHA256 in again.directory.name
    assert again.fidelity["mean_cosine"] >= 0.98


def _copy_model(target: Path) -> Path:
    source, _ = resolve_model(DEFAULT_MODEL)
    shutil.copytree(source, target)
    return target


def test_tampered_weights_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = _copy_model(tmp_path / "model")
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    # The tampered copy claims to be the packaged model, which must match the official sha256.
    monkeypatch.setattr(onnx_encoder, "resolve_model", lambda name: (model, OFFICIAL_SHA256))
    cache = tmp_path / "cache"
    with pytest.raises(ModelIntegrityError):
        OnnxEncoder(cache_dir=cache)
    assert not cache.exists()


def test_custom_local_model_shares_the_export_of_its_weights(
        tmp_path: Path, cache_dir: Path, fp32: OnnxEncoder) -> None:
    model = _copy_model(tmp_path / "my-model")
    enc = OnnxEncoder(str(model), cache_dir=cache_dir)
    assert enc.exports == 0  # same weights, same sha256: the cached export serves it
    assert enc.model_id == f"{model}@{OFFICIAL_SHA256[:12]}"
    np.testing.assert_allclose(enc.encode(["disk full"]), fp32.encode(["disk full"]), atol=1e-6)


def test_unexportable_model_falls_back_to_torch(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(onnx_encoder.OnnxUnavailableError):
        OnnxEncoder(str(tmp_path / "nowhere"), cache_dir=tmp_path)
    # A local sentence-transformers dir without tokenizer.json: torch builds its tokenizer from
    # vocab.txt, the ONNX encoder does not try.
    model = _copy_model(tmp_path / "no-tokenizer-json")
    (model / "tokenizer.json").unlink()
    with caplog.at_level(logging.WARNING, logger="embeddings.onnx_encoder"):
        enc = create_encoder(str(model), "onnx-int8", cache_dir=tmp_path / "cache")
    assert isinstance(enc, SentenceTransformerEncoder)
    assert "using torch" in caplog.text
    assert enc.encode(["disk full"]).shape == (1, 384)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown embedder"):
        create_encoder(DEFAULT_MODEL, "tensorrt")


def test_settings_select_the_backend(tmp_path: Path, cache_dir: Path, int8: OnnxEncoder,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().embedder == "onnx"
    monkeypatch.setenv("DEJA_EMBEDDER", "onnx-int8")
    monkeypatch.setenv("DEJA_MODEL_CACHE_DIR", str(cache_dir))
    settings = Settings(sweep_seconds=0)
    assert settings.embedder == "onnx-int8" and settings.model_cache_dir == cache_dir
    with Deja.open(tmp_path / "data", settings=settings) as deja:
        assert isinstance(deja.cache.encoder, OnnxEncoder)
        assert deja.cache.encoder.quantize and deja.cache.encoder.exports == 0
        assert deja.model_id == int8.model_id
    monkeypatch.setenv("DEJA_EMBEDDER", "onnx")
    with Deja.open(tmp_path / "data2", settings=Settings(sweep_seconds=0)) as deja:
        assert isinstance(deja.cache.encoder, OnnxEncoder)
        assert not deja.cache.encoder.quantize
    monkeypatch.setenv("DEJA_EMBEDDER", "bogus")
    with pytest.raises(ValueError):
        Settings()
