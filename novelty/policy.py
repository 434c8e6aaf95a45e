"""The decision policy: novelty + neighbours + track records → replay | review | escalate.

A policy is a plain, immutable value (its version travels with every verdict), so the same policy
can be replayed over stored history. The rules, in order:

1. ``escalate`` when the event is novel at the policy's α.
2. ``review`` when the match is familiar but weak, when the event contradicts a word that the
   matched kind never varies (a look-alike), when the matching neighbours carry no
   resolution, when they disagree, when the agreed resolution's track record is thin or bad, when
   it is not automatable, or when automation is not allowed for the event's service or severity.
3. ``replay`` otherwise.
"""

from __future__ import annotations

import fnmatch
import math
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any, Literal

from scipy.stats import beta as beta_dist

from novelty.scorer import NoveltyResult

__all__ = ["Decision", "DecisionKind", "Policy", "TrackRecord", "parse_policy", "resolution_key"]

DecisionKind = Literal["replay", "review", "escalate"]


@dataclass(frozen=True)
class TrackRecord:
    """Outcomes of one resolution: a Beta(1 + successes, 1 + failures) posterior."""

    successes: int = 0
    failures: int = 0

    def lower_bound(self, credibility: float) -> float:
        """The success rate we are ``credibility`` sure the resolution beats."""
        return _beta_lower(self.successes, self.failures, credibility)


@lru_cache(maxsize=65536)
def _beta_lower(successes: int, failures: int, credibility: float) -> float:
    # scipy's ppf costs ~0.4 ms, on every replay candidate of every check; records repeat.
    return float(beta_dist.ppf(1.0 - credibility, 1 + successes, 1 + failures))


@dataclass(frozen=True)
class Decision:
    decision: DecisionKind
    confidence: float
    reasons: list[str]
    resolution_key: str | None
    agreement: float
    track_record: TrackRecord | None


@dataclass(frozen=True)
class Policy:
    """Thresholds and automation rules; immutable once active.

    - ``alpha``: tolerated share of familiar events escalated (false escalations). Lower escalates
      less and misses more novelty.
    - ``weak_match_factor``: a familiar event whose p-value is below this multiple of the
      effective α is a weak match and goes to review instead of replay.
    - ``min_agreement``: share of the matching neighbours' incidents that must carry the same
      resolution for it to be replayed.
    - ``min_success`` / ``credibility``: replay only if we are ``credibility`` sure that the
      resolution succeeds more often than ``min_success``.
    - ``automate_services`` (glob patterns) / ``automate_severities``: where replay is allowed.
    """

    version: int = 1
    alpha: float = 0.05
    weak_match_factor: float = 2.0
    min_agreement: float = 0.9
    min_success: float = 0.5
    credibility: float = 0.9
    automate_services: tuple[str, ...] = ("*",)
    automate_severities: tuple[str, ...] = ("info", "warning", "error")
    neighbours: int = 5
    service_alpha: Mapping[str, float] = field(default_factory=dict)
    alpha_bounds: tuple[float, float] = (0.001, 0.25)
    service_threshold: Mapping[str, float] = field(default_factory=dict)
    max_threshold: float = 0.6
    learn_min_feedback: int = 20
    routing: Mapping[str, Any] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        lo, hi = self.alpha_bounds
        if not 0 < lo <= hi < 1:
            raise ValueError("alpha_bounds: must satisfy 0 < low <= high < 1")
        if not 0 < self.alpha < 1:
            raise ValueError("alpha: must be in (0, 1)")
        for name, a in self.service_alpha.items():
            if not lo <= a <= hi:
                raise ValueError(f"service_alpha.{name}: must be within alpha_bounds {lo}..{hi}")
        for name, t in self.service_threshold.items():
            if not 0 <= t <= self.max_threshold:
                raise ValueError(f"service_threshold.{name}: must be within 0..max_threshold "
                                 f"{self.max_threshold}")
        for name in ("min_agreement", "min_success", "credibility"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1]")
        if self.neighbours < 1:
            raise ValueError("neighbours: must be >= 1")

    def alpha_for(self, service: str | None) -> float:
        """The tolerated false-escalation rate for a service: its own, else the policy's."""
        return self.service_alpha.get(service or "", self.alpha)

    def threshold_floor(self, service: str | None) -> float:
        """A raw-score floor under the calibrated threshold, learned from feedback when even the
        lowest α escalates what people keep calling familiar (0: none)."""
        return self.service_threshold.get(service or "", 0.0)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["automate_services"] = list(self.automate_services)
        out["automate_severities"] = list(self.automate_severities)
        out["service_alpha"] = dict(self.service_alpha)
        out["service_threshold"] = dict(self.service_threshold)
        out["alpha_bounds"] = list(self.alpha_bounds)
        out["routing"] = dict(self.routing) if self.routing is not None else None
        out["extra"] = dict(self.extra)
        return out

    def allows_automation(self, service: str | None, severity: str | None) -> bool:
        if severity is not None and severity not in self.automate_severities:
            return False
        return any(fnmatch.fnmatchcase(service or "", pat) for pat in self.automate_services)

    def decide(self, novelty: NoveltyResult, *, service: str | None, severity: str | None,
               records: Mapping[str, TrackRecord],
               automatable: Mapping[str, bool] | None = None) -> Decision:
        """Apply the rules (module docstring) to one scored event."""
        p, comp = novelty.p_value, novelty.components
        if novelty.is_novel:
            return Decision("escalate", _clip(1.0 - p), [
                f"novel: novelty {novelty.score:.3f} above threshold {novelty.threshold:.3f} "
                f"(p-value {p:.3f}, α={self.alpha_for(service)}); nearest similarity "
                f"{novelty.nearest_similarity:.3f}"], None, 0.0, None)

        familiarity = _clip(1.0 - novelty.score)
        votes = self._votes(novelty)
        if not votes:
            return Decision("review", familiarity, [
                f"familiar (nearest similarity {novelty.nearest_similarity:.3f}), but no matching "
                "incident has a resolution on record"], None, 0.0, None)
        key, count = votes.most_common(1)[0]
        agreement = count / sum(votes.values())
        record = records.get(key, TrackRecord())
        lower = record.lower_bound(self.credibility)
        confidence = _clip(familiarity * agreement * lower)
        reasons: list[str] = []
        eff_alpha = comp.get("effective_alpha", self.alpha)
        if p <= min(1.0, self.weak_match_factor * eff_alpha) and comp.get("exact_match", 0) < 1:
            reasons.append(f"weak match: p-value {p:.3f} is within {self.weak_match_factor:g}× "
                           f"the novelty level {eff_alpha:.3f}")
        contradiction = comp.get("template_contradiction", 0.0)
        if contradiction > 0 and comp.get("exact_match", 0) < 1:
            reasons.append(
                f"differs from the matched incidents in {contradiction:.0%} of the words their "
                "kind never varies: possibly a look-alike of another kind")
        if agreement < self.min_agreement:
            reasons.append(f"neighbours disagree: the top resolution has {agreement:.0%} of "
                           f"{sum(votes.values())} matching incidents (< {self.min_agreement:.0%})")
        if lower < self.min_success:
            reasons.append(
                f"thin or poor track record: {record.successes} resolved, {record.failures} "
                f"failed; {self.credibility:.0%} lower bound {lower:.2f} < {self.min_success}")
        if automatable is not None and not automatable.get(key, True):
            reasons.append("the resolution is marked not automatable")
        if not self.allows_automation(service, severity):
            reasons.append(f"policy v{self.version} does not automate service {service!r} at "
                           f"severity {severity!r}")
        if reasons:
            return Decision("review", confidence, reasons, key, agreement, record)
        return Decision("replay", confidence, [
            f"familiar: p-value {p:.3f} (nearest similarity {novelty.nearest_similarity:.3f})",
            f"neighbours agree on one resolution ({agreement:.0%} of {sum(votes.values())})",
            f"track record {record.successes} resolved / {record.failures} failed "
            f"(lower bound {lower:.2f} ≥ {self.min_success})"], key, agreement, record)

    def _votes(self, novelty: NoveltyResult) -> Counter[str]:
        """Resolutions of the incidents this event plausibly is: its own fingerprint's on an
        exact repeat, else every neighbour that alone would make it familiar (the nearest always
        counts)."""
        votes: Counter[str] = Counter()
        if novelty.components.get("exact_match", 0.0) >= 1.0 and novelty.neighbours:
            # The event *is* that fingerprint: its incidents alone say what fixed it.
            votes.update(dict(novelty.neighbours[0].resolutions))
            return votes
        limit = novelty.raw_threshold
        for i, n in enumerate(novelty.neighbours[: self.neighbours]):
            own = novelty.neighbour_raw[i] if i < len(novelty.neighbour_raw) else math.inf
            if i > 0 and own > limit:
                continue
            for key, count in n.resolutions:
                votes[key] += count
        return votes


def _clip(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


def resolution_key(action: str) -> str:
    """Resolutions are the same when their actions are, ignoring case and spacing."""
    return " ".join(action.lower().split())[:500]



def parse_policy(data: Mapping[str, Any], version: int) -> Policy:
    """Build a policy from JSON-like data; unknown keys go to ``extra``.

    Raises ``ValueError`` whose message starts with the offending field.
    """
    known = {f for f in Policy.__dataclass_fields__ if f not in ("version", "extra")}
    kwargs: dict[str, Any] = {k: v for k, v in data.items() if k in known}
    try:
        for name in ("automate_services", "automate_severities", "alpha_bounds"):
            if name in kwargs:
                kwargs[name] = tuple(kwargs[name])
        for name in ("service_alpha", "service_threshold"):
            if name in kwargs:
                kwargs[name] = {str(k): float(v) for k, v in dict(kwargs[name]).items()}
        for name in ("alpha", "weak_match_factor", "min_agreement", "min_success",
                     "credibility", "max_threshold"):
            if name in kwargs:
                kwargs[name] = float(kwargs[name])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: {exc}") from exc
    extra = {k: v for k, v in data.items() if k not in known and k != "version"}
    return Policy(version=version, extra=extra, **kwargs)
