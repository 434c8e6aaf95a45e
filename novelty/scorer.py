"""kNN novelty with lexical fusion, local density and conformal calibration.

Higher is more novel, everywhere in this package and in the API.

The unit of the knowledge base here is the *fingerprint group*: incidents whose masked text is
identical share one vector, so the FAISS index holds one entry per group (keyed by the group's
first KB id) and duplicates count as weight instead of collapsing density to zero.

For a query, the dense top-``candidates`` groups are re-ranked by a fused similarity
``w·cosine + (1−w)·lexical``, where lexical is the IDF-weighted Jaccard overlap of masked tokens
(TF-IDF on fingerprints, binary term frequency); identical fingerprints are similarity 1. Over the
best few neighbours, the raw novelty is the smallest
``(1 − fused similarity) · density factor + γ · template contradiction``:

- the density factor compares the neighbour's own neighbour distance ρ with the KB's median ρ₀
  (``(2ρ₀/(ρ+ρ₀))^β``: > 1 near a tight cluster, < 1 inside a broad, varied family, bounded in
  (0, 2^β]);
- the template contradiction is the share of the neighbour's mined template (its kind's constant
  words) that the query contradicts — look-alikes differ exactly there ("VM Started"/"VM Paused").

``fit`` learns ``w``, ``β`` and ``γ`` from the KB itself, without labels: it mines kinds
(templates), then compares leave-one-fingerprint-out scores of items that have kin (familiar by
construction) with leave-one-kind-out scores (novel by construction) and keeps the weights with
the best separation (AUROC between the two).
The familiar scores, per service, are the conformal reference that turns a raw score into a
p-value and an α-level threshold (:mod:`novelty.calibration`).
"""

from __future__ import annotations

import math
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
from sklearn.metrics import roc_auc_score

from embeddings.normalize import lexical_tokens
from novelty.calibration import Reference
from novelty.index import VectorIndex
from novelty.templates import TemplateMiner, contradiction, merge

__all__ = ["Item", "Neighbour", "NoveltyResult", "NoveltyScorer", "Query"]

Vector = npt.NDArray[np.float32]
GLOBAL = "*"
#: Levels at which every result also reports its raw threshold, so a stored verdict can be
#: re-decided under a policy with another α.
ALPHA_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)
_NO_COUNTS: Counter[str] = Counter()


@dataclass(frozen=True)
class Item:
    """A KB incident as the scorer sees it."""

    kb_id: int
    fingerprint: str
    masked: str
    service: str | None = None
    resolution_key: str | None = None


@dataclass(frozen=True)
class Query:
    vector: Vector
    fingerprint: str
    masked: str
    service: str | None = None


@dataclass(frozen=True)
class Neighbour:
    """A fingerprint group near the query; ``kb_ids`` are its incidents, oldest first."""

    kb_ids: tuple[int, ...]
    similarity: float
    cosine: float
    lexical: float
    resolutions: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class NoveltyResult:
    score: float
    is_novel: bool
    threshold: float
    p_value: float
    raw: float
    raw_threshold: float
    nearest_similarity: float
    reference: str
    components: dict[str, float]
    neighbours: list[Neighbour] = field(default_factory=list)
    #: Raw novelty the event would have against each of the first neighbours alone.
    neighbour_raw: list[float] = field(default_factory=list)
    #: Raw thresholds of the event's reference at other levels α (for policy backtests).
    thresholds: dict[float, float] = field(default_factory=dict)


class NoveltyScorer:
    """Novelty of events against a growing KB; see the module docstring for the method.

    Parameters (each a trade-off, none tuned to a data set):

    - ``candidates``: dense neighbours re-ranked lexically. More finds look-alikes the dense
      ranking put lower, at a linear cost per check.
    - ``min_reference``: familiar scores a service needs before it gets its own threshold;
      fewer fall back to the global reference (a threshold from few scores is noisy).
    - ``max_calibration``: fingerprint groups sampled by ``fit``; bounds its cost on big KBs.
    - ``kind_similarity``: the template miner's join threshold (see :mod:`novelty.templates`).
    - ``default_threshold``: raw threshold used only while the KB has no kinds to learn from.

    ``is_novel`` holds the false-escalation rate of familiar events near ``alpha`` (conformal,
    see :class:`novelty.calibration.Reference`).
    """

    # Neither evidence is ever switched off entirely: a purely lexical ranking fails free-text
    # searches, a purely dense one fails look-alikes.
    WEIGHTS = tuple(round(0.1 * i, 1) for i in range(1, 10))
    BETAS = (0.0, 0.5, 1.0)
    GAMMAS = (0.0, 0.1, 0.2, 0.4, 0.8, 1.6)
    #: Neighbours (by fused similarity) whose template contradiction is weighed.
    TOP = 5

    def __init__(self, index: VectorIndex, *, candidates: int = 32, min_reference: int = 20,
                 max_calibration: int = 4000, kind_similarity: float = 0.5,
                 default_threshold: float = 0.25, seed: int = 0) -> None:
        self.index = index
        self.candidates = candidates
        self.min_reference = min_reference
        self.max_calibration = max_calibration
        self.default_threshold = default_threshold
        self.seed = seed
        self._miner = TemplateMiner(kind_similarity)
        self._fp_gid: dict[str, int] = {}
        self._rep: list[int] = []
        self._rep_gid: dict[int, int] = {}
        self._tokens: list[frozenset[str]] = []
        self._service: list[str | None] = []
        self._kind: list[int] = []
        self._members: list[list[int]] = []
        self._resolutions: list[Counter[str]] = []
        self._rho: list[float] = []
        self._df: Counter[str] = Counter()
        self._seq: list[list[str]] = []
        self._kind_groups: dict[int, list[int]] = {}
        self._kind_df: dict[int, Counter[str]] = {}
        self._lock = threading.RLock()
        # Learned by fit(); usable defaults until then.
        self.weight_ = 0.5
        self.beta_ = 0.0
        self.gamma_ = 0.0
        self.rho0_ = 1.0
        self.references_: dict[str, Reference] = {}
        self.fallback_threshold_ = default_threshold
        self.separation_ = math.nan
        self.fitted_groups_ = 0

    # -- growing the KB ----------------------------------------------------------------------------
    @property
    def groups(self) -> int:
        return len(self._rep)

    @property
    def incidents(self) -> int:
        return sum(len(m) for m in self._members)

    def add(self, items: Sequence[Item], vectors: Vector | None) -> list[int]:
        """Register incidents; new fingerprints get a vector in the index (row-aligned ``vectors``).

        With ``vectors=None`` the index is assumed to hold the groups already (restoring from a
        saved index). Returns the KB ids that became new index entries.
        """
        with self._lock:
            new_rows: list[int] = []
            new_reps: list[int] = []
            for row, item in enumerate(items):
                gid = self._fp_gid.get(item.fingerprint)
                if gid is None:
                    gid = self._new_group(item)
                    new_rows.append(row)
                    new_reps.append(item.kb_id)
                self._members[gid].append(item.kb_id)
                if item.resolution_key is not None:
                    self._resolutions[gid][item.resolution_key] += 1
            if vectors is not None and new_rows:
                fresh = np.ascontiguousarray(vectors[new_rows], dtype=np.float32)
                self.index.add(np.asarray(new_reps, dtype=np.int64), fresh)
                self._update_density([self._rep_gid[r] for r in new_reps], fresh)
            return new_reps

    def add_resolution(self, kb_id: int, resolution_key: str) -> None:
        with self._lock:
            for gid, members in enumerate(self._members):
                if kb_id in members:
                    self._resolutions[gid][resolution_key] += 1
                    return

    def _new_group(self, item: Item) -> int:
        gid = len(self._rep)
        self._fp_gid[item.fingerprint] = gid
        self._rep.append(item.kb_id)
        self._rep_gid[item.kb_id] = gid
        tokens = lexical_tokens(item.masked)
        self._tokens.append(tokens)
        self._df.update(tokens)
        self._service.append(item.service)
        seq = item.masked.split()
        kind = self._miner.add(seq)
        self._seq.append(seq)
        self._kind.append(kind)
        self._kind_groups.setdefault(kind, []).append(gid)
        self._kind_df.setdefault(kind, Counter()).update(tokens)
        self._members.append([])
        self._resolutions.append(Counter())
        self._rho.append(math.nan)
        return gid

    def _lexical(self, a: frozenset[str], b: frozenset[str],
                 held_out: Counter[str] | None = None) -> float:
        """IDF-weighted Jaccard of masked token sets: sharing a rare word counts for more than
        sharing a common one, and a word the KB has never seen weighs most when it differs.

        ``held_out`` (the held-out items' document frequencies) says which words only they use:
        those count as never seen, as a new event's own words would be. Shared words keep the
        KB's counts, which a new event meets too.
        """
        if not a and not b:
            return 1.0
        df = self._df
        total = len(self._rep) + 1
        minus = held_out if held_out is not None else _NO_COUNTS

        def idf(t: str) -> float:
            count = df.get(t, 0)
            if count and minus.get(t, 0) >= count:
                count = 0
            return math.log(total / (count + 1)) + 1.0

        inter = sum(idf(t) for t in a & b)
        return inter / (inter + sum(idf(t) for t in a ^ b))

    def _candidates(self, vectors: Vector, k: int) -> list[list[tuple[int, float]]]:
        sims, ids = self.index.search(vectors, k)
        rep = self._rep_gid
        return [[(rep[int(i)], float(s)) for s, i in zip(srow, irow, strict=True)
                 if i >= 0 and int(i) in rep] for srow, irow in zip(sims, ids, strict=True)]

    def _update_density(self, gids: list[int], vectors: Vector) -> None:
        """ρ of new groups, and of old groups the new ones came closer to than their neighbour."""
        w = self.weight_
        for gid, cands in zip(gids, self._candidates(vectors, self.candidates + 1), strict=True):
            best = math.inf
            for other, cos in cands:
                if other == gid:
                    continue
                d = 1.0 - (w * cos + (1 - w) * self._lexical(self._tokens[gid],
                                                              self._tokens[other]))
                best = min(best, d)
                if not self._rho[other] <= d:
                    self._rho[other] = d
            if best < math.inf:
                self._rho[gid] = best

    # -- learning from the KB ----------------------------------------------------------------------
    def fit(self) -> NoveltyScorer:
        """Learn the fusion weight, the density exponent and the per-service references."""
        with self._lock:
            n = self.groups
            if n < 3:
                self.references_ = {}
                self.fallback_threshold_ = self.default_threshold
                self.fitted_groups_ = n
                return self
            rng = np.random.default_rng(self.seed)
            sample = np.sort(rng.choice(n, size=min(n, self.max_calibration), replace=False))
            kind_sizes = Counter(self._kind)
            vecs = self.index.reconstruct(np.asarray([self._rep[g] for g in sample]))
            cands = self._candidates(vecs, min(n, 4 * self.candidates + 1))
            pos, neg = self._loo_sets(sample, cands, kind_sizes)
            self.weight_ = self._best_weight([x for x in pos if x.has_kin], neg)
            if n <= 20_000:
                self._recompute_density()
            rhos = np.asarray([r for r in self._rho if not math.isnan(r)])
            self.rho0_ = float(max(np.median(rhos), 1e-3)) if len(rhos) else 1.0
            kin = self._kin(pos)
            self.beta_ = self._best_beta(kin, neg)
            self.gamma_ = self._best_gamma(kin, neg)
            self._set_references(kin, neg)
            self.fitted_groups_ = n
            return self

    def _loo_sets(self, sample: npt.NDArray[np.int64], cands: list[list[tuple[int, float]]],
                  kind_sizes: Counter[int]) -> tuple[list[_Loo], list[_Loo]]:
        """Leave-one-fingerprint-out (items with kin) and leave-one-kind-out candidate lists."""
        pos: list[_Loo] = []
        neg: list[_Loo] = []
        for g, row in zip(sample.tolist(), cands, strict=True):
            kind = self._kind[g]
            mine = self._tokens[g]
            seq = self._seq[g]
            alone = Counter(mine)
            without_kind = self._kind_df[kind]
            near = [(o, c) for o, c in row if o != g][: self.candidates]
            if near:
                # The held-out item's own kind is judged by the template of its other members.
                own = [self._seq[m] for m in self._kind_groups[kind] if m != g]
                own_template = merge(own) if own else None
                pos.append(_Loo(
                    g, near, [self._lexical(mine, self._tokens[o], alone) for o, _ in near],
                    [contradiction(seq, own_template) if self._kind[o] == kind and own_template
                     else self._contradiction(seq, o) for o, _ in near],
                    kind_sizes[kind] >= 2))
            far = [(o, c) for o, c in row if self._kind[o] != kind][: self.candidates]
            if far:
                lex = [self._lexical(mine, self._tokens[o], without_kind) for o, _ in far]
                neg.append(_Loo(g, far, lex, [self._contradiction(seq, o) for o, _ in far],
                                False))
        return pos, neg

    def _contradiction(self, seq: list[str], gid: int) -> float:
        return contradiction(seq, self._miner.templates[self._kind[gid]])

    def _best_weight(self, pos: list[_Loo], neg: list[_Loo]) -> float:
        if not pos or not neg:
            return self.weight_
        best_w, best_auc = self.weight_, -1.0
        for w in self.WEIGHTS:
            auc = _auroc([x.distance(w)[0] for x in pos], [x.distance(w)[0] for x in neg])
            # Prefer the middle on ties: neither evidence alone is trusted without cause.
            if auc > best_auc + 1e-9 or (abs(auc - best_auc) <= 1e-9
                                         and abs(w - 0.5) < abs(best_w - 0.5)):
                best_w, best_auc = w, auc
        self.separation_ = best_auc
        return best_w

    def _recompute_density(self) -> None:
        self._rho = [math.nan] * self.groups
        reps = np.asarray(self._rep, dtype=np.int64)
        for start in range(0, len(reps), 4096):
            chunk = reps[start:start + 4096]
            gids = [self._rep_gid[int(r)] for r in chunk]
            self._update_density(gids, self.index.reconstruct(chunk))

    def _factor(self, gid: int, beta: float) -> float:
        rho = self._rho[gid]
        if beta == 0.0 or math.isnan(rho):
            return 1.0
        return float((2 * self.rho0_ / (rho + self.rho0_)) ** beta)

    def _best_beta(self, pos: list[_Loo], neg: list[_Loo]) -> float:
        if not pos or not neg:
            return 0.0
        w = self.weight_
        best_b, best_auc = 0.0, -1.0
        for b in self.BETAS:
            auc = _auroc([x.raw(w, self._factor, b, 0.0, self.TOP)[0] for x in pos],
                         [x.raw(w, self._factor, b, 0.0, self.TOP)[0] for x in neg])
            if auc > best_auc + 1e-9:
                best_b, best_auc = b, auc
        self.separation_ = best_auc
        return best_b

    def _best_gamma(self, pos: list[_Loo], neg: list[_Loo]) -> float:
        if not pos or not neg:
            return 0.0
        w, b = self.weight_, self.beta_
        best_g, best_auc = 0.0, -1.0
        for g in self.GAMMAS:
            auc = _auroc([x.raw(w, self._factor, b, g, self.TOP)[0] for x in pos],
                         [x.raw(w, self._factor, b, g, self.TOP)[0] for x in neg])
            if auc > best_auc + 1e-9:
                best_g, best_auc = g, auc
        self.separation_ = best_auc
        return best_g

    def _kin(self, pos: list[_Loo]) -> list[_Loo]:
        """Held-out items whose nearest neighbour is kin: a member of the same mined template.

        The rest are singletons of their kind (or the miner's kin did not help find them), and
        say nothing about how close a fresh member of a known kind lands. Mutual nearest
        neighbours were tried as kin too: look-alike singletons pair up and the reference then
        absorbs novel-looking scores (missed novelty on LogHub rose from 10% to 28%).
        """
        return [x for x in pos
                if x.has_kin and self._kind[x.distance(self.weight_)[1]] == self._kind[x.gid]]

    def _set_references(self, pos: list[_Loo], neg: list[_Loo]) -> None:
        w, b, g = self.weight_, self.beta_, self.gamma_
        by_service: dict[str, list[float]] = {}
        all_pos: list[float] = []
        for x in pos:
            raw = x.raw(w, self._factor, b, g, self.TOP)[0]
            all_pos.append(raw)
            by_service.setdefault(self._service[x.gid] or GLOBAL, []).append(raw)
        dup = self._duplicate_rates()
        refs = {name: Reference(scores, name, duplicate_rate=dup.get(name, 0.0))
                for name, scores in by_service.items()
                if name != GLOBAL and len(scores) >= self.min_reference}
        refs[GLOBAL] = Reference(all_pos, GLOBAL, duplicate_rate=dup[GLOBAL])
        self.references_ = refs
        neg_raw = np.asarray([x.raw(w, self._factor, b, g, self.TOP)[0] for x in neg])
        self.fallback_threshold_ = _fallback_threshold(np.asarray(all_pos), neg_raw,
                                                       self.default_threshold)

    def _duplicate_rates(self) -> dict[str, float]:
        """Per service and overall: the share of incidents whose fingerprint another one shares."""
        shared: Counter[str] = Counter()
        total: Counter[str] = Counter()
        for gid, members in enumerate(self._members):
            name = self._service[gid] or GLOBAL
            total[name] += len(members)
            total[GLOBAL] += len(members) if name != GLOBAL else 0
            if len(members) >= 2:
                shared[name] += len(members)
                shared[GLOBAL] += len(members) if name != GLOBAL else 0
        return {name: shared[name] / n for name, n in total.items() if n}

    # -- scoring ----------------------------------------------------------------------------
    def reference_for(self, service: str | None) -> Reference | None:
        refs = self.references_
        ref = refs.get(service or GLOBAL)
        if ref is None or len(ref) < self.min_reference:
            ref = refs.get(GLOBAL)
        if ref is not None and len(ref) == 0:
            return None
        return ref

    def raw_threshold(self, ref: Reference | None, alpha: float) -> float:
        if ref is None or len(ref) == 0:
            return self.fallback_threshold_
        return ref.threshold(alpha)

    def search(self, queries: Sequence[Query], k: int) -> list[list[Neighbour]]:
        """Fused-similarity neighbours, best first (at most ``k`` per query)."""
        if not queries:
            return []
        vecs = np.stack([q.vector for q in queries]).astype(np.float32)
        cands = self._candidates(vecs, max(k, self.candidates))
        return [self._rank(q, row)[:k] for q, row in zip(queries, cands, strict=True)]

    def _rank(self, q: Query, row: list[tuple[int, float]]) -> list[Neighbour]:
        w = self.weight_
        tokens = lexical_tokens(q.masked)
        exact = self._fp_gid.get(q.fingerprint)
        scored: list[tuple[float, float, float, int]] = []
        seen = False
        for gid, cos in row:
            if gid == exact:
                seen = True
                scored.append((1.0, 1.0, 1.0, gid))
            else:
                lex = self._lexical(tokens, self._tokens[gid])
                scored.append((w * cos + (1 - w) * lex, cos, lex, gid))
        if exact is not None and not seen:
            scored.append((1.0, 1.0, 1.0, exact))
        scored.sort(key=lambda t: (-t[0], -t[1]))
        return [Neighbour(kb_ids=tuple(self._members[g]), similarity=s, cosine=c, lexical=lx,
                          resolutions=tuple(self._resolutions[g].most_common()))
                for s, c, lx, g in scored]

    def score(self, queries: Sequence[Query], *, alpha: float | Callable[[str | None], float],
              k: int = 5, floor: Callable[[str | None], float] | None = None
              ) -> list[NoveltyResult]:
        """Novelty of each query at level ``alpha`` (the tolerated false-escalation rate), a
        number or a function of the query's service; ``floor`` gives a raw threshold the
        calibrated one may not go below."""
        if not queries:
            return []
        vecs = np.stack([q.vector for q in queries]).astype(np.float32)
        cands = self._candidates(vecs, max(k, self.candidates))
        out = []
        for q, row in zip(queries, cands, strict=True):
            ranked = self._rank(q, row)
            level = alpha(q.service) if callable(alpha) else alpha
            out.append(self._result(q, ranked, level, k,
                                    floor(q.service) if floor is not None else 0.0))
        return out

    def _result(self, q: Query, ranked: list[Neighbour], alpha: float, k: int,
                floor: float = 0.0) -> NoveltyResult:
        ref = self.reference_for(q.service)
        t = max(self.raw_threshold(ref, alpha), floor)
        seq = q.masked.split()
        exact = q.fingerprint in self._fp_gid
        best = ranked[: self.TOP]
        contra = [0.0 if exact and i == 0 else
                  self._contradiction(seq, self._rep_gid[n.kb_ids[0]]) for i, n in enumerate(best)]
        each = [(n.similarity, self._rep_gid[n.kb_ids[0]], m)
                for n, m in zip(best, contra, strict=True)]
        raw, arg = _combine(each, self._factor, self.beta_, self.gamma_)
        top = next((n for n in best if self._rep_gid[n.kb_ids[0]] == arg), None)
        if top is not None:
            distance = max(0.0, 1.0 - top.similarity)
            factor = self._factor(arg, self.beta_)
            rho = self._rho[arg]
            m_top = contra[best.index(top)]
        else:
            distance, factor, rho, m_top = 1.0, 1.0, math.nan, 1.0
        p = _p_value(ref, raw)
        score = _to_score(raw, p)
        threshold = 1.0 if math.isinf(t) else _to_score(t, _p_value(ref, t))
        components = {
            "distance": distance,
            "cosine": top.cosine if top else 0.0,
            "max_cosine": max((n.cosine for n in ranked), default=0.0),
            "lexical": top.lexical if top else 0.0,
            "fused_similarity": top.similarity if top else 0.0,
            "exact_match": 1.0 if exact else 0.0,
            "neighbour_radius": rho if not math.isnan(rho) else -1.0,
            "density_ratio": factor,
            "template_contradiction": m_top,
            "contradiction_weight": self.gamma_,
            "raw": raw,
            "raw_threshold": t if not math.isinf(t) else -1.0,
            "p_value": p,
            "effective_alpha": ref.effective_alpha(alpha) if ref is not None else alpha,
            "duplicate_rate": ref.duplicate_rate if ref is not None else 0.0,
            "lexical_weight": 1.0 - self.weight_,
            "density_exponent": self.beta_,
            "reference_size": float(len(ref) if ref is not None else 0),
        }
        return NoveltyResult(
            score=score, is_novel=raw > t, threshold=threshold, p_value=p, raw=raw,
            raw_threshold=t, nearest_similarity=ranked[0].similarity if ranked else 0.0,
            reference=ref.name if ref is not None else "none", components=components,
            neighbours=ranked[:k],
            neighbour_raw=[_combine([e], self._factor, self.beta_, self.gamma_)[0]
                           for e in each],
            thresholds={a: self.raw_threshold(ref, a) for a in ALPHA_GRID})


@dataclass
class _Loo:
    gid: int
    near: list[tuple[int, float]]
    lexical: list[float]
    contra: list[float]
    has_kin: bool

    def distance(self, w: float) -> tuple[float, int]:
        best, arg = -math.inf, -1
        for (other, cos), lex in zip(self.near, self.lexical, strict=True):
            s = w * cos + (1 - w) * lex
            if s > best:
                best, arg = s, other
        return max(0.0, 1.0 - best), arg

    def raw(self, w: float, factor: Callable[[int, float], float], beta: float, gamma: float,
            top: int) -> tuple[float, int]:
        fused = sorted(((w * cos + (1 - w) * lex, other, m) for (other, cos), lex, m
                        in zip(self.near, self.lexical, self.contra, strict=True)), reverse=True)
        return _combine([(s, o, m) for s, o, m in fused[:top]], factor, beta, gamma)


def _combine(top: list[tuple[float, int, float]], factor: Callable[[int, float], float],
             beta: float, gamma: float) -> tuple[float, int]:
    """Raw novelty: the smallest density-scaled distance plus template contradiction over the
    best few neighbours (by fused similarity)."""
    best, arg = math.inf, -1
    for sim, gid, m in top:
        v = max(0.0, 1.0 - sim) * factor(gid, beta) + gamma * m
        if v < best:
            best, arg = v, gid
    return (best, arg) if arg >= 0 else (1.0, -1)


def _auroc(pos: list[float], neg: list[float]) -> float:
    """How well raw scores put held-out kinds (neg: novel) above held-out kin (pos: familiar)."""
    y = np.r_[np.zeros(len(pos)), np.ones(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg]))


def _p_value(ref: Reference | None, raw: float) -> float:
    if ref is None or len(ref) == 0:
        return float(max(0.0, 1.0 - raw))
    return ref.p_value(raw)


def _to_score(raw: float, p: float) -> float:
    """Map to [0, 1]: strictly increasing in ``raw`` for a fixed reference, comparable across
    services through the p-value."""
    return 0.5 * (1.0 - p) + 0.5 * min(max(raw, 0.0), 1.0)


def _fallback_threshold(pos: npt.NDArray[np.float64], neg: npt.NDArray[np.float64],
                        default: float) -> float:
    """A threshold for a KB too small for a conformal one: the cut that best separates the
    self-supervised familiar and novel scores (equal cost), else a low quantile of novel ones."""
    if len(neg) == 0:
        return default
    if len(pos) == 0:
        return float(np.quantile(neg, 0.05))
    cuts = np.unique(np.r_[pos, neg])
    best_cut, best_err = default, math.inf
    for c in cuts:
        err = float(np.mean(pos > c) + np.mean(neg <= c))
        if err < best_err:
            best_cut, best_err = float(c), err
    return best_cut
