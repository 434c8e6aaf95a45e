"""Quality metrics for novelty scoring, retrieval and replay decisions (pure functions).

Conventions: novel is the positive class, a higher score means more novel. A metric whose
denominator is empty (no known or no novel queries, one class only) is ``nan``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Hashable, Sequence
from collections.abc import Set as AbstractSet

import numpy as np
from sklearn.metrics import roc_auc_score

NAN = float("nan")

# What a right replay may carry: one action, a set of acceptable actions, or None (nothing is
# right: a novel query must not be replayed).
Expected = str | AbstractSet[str] | None


def auroc(scores_known: Sequence[float], scores_novel: Sequence[float]) -> float:
    """ROC AUC of separating novel (positive) from known queries by score."""
    if len(scores_known) == 0 or len(scores_novel) == 0:
        return NAN
    y = np.r_[np.zeros(len(scores_known)), np.ones(len(scores_novel))]
    s = np.r_[np.asarray(scores_known, dtype=float), np.asarray(scores_novel, dtype=float)]
    return float(roc_auc_score(y, s))


def template_weights(is_novel_labels: Sequence[bool], templates: Sequence[Hashable]) -> np.ndarray:
    """Weight 1 / (#samples of the same template within the same class) per sample."""
    if len(is_novel_labels) != len(templates):
        raise ValueError("labels and templates differ in length")
    keys = [(bool(c), t) for c, t in zip(is_novel_labels, templates, strict=True)]
    counts = Counter(keys)
    return np.array([1.0 / counts[k] for k in keys], dtype=float)


def template_balanced_auroc(
    scores: Sequence[float], is_novel_labels: Sequence[bool], templates: Sequence[Hashable]
) -> float:
    """ROC AUC where every template counts equally within its class (sample-weighted)."""
    if len(scores) != len(is_novel_labels):
        raise ValueError("scores and labels differ in length")
    y = np.asarray([bool(v) for v in is_novel_labels], dtype=int)
    if len(y) == 0 or y.min() == y.max():
        return NAN
    w = template_weights(is_novel_labels, templates)
    return float(roc_auc_score(y, np.asarray(scores, dtype=float), sample_weight=w))


def recall_at_1(
    predicted_templates: Sequence[Hashable | None], true_templates: Sequence[Hashable]
) -> float:
    """Fraction of queries whose top neighbour has the query's template (None = no neighbour)."""
    if len(predicted_templates) != len(true_templates):
        raise ValueError("predicted and true templates differ in length")
    if len(true_templates) == 0:
        return NAN
    hits = sum(
        p is not None and p == t for p, t in zip(predicted_templates, true_templates, strict=True)
    )
    return hits / len(true_templates)


def _fraction(flags: Sequence[bool]) -> float:
    return NAN if len(flags) == 0 else sum(bool(f) for f in flags) / len(flags)


def false_escalation_rate(is_novel_on_known: Sequence[bool]) -> float:
    """Fraction of known queries the service called novel."""
    return _fraction(is_novel_on_known)


def missed_novelty_rate(is_novel_on_novel: Sequence[bool]) -> float:
    """Fraction of novel queries the service did not call novel."""
    return _fraction([not f for f in is_novel_on_novel])


def is_right_action(action: str | None, expected: Expected) -> bool:
    """Whether a replayed ``action`` is the query's true resolution."""
    if action is None or expected is None:
        return False
    if isinstance(expected, str):
        return action == expected
    return action in expected


def _check_lengths(*seqs: Sequence[object]) -> None:
    if len({len(s) for s in seqs}) > 1:
        raise ValueError("sequences differ in length")


def wrong_replays(
    decisions: Sequence[str], actions: Sequence[str | None], expected: Sequence[Expected]
) -> int:
    """Verdicts with decision ``replay`` whose resolution is not the true one (novel: all)."""
    _check_lengths(decisions, actions, expected)
    return sum(
        d == "replay" and not is_right_action(a, e)
        for d, a, e in zip(decisions, actions, expected, strict=True)
    )


def replay_rate_known(
    decisions: Sequence[str], actions: Sequence[str | None], expected: Sequence[Expected]
) -> float:
    """Fraction of known queries replayed with the right resolution."""
    _check_lengths(decisions, actions, expected)
    if len(decisions) == 0:
        return NAN
    right = sum(
        d == "replay" and is_right_action(a, e)
        for d, a, e in zip(decisions, actions, expected, strict=True)
    )
    return right / len(decisions)


def max_cosine_novelty(queries: np.ndarray, kb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Baseline: ``1 - max cosine`` of L2-normalised query rows against KB rows, and argmax."""
    if kb.shape[0] == 0:
        return np.ones(queries.shape[0]), np.full(queries.shape[0], -1, dtype=int)
    sims = np.asarray(queries, dtype=np.float32) @ np.asarray(kb, dtype=np.float32).T
    best = sims.argmax(axis=1)
    top = sims[np.arange(sims.shape[0]), best]
    return np.clip(1.0 - top.astype(float), 0.0, 2.0), best.astype(int)
