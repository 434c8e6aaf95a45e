"""Conformal calibration: turn a raw novelty score into a p-value and an α-level threshold.

The reference scores are leave-one-out scores of knowledge-base items *that have kin* (see
:mod:`novelty.templates`): each is how novel a fresh member of a known kind looked when its own
fingerprint was held out. Under exchangeability, flagging a new event as novel when its p-value is
≤ α escalates at most a fraction α of familiar events.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt

__all__ = ["Reference"]


class Reference:
    """A sorted set of reference (familiar) raw scores for one calibration group."""

    def __init__(self, scores: npt.ArrayLike, name: str, *, duplicate_rate: float = 0.0) -> None:
        self.scores = np.sort(np.asarray(scores, dtype=np.float64))
        self.name = name
        self.duplicate_rate = duplicate_rate

    def effective_alpha(self, alpha: float) -> float:
        """The level to apply to events whose fingerprint is new.

        A familiar event repeats a KB fingerprint exactly with probability π (estimated, without
        labels, as the share of KB incidents whose fingerprint another incident shares) and then
        scores 0. Only the other 1 − π can be escalated by mistake, so testing them at
        α / (1 − π) keeps the overall false-escalation rate at α. Capped at 0.5 so that a
        noisy π never makes the median familiar event novel.
        """
        return min(0.5, alpha / max(1.0 - self.duplicate_rate, 1e-9))

    def __len__(self) -> int:
        return len(self.scores)

    def p_value(self, raw: float) -> float:
        """Share of reference scores at least as novel as ``raw``, conformally smoothed.

        Compare it with :meth:`effective_alpha`, not with α itself.
        """
        n = len(self.scores)
        at_least = n - int(np.searchsorted(self.scores, raw, side="left"))
        return (1 + at_least) / (n + 1)

    def threshold(self, alpha: float) -> float:
        """The raw score above which an event is novel at level ``alpha``.

        It is the ⌈(n+1)(1−α)⌉-th smallest reference score; with too few references for that
        rank, the largest one (the strictest threshold the data supports).
        """
        n = len(self.scores)
        if n == 0:
            return math.inf
        rank = math.ceil((n + 1) * (1 - self.effective_alpha(alpha)))
        return float(self.scores[min(rank, n) - 1])
