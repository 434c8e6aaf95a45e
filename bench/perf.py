"""Speed benchmark: the model, checks and ingest over HTTP against a real ``deja serve``, FAISS at
10k/100k/1M vectors, feedback-to-searchable latency, and a naive peer on the same KBs (AUROC on
the labelled scenario KB, check throughput at ``--peer-kb`` incidents, 100k by default).

    python -m bench.perf --out bench/results [--quick] [--json]
    python -m bench.perf --out /tmp/perf --sections faiss --faiss-sizes 1000000 \
        [--faiss-kinds ivf-flat ivf-fp16]          # one section, one size, some kinds
    python -m bench.perf --out /tmp/peer --sections peer --peer-kb 20000   # a smaller peer KB

Every figure is the median of ``repeats`` runs made in this one invocation (each run's value is in
perf.json). The tables go to stdout (or the JSON document, with ``--json``) and to OUT/perf.md and
OUT/perf.json. ``--quick`` shrinks every section to finish in under 3 minutes (a smoke test, not a
measurement); the full run takes about 20 minutes on 2 cores.

The HTTP client runs on the same machine as the server it measures: on 2 cores its own CPU is part
of every HTTP figure, as it would be for a co-located caller. Servers are started one at a time
and killed on exit, whatever the exit.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import http.client
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

# The naive peer embeds what the quality benchmark's baseline does: the raw title and text.
from bench.quality import _tail, deja_command, event_text, free_port

REPO_ROOT = Path(__file__).resolve().parents[1]
DIM = 384
K = 10
INGEST_BATCH = 500
CHECK_BATCH = 100
REPEAT_SHARE = 0.9
#: Busiest the CPUs may be (share of all cores) just before the start, and the share other
#: processes may take during the run, for a run to count as quiet.
QUIET_BUSY = 0.15


@dataclass(frozen=True)
class Plan:
    """How much of everything one invocation measures."""

    repeats: int
    model_singles: int
    model_batch_texts: int
    ingest_unique: int
    ingest_stream: int
    checks: int
    feedback_trials: int
    peer_events: int
    peer_rules: int
    faiss_sizes: tuple[int, ...]
    faiss_queries: int
    #: Also the compact kinds (ivf-fp16, ivf-sq8) at the largest size, where a memory budget
    #: would pick them.
    coded_at_largest: bool
    #: Incidents in both KBs of the peer section's throughput rows (scenario KB + alert-stream
    #: filler); its AUROC rows use the labelled scenario KB alone.
    peer_kb: int = 100_000
    hot_templates: int = 200


FULL = Plan(repeats=3, model_singles=200, model_batch_texts=1024, ingest_unique=1000,
            ingest_stream=5000, checks=200, feedback_trials=15, peer_events=600, peer_rules=300,
            faiss_sizes=(10_000, 50_000, 100_000, 1_000_000), faiss_queries=200,
            coded_at_largest=True)
QUICK = Plan(repeats=2, model_singles=30, model_batch_texts=128, ingest_unique=100,
             ingest_stream=600, checks=30, feedback_trials=3, peer_events=100, peer_rules=60,
             faiss_sizes=(10_000, 50_000), faiss_queries=100, coded_at_largest=False,
            peer_kb=5_000)


# -- small statistics -----------------------------------------------------------------------------


def pct(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def median_of(runs: Sequence[float]) -> float:
    return float(statistics.median(runs)) if runs else math.nan


def figure(runs: Sequence[float], unit: str) -> dict[str, Any]:
    """A reported figure: the median of its runs, with the runs themselves."""
    return {"value": median_of(runs), "unit": unit, "runs": [float(r) for r in runs]}


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- events -------------------------------------------------------------------------------------


class Events:
    """Alert events rendered from the packaged rule catalogue.

    ``unique`` events have a fingerprint never produced before by this factory (three catalogue
    words are prefixed to the title: numbers, IPs and hex ids are masked, words are not), so they
    miss every embedding cache. ``stream`` is the realistic alert stream: 90% repeats of
    ``hot_templates`` alerts (one render per rule, as one alerting pipeline renders it) with new
    numbers, IPs, ports and timestamps each time (:meth:`variant`), 10% unique events.
    """

    def __init__(self, seed: int, hot_templates: int) -> None:
        from api.scenarios import load_catalogue

        self.rng = random.Random(seed)
        self.rules = load_catalogue()
        hot = self.rng.sample(self.rules, min(hot_templates, len(self.rules)))
        from api.scenarios import render_event

        self.templates = [render_event(rule, self.rng, with_resolution=True) for rule in hot]
        words = {w.lower() for r in self.rules
                 for w in re.findall(r"\b[A-Za-z]{4,12}\b", f"{r.name} {r.description}")}
        self.vocab = sorted(words)
        self.seen: set[str] = set()

    def _fingerprint(self, event: dict[str, Any]) -> str:
        from embeddings import fingerprint, normalize

        return fingerprint(normalize({"title": event["title"], "text": event.get("text")}))

    def unique(self, *, with_resolution: bool = False) -> dict[str, Any]:
        from api.scenarios import render_event

        while True:
            event = render_event(self.rng.choice(self.rules), self.rng,
                                 with_resolution=with_resolution)
            event["title"] = f"{' '.join(self.rng.sample(self.vocab, 3))} {event['title']}"[:2000]
            fp = self._fingerprint(event)
            if fp not in self.seen:
                self.seen.add(fp)
                return event

    def stream(self, n: int, *, with_resolution: bool = False) -> list[dict[str, Any]]:
        out = []
        for _ in range(n):
            if self.rng.random() < REPEAT_SHARE:
                template = self.rng.choice(self.templates)
                event = self.variant(template) | {"id": f"perf-{self.rng.getrandbits(64):016x}"}
                if with_resolution:
                    event |= {"resolution": template["resolution"],
                              "outcome": template["outcome"]}
                self.seen.add(self._fingerprint(event))
                out.append(event)
            else:
                out.append(self.unique(with_resolution=with_resolution))
        return out

    def variant(self, event: dict[str, Any]) -> dict[str, Any]:
        """The same alert firing again: new numbers, IPs, ports and timestamps; digits glued to a
        word (``eth0``, ``ssh2``) are part of what the alert says and stay."""
        def digits(text: str) -> str:
            return re.sub(r"(?<![A-Za-z0-9])\d+", lambda m: "".join(
                str(self.rng.randrange(10)) for _ in m.group()), text)

        out = {k: v for k, v in event.items() if k not in ("id", "resolution", "outcome")}
        out["title"] = digits(str(event["title"]))
        if event.get("text"):
            out["text"] = digits(str(event["text"]))
        return out


def _query(event: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in event.items() if k not in ("id", "resolution", "outcome")}


# -- processes ----------------------------------------------------------------------------------

_LIVE: set[subprocess.Popen[bytes]] = set()


@dataclass
class Running:
    """A started server: its client and its process id."""

    client: httpx.Client
    pid: int

    def rss_mib(self) -> float:
        """The server's resident memory, MiB."""
        with open(f"/proc/{self.pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _LIVE.discard(proc)


def _stop_all() -> None:
    for proc in list(_LIVE):
        _stop(proc)


atexit.register(_stop_all)


@contextlib.contextmanager
def server(command: list[str], port: int, log_path: Path,
           timeout: float = 300.0) -> Iterator[Running]:
    """Run ``command`` until its /healthz answers 200; yield it with a client; always stop it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT)
    _LIVE.add(proc)
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600.0)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited with {proc.returncode}:\n"
                                   f"{_tail(log_path)}")
            with contextlib.suppress(httpx.TransportError):
                if client.get("/healthz", timeout=5.0).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"/healthz not ready after {timeout}s:\n{_tail(log_path)}")
            time.sleep(0.3)
        yield Running(client, proc.pid)
    finally:
        client.close()
        _stop(proc)


@contextlib.contextmanager
def deja_server(workdir: Path, name: str) -> Iterator[Running]:
    data_dir = workdir / name
    port = free_port()
    cmd = [*deja_command(), "serve", "--data-dir", str(data_dir), "--host", "127.0.0.1",
           "--port", str(port)]
    with server(cmd, port, workdir / f"{name}.log") as running:
        client = running.client
        # A data dir's first start writes its admin key; every /v1 route needs a key.
        key_file = data_dir / "admin.key"
        deadline = time.monotonic() + 10
        while not key_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if key_file.exists():
            client.headers["Authorization"] = f"Bearer {key_file.read_text().strip()}"
        yield running


@contextlib.contextmanager
def peer_server(workdir: Path, kb: Sequence[dict[str, Any]] | Path) -> Iterator[Running]:
    """The naive peer on ``kb``: events whose texts it embeds at start, or a ``.npy`` file of
    precomputed KB vectors (one row per incident)."""
    if isinstance(kb, Path):
        source, timeout = ["--vectors", str(kb)], 3600.0  # LOF's fit on 100k rows takes minutes
    else:
        kb_file = workdir / "peer-kb.jsonl"
        kb_file.write_text("".join(json.dumps({"text": event_text(e)}) + "\n" for e in kb))
        source, timeout = ["--kb", str(kb_file)], 300.0
    port = free_port()
    cmd = [sys.executable, "-m", "bench.perf", "_peer", *source, "--port", str(port)]
    with server(cmd, port, workdir / "peer.log", timeout=timeout) as running:
        yield running


def post(client: httpx.Client, path: str, body: Any) -> Any:
    r = client.post(path, json=body)
    if r.status_code >= 300:
        raise RuntimeError(f"POST {path}: {r.status_code} {r.text[:500]}")
    return r.json()


def cache_counts(client: httpx.Client) -> tuple[int, int]:
    cache = client.get("/v1/stats").json().get("cache", {})
    return int(cache.get("hits", 0)), int(cache.get("misses", 0))


# -- the naive peer -------------------------------------------------------------------------------


def peer_main(argv: Sequence[str]) -> int:
    """Serve the naive peer: encode every request with sentence-transformers, then scikit-learn
    brute-force cosine neighbours and LocalOutlierFactor(novelty=True) fitted on the KB.

    The KB is a JSONL file of texts embedded at start (``--kb``) or precomputed vectors
    (``--vectors``, a ``.npy`` matrix): embedding 100k texts would take longer than the whole
    benchmark, and it is a one-time cost, not the per-check one measured. /healthz reports the
    KB's rows and the fit's seconds."""
    p = argparse.ArgumentParser(prog="python -m bench.perf _peer")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--kb", type=Path)
    source.add_argument("--vectors", type=Path)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)

    import uvicorn
    from fastapi import FastAPI
    from sklearn.neighbors import LocalOutlierFactor, NearestNeighbors

    from embeddings import SentenceTransformerEncoder

    encoder = SentenceTransformerEncoder()
    t0 = time.perf_counter()
    if args.vectors is not None:
        kb = np.load(args.vectors)
    else:
        kb = encoder.encode([json.loads(line)["text"]
                             for line in args.kb.read_text().splitlines() if line])
    encode_s = time.perf_counter() - t0
    rows = len(kb)
    t0 = time.perf_counter()
    nn = NearestNeighbors(n_neighbors=min(5, rows), metric="cosine", algorithm="brute").fit(kb)
    lof = LocalOutlierFactor(n_neighbors=min(20, rows - 1), novelty=True,
                             metric="cosine", algorithm="brute").fit(kb)
    fit_s = time.perf_counter() - t0
    app = FastAPI()

    @app.get("/healthz")
    def healthz() -> dict[str, Any]:
        return {"status": "ok", "kb_rows": rows, "kb_encode_seconds": encode_s,
                "fit_seconds": fit_s, "precomputed": args.vectors is not None}

    @app.post("/check/batch")
    def check(body: dict[str, Any]) -> dict[str, Any]:
        vectors = encoder.encode([event_text(e) for e in body["events"]])
        dist, idx = nn.kneighbors(vectors)
        novelty = -lof.score_samples(vectors)  # LOF: higher score_samples = more normal
        return {"results": [
            {"novelty": float(s), "nearest_similarity": float(1 - d[0]),
             "neighbors": [int(i) for i in row]}
            for s, d, row in zip(novelty, dist, idx, strict=True)]}

    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    return 0


# -- sections -------------------------------------------------------------------------------------


def bench_model(plan: Plan, events: Events) -> dict[str, Any]:
    """The packaged model in this process, single-text latency and batch-64 throughput, with
    the runtime the service uses (``DEJA_EMBEDDER``, the reference of every ratio) and, when that
    is not sentence-transformers, with sentence-transformers beside it (what the naive peer
    runs). The two take turns within each repeat, so load hits both alike."""
    from api.settings import Settings
    from embeddings import create_encoder, normalize

    def texts(n: int) -> list[str]:
        return [normalize({"title": e["title"], "text": e.get("text")})
                for e in (events.unique() for _ in range(n))]

    served = Settings().embedder
    backends = [served] + (["torch"] if served != "torch" else [])
    # Each runtime at the batch size the service uses with it.
    encoders = {b: create_encoder(backend=b) for b in backends}
    sizes: dict[str, int] = {b: int(getattr(e, "batch_size", 0)) for b, e in encoders.items()}
    for encoder in encoders.values():
        encoder.encode(texts(16))  # warm-up: first calls allocate
    p50s: dict[str, list[float]] = {b: [] for b in backends}
    p99s: dict[str, list[float]] = {b: [] for b in backends}
    rates: dict[str, list[float]] = {b: [] for b in backends}
    for _ in range(plan.repeats):
        singles, batch = texts(plan.model_singles), texts(plan.model_batch_texts)
        for b, encoder in encoders.items():
            lat = []
            for text in singles:
                t0 = time.perf_counter()
                encoder.encode([text])
                lat.append(time.perf_counter() - t0)
            p50s[b].append(pct(lat, 50) * 1e3)
            p99s[b].append(pct(lat, 99) * 1e3)
            t0 = time.perf_counter()
            encoder.encode(batch)
            rates[b].append(len(batch) / (time.perf_counter() - t0))
    import torch

    def record(b: str) -> dict[str, Any]:
        return {"backend": b, "single_p50_ms": figure(p50s[b], "ms"),
                "single_p99_ms": figure(p99s[b], "ms"),
                "batch_texts_per_s": figure(rates[b], "texts/s"),
                "batch_size": sizes[b]}

    out = {**record(served), "torch_threads": torch.get_num_threads(),
           "others": [record(b) for b in backends[1:]]}
    del encoders
    gc.collect()
    return out


def _ingest(client: httpx.Client, batch: Sequence[dict[str, Any]]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(batch), INGEST_BATCH):
        post(client, "/v1/events", {"events": list(batch[start:start + INGEST_BATCH])})
    return len(batch) / (time.perf_counter() - t0)


#: Misses are measured in blocks of this many checks, each after a block of the model embedding
#: the same texts in this process: both run warm, back to back, and drift of a shared machine
#: over the minutes of a run hits both alike.
PAIR_BLOCK = 25
#: Pause after a block (seconds): the other side's threads stop spinning before the next.
PAIR_GAP = 0.05


def _single_checks(client: httpx.Client, batch: Sequence[dict[str, Any]],
                   model: Callable[[str], None] | None = None
                   ) -> tuple[list[float], list[float]]:
    """Latency of one check at a time, each over one kept-alive HTTP/1.1 connection, as a
    caller's client sends it. The client is the standard library's: httpx spends ~1.5 ms of
    its own per request here, which would be counted against the service.

    With ``model``, blocks of checks alternate with blocks of the model embedding the same
    (masked) texts here (:data:`PAIR_BLOCK`); the second list holds the model's latencies."""
    from embeddings import normalize

    url = httpx.URL(str(client.base_url))
    conn = http.client.HTTPConnection(url.host, url.port, timeout=600)
    headers = {"Content-Type": "application/json", **{k: v for k, v in client.headers.items()
                                                      if k.lower() == "authorization"}}
    bodies = [json.dumps(event).encode() for event in batch]
    texts = [normalize({"title": e["title"], "text": e.get("text")}) for e in batch]
    lat: list[float] = []
    model_lat: list[float] = []
    try:
        for start in range(0, len(bodies), PAIR_BLOCK if model is not None else len(bodies)):
            end = start + (PAIR_BLOCK if model is not None else len(bodies))
            if model is not None:
                for text in texts[start:end]:
                    t0 = time.perf_counter()
                    model(text)
                    model_lat.append(time.perf_counter() - t0)
                time.sleep(PAIR_GAP)
            for body in bodies[start:end]:
                t0 = time.perf_counter()
                conn.request("POST", "/v1/check", body, headers)
                resp = conn.getresponse()
                data = resp.read()
                lat.append(time.perf_counter() - t0)
                if resp.status >= 300:
                    raise RuntimeError(f"POST /v1/check: {resp.status} {data[:500]!r}")
            if model is not None:
                time.sleep(PAIR_GAP)
    finally:
        conn.close()
    return lat, model_lat


def bench_service(plan: Plan, events: Events, workdir: Path,
                  model: dict[str, Any]) -> dict[str, Any]:
    """Ingest, checks and feedback over HTTP against one ``deja serve``."""
    out: dict[str, Any] = {}
    model_p50 = model["single_p50_ms"]["value"] if model else math.nan
    model_rate = model["batch_texts_per_s"]["value"] if model else math.nan
    with deja_server(workdir, "service") as running:
        client = running.client
        out["rss_start_mib"] = running.rss_mib()
        # Bulk ingest: unique texts pay the model for every event; the stream mostly does not.
        unique_rates = [_ingest(client, [events.unique(with_resolution=True)
                                         for _ in range(plan.ingest_unique)])
                        for _ in range(plan.repeats)]
        stream_rates, hit_rates = [], []
        stream_kb: list[dict[str, Any]] = []
        for _ in range(plan.repeats):
            batch = events.stream(plan.ingest_stream, with_resolution=True)
            h0, m0 = cache_counts(client)
            stream_rates.append(_ingest(client, batch))
            h1, m1 = cache_counts(client)
            hit_rates.append(ratio(h1 - h0, (h1 - h0) + (m1 - m0)))
            stream_kb += batch
        out["ingest_unique_events_per_s"] = figure(unique_rates, "events/s")
        out["ingest_stream_events_per_s"] = figure(stream_rates, "events/s")
        out["ingest_stream_cache_hit_rate"] = figure(hit_rates, "")
        out["ingest_unique_vs_model_batch"] = ratio(out["ingest_unique_events_per_s"]["value"],
                                                    model_rate)
        out["ingest_stream_vs_unique"] = ratio(out["ingest_stream_events_per_s"]["value"],
                                               out["ingest_unique_events_per_s"]["value"])
        out["ingest_stream_vs_model_batch"] = ratio(out["ingest_stream_events_per_s"]["value"],
                                                    model_rate)

        # Single checks (audited, as a caller's real check is): misses embed, hits do not.
        # Misses alternate in blocks with the service's runtime embedding the same texts here.
        from api.settings import Settings
        from embeddings import create_encoder

        encoder = create_encoder(backend=Settings().embedder)

        def embed(text: str) -> None:
            encoder.encode([text])

        _single_checks(client, [_query(events.unique()) for _ in range(5)], embed)  # warm-up
        miss50, miss99, hit50, hit99, hit_share, paired50 = [], [], [], [], [], []
        rng = random.Random(7)
        for _ in range(plan.repeats):
            lat, model_lat = _single_checks(
                client, [_query(events.unique()) for _ in range(plan.checks)], embed)
            miss50.append(pct(lat, 50) * 1e3)
            miss99.append(pct(lat, 99) * 1e3)
            paired50.append(pct(model_lat, 50) * 1e3)
            repeats = [_query(e) for e in rng.sample(stream_kb, plan.checks)]
            h0, m0 = cache_counts(client)
            lat, _ = _single_checks(client, repeats)
            h1, m1 = cache_counts(client)
            hit_share.append(ratio(h1 - h0, (h1 - h0) + (m1 - m0)))
            hit50.append(pct(lat, 50) * 1e3)
            hit99.append(pct(lat, 99) * 1e3)
        out["check_miss_p50_ms"] = figure(miss50, "ms")
        out["check_miss_p99_ms"] = figure(miss99, "ms")
        out["check_hit_p50_ms"] = figure(hit50, "ms")
        out["check_hit_p99_ms"] = figure(hit99, "ms")
        out["check_hit_cache_hit_rate"] = figure(hit_share, "")
        # The ratios' reference: the model's p50 measured beside the misses (the model
        # section's figure, taken minutes earlier, is kept for comparison).
        out["model_paired_p50_ms"] = figure(paired50, "ms")
        out["model_single_p50_ms"] = model_p50
        reference = out["model_paired_p50_ms"]["value"]
        out["check_miss_vs_model_p50"] = ratio(out["check_miss_p50_ms"]["value"], reference)
        out["check_hit_vs_model_p50"] = ratio(out["check_hit_p50_ms"]["value"], reference)

        out["feedback"] = _feedback(client, events, plan)
        stats = client.get("/v1/stats").json()
        out["kb"] = {"incidents": stats.get("incidents"), "vectors": stats["index"].get("vectors"),
                     "index": stats.get("index"), "rss_start_mib": out.pop("rss_start_mib"),
                     "rss_end_mib": running.rss_mib()}
    return out


def _feedback(client: httpx.Client, events: Events, plan: Plan) -> dict[str, Any]:
    """Feedback with a resolution on a novel event, then checks of a variant (same alert, other
    numbers) until the new incident is its top neighbour."""
    totals, feedback_ms, attempts = [], [], []
    for trial in range(plan.feedback_trials):
        event = events.unique()
        verdict = post(client, "/v1/check", _query(event) | {"id": event["id"]})
        variant = events.variant(event) | {"dry_run": True}
        t0 = time.perf_counter()
        fb = post(client, f"/v1/decisions/{verdict['decision_id']}/feedback", {
            "correct": False, "novel": True, "outcome": "resolved",
            "resolution": {"action": f"perf fix {trial}"}})
        feedback_ms.append((time.perf_counter() - t0) * 1e3)
        n = 0
        while True:
            n += 1
            got = post(client, "/v1/check", variant)
            top = got["neighbors"][0]["id"] if got["neighbors"] else None
            if top == fb["incident"]:
                break
            if time.perf_counter() - t0 > 30:
                raise RuntimeError(f"feedback incident {fb['incident']} not found in 30 s")
        totals.append((time.perf_counter() - t0) * 1e3)
        attempts.append(n)
    return {"searchable_p50_ms": figure([pct(totals, 50)], "ms"),
            "searchable_max_ms": figure([max(totals)], "ms"),
            "feedback_request_p50_ms": figure([pct(feedback_ms, 50)], "ms"),
            "checks_needed_max": max(attempts), "trials": len(totals)}


def _batch_rate(client: httpx.Client, path: str, batch: Sequence[dict[str, Any]],
                extra: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(batch), CHECK_BATCH):
        post(client, path, {"events": [_query(e) for e in batch[start:start + CHECK_BATCH]],
                            **extra})
    return len(batch) / (time.perf_counter() - t0)


def build_peer_kb(kb: Sequence[dict[str, Any]], events: Events, n: int,
                  workdir: Path) -> tuple[Path, Path, dict[str, Any]]:
    """A Deja data dir holding ``kb`` plus alert-stream filler up to ``n`` incidents, and the
    same rows' vectors as a ``.npy`` file for the peer.

    Built with the local backfill before any server starts: ingest over HTTP runs at ~100
    events/s, far too slow for 100k. Repeats of the stream share a fingerprint, so only the
    distinct masked texts are embedded. The peer gets the vector Deja stored for each row's
    fingerprint: embedding 100k raw texts would take ~40 min, a one-time cost the check
    throughput does not include.
    """
    import duckdb

    from api.backfill import backfill
    from api.deja import DB_FILE

    source = workdir / "peer-large.jsonl"
    with source.open("w") as fh:
        for event in kb:
            fh.write(json.dumps(event) + "\n")
        for start in range(0, max(0, n - len(kb)), 10_000):
            for event in events.stream(min(10_000, n - len(kb) - start), with_resolution=True):
                fh.write(json.dumps(event) + "\n")
    data_dir = workdir / "versus-large"
    t0 = time.perf_counter()
    report = backfill(source, data_dir, engine="local")
    build_s = time.perf_counter() - t0
    gc.collect()
    t0 = time.perf_counter()
    with duckdb.connect(str(data_dir / DB_FILE), read_only=True) as con:
        res = con.execute(
            "SELECT e.vector FROM incidents i JOIN embeddings e ON e.fingerprint = i.fingerprint "
            "ORDER BY i.kb_id").fetchnumpy()
    vectors = np.stack(list(res["vector"])).astype(np.float32)
    npy = workdir / "peer-large.npy"
    np.save(npy, vectors)
    export_s = time.perf_counter() - t0
    source.unlink()
    return data_dir, npy, {
        "incidents": report.created, "events": report.events,
        "distinct_fingerprints": report.distinct_fingerprints, "embedded": report.embedded,
        "indexed": report.indexed, "index_status": report.index_status,
        "build_s": build_s, "stages_s": report.seconds,
        "peer_vectors": len(vectors), "peer_vectors_export_s": export_s}


def bench_peer(plan: Plan, events: Events, workdir: Path) -> dict[str, Any]:
    """Deja against the naive peer, both over HTTP batch endpoints, with the same queries.

    AUROC on the labelled scenario KB (known vs novel alerts); check throughput with both KBs at
    ``plan.peer_kb`` incidents (the scenario KB plus alert-stream filler), where a kNN over the
    KB costs what it would in production.
    """
    from api.scenarios import make_scenario
    from bench.metrics import auroc

    scenario = make_scenario(0, max_rules=plan.peer_rules)
    queries = [_query(e) for e in scenario.known + scenario.novel]
    n_known = len(scenario.known)
    print(f"  peer: building a {plan.peer_kb:,}-incident KB", file=sys.stderr)
    large_dir, large_npy, large = build_peer_kb(scenario.kb, events, plan.peer_kb, workdir)
    print(f"  peer: {large['incidents']:,} incidents, {large['distinct_fingerprints']:,} distinct "
          f"fingerprints, built in {large['build_s']:.0f} s", file=sys.stderr)
    warm = events.stream(CHECK_BATCH * 3)
    runs = [(events.stream(plan.peer_events), [events.unique() for _ in range(plan.peer_events)])
            for _ in range(plan.repeats)]
    sides: dict[str, dict[str, Any]] = {}

    def scores_of(client: httpx.Client, path: str, extra: dict[str, Any],
                  score: Callable[[dict[str, Any]], float]) -> float:
        results: list[dict[str, Any]] = []
        for start in range(0, len(queries), CHECK_BATCH):
            results += post(client, path, {"events": queries[start:start + CHECK_BATCH],
                                           **extra})["results"]
        scores = [score(r) for r in results]
        return auroc(scores[:n_known], scores[n_known:])

    def rates(client: httpx.Client, path: str, extra: dict[str, Any]) -> dict[str, Any]:
        _batch_rate(client, path, warm, extra)  # the stream's templates, as a warm service has
        stream = [_batch_rate(client, path, s, extra) for s, _ in runs]
        unique = [_batch_rate(client, path, u, extra) for _, u in runs]
        return {"stream_checks_per_s": figure(stream, "checks/s"),
                "unique_checks_per_s": figure(unique, "checks/s")}

    def deja_score(r: dict[str, Any]) -> float:
        return float(r["novelty"]["score"])

    def peer_score(r: dict[str, Any]) -> float:
        return float(r["novelty"])

    with deja_server(workdir, "versus") as running:
        client = running.client
        for start in range(0, len(scenario.kb), INGEST_BATCH):
            post(client, "/v1/events", {"events": scenario.kb[start:start + INGEST_BATCH]})
        sides["deja"] = {"auroc": scores_of(client, "/v1/check/batch", {"dry_run": True},
                                            deja_score)}
    with deja_server(workdir, large_dir.name) as running:
        stats = running.client.get("/v1/stats").json()
        sides["deja"] |= rates(running.client, "/v1/check/batch", {"dry_run": True})
        sides["deja"]["kb"] = {"incidents": stats.get("incidents"),
                               "vectors": stats["index"].get("vectors"),
                               "index_kind": stats["index"].get("kind"),
                               "rss_mib": running.rss_mib()}
    with peer_server(workdir, scenario.kb) as running:
        sides["peer"] = {"auroc": scores_of(running.client, "/check/batch", {}, peer_score)}
    with peer_server(workdir, large_npy) as running:
        health = running.client.get("/healthz").json()
        sides["peer"] |= rates(running.client, "/check/batch", {})
        sides["peer"]["kb"] = {"rows": health["kb_rows"], "fit_s": health["fit_seconds"],
                               "precomputed_vectors": health["precomputed"],
                               "rss_mib": running.rss_mib()}
    deja, peer = sides["deja"], sides["peer"]
    return {
        "kb_incidents": len(scenario.kb), "known_queries": n_known,
        "novel_queries": len(scenario.novel), "batch": CHECK_BATCH,
        "throughput_kb": large,
        "deja": deja, "peer": peer,
        "stream_speedup": ratio(deja["stream_checks_per_s"]["value"],
                                peer["stream_checks_per_s"]["value"]),
        "unique_speedup": ratio(deja["unique_checks_per_s"]["value"],
                                peer["unique_checks_per_s"]["value"]),
        "auroc_gain": deja["auroc"] - peer["auroc"],
    }


# -- FAISS ----------------------------------------------------------------------------------------


class Synthetic:
    """Clustered unit vectors shaped like sentence embeddings of an alert KB.

    Topics of ten sub-clusters each, ~500 vectors per topic: cosine ≈ 0.77 between members of a
    sub-cluster, ≈ 0.47 across sub-clusters of a topic, ≈ 0 across topics. ``novel`` draws
    points around topics the KB does not have.
    """

    SUBS = 10

    def __init__(self, n: int, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.topics = max(1, n // 500)
        scale = 1 / math.sqrt(DIM)
        self.t = (rng.standard_normal((self.topics, DIM)) * scale).astype(np.float32)
        self.s = (rng.standard_normal((self.topics * self.SUBS, DIM)) * scale).astype(np.float32)

    def sample(self, n: int, rng: np.random.Generator, *, novel: bool = False) -> np.ndarray:
        out = np.empty((n, DIM), dtype=np.float32)
        scale = np.float32(1 / math.sqrt(DIM))
        for start in range(0, n, 100_000):
            m = min(100_000, n - start)
            if novel:
                centre = rng.standard_normal((m, DIM), dtype=np.float32) * scale
            else:
                sub = rng.integers(0, self.topics * self.SUBS, m)
                centre = self.t[sub // self.SUBS] + np.float32(0.8) * self.s[sub]
            x = centre + np.float32(0.7) * scale * rng.standard_normal((m, DIM), dtype=np.float32)
            out[start:start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out


def _provider(ids: np.ndarray, vectors: np.ndarray) -> Callable[[], tuple[Any, Any]]:
    return lambda: (ids, vectors)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _latencies(index: Any, queries: np.ndarray) -> list[float]:
    lat = []
    for q in queries:
        t0 = time.perf_counter()
        index.search(q[None, :], K)
        lat.append(time.perf_counter() - t0)
    return lat


def _recall(found: np.ndarray, exact: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(e.tolist())) / K
                          for f, e in zip(found, exact, strict=True)]))


def bench_faiss(plan: Plan, only: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Flat vs IVF through ``novelty.VectorIndex`` on synthetic clustered vectors; ``only``
    limits the kinds measured."""
    import faiss

    from novelty import VectorIndex
    from novelty.index import memory_estimate

    rows: list[dict[str, Any]] = []
    largest = max(plan.faiss_sizes)
    for n in plan.faiss_sizes:
        syn = Synthetic(n)
        rng = np.random.default_rng(1)
        vectors = syn.sample(n, rng)
        ids = np.arange(n, dtype=np.int64)
        nq = plan.faiss_queries if n < 1_000_000 else max(50, plan.faiss_queries // 2)
        fresh = syn.sample(nq, rng)
        novel = syn.sample(nq, rng, novel=True)
        _, exact_fresh = faiss.knn(fresh, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)
        novel_sims, exact_novel = faiss.knn(novel, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)

        kinds = ["flat", "ivf-flat"] + (["ivf-fp16", "ivf-sq8"]
                                        if plan.coded_at_largest and n == largest else [])
        for kind in kinds:
            if only and kind not in only:
                continue
            builds = 1 if n >= 1_000_000 else plan.repeats
            build_s, p50, p99, mem, rss = [], [], [], [], []
            info: dict[str, Any] = {}
            r_fresh = r_novel = top1_err = math.nan
            for run in range(plan.repeats):
                if run < builds:
                    index = None
                    gc.collect()
                    before = _rss_bytes()
                    if kind == "flat":
                        index = VectorIndex(DIM, approximate_above=n, auto_rebuild=False)
                        t0 = time.perf_counter()
                        index.add(ids, vectors)
                        build_s.append(time.perf_counter() - t0)
                    else:
                        # The budget a deployment would have set to get this kind: exactly
                        # its estimate (ivf-flat: none).
                        budget = None if kind == "ivf-flat" else memory_estimate(kind, n, DIM)
                        index = VectorIndex(DIM, approximate_above=0, auto_rebuild=False,
                                            memory_budget=budget)
                        thread = index.start_rebuild(_provider(ids, vectors))
                        thread.join()
                        if thread.error is not None:
                            raise thread.error
                        build_s.append(float(index.build_info()["build_seconds"]))
                    gc.collect()
                    rss.append((_rss_bytes() - before) / 2**20)
                    info = index.build_info()
                    if info["kind"] != kind:
                        raise RuntimeError(f"asked for {kind}, VectorIndex built {info['kind']}")
                    mem.append(info["memory_bytes"] / 2**20)
                assert index is not None
                lat = _latencies(index, fresh)
                p50.append(pct(lat, 50) * 1e3)
                p99.append(pct(lat, 99) * 1e3)
            assert index is not None
            _, found = index.search(fresh, K)
            r_fresh = _recall(found, exact_fresh)
            nsims, nfound = index.search(novel, K)
            r_novel = _recall(nfound, exact_novel)
            top1_err = float(np.mean(novel_sims[:, 0] - nsims[:, 0]))
            rows.append({
                "vectors": n, "kind": info["kind"], "build_s": figure(build_s, "s"),
                "memory_mb": figure(mem, "MiB"), "rss_delta_mb": figure(rss, "MiB"),
                "nprobe": info["nprobe"], "nlist": info["nlist"],
                "recall_at_10_build": info["recall_at_10"],
                "recall_at_10_fresh": r_fresh, "recall_at_10_novel": r_novel,
                "novel_top1_similarity_shortfall": top1_err,
                "p50_ms": figure(p50, "ms"), "p99_ms": figure(p99, "ms"),
                "builds": builds, "latency_runs": plan.repeats, "queries": nq,
            })
            print(f"  faiss {n:>9,} {info['kind']:<8} build {median_of(build_s):7.2f}s "
                  f"mem {median_of(mem):6.0f} MiB  p50 {median_of(p50):7.3f} ms  "
                  f"p99 {median_of(p99):7.3f} ms  recall {r_fresh:.4f}", file=sys.stderr)
            del index
            gc.collect()
        del vectors
        gc.collect()
    return rows


# -- report ---------------------------------------------------------------------------------------


def _v(x: Any, digits: int = 1) -> str:
    if isinstance(x, dict):
        x = x.get("value")
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float):
        return f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _runs(x: dict[str, Any], digits: int = 1) -> str:
    return ", ".join(f"{r:,.{digits}f}" for r in x.get("runs", []))


def markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Deja performance", "",
        f"{meta['started']} · commit {meta['commit'] or '?'} · {meta['cpus']} CPUs · "
        f"{'quick (smoke test)' if meta['quick'] else 'full'} run · every figure the median of "
        f"{meta['repeats']} runs · machine quiet: {meta['quiet']} (CPU busy before start "
        f"{meta['cpu_busy_before_start']:.0%}; other processes used "
        f"{meta['foreign_cpu_seconds']:.0f} CPU-s during the run, {meta['foreign_cpu_share']:.0%} "
        f"of the machine; iowait {meta['iowait']:.1%}, steal {meta['steal']:.1%}) · "
        f"{meta['seconds']:.0f} s", "",
    ]
    rows: list[tuple[str, str, str, str]] = []
    model = result.get("model") or {}
    for m in [model, *model.get("others", [])] if model else []:
        name = {"torch": "sentence-transformers (torch)", "onnx": "ONNX Runtime fp32",
                "onnx-int8": "ONNX Runtime int8"}.get(m.get("backend", "torch"), "?")
        served = m is model
        rows += [
            (f"model ({m.get('backend', 'torch')}): one text, p50", _v(m["single_p50_ms"]) + " ms",
             _runs(m["single_p50_ms"]), f"all-MiniLM-L6-v2, {name}, in-process"
             + ("; the service's runtime: every ratio below is to it" if served else "")),
            (f"model ({m.get('backend', 'torch')}): one text, p99", _v(m["single_p99_ms"]) + " ms",
             _runs(m["single_p99_ms"]), ""),
            (f"model ({m.get('backend', 'torch')}): batches of {m.get('batch_size', 64)}",
             _v(m["batch_texts_per_s"], 0) + " texts/s", _runs(m["batch_texts_per_s"], 0),
             "length-sorted, the service's batch size for this runtime"
             + (f"; torch threads {model['torch_threads']}" if m.get("backend") == "torch"
                else "")),
        ]
    svc = result.get("service") or {}
    if svc:
        rows += [
            ("check, cache miss, p50", _v(svc["check_miss_p50_ms"]) + " ms",
             _runs(svc["check_miss_p50_ms"]),
             f"× {_v(svc['check_miss_vs_model_p50'], 2)} the model's p50 taken beside it "
             f"({_v(svc['model_paired_p50_ms'])} ms: blocks of {PAIR_BLOCK} checks alternate "
             f"with the model embedding the same texts in the bench process)"),
            ("check, cache miss, p99", _v(svc["check_miss_p99_ms"]) + " ms",
             _runs(svc["check_miss_p99_ms"]),
             "POST /v1/check, audited (journal fsync); one at a time, kept-alive connection"),
            ("check, cache hit, p50", _v(svc["check_hit_p50_ms"]) + " ms",
             _runs(svc["check_hit_p50_ms"]),
             f"× {_v(svc['check_hit_vs_model_p50'], 2)} that p50; hit rate "
             f"{_v(svc['check_hit_cache_hit_rate'], 2)}"),
            ("check, cache hit, p99", _v(svc["check_hit_p99_ms"]) + " ms",
             _runs(svc["check_hit_p99_ms"]), ""),
            ("ingest, unique texts", _v(svc["ingest_unique_events_per_s"], 0) + " events/s",
             _runs(svc["ingest_unique_events_per_s"], 0),
             f"× {_v(svc['ingest_unique_vs_model_batch'], 2)} the model's batch throughput"),
            ("ingest, alert stream", _v(svc["ingest_stream_events_per_s"], 0) + " events/s",
             _runs(svc["ingest_stream_events_per_s"], 0),
             f"× {_v(svc.get('ingest_stream_vs_model_batch'), 1)} the model's batch "
             f"throughput, × {_v(svc['ingest_stream_vs_unique'], 1)} unique; cache hit rate "
             f"{_v(svc['ingest_stream_cache_hit_rate'], 2)}"),
        ]
        fb = svc.get("feedback") or {}
        if fb:
            rows += [("feedback → searchable, p50", _v(fb["searchable_p50_ms"]) + " ms", "",
                      f"{fb['trials']} trials; max {_v(fb['searchable_max_ms'])} ms; checks "
                      f"needed at most {fb['checks_needed_max']}; feedback request p50 "
                      f"{_v(fb['feedback_request_p50_ms'])} ms")]
        kb = svc.get("kb") or {}
        rows.append(("KB of this server at the end", f"{_v(kb.get('incidents'))} incidents", "",
                     f"{_v(kb.get('vectors'))} vectors; server RSS {_v(kb.get('rss_start_mib'), 0)}"
                     f" MiB at start (empty KB), {_v(kb.get('rss_end_mib'), 0)} MiB at the end"))
    peer = result.get("peer") or {}
    if peer:
        d, p = peer["deja"], peer["peer"]
        big = peer.get("throughput_kb") or {}
        dkb, pkb = d.get("kb") or {}, p.get("kb") or {}
        rows += [
            ("Deja, alert stream, batch", _v(d["stream_checks_per_s"], 0) + " checks/s",
             _runs(d["stream_checks_per_s"], 0),
             f"× {_v(peer['stream_speedup'], 1)} the naive peer; KB {_v(dkb.get('incidents'))} "
             f"incidents, {_v(dkb.get('vectors'))} vectors ({dkb.get('index_kind', '?')})"),
            ("naive peer, alert stream, batch", _v(p["stream_checks_per_s"], 0) + " checks/s",
             _runs(p["stream_checks_per_s"], 0),
             f"encode + NearestNeighbors + LOF; KB {_v(pkb.get('rows'))} rows"),
            ("Deja, unique texts, batch", _v(d["unique_checks_per_s"], 0) + " checks/s",
             _runs(d["unique_checks_per_s"], 0),
             f"× {_v(peer['unique_speedup'], 2)} the naive peer"),
            ("naive peer, unique texts, batch", _v(p["unique_checks_per_s"], 0) + " checks/s",
             _runs(p["unique_checks_per_s"], 0), ""),
            ("AUROC known/novel, Deja", _v(d["auroc"], 3), "",
             f"{peer['known_queries']} known + {peer['novel_queries']} novel alerts, KB "
             f"{peer['kb_incidents']}"),
            ("AUROC known/novel, naive peer", _v(p["auroc"], 3), "",
             f"Deja − peer = {_v(peer['auroc_gain'], 3)}; same KB and queries"),
        ]
        if big:
            rows += [
                ("throughput KB build (Deja)", _v(big["build_s"], 0) + " s", "",
                 f"{_v(big['incidents'])} incidents (scenario KB + alert-stream filler) → "
                 f"{_v(big['distinct_fingerprints'])} distinct fingerprints, "
                 f"{_v(big['embedded'])} embedded; local backfill, before the server starts"),
                ("throughput KB fit (naive peer)", _v(pkb.get("fit_s"), 0) + " s", "",
                 f"NearestNeighbors + LOF(n_neighbors=20, brute) on {_v(pkb.get('rows'))} "
                 "precomputed vectors (Deja's stored vector of each incident's fingerprint)"),
            ]
    if rows:
        lines += ["| figure | median | runs | note |", "|---|---|---|---|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
        lines.append("")
    if peer and peer.get("throughput_kb"):
        lines += [
            f"Naive peer rows: check throughput with both KBs at "
            f"{peer['throughput_kb']['incidents']:,} incidents, AUROC on the labelled scenario KB "
            f"of {peer['kb_incidents']:,}. The peer's throughput-KB vectors were precomputed (not "
            "embedded by the peer, a one-time cost); its per-check cost is what is measured: "
            "encode every event, kNN over the whole KB, LOF scoring.", ""]
    faiss_rows = result.get("faiss") or []
    if faiss_rows:
        lines += [
            "FAISS through `novelty.VectorIndex`, 384-d synthetic clustered unit vectors, k = 10, "
            "single queries on one OpenMP thread. recall@10 against exact search: at build time "
            "(stored vectors as queries, self left out), on fresh queries near the KB, and on "
            "novel queries far from it; shortfall = exact minus found top-1 similarity on the "
            "novel queries. Memory: the index's own (codes, ids, id hash table, centroids: "
            "`memory_bytes` of `/v1/stats`, what the memory budget is checked against) and the "
            "process's resident-size growth over the build.",
            "",
            "| vectors | kind | build s | memory MiB | RSS Δ MiB | nlist | nprobe | recall build "
            "| recall fresh | recall novel | novel top-1 shortfall | p50 ms | p99 ms | builds |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in faiss_rows:
            lines.append(
                f"| {r['vectors']:,} | {r['kind']} | {_v(r['build_s'], 2)} | "
                f"{_v(r['memory_mb'], 0)} | {_v(r['rss_delta_mb'], 0)} | {_v(r['nlist'])} | "
                f"{_v(r['nprobe'])} | {_v(r['recall_at_10_build'], 4)} | "
                f"{_v(r['recall_at_10_fresh'], 4)} | {_v(r['recall_at_10_novel'], 4)} | "
                f"{_v(r['novel_top1_similarity_shortfall'], 4)} | {_v(r['p50_ms'], 3)} | "
                f"{_v(r['p99_ms'], 3)} | {r['builds']} |")
        lines.append("")
    for name, err in result.get("errors", {}).items():
        lines.append(f"**{name} failed:** `{err}`")
    return "\n".join(lines).rstrip() + "\n"


# -- main -----------------------------------------------------------------------------------------


def _other_benchmarks() -> list[str]:
    try:
        out = subprocess.run(["pgrep", "-af", "bench.quality"], capture_output=True, text=True,
                             check=False).stdout
    except OSError:
        return []
    return [line for line in out.splitlines() if line and "pgrep" not in line]


def cpu_times() -> list[int]:
    """The machine's CPU time counters (user nice system idle iowait irq softirq steal …)."""
    with open("/proc/stat") as fh:
        return [int(x) for x in fh.readline().split()[1:]]


def cpu_shares(before: Sequence[int], after: Sequence[int]) -> dict[str, float]:
    """Shares of CPU time between two :func:`cpu_times` samples spent waiting on I/O and stolen
    by the hypervisor: either one high makes disk-bound or CPU-bound figures unreliable."""
    delta = [b - a for a, b in zip(before, after, strict=False)]
    total = sum(delta) or 1
    return {"iowait": round(delta[4] / total, 3) if len(delta) > 4 else 0.0,
            "steal": round(delta[7] / total, 3) if len(delta) > 7 else 0.0}


def cpu_busy(seconds: float = 3.0) -> float:
    """Share of the machine's CPU time spent busy over ``seconds`` (from /proc/stat)."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as fh:
            fields = [int(x) for x in fh.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
        return sum(fields), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    return 1.0 - ratio(idle1 - idle0, total1 - total0)


def cpu_by_process() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, CPU seconds used so far), for every process visible in /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[int, tuple[int, float]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # fields 3.. of proc(5); comm may hold spaces
        out[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return out


def foreign_cpu_seconds(before: dict[int, tuple[int, float]],
                        after: dict[int, tuple[int, float]], me: int) -> float:
    """CPU seconds that processes outside this benchmark's process tree used between the two
    samples. A lower bound: a process that started and ended in between is not seen."""
    ours = {me}
    grew = True
    while grew:
        grew = False
        for pid, (ppid, _) in after.items():
            if ppid in ours and pid not in ours:
                ours.add(pid)
                grew = True
    return sum(cpu - before.get(pid, (0, 0.0))[1] for pid, (_, cpu) in after.items()
               if pid not in ours)


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, np.generic):
        return _jsonable(x.item())
    return x


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.perf", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--quick", action="store_true", help="a < 3 min smoke test, not a measurement")
    p.add_argument("--json", action="store_true", help="print the JSON document, not markdown")
    p.add_argument("--sections", nargs="+", default=["model", "service", "peer", "faiss"],
                   choices=["model", "service", "peer", "faiss"])
    p.add_argument("--faiss-sizes", nargs="+", type=int, default=None, metavar="N",
                   help="vector counts of the faiss section (default: the plan's); the coded "
                        "kinds run at the largest")
    p.add_argument("--faiss-kinds", nargs="+", default=None,
                   choices=["flat", "ivf-flat", "ivf-fp16", "ivf-sq8"],
                   help="only these kinds in the faiss section")
    p.add_argument("--peer-kb", type=int, default=None, metavar="N",
                   help="incidents in both KBs of the peer section's throughput rows (default: "
                        "the plan's)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_peer"]:
        return peer_main(argv[1:])
    args = parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so every server is stopped by its context manager.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    plan = QUICK if args.quick else FULL
    if args.faiss_sizes:
        plan = replace(plan, faiss_sizes=tuple(args.faiss_sizes))
    if args.peer_kb:
        plan = replace(plan, peer_kb=args.peer_kb)
    others = _other_benchmarks()
    busy = cpu_busy()
    cpu_before = cpu_by_process()
    times_before = cpu_times()
    started = time.time()
    result: dict[str, Any] = {"meta": {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)),
        "commit": _git_commit(), "cpus": os.cpu_count(), "python": platform.python_version(),
        "quick": args.quick, "repeats": plan.repeats, "plan": asdict(plan),
        "faiss_kinds": args.faiss_kinds,
        "load_start": round(os.getloadavg()[0], 2), "other_benchmarks_at_start": others,
        "cpu_busy_before_start": round(busy, 3),
    }, "errors": {}}
    events = Events(seed=0, hot_templates=plan.hot_templates)

    def section(name: str, fn: Callable[[], Any]) -> None:
        if name not in args.sections:
            return
        print(f"[perf] {name} …", file=sys.stderr)
        t0 = time.perf_counter()
        try:
            result[name] = fn()
        except Exception as exc:  # one failed section must not lose the others' figures
            result["errors"][name] = f"{type(exc).__name__}: {exc}"
            print(f"[perf] {name} failed: {exc}", file=sys.stderr)
        result["meta"].setdefault("section_seconds", {})[name] = round(time.perf_counter() - t0)
        print(f"[perf] {name} done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="deja-perf-") as tmp:
        workdir = Path(tmp)
        section("model", lambda: bench_model(plan, events))
        section("service", lambda: bench_service(plan, events, workdir, result.get("model", {})))
        section("peer", lambda: bench_peer(plan, events, workdir))
        section("faiss", lambda: bench_faiss(plan, args.faiss_kinds))
    others_end = _other_benchmarks()
    foreign = foreign_cpu_seconds(cpu_before, cpu_by_process(), os.getpid())
    result["meta"].update({
        "foreign_cpu_seconds": round(foreign, 1), **cpu_shares(times_before, cpu_times()),
        "foreign_cpu_share": round(foreign / ((time.time() - started) * (os.cpu_count() or 1)), 3),
        "seconds": time.time() - started, "load_end": round(os.getloadavg()[0], 2),
        "other_benchmarks_at_end": others_end,
        # Quiet: no quality benchmark at either end, the CPUs idle just before the start, and
        # other processes took little CPU during the run.
        "quiet": (not others and not others_end and busy < QUIET_BUSY
                  and foreign / ((time.time() - started) * (os.cpu_count() or 1)) < QUIET_BUSY),
    })
    args.out.mkdir(parents=True, exist_ok=True)
    doc = _jsonable(result)
    (args.out / "perf.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = markdown(result)
    (args.out / "perf.md").write_text(md)
    print(json.dumps(doc, indent=2) if args.json else md)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
