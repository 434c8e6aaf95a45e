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

``fit`` learns ``w``, ``β`` and ``γ`` from the KB itself, without query labels: it mines kinds
(templates) and splits them into *problems* by the resolutions operators recorded (look-alikes the
miner merged, "action:TIME_TICK" / "action:SCREEN_ON", stay apart once resolved differently), then
compares leave-one-fingerprint-out scores of items whose nearest neighbour is of their own problem
(familiar by construction) with leave-one-problem-out scores (novel by construction; a look-alike
resolved differently stays in the KB as the hardest novel case). ``w`` keeps the best separation
(AUROC); ``β`` and ``γ`` the best separation where policies operate (partial AUROC up to
:attr:`NoveltyScorer.OPERATING_FPR`), ties going to the stronger contradiction weight.
Events of another length than a neighbour's template are compared by their words; whether such
a difference makes another problem is learnt per service from KB neighbour pairs of different
length and their resolutions (a LogHub field more is another template; an alert's optional
labels are not).
The familiar scores, per service, are the conformal reference that turns a raw score into a
p-value and an α-level threshold (:mod:`novelty.calibration`).
"""

from __future__ import annotations

import functools
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
from novelty.templates import (
    TemplateMiner,
    constants,
    contradiction,
    merge,
    same_words,
    words,
)

__all__ = ["Item", "Neighbour", "NoveltyResult", "NoveltyScorer", "Query"]

Vector = npt.NDArray[np.float32]
GLOBAL = "*"
#: Levels at which every result also reports its raw threshold, so a stored verdict can be
#: re-decided under a policy with another α.
ALPHA_GRID = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)


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
    - ``prior_pairs``: weight, in neighbour pairs, of the KB-wide length habit in a service's
      own (a service with few pairs of different length inherits the KB's).

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
    #: The density and contradiction weights are chosen where policies operate: the separation
    #: counted is where at most this share of familiar events would be escalated (partial AUROC).
    #: Whole-curve AUROC let a weight that helps the bulk of novel events hide look-alikes in the
    #: low tail, which is where missed novelty comes from.
    OPERATING_FPR = 0.1
    #: Largest raw threshold: an event whose best neighbour is this far (orthogonal, or its
    #: template contradicted) is novel whatever the reference says; it also keeps scores, which
    #: stop growing at raw 1, strictly above the threshold of a novel event.
    MAX_THRESHOLD = 0.99
    #: Separations closer than this are a tie (a few hundred held-out items cannot tell them
    #: apart).
    TIE = 0.001

    def __init__(self, index: VectorIndex, *, candidates: int = 32, min_reference: int = 20,
                 max_calibration: int = 4000, kind_similarity: float = 0.5,
                 default_threshold: float = 0.25, prior_pairs: int = 2,
                 seed: int = 0) -> None:
        self.index = index
        self.candidates = candidates
        self.min_reference = min_reference
        self.max_calibration = max_calibration
        self.default_threshold = default_threshold
        self.prior_pairs = prior_pairs
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
        self._top_key: list[str | None] = []
        self._words: list[frozenset[str]] = []
        # A *problem* is a mined kind split by resolution: look-alikes the miner merged
        # ("... action:TIME_TICK" / "... action:SCREEN_ON") are apart once operators resolved
        # them differently. Groups without a resolution form their kind's problem ``None``.
        self._problem_template: dict[tuple[int, str | None], list[str]] = {}
        self._problem_words: dict[tuple[int, str | None], frozenset[str]] = {}
        self._problem_groups: dict[tuple[int, str | None], list[int]] = {}
        self._problem_df: dict[tuple[int, str | None], Counter[str]] = {}
        self._lock = threading.RLock()
        self._idf: tuple[int, dict[str, float], dict[int, float]] = (0, {}, {})
        # Learned by fit(); usable defaults until then.
        self.weight_ = 0.5
        self.beta_ = 0.0
        self.gamma_ = 0.0
        self.rho0_ = 1.0
        self.references_: dict[str, Reference] = {}
        self.fallback_threshold_ = default_threshold
        self.separation_ = math.nan
        self.fitted_groups_ = 0
        #: Per service (and "*"): the contradiction a length difference adds (see fit).
        self.length_penalty_: dict[str, float] = {}

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
                    self._add_resolution(gid, item.resolution_key)
            if vectors is not None and new_rows:
                fresh = np.ascontiguousarray(vectors[new_rows], dtype=np.float32)
                self.index.add(np.asarray(new_reps, dtype=np.int64), fresh)
                self._update_density([self._rep_gid[r] for r in new_reps], fresh)
            return new_reps

    def add_resolution(self, kb_id: int, resolution_key: str) -> None:
        with self._lock:
            for gid, members in enumerate(self._members):
                if kb_id in members:
                    self._add_resolution(gid, resolution_key)
                    return

    def _add_resolution(self, gid: int, key: str) -> None:
        first = not self._resolutions[gid]
        self._resolutions[gid][key] += 1
        self._top_key[gid] = self._resolutions[gid].most_common(1)[0][0]
        if self._resolutions[gid][key] == 1:
            if first:
                self._leave_problem(gid, (self._kind[gid], None))
            self._join_problem(gid, (self._kind[gid], key))

    def _template_words(self, problem: tuple[int, str | None]) -> frozenset[str]:
        """The words of a problem's template (its constants), kept until the template changes."""
        found = self._problem_words.get(problem)
        if found is None:
            found = self._problem_words[problem] = constants(self._problem_template[problem])
        return found

    def _join_problem(self, gid: int, problem: tuple[int, str | None]) -> None:
        seq = self._seq[gid]
        template = self._problem_template.get(problem)
        self._problem_template[problem] = merge([template, seq]) if template else list(seq)
        self._problem_words.pop(problem, None)
        self._problem_groups.setdefault(problem, []).append(gid)
        self._problem_df.setdefault(problem, Counter()).update(self._tokens[gid])

    def _leave_problem(self, gid: int, problem: tuple[int, str | None]) -> None:
        groups = self._problem_groups.get(problem, [])
        if gid not in groups:
            return
        groups.remove(gid)
        self._problem_df[problem].subtract(self._tokens[gid])
        self._problem_words.pop(problem, None)
        if groups:
            self._problem_template[problem] = merge([self._seq[g] for g in groups])
        else:
            del self._problem_template[problem], self._problem_groups[problem]
            del self._problem_df[problem]

    def _problem(self, gid: int) -> tuple[int, str | None]:
        return self._kind[gid], self._top_key[gid]

    def _related(self, a: int, b: int) -> bool:
        """The same problem: sharing a resolution when both carry one, else the same kind."""
        ra, rb = self._resolutions[a], self._resolutions[b]
        if ra and rb:
            return bool(ra.keys() & rb.keys())
        return self._kind[a] == self._kind[b]

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
        self._members.append([])
        self._resolutions.append(Counter())
        self._top_key.append(None)
        self._words.append(words(seq))
        self._rho.append(math.nan)
        self._join_problem(gid, (kind, None))
        return gid

    def _lexical(self, a: frozenset[str], others: Sequence[int],
                 held_out: Counter[str] | None = None) -> list[float]:
        """IDF-weighted Jaccard of the masked token set ``a`` with each of the groups
        ``others``: sharing a rare word counts for more than sharing a common one, and a word the
        KB has never seen weighs most when it differs.

        ``held_out`` (the held-out items' document frequencies) says which words only they use:
        those count as never seen, as a new event's own words would be. Shared words keep the
        KB's counts, which a new event meets too (a word only held-out items use is in none of
        ``others``, which are never held out).

        Computed as ``Σ∩ / (Σa + Σb − Σ∩)``: each group's total weight is kept until the KB
        grows, so a pair costs one set intersection.
        """
        df = self._df
        total = len(self._rep) + 1
        # Swapped whole when the KB grows, so a check still weighing with the old size fills a
        # dropped cache.
        size, idf, sums = self._idf
        if size != total:
            idf, sums = {}, {}
            self._idf = (total, idf, sums)

        def weight(t: str) -> float:
            x = idf.get(t)
            if x is None:
                x = idf[t] = math.log(total / (df.get(t, 0) + 1)) + 1.0
            return x

        # A shared word is one of a's: its weight is looked up once per call, not per pair.
        mine = {t: weight(t) for t in a}
        if held_out is None:
            wa = sum(mine.values())
        else:
            unseen = math.log(total) + 1.0
            wa = sum(unseen if 0 < df.get(t, 0) <= held_out.get(t, 0) else x
                     for t, x in mine.items())
        out = []
        tokens = self._tokens
        shared_weight = mine.__getitem__
        for o in others:
            b = tokens[o]
            wb = sums.get(o)
            if wb is None:
                wb = sums[o] = sum(weight(t) for t in b)
            inter = sum(map(shared_weight, a & b))
            union = wa + wb - inter
            out.append(inter / union if union > 0 else 1.0)
        return out

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
            others = [(o, c) for o, c in cands if o != gid]
            lex = self._lexical(self._tokens[gid], [o for o, _ in others])
            for (other, cos), lx in zip(others, lex, strict=True):
                d = 1.0 - (w * cos + (1 - w) * lx)
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
            vecs = self.index.reconstruct(np.asarray([self._rep[g] for g in sample]))
            cands = self._candidates(vecs, min(n, 4 * self.candidates + 1))
            self.length_penalty_ = self._learn_length_penalty(sample, cands)
            pos, neg = self._loo_sets(sample, cands)
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

    def _loo_sets(self, sample: npt.NDArray[np.int64], cands: list[list[tuple[int, float]]]
                  ) -> tuple[list[_Loo], list[_Loo]]:
        """Leave-one-fingerprint-out (familiar by construction) and leave-one-problem-out
        (novel by construction) candidate lists; a look-alike resolved differently stays in
        the second, as the hardest kind of novel event."""
        pos: list[_Loo] = []
        neg: list[_Loo] = []
        for g, row in zip(sample.tolist(), cands, strict=True):
            problem = self._problem(g)
            mine = self._tokens[g]
            seq = self._seq[g]
            alone = Counter(mine)
            near = [(o, c) for o, c in row if o != g][: self.candidates]
            if near:
                own = [self._seq[m] for m in self._problem_groups[problem] if m != g]
                pos.append(_Loo(g, near, self._lexical(mine, [o for o, _ in near], alone),
                                self._kin_contradiction(g, own), len(own) >= 1))
            far = [(o, c) for o, c in row if not self._related(g, o)][: self.candidates]
            if far:
                held_out = self._problem_df[problem]
                lex = self._lexical(mine, [o for o, _ in far], held_out)
                neg.append(_Loo(g, far, lex, functools.partial(
                    self._contradiction, seq, seq_words=self._words[g]), False))
        return pos, neg

    def _kin_contradiction(self, g: int, own: list[list[str]]) -> Callable[[int], float]:
        """Contradiction of held-out ``g`` with a neighbour: one of its own problem judges it by
        the template of the problem's other members (merged once, if ever needed)."""
        problem = self._problem(g)
        seq, seq_words = self._seq[g], self._words[g]
        template: list[list[str] | None] = []

        def of(other: int) -> float:
            if own and self._problem(other) == problem:
                if not template:
                    template.append(merge(own))
                if template[0]:
                    return contradiction(seq, template[0])
            return self._contradiction(seq, other, seq_words)
        return of

    def _contradiction(self, seq: list[str], gid: int,
                       seq_words: frozenset[str] | None = None) -> float:
        """Contradiction of the masked tokens ``seq`` with group ``gid``'s problem template;
        ``seq_words`` is ``words(seq)`` when the caller has it."""
        problem = self._problem(gid)
        template = self._problem_template[problem]
        if len(seq) == len(template):
            return contradiction(seq, template)
        if same_words(words(seq) if seq_words is None else seq_words,
                      self._template_words(problem), self._words[gid]):
            return 0.0
        m = contradiction(seq, template)
        p = self.length_penalty_.get(self._service[gid] or GLOBAL,
                                     self.length_penalty_.get(GLOBAL, 0.0))
        # Mostly resolved apart: another structure is another template, as in Drain.
        return 1.0 if p > 0.5 else m

    def _learn_length_penalty(self, sample: npt.NDArray[np.int64],
                              cands: list[list[tuple[int, float]]]) -> dict[str, float]:
        """Per service: how often a near look-alike of another length is another problem.

        Mined kinds never span lengths, so the KB's own resolutions decide: for each item, its
        nearest neighbour of another length whose words differ (not a list that only grew) but
        which lacks at most half of the item's template words. When
        such pairs were mostly resolved differently (LogHub's ``... rhost=<IP>`` vs
        ``... rhost=<IP> user=root``), another structure counts as full contradiction, as in
        Drain; when they mostly share a resolution (an alert whose optional labels come and go),
        the lenient share of :func:`novelty.templates.contradiction` is used.
        """
        same: Counter[str] = Counter()
        diff: Counter[str] = Counter()
        for g, row in zip(sample.tolist(), cands, strict=True):
            mine = self._resolutions[g]
            if not mine:
                continue
            length = len(self._seq[g])
            for o, _ in row:
                if o == g or len(self._seq[o]) == length or not self._resolutions[o]:
                    continue
                problem = self._problem(o)
                template = self._problem_template[problem]
                if same_words(self._words[g], self._template_words(problem), self._words[o]):
                    continue
                if contradiction(self._seq[g], template) > 0.5:
                    break
                shared = bool(mine.keys() & self._resolutions[o].keys())
                for name in {self._service[g] or GLOBAL, GLOBAL}:
                    (same if shared else diff)[name] += 1
                break
        # Beta(1, 1) overall; each service shrunk towards the overall rate with the weight of
        # ``prior_pairs`` pairs, so a service with few pairs inherits the KB's habit.
        overall = (diff[GLOBAL] + 1.0) / (same[GLOBAL] + diff[GLOBAL] + 2.0)
        m = self.prior_pairs
        out = {name: (diff[name] + m * overall) / (same[name] + diff[name] + m)
               for name in set(same) | set(diff) if name != GLOBAL}
        out[GLOBAL] = overall
        return out

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
                         [x.raw(w, self._factor, b, 0.0, self.TOP)[0] for x in neg],
                         self.OPERATING_FPR)
            if auc > best_auc + 1e-9:
                best_b, best_auc = b, auc
        self.separation_ = best_auc
        return best_b

    def _best_gamma(self, pos: list[_Loo], neg: list[_Loo]) -> float:
        if not pos or not neg:
            # Nothing to learn from (every problem seen once): contradiction keeps a middle
            # weight rather than none, as the look-alike guard.
            return self.GAMMAS[len(self.GAMMAS) // 2]
        w, b = self.weight_, self.beta_
        part: dict[float, float] = {}
        whole: dict[float, float] = {}
        for g in self.GAMMAS:
            p = [x.raw(w, self._factor, b, g, self.TOP)[0] for x in pos]
            n = [x.raw(w, self._factor, b, g, self.TOP)[0] for x in neg]
            part[g], whole[g] = _auroc(p, n, self.OPERATING_FPR), _auroc(p, n)
        # Separation where policies operate first, then over the whole curve; among ties the
        # strongest weight: the held-out kinds of a small KB rarely include look-alikes, so a
        # tie says "no evidence against", and contradiction is the guard against them.
        tied = [g for g in self.GAMMAS if part[g] >= max(part.values()) - self.TIE]
        best = max(whole[g] for g in tied)
        gamma = max(g for g in tied if whole[g] >= best - self.TIE)
        self.separation_ = part[gamma]
        return gamma

    def _kin(self, pos: list[_Loo]) -> list[_Loo]:
        """Held-out items whose nearest neighbour is kin: of the same problem (same resolution
        where both carry one, else the same mined template).

        The rest are singletons of their problem (or the miner's kin did not help find them), and
        say nothing about how close a fresh member of a known kind lands. Mutual nearest
        neighbours were tried as kin too: look-alike singletons pair up and the reference then
        absorbs novel-looking scores (missed novelty on LogHub rose from 10% to 28%).
        """
        return [x for x in pos
                if x.has_kin and self._related(x.distance(self.weight_)[1], x.gid)]

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
            return min(self.fallback_threshold_, self.MAX_THRESHOLD)
        return min(ref.threshold(alpha), self.MAX_THRESHOLD)

    def search(self, queries: Sequence[Query], k: int) -> list[list[Neighbour]]:
        """Fused-similarity neighbours, best first (at most ``k`` per query)."""
        if not queries:
            return []
        vecs = np.stack([q.vector for q in queries]).astype(np.float32)
        cands = self._candidates(vecs, max(k, self.candidates))
        return [self._rank(q, row, k)[0] for q, row in zip(queries, cands, strict=True)]

    def _rank(self, q: Query, row: list[tuple[int, float]], limit: int
              ) -> tuple[list[Neighbour], float]:
        """The ``limit`` best candidates by fused similarity, and the best cosine of all."""
        w = self.weight_
        tokens = lexical_tokens(q.masked)
        exact = self._fp_gid.get(q.fingerprint)
        scored: list[tuple[float, float, float, int]] = []
        seen = False
        lexical = self._lexical(tokens, [gid for gid, _ in row])
        for (gid, cos), lex in zip(row, lexical, strict=True):
            if gid == exact:
                seen = True
                scored.append((1.0, 1.0, 1.0, gid))
            else:
                scored.append((w * cos + (1 - w) * lex, cos, lex, gid))
        if exact is not None and not seen:
            scored.append((1.0, 1.0, 1.0, exact))
        scored.sort(key=lambda t: (-t[0], -t[1]))
        # Only the shown and scored few become neighbours: a hot group has thousands of members.
        return ([Neighbour(kb_ids=tuple(self._members[g]), similarity=s, cosine=c, lexical=lx,
                           resolutions=tuple(self._resolutions[g].most_common()))
                 for s, c, lx, g in scored[:limit]],
                max((c for _, c, _, _ in scored), default=0.0))

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
            ranked, max_cosine = self._rank(q, row, max(k, self.TOP))
            level = alpha(q.service) if callable(alpha) else alpha
            out.append(self._result(q, ranked, max_cosine, level, k,
                                    floor(q.service) if floor is not None else 0.0))
        return out

    def _result(self, q: Query, ranked: list[Neighbour], max_cosine: float, alpha: float,
                k: int, floor: float = 0.0) -> NoveltyResult:
        ref = self.reference_for(q.service)
        t = min(max(self.raw_threshold(ref, alpha), floor), self.MAX_THRESHOLD)
        seq = q.masked.split()
        seq_words = words(seq)
        exact = q.fingerprint in self._fp_gid
        best = ranked[: self.TOP]
        contra = [0.0 if exact and i == 0 else
                  self._contradiction(seq, self._rep_gid[n.kb_ids[0]], seq_words)
                  for i, n in enumerate(best)]
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
            "max_cosine": max_cosine,
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
    """One held-out item and its candidates. Contradictions are computed when first needed:
    only the few best candidates at the chosen fusion weight ever are (~6x fewer than all)."""

    gid: int
    near: list[tuple[int, float]]
    lexical: list[float]
    contra_of: Callable[[int], float]
    has_kin: bool
    _contra: dict[int, float] = field(default_factory=dict)
    _best: dict[tuple[float, int], list[tuple[float, int, float]]] = field(default_factory=dict)

    def contra(self, other: int) -> float:
        m = self._contra.get(other)
        if m is None:
            m = self._contra[other] = self.contra_of(other)
        return m

    def distance(self, w: float) -> tuple[float, int]:
        best, arg = -math.inf, -1
        for (other, cos), lex in zip(self.near, self.lexical, strict=True):
            s = w * cos + (1 - w) * lex
            if s > best:
                best, arg = s, other
        return max(0.0, 1.0 - best), arg

    def raw(self, w: float, factor: Callable[[int, float], float], beta: float, gamma: float,
            top: int) -> tuple[float, int]:
        best = self._best.get((w, top))
        if best is None:
            # The ranking depends on the weight only: computed once for every β and γ tried.
            fused = sorted(((w * cos + (1 - w) * lex, other) for (other, cos), lex
                            in zip(self.near, self.lexical, strict=True)), reverse=True)
            best = self._best[(w, top)] = [(s, o, self.contra(o)) for s, o in fused[:top]]
        return _combine(best, factor, beta, gamma)


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


def _auroc(pos: list[float], neg: list[float], max_fpr: float | None = None) -> float:
    """How well raw scores put held-out kinds (neg: novel) above held-out kin (pos: familiar);
    with ``max_fpr``, only where at most that share of familiar scores is above the cut
    (McClish-standardised partial AUROC)."""
    y = np.r_[np.zeros(len(pos)), np.ones(len(neg))]
    return float(roc_auc_score(y, np.r_[pos, neg], max_fpr=max_fpr))


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
