"""Replay stored verdicts under a candidate policy, from the evidence each verdict recorded.

A verdict's evidence (p-value, raw score, its reference's raw thresholds at a grid of α, the
matching neighbours' resolutions and the track records it saw) is enough to decide it again
under another policy without re-embedding or re-searching, and what people later said about the
event (feedback, outcomes, the resolution that closed its escalation) tells which of the new
decisions would have been wrong.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from novelty.policy import Decision, Policy, TrackRecord
from novelty.scorer import Neighbour, NoveltyResult

__all__ = ["HistoryItem", "Truth", "backtest", "evidence_of", "redecide", "threshold_at"]


@dataclass(frozen=True)
class Truth:
    """What people said about an event after its verdict (each part may be unknown)."""

    novel: bool | None = None
    resolution_key: str | None = None
    failed_keys: frozenset[str] = frozenset()
    unnecessary_escalation: bool = False


@dataclass(frozen=True)
class HistoryItem:
    decision_id: str
    service: str | None
    severity: str | None
    decision: str
    evidence: Mapping[str, Any]
    truth: Truth = field(default_factory=Truth)


def evidence_of(result: NoveltyResult, *, service: str | None, severity: str | None,
                records: Mapping[str, TrackRecord], automatable: Mapping[str, bool]
                ) -> dict[str, Any]:
    """The JSON a verdict stores so that :func:`redecide` can replay it."""
    keys = {k for n in result.neighbours for k, _ in n.resolutions}
    return {
        "service": service, "severity": severity, "score": result.score, "raw": result.raw,
        "p_value": result.p_value, "nearest_similarity": result.nearest_similarity,
        "reference": result.reference, "components": result.components,
        "thresholds": {str(a): (t if math.isfinite(t) else None)
                       for a, t in result.thresholds.items()},
        "neighbours": [{"similarity": n.similarity, "raw": r,
                        "resolutions": [list(x) for x in n.resolutions]}
                       for n, r in zip(result.neighbours, result.neighbour_raw, strict=False)],
        "records": {k: [records[k].successes, records[k].failures] for k in keys if k in records},
        "automatable": {k: automatable[k] for k in keys if k in automatable},
    }


def threshold_at(thresholds: Mapping[str, float | None], alpha: float) -> float:
    """The raw threshold at ``alpha``, log-linearly interpolated between stored levels."""
    grid = sorted((float(a), math.inf if t is None else float(t)) for a, t in thresholds.items())
    if not grid:
        return math.inf
    if alpha <= grid[0][0]:
        return grid[0][1]
    for (a0, t0), (a1, t1) in itertools.pairwise(grid):
        if alpha <= a1:
            if not (math.isfinite(t0) and math.isfinite(t1)):
                return t1 if alpha == a1 else t0
            w = (math.log(alpha) - math.log(a0)) / (math.log(a1) - math.log(a0))
            return t0 + w * (t1 - t0)
    return grid[-1][1]


def redecide(evidence: Mapping[str, Any], policy: Policy) -> Decision:
    """Decide a stored verdict again under ``policy``."""
    service = evidence.get("service")
    alpha = policy.alpha_for(service)
    t = max(threshold_at(evidence.get("thresholds") or {}, alpha),
            policy.threshold_floor(service))
    raw = float(evidence["raw"])
    comp = dict(evidence.get("components") or {})
    dup = float(comp.get("duplicate_rate", 0.0))
    comp["effective_alpha"] = min(0.5, alpha / max(1.0 - dup, 1e-9))
    neighbours = evidence.get("neighbours") or []
    result = NoveltyResult(
        score=float(evidence["score"]), is_novel=raw > t, threshold=float("nan"),
        p_value=float(evidence["p_value"]), raw=raw, raw_threshold=t,
        nearest_similarity=float(evidence.get("nearest_similarity", 0.0)),
        reference=str(evidence.get("reference", "")), components=comp,
        neighbours=[Neighbour(kb_ids=(0,), similarity=float(n["similarity"]), cosine=0.0,
                              lexical=0.0,
                              resolutions=tuple((str(k), int(c)) for k, c in n["resolutions"]))
                    for n in neighbours],
        neighbour_raw=[float(n["raw"]) for n in neighbours])
    records = {k: TrackRecord(int(v[0]), int(v[1]))
               for k, v in (evidence.get("records") or {}).items()}
    return policy.decide(result, service=service, severity=evidence.get("severity"),
                         records=records, automatable=evidence.get("automatable") or {})


def backtest(history: Iterable[HistoryItem], policy: Policy) -> dict[str, Any]:
    """Rates of replay / review / escalate under ``policy``, replays that what people later
    said shows wrong, and escalations that feedback called unnecessary — overall and per
    service."""
    totals: Counter[str] = Counter()
    per: dict[str, Counter[str]] = {}
    for item in history:
        d = redecide(item.evidence, policy)
        svc = item.service or "*"
        for c in (totals, per.setdefault(svc, Counter())):
            c["events"] += 1
            c[d.decision] += 1
            if d.decision == "replay" and _wrong(d, item.truth):
                c["wrong_replays"] += 1
            if d.decision == "escalate" and item.truth.unnecessary_escalation:
                c["unnecessary_escalations"] += 1
            if d.decision != item.decision:
                c["changed"] += 1
    return {"policy_version": policy.version, **_rates(totals),
            "services": {s: _rates(c) for s, c in sorted(per.items())}}


def _wrong(d: Decision, truth: Truth) -> bool:
    if truth.novel:
        return True
    if d.resolution_key is None:
        return False
    if d.resolution_key in truth.failed_keys:
        return True
    return truth.resolution_key is not None and truth.resolution_key != d.resolution_key


def _rates(c: Counter[str]) -> dict[str, Any]:
    n = c["events"]

    def rate(k: str) -> float:
        return c[k] / n if n else 0.0

    return {"events": n, "replay_rate": rate("replay"), "review_rate": rate("review"),
            "escalate_rate": rate("escalate"), "wrong_replays": c["wrong_replays"],
            "unnecessary_escalations": c["unnecessary_escalations"], "changed": c["changed"]}
