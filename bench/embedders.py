"""Embedder backends side by side: torch (sentence-transformers), ONNX Runtime fp32, ONNX int8.

In one process, interleaved per repeat so that background load hits every backend alike:
single-text latency (p50/p99) on alert-length texts (Prometheus rule name + description) and
log-length texts (LogHub lines), batch-of-64 throughput, and fidelity to torch: cosine of each
backend's vector to the torch vector, and agreement of nearest neighbours within each LogHub
system. Every text is masked first, as Deja embeds it; fidelity is also measured on a sample of
raw (unmasked) lines, which carry the numbers and ids masking removes.

    python -m bench.embedders --out bench/results [--repeats 3] [--singles 200]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.loghub import discover_systems, load_system, loghub_dir

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RULES = REPO_ROOT.parent / "shared" / "data" / "prometheus-alert-rules" / "rules.yml"
BACKENDS = ("torch", "onnx", "onnx-int8")


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def alert_texts(path: Path) -> list[str]:
    from api.scenarios import load_catalogue
    from embeddings import normalize

    return [normalize({"title": r.name, "text": r.description}) for r in load_catalogue(path)]


def loghub_texts(systems: Sequence[str]) -> dict[str, tuple[list[str], list[str]]]:
    """Per system: the unique masked lines and the unique raw lines, in file order."""
    from embeddings import normalize

    out: dict[str, tuple[list[str], list[str]]] = {}
    for system in systems:
        lines = load_system(system)
        masked = list(dict.fromkeys(normalize({"title": ln.content}) for ln in lines))
        raw = list(dict.fromkeys(ln.content for ln in lines))
        out[system] = (masked, raw)
    return out


def build(backend: str, cache_dir: Path) -> tuple[Any, float]:
    """An encoder of ``backend`` and the seconds it took to construct (export included)."""
    from embeddings import OnnxEncoder, SentenceTransformerEncoder

    t0 = time.perf_counter()
    enc: Any
    if backend == "torch":
        enc = SentenceTransformerEncoder(batch_size=64)
    else:
        enc = OnnxEncoder(quantize=backend == "onnx-int8", cache_dir=cache_dir, batch_size=64)
    return enc, time.perf_counter() - t0


def latencies(encode: Callable[[list[str]], Any], texts: Sequence[str]) -> list[float]:
    out = []
    for text in texts:
        t0 = time.perf_counter()
        encode([text])
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def throughput(encode: Callable[[list[str]], Any], texts: list[str]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(texts), 64):
        encode(texts[start:start + 64])
    return len(texts) / (time.perf_counter() - t0)


def neighbour_agreement(ref: np.ndarray, other: np.ndarray) -> float:
    """Share of rows whose nearest other row is the same under both embeddings."""
    if len(ref) < 2:
        return float("nan")

    def nearest(v: np.ndarray) -> np.ndarray:
        sims = v @ v.T
        np.fill_diagonal(sims, -np.inf)
        result: np.ndarray = sims.argmax(axis=1)
        return result

    return float((nearest(ref) == nearest(other)).mean())


def fidelity(ref: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> dict[str, Any]:
    cos = np.concatenate([np.einsum("ij,ij->i", ref[s], got[s]) for s in ref])
    agree = {s: neighbour_agreement(ref[s], got[s]) for s in ref}
    return {"mean_cosine": float(cos.mean()), "min_cosine": float(cos.min()),
            "p1_cosine": pct(cos.tolist(), 1), "n": len(cos),
            "nn_agreement": float(statistics.fmean(agree.values())),
            "nn_agreement_min": float(min(agree.values())), "nn_agreement_by_system": agree}


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.embedders",
                                description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--backends", nargs="+", choices=BACKENDS, default=list(BACKENDS))
    p.add_argument("--repeats", type=int, default=3, help="medians are taken over these")
    p.add_argument("--singles", type=int, default=200, help="single-text calls per kind, repeat")
    p.add_argument("--batch-texts", type=int, default=640, help="texts per throughput repeat")
    p.add_argument("--raw-per-system", type=int, default=250,
                   help="raw (unmasked) LogHub lines per system for fidelity")
    p.add_argument("--rules", type=Path, default=DEFAULT_RULES)
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="ONNX export cache (default: a fresh temp dir, so export is timed)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rng = random.Random(args.seed)
    systems = discover_systems()
    if "torch" not in args.backends:
        print("torch is the fidelity reference: include it in --backends")
        return 2
    alerts = alert_texts(args.rules)
    logs = loghub_texts(systems)
    log_pool = [t for masked, _ in logs.values() for t in masked]
    raw = {s: rng.sample(r, min(args.raw_per_system, len(r))) for s, (_, r) in logs.items()}

    tmp = tempfile.TemporaryDirectory(prefix="deja-embedders-")
    cache_dir = args.cache_dir or Path(tmp.name)
    encoders: dict[str, Any] = {}
    startup: dict[str, float] = {}
    for backend in args.backends:  # onnx before onnx-int8: the int8 export reuses the fp32 file
        encoders[backend], startup[backend] = build(backend, cache_dir)
        tqdm.write(f"{backend}: ready in {startup[backend]:.1f} s")
    for enc in encoders.values():  # warm-up: first calls allocate
        enc.encode(alerts[:16])
        enc.encode(alerts[:1])

    runs: dict[str, dict[str, list[float]]] = {b: {} for b in encoders}
    steps = args.repeats * len(encoders) * 3
    with tqdm(total=steps, unit="step", dynamic_ncols=True) as bar:
        for rep in range(args.repeats):
            pick_alerts = [rng.choice(alerts) for _ in range(args.singles)]
            pick_logs = [rng.choice(log_pool) for _ in range(args.singles)]
            batch = [rng.choice(alerts + log_pool) for _ in range(args.batch_texts)]
            # Rotate the order per repeat, so no backend always runs right after another.
            order = list(encoders)[rep % len(encoders):] + list(encoders)[:rep % len(encoders)]
            for backend in order:
                enc, r = encoders[backend], runs[backend]
                for kind, texts in (("alert", pick_alerts), ("log", pick_logs)):
                    bar.set_description(f"repeat {rep} {backend} {kind} singles")
                    lat = latencies(enc.encode, texts)
                    r.setdefault(f"{kind}_p50_ms", []).append(pct(lat, 50))
                    r.setdefault(f"{kind}_p99_ms", []).append(pct(lat, 99))
                    bar.update(1)
                bar.set_description(f"repeat {rep} {backend} batch-64")
                r.setdefault("batch64_texts_per_s", []).append(throughput(enc.encode, batch))
                bar.update(1)

    vectors: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for backend, enc in tqdm(encoders.items(), desc="fidelity", unit="backend"):
        vectors[backend] = {
            "masked": {s: enc.encode(masked) for s, (masked, _) in logs.items()},
            "raw": {s: enc.encode(texts) for s, texts in raw.items()},
            "alerts": {"alerts": enc.encode(alerts)},
        }
    results: dict[str, Any] = {}
    for backend, enc in encoders.items():
        speed = {k: {"median": _median(v), "runs": v} for k, v in runs[backend].items()}
        results[backend] = {
            "model_id": enc.model_id,
            "startup_s": startup[backend],
            **speed,
            "fidelity": {kind: fidelity(vectors["torch"][kind], vectors[backend][kind])
                         for kind in ("masked", "raw", "alerts")},
        }
    del encoders, vectors
    gc.collect()
    tmp.cleanup()

    payload = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "commit": _git_commit(), "cpus": os.cpu_count(),
                   "machine": platform.processor() or platform.machine(),
                   "loghub_dir": str(loghub_dir()), "systems": systems,
                   "alert_texts": len(alerts),
                   "masked_lines": {s: len(m) for s, (m, _) in logs.items()},
                   "load_average": os.getloadavg()},
        "results": results,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "embedders.json").write_text(json.dumps(payload, indent=2) + "\n")
    md = markdown(payload)
    (args.out / "embedders.md").write_text(md)
    print(md)
    print(f"wrote {args.out / 'embedders.md'} and {args.out / 'embedders.json'}")
    return 0


def markdown(payload: dict[str, Any]) -> str:
    cfg, res = payload["config"], payload["results"]
    torch_rate = res["torch"]["batch64_texts_per_s"]["median"] if "torch" in res else None
    torch_p50 = res["torch"]["alert_p50_ms"]["median"] if "torch" in res else None
    lines = [
        "# Embedder backends",
        "",
        f"Commit `{cfg['commit']}`, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, {cfg['cpus']} CPUs, "
        f"load average at the end {', '.join(f'{x:.1f}' for x in cfg['load_average'])}. "
        f"Medians of {cfg['repeats']} interleaved repeats; {cfg['singles']} single-text calls per "
        f"kind and repeat; batch-64 throughput over {cfg['batch_texts']} mixed texts. Alert texts: "
        f"{cfg['alert_texts']} Prometheus rules (name + description, masked); log texts: "
        f"{sum(cfg['masked_lines'].values())} unique masked LogHub lines.",
        "",
        "| backend | model_id | startup s | alert p50 ms | alert p99 ms | log p50 ms | log p99 ms "
        "| batch-64 texts/s | vs torch |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in res.items():
        rate = r["batch64_texts_per_s"]["median"]
        speed = (f"{rate / torch_rate:.2f}× batch, "
                 f"{torch_p50 / r['alert_p50_ms']['median']:.2f}× single"
                 if torch_rate and torch_p50 else "")
        lines.append(
            f"| {name} | `{r['model_id']}` | {r['startup_s']:.1f} | "
            f"{r['alert_p50_ms']['median']:.1f} | {r['alert_p99_ms']['median']:.1f} | "
            f"{r['log_p50_ms']['median']:.1f} | {r['log_p99_ms']['median']:.1f} | "
            f"{rate:.0f} | {speed} |")
    lines += [
        "",
        "Fidelity to torch: cosine of each text's vector to its torch vector; NN agreement = share "
        "of texts whose nearest other text (within its LogHub system) is the same as under torch "
        "(mean over systems, and the worst system).",
        "",
        "| backend | texts | mean cos | min cos | p1 cos | NN agreement | worst system |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"masked": "LogHub masked (all unique)", "raw": "LogHub raw (sample)",
              "alerts": "alert rules"}
    for name, r in res.items():
        for kind, f in r["fidelity"].items():
            agree = f"{f['nn_agreement']:.4f}"
            worst = "" if kind == "alerts" else f"{f['nn_agreement_min']:.4f}"
            lines.append(f"| {name} | {labels[kind]} ({f['n']}) | {f['mean_cosine']:.5f} | "
                         f"{f['min_cosine']:.5f} | {f['p1_cosine']:.5f} | {agree} | {worst} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
