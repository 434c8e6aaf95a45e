"""The sentence encoder on ONNX Runtime: fp32 (the torch model's vectors, faster) or int8.

The ONNX graph is exported here, from the verified safetensors the torch encoder loads, never
downloaded: the first start exports once (seconds), checks the graph against sentence-transformers
on a probe set and refuses it if any probe drifts, then caches it in a directory keyed by the
weights' sha256. Later starts only load the cached file.

Mean pooling and L2 normalisation are inside the graph, so a call returns finished vectors and the
``(batch, tokens, 384)`` hidden states never cross into Python.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np

from embeddings.encoder import (
    DEFAULT_MODEL,
    Encoder,
    ModelIntegrityError,
    SentenceTransformerEncoder,
    Vectors,
    _sha256,
    resolve_model,
)

__all__ = [
    "BACKENDS",
    "EXPORT_VERSION",
    "Backend",
    "ExportRefusedError",
    "OnnxEncoder",
    "OnnxUnavailableError",
    "create_encoder",
    "default_cache_dir",
]

log = logging.getLogger(__name__)

Backend = Literal["torch", "onnx", "onnx-int8"]
BACKENDS: tuple[Backend, ...] = ("torch", "onnx", "onnx-int8")

#: Bumped whenever the exported graph changes, so caches of an older export are not reused.
EXPORT_VERSION = 1
#: Lowest cosine between an fp32 ONNX vector and the torch vector of the same probe text.
FP32_MIN_COSINE = 0.9999
#: int8 moves vectors by design; a probe this far off means a broken quantisation, not rounding.
INT8_MIN_MEAN_COSINE = 0.98
INT8_MIN_COSINE = 0.9

# Probe texts for the export check: short and long, masked placeholders, punctuation, non-ASCII,
# and one past 256 word pieces so truncation is exercised too.
PROBES: tuple[str, ...] = (
    "disk full",
    "Disk usage on <HOST> is above <NUM>% for <NUM> minutes",
    "Failed password for invalid user admin from <IP> port <NUM> ssh2",
    "PacketResponder <NUM> for block blk_<NUM> terminating",
    "kernel: Out of memory: Killed process <NUM> (java) total-vm:<NUM>kB",
    "HTTP 503 from upstream payments-api: connection refused (retry <NUM>/<NUM>)",
    "Pod <HOST>-<POD> CrashLoopBackOff: back-off restarting failed container",
    "Prometheus target missing\nA Prometheus target has disappeared. An exporter might be crashed.",
    "Zeitüberschreitung beim Verbinden mit der Datenbank — 数据库连接超时",
    "x",
    " ".join(f"token{i} error warning" for i in range(120)),
)


class OnnxUnavailableError(RuntimeError):
    """This model cannot be exported here (not a local sentence-transformers dir with weights)."""


class ExportRefusedError(RuntimeError):
    """The exported graph does not reproduce the torch model's vectors closely enough."""


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/deja/models`` (``~/.cache/deja/models``): shared by every data dir."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "deja" / "models"


def _threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's tracer and deprecation chatter (it is about tracing, not results)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _atomic_write(target: Path, write: Callable[[Path], object]) -> None:
    """Write through ``write(tmp)`` next to ``target``, then rename: readers never see a torn file,
    and two processes exporting at once both end with a whole file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with tmp.open("rb") as fh:
            os.fsync(fh.fileno())
        tmp.chmod(0o644)  # mkstemp makes it owner-only; the cache is shared like any model file
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def _cosines(a: Vectors, b: Vectors) -> Vectors:
    out: Vectors = np.einsum("ij,ij->i", a.astype(np.float64), b.astype(np.float64)).astype(
        np.float32)
    return out


#: Texts per ONNX Runtime call on bulk work. Batches are sorted by length, and small ones pad
#: least: on 2 cores, 512 alert texts embedded at 48 / 46 / 44 / 39 texts/s with batches of
#: 8 / 16 / 32 / 64 (medians of 4, one throwaway run; ``python -m bench.perf`` reports the
#: rate at the size in use).
ONNX_BATCH = 16


class OnnxEncoder:
    """A sentence-transformers model (mean pooling) on ONNX Runtime, CPU, optionally int8.

    ``model`` is a model setting as for :class:`SentenceTransformerEncoder`; it must resolve to a
    local directory holding ``model.safetensors`` and ``tokenizer.json``, else
    :class:`OnnxUnavailableError`. The default model's weights are sha256-verified first.

    Vector space: fp32 vectors match torch to cosine ≥ 0.9999 on every probe (checked at export),
    so fp32 keeps the torch ``model_id``: an index or embedding cache built by either backend stays
    valid for the other. int8 vectors differ measurably, so int8 has its own ``model_id`` and its
    own index.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, quantize: bool = False,
                 cache_dir: Path | None = None, batch_size: int = ONNX_BATCH,
                 verify: bool = True, threads: int | None = None) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        location, expected = resolve_model(model)
        root = Path(location)
        weights = root / "model.safetensors"
        if not (weights.is_file() and (root / "tokenizer.json").is_file()):
            raise OnnxUnavailableError(
                f"{model}: not a local sentence-transformers directory with model.safetensors "
                "and tokenizer.json")
        digest = _sha256(weights)
        if verify and expected is not None and digest != expected:
            raise ModelIntegrityError(
                f"model weights at {weights} have sha256 {digest}, expected {expected}")
        self.quantize = quantize
        self.batch_size = batch_size
        #: Number of exports (fp32 or int8) this instance had to run: 0 when the cache served it.
        self.exports = 0
        self.directory = (cache_dir or default_cache_dir()) / f"{digest}-v{EXPORT_VERSION}"
        self._source = root
        self._max_seq_length = _max_seq_length(root)
        self._ensure_exported()
        self.path = self.directory / ("model-int8.onnx" if quantize else "model.onnx")
        meta = json.loads((self.directory / "export.json").read_text())
        self._dim = int(meta["dim"])
        self.fidelity: dict[str, Any] = meta["int8" if quantize else "fp32"]
        name = model if expected is None else DEFAULT_MODEL
        base_id = f"{name}@{digest[:12]}"
        self._model_id = f"{base_id}+onnx-int8" if quantize else base_id
        self._session = _session(self.path, threads or _threads())
        self._inputs = [i.name for i in self._session.get_inputs()]
        self._tokenizer = _tokenizer(root, self._max_seq_length)
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
            if len(texts) == 1:
                # The lean path: one text is never padded, so it costs exactly its tokens.
                return self._run(self._tokenizer.encode_batch(texts))
            # Like sentence-transformers: longest first, so each batch pads to similar lengths.
            order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
            out = np.empty((len(texts), self._dim), dtype=np.float32)
            for start in range(0, len(order), self.batch_size):
                idx = order[start:start + self.batch_size]
                out[idx] = self._run(self._tokenizer.encode_batch([texts[i] for i in idx]))
            return out

    def _run(self, encodings: list[Any]) -> Vectors:
        return _run_session(self._session, self._inputs, encodings)

    # -- export ----------------------------------------------------------------------------------
    def _ensure_exported(self) -> None:
        fp32 = self.directory / "model.onnx"
        int8 = self.directory / "model-int8.onnx"
        meta_path = self.directory / "export.json"
        meta: dict[str, Any] = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        need_fp32 = not (fp32.is_file() and "fp32" in meta)
        need_int8 = self.quantize and not (int8.is_file() and "int8" in meta)
        if not (need_fp32 or need_int8):
            return
        with _quiet():
            from sentence_transformers import SentenceTransformer

            st = SentenceTransformer(str(self._source), device="cpu")
            reference = np.asarray(st.encode(list(PROBES), normalize_embeddings=True,
                                             convert_to_numpy=True, show_progress_bar=False),
                                   dtype=np.float32)
            if need_fp32:
                log.info("exporting %s to ONNX in %s", self._source, self.directory)
                _atomic_write(fp32, lambda tmp: _export(st, tmp))
                self.exports += 1
                meta = {"dim": int(reference.shape[1]), "source": str(self._source)}
                meta["fp32"] = self._check(fp32, reference, "fp32")
            if need_int8:
                log.info("quantising %s to int8", fp32)
                _atomic_write(int8, lambda tmp: _quantize(fp32, tmp))
                self.exports += 1
                meta["int8"] = self._check(int8, reference, "int8")
        _atomic_write(meta_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))

    def _check(self, path: Path, reference: Vectors, kind: str) -> dict[str, float]:
        """Probe cosines against sentence-transformers; deletes and refuses a graph that drifts."""
        session = _session(path, _threads())
        tokenizer = _tokenizer(self._source, self._max_seq_length)
        names = [i.name for i in session.get_inputs()]
        rows = []
        for text in PROBES:  # one by one and as a padded batch: both paths must agree
            rows.append(_run_session(session, names, tokenizer.encode_batch([text])))
        single = np.concatenate(rows)
        batch = _run_session(session, names, tokenizer.encode_batch(list(PROBES)))
        cos = np.concatenate([_cosines(single, reference), _cosines(batch, reference)])
        stats = {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min())}
        ok = (stats["min_cosine"] >= FP32_MIN_COSINE if kind == "fp32" else
              stats["mean_cosine"] >= INT8_MIN_MEAN_COSINE
              and stats["min_cosine"] >= INT8_MIN_COSINE)
        if not ok:
            path.unlink(missing_ok=True)
            raise ExportRefusedError(
                f"{kind} ONNX export of {self._source} drifts from torch on the probe set "
                f"(mean cosine {stats['mean_cosine']:.6f}, min {stats['min_cosine']:.6f})")
        return stats


def _max_seq_length(root: Path) -> int:
    config = root / "sentence_bert_config.json"
    if config.is_file():
        value = json.loads(config.read_text()).get("max_seq_length")
        if value:
            return int(value)
    return 512


def _tokenizer(root: Path, max_length: int) -> Any:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.enable_truncation(max_length=max_length)
    pad_id = tok.token_to_id("[PAD]")
    tok.enable_padding(pad_id=0 if pad_id is None else pad_id,
                       pad_token="[PAD]" if pad_id is not None else "<pad>")
    return tok


def _session(path: Path, threads: int) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # ONNX Runtime's default: idle workers spin briefly before sleeping. On a quiet 2-core host
    # that cut single-text latency by ~30% against sleeping at once (17.7 vs 25.8 ms p50).
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def _run_session(session: Any, names: list[str], encodings: list[Any]) -> Vectors:
    feeds = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    (vectors,) = session.run(None, {k: feeds[k] for k in names})
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _export(st: Any, target: Path) -> None:
    """Trace the transformer with pooling and normalisation appended, as sentence-transformers
    computes them, with dynamic batch and sequence axes."""
    import torch

    transformer = st[0].auto_model

    class Pooled(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            hidden = self.inner(input_ids=input_ids, attention_mask=attention_mask,
                                token_type_ids=token_type_ids).last_hidden_state
            weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
            summed = (hidden * weights).sum(dim=1)
            mean = summed / weights.sum(dim=1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, p=2.0, dim=1)

    wrapper = Pooled(transformer).eval()
    # A padded example: traced with an all-ones mask, transformers may drop the mask entirely and
    # the graph would then ignore padding.
    ids = torch.tensor([[101, 7592, 2088, 102], [101, 7592, 102, 0]], dtype=torch.long)
    mask = (ids != 0).to(torch.long)
    names = ["input_ids", "attention_mask", "token_type_ids"]
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    with torch.no_grad():
        torch.onnx.export(
            wrapper, (ids, mask, torch.zeros_like(ids)), str(target), input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**axes, "sentence_embedding": {0: "batch"}},
            opset_version=17, do_constant_folding=True, dynamo=False)


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8: weights quantised once, activations per call (no calibration data)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True)


def create_encoder(model: str = DEFAULT_MODEL, backend: str = "torch", *,
                   cache_dir: Path | None = None, batch_size: int | None = None) -> Encoder:
    """The encoder a setting asks for; a model ONNX cannot export here falls back to torch.
    ``batch_size`` defaults to each runtime's own (ONNX: :data:`ONNX_BATCH`; torch: 64)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown embedder {backend!r}; expected one of {', '.join(BACKENDS)}")
    if backend != "torch":
        try:
            return OnnxEncoder(model, quantize=backend == "onnx-int8", cache_dir=cache_dir,
                               batch_size=batch_size or ONNX_BATCH)
        except OnnxUnavailableError as exc:
            log.warning("embedder %s unavailable (%s): using torch", backend, exc)
    return SentenceTransformerEncoder(model, batch_size=batch_size or 64)

