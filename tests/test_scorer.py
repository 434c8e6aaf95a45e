"""kNN novelty (novelty/scorer.py), conformal calibration (novelty/calibration.py) and the template
miner (novelty/templates.py), on toy vectors small enough to compute by hand.

Before ``fit`` the scorer has no reference, so for raw novelty r in [0, 1] the p-value is 1 − r
and the score is 0.5·r + 0.5·r = r; the threshold is ``default_threshold`` (0.25). With the
default fusion weight w = 0.5, similarity = 0.5·cosine + 0.5·lexical, where lexical is the
IDF-weighted Jaccard overlap of masked tokens, idf(t) = 1 + ln((groups + 1) / (df(t) + 1)).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from embeddings import HashingEncoder, fingerprint, mask
from novelty import Item, NoveltyResult, NoveltyScorer, Query, VectorIndex
from novelty.calibration import Reference
from novelty.templates import TemplateMiner, constants, contradiction, merge, same_words, words

Vec = npt.NDArray[np.float32]


def _unit(*values: float) -> Vec:
    v = np.asarray(values, dtype=np.float32)
    return (v / np.linalg.norm(v)).astype(np.float32)


def _at(theta: float) -> Vec:
    return _unit(math.cos(theta), math.sin(theta))


def _scorer(items: Sequence[Item], vectors: Sequence[Vec], dim: int, **kw: float) -> NoveltyScorer:
    scorer = NoveltyScorer(VectorIndex(dim), **kw)  # type: ignore[arg-type]
    scorer.add(list(items), np.stack(vectors))
    return scorer


def _one(scorer: NoveltyScorer, vector: Vec, fp: str, masked: str, *,
         service: str | None = None, alpha: float = 0.05, k: int = 5) -> NoveltyResult:
    return scorer.score([Query(vector, fp, masked, service)], alpha=alpha, k=k)[0]


@pytest.fixture
def toy() -> NoveltyScorer:
    """KB: "disk full" along x, "cpu hot" along y."""
    return _scorer([Item(1, "fp-disk", "disk full", resolution_key="clean"),
                    Item(2, "fp-cpu", "cpu hot", resolution_key="restart")],
                   [_unit(1, 0), _unit(0, 1)], dim=2)


# -- hand-computed toy cases ----------------------------------------------------------------------


def test_exact_fingerprint_is_raw_zero_and_the_lowest_score(toy: NoveltyScorer) -> None:
    # The stored vector does not matter: the fingerprint itself is an exact match.
    exact = _one(toy, _unit(0.6, 0.8), "fp-disk", "disk full")
    assert exact.raw == 0.0 and exact.score == 0.0
    assert exact.nearest_similarity == 1.0
    assert exact.components["exact_match"] == 1.0
    assert exact.neighbours[0].kb_ids == (1,)
    assert not exact.is_novel
    others = [_one(toy, _at(math.radians(d)), f"q{d}", "disk full").score for d in (1, 30, 90)]
    assert all(exact.score < s for s in others)


@pytest.mark.parametrize(
    ("degrees", "raw"),
    # Same tokens as "disk full" (lexical 1), so similarity = 0.5·cos θ + 0.5 and
    # raw = 0.5·(1 − cos θ).
    [(0, 0.0), (30, 0.5 * (1 - math.sqrt(3) / 2)), (45, 0.5 * (1 - math.sqrt(0.5))),
     (59, 0.5 * (1 - math.cos(math.radians(59)))), (62, 0.5 * (1 - math.cos(math.radians(62)))),
     (75, 0.5 * (1 - math.cos(math.radians(75))))],
)
def test_novelty_of_a_rotated_query_matches_hand_computation(toy: NoveltyScorer, degrees: int,
                                                             raw: float) -> None:
    res = _one(toy, _at(math.radians(degrees)), f"q{degrees}", "disk full")
    assert res.raw == pytest.approx(raw, abs=1e-6)
    assert res.score == pytest.approx(raw, abs=1e-6)
    assert res.nearest_similarity == pytest.approx(1 - raw, abs=1e-6)
    assert res.raw_threshold == 0.25 and res.threshold == pytest.approx(0.25)
    assert res.is_novel == (raw > 0.25)
    assert res.neighbours[0].kb_ids == (1,)
    assert res.components["cosine"] == pytest.approx(math.cos(math.radians(degrees)), abs=1e-6)
    assert res.components["lexical"] == 1.0


def test_lexical_evidence_is_fused_with_the_cosine(toy: NoveltyScorer) -> None:
    # Two groups; "disk" and "full" occur in one (idf s = 1 + ln 3/2), "on" and "node" in none
    # (idf u = 1 + ln 3). {disk, full, on, node} vs {disk, full}: lexical = 2s / (2s + 2u).
    s, u = 1 + math.log(1.5), 1 + math.log(3)
    lexical = s / (s + u)
    res = _one(toy, _unit(0.8, 0.6), "q", "disk full on node")
    top = res.neighbours[0]
    assert top.kb_ids == (1,)
    assert top.cosine == pytest.approx(0.8, abs=1e-6)
    assert top.lexical == pytest.approx(lexical)
    assert top.similarity == pytest.approx(0.5 * 0.8 + 0.5 * lexical, abs=1e-6)
    assert res.raw == pytest.approx(1 - (0.5 * 0.8 + 0.5 * lexical), abs=1e-6)
    # cpu hot: cos 0.6, no shared word → 0.3.
    assert res.neighbours[1].similarity == pytest.approx(0.3, abs=1e-6)


def test_words_can_outrank_the_cosine(toy: NoveltyScorer) -> None:
    # Closer to "disk full" in angle, but worded like "cpu hot": 0.5·0.6+0.5 > 0.5·0.8+0.
    res = _one(toy, _unit(0.8, 0.6), "q", "cpu hot")
    assert [n.kb_ids for n in res.neighbours] == [(2,), (1,)]
    assert res.nearest_similarity == pytest.approx(0.8, abs=1e-6)


def test_same_fingerprint_incidents_form_one_group_with_their_resolutions() -> None:
    scorer = _scorer([Item(1, "fa", "disk full", resolution_key="clean"),
                      Item(2, "fb", "cpu hot", resolution_key="restart"),
                      Item(3, "fa", "disk full", resolution_key="clean"),
                      Item(4, "fa", "disk full", resolution_key="expand")],
                     [_unit(1, 0), _unit(0, 1), _unit(1, 0), _unit(1, 0)], dim=2)
    assert scorer.groups == 2 and scorer.incidents == 4
    assert scorer.index.ntotal == 2
    [neighbours] = scorer.search([Query(_unit(1, 0.1), "q", "disk full")], k=1)
    assert len(neighbours) == 1
    assert neighbours[0].kb_ids == (1, 3, 4)
    assert neighbours[0].resolutions == (("clean", 2), ("expand", 1))


def test_search_returns_at_most_k_best_first(toy: NoveltyScorer) -> None:
    [one] = toy.search([Query(_unit(1, 0.2), "q", "x")], k=1)
    [both] = toy.search([Query(_unit(1, 0.2), "q", "x")], k=5)
    assert [n.kb_ids for n in one] == [(1,)]
    assert [n.kb_ids for n in both] == [(1,), (2,)]
    assert both[0].similarity >= both[1].similarity
    assert toy.search([], k=3) == []


def test_an_empty_kb_makes_everything_maximally_novel() -> None:
    scorer = NoveltyScorer(VectorIndex(2))
    res = _one(scorer, _unit(1, 0), "q", "disk full")
    assert res.raw == 1.0 and res.score == 1.0 and res.is_novel
    assert res.neighbours == []


# -- monotonicity ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single() -> NoveltyScorer:
    return _scorer([Item(1, "fp-disk", "disk full")], [_unit(1, 0)], dim=2)


@settings(max_examples=100)
@given(st.floats(0, math.pi), st.floats(0, math.pi))
def test_novelty_rises_as_the_query_rotates_away(single: NoveltyScorer, a: float,
                                                 b: float) -> None:
    lo, hi = sorted((a, b))
    scorer = single
    near = _one(scorer, _at(lo), "q1", "disk full")
    far = _one(scorer, _at(hi), "q2", "disk full")
    assert near.raw <= far.raw + 1e-6
    assert near.score <= far.score + 1e-6


def _kin_kb(dim: int = 3) -> tuple[list[Item], list[Vec]]:
    """Two kinds of three variants each, all in the x-y plane with x > 0."""
    items, vectors = [], []
    texts = ["disk full on host a", "disk full on host b", "disk full on host c",
             "cpu hot on node a", "cpu hot on node b", "cpu hot on node c"]
    for i, (text, degrees) in enumerate(zip(texts, (0, 8, 16, 50, 58, 66), strict=True)):
        t = math.radians(degrees)
        items.append(Item(i + 1, f"fp{i}", text, resolution_key=text.split(" on ")[0]))
        vectors.append(_unit(math.cos(t), math.sin(t), *([0.0] * (dim - 2))))
    return items, vectors


@pytest.fixture(scope="module")
def kin_scorer() -> NoveltyScorer:
    items, vectors = _kin_kb()
    scorer = _scorer(items, vectors, dim=3, min_reference=2).fit()
    assert scorer.references_, "the toy KB should be big enough to calibrate"
    return scorer


@settings(max_examples=100)
@given(st.floats(0, math.radians(89)), st.floats(0, math.radians(89)))
def test_fitted_novelty_rises_as_the_query_leaves_the_kb_plane(kin_scorer: NoveltyScorer,
                                                               a: float, b: float) -> None:
    lo, hi = sorted((a, b))
    scorer = kin_scorer

    def at(theta: float) -> NoveltyResult:  # from the x axis towards z, away from every item
        return _one(scorer, _unit(math.cos(theta), 0, math.sin(theta)), "q", "payment mismatch")

    near, far = at(lo), at(hi)
    assert near.raw <= far.raw + 1e-6
    assert near.score <= far.score + 1e-6


# -- invariants on a fitted scorer ----------------------------------------------------------------

_KINDS = ["Disk full on host {h} volume {v}", "CPU throttled on node {h} core {v}",
          "VM Started on host {h} id {v}", "Connection refused to db {h} port {v}",
          "Certificate expires for {h} in {v} days", "Queue backlog on {h} size {v}"]


@pytest.fixture(scope="module")
def fitted() -> tuple[NoveltyScorer, HashingEncoder, list[str]]:
    encoder = HashingEncoder(64)
    items: list[Item] = []
    texts: list[str] = []
    for k, kind in enumerate(_KINDS):
        for j in range(4):
            masked = mask(kind.format(h=f"web-{j}x", v=j * 7 + k) + f" zone{'abcd'[j]}")
            items.append(Item(len(items) + 1, fingerprint(masked), masked,
                              service="db" if k % 2 else "web", resolution_key=f"fix {k}"))
            texts.append(masked)
    scorer = NoveltyScorer(VectorIndex(64), min_reference=3)
    scorer.add(items, encoder.encode(texts))
    assert scorer.fit() is scorer
    return scorer, encoder, texts


def test_fit_learns_weights_and_references(
        fitted: tuple[NoveltyScorer, HashingEncoder, list[str]]) -> None:
    scorer, _, texts = fitted
    assert 0.0 <= scorer.weight_ <= 1.0
    assert scorer.weight_ in NoveltyScorer.WEIGHTS
    assert scorer.beta_ in NoveltyScorer.BETAS
    assert scorer.gamma_ in NoveltyScorer.GAMMAS
    assert scorer.rho0_ > 0
    assert scorer.fitted_groups_ == scorer.groups == len(texts)
    assert "*" in scorer.references_
    assert set(scorer.references_) <= {"*", "db", "web"}
    ref = scorer.references_["*"]
    assert len(ref) > 0
    assert (np.diff(ref.scores) >= 0).all()
    assert 0.5 <= scorer.separation_ <= 1.0


def test_fit_on_a_tiny_kb_keeps_the_default_threshold(toy: NoveltyScorer) -> None:
    assert toy.fit() is toy
    assert toy.references_ == {}
    assert toy.fallback_threshold_ == toy.default_threshold
    assert toy.fitted_groups_ == 2


@settings(max_examples=150)
@given(vector=st.lists(st.floats(-1, 1), min_size=64, max_size=64),
       pick=st.integers(0, 23), blend=st.floats(0, 1), reuse_text=st.booleans(),
       service=st.sampled_from([None, "db", "web", "other"]),
       alpha=st.sampled_from([0.01, 0.05, 0.2]))
def test_score_is_in_unit_interval_and_is_novel_iff_above_threshold(
        fitted: tuple[NoveltyScorer, HashingEncoder, list[str]], vector: list[float],
        pick: int, blend: float, reuse_text: bool, service: str | None, alpha: float) -> None:
    scorer, encoder, texts = fitted
    noise = np.asarray(vector, dtype=np.float32)
    assume(float(np.linalg.norm(noise)) > 1e-3)
    v = blend * encoder.encode([texts[pick]])[0] + (1 - blend) * noise / np.linalg.norm(noise)
    assume(float(np.linalg.norm(v)) > 1e-3)
    masked = texts[pick] if reuse_text else "payment webhook mismatch"
    res = _one(scorer, (v / np.linalg.norm(v)).astype(np.float32), "q-new", masked,
               service=service, alpha=alpha)
    assert 0.0 <= res.score <= 1.0
    assert 0.0 <= res.threshold <= 1.0
    assert 0.0 < res.p_value <= 1.0
    assert res.is_novel == (res.score > res.threshold)
    assert res.is_novel == (res.raw > res.raw_threshold)


def test_a_repeat_is_familiar_and_unrelated_text_is_novel(
        fitted: tuple[NoveltyScorer, HashingEncoder, list[str]]) -> None:
    scorer, encoder, _ = fitted

    def check(text: str) -> NoveltyResult:
        m = mask(text)
        return _one(scorer, encoder.encode([m])[0], fingerprint(m), m)

    known = check("Disk full on host web-9x volume 55 zonea")  # new values, known fingerprint
    novel = check("Payment provider webhook signature mismatch")
    assert known.components["exact_match"] == 1.0
    assert not known.is_novel and novel.is_novel
    assert known.score < novel.score


_NATO = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]
_HOSTS = [a + b for a in _NATO for b in _NATO if a != b]
_FAMILIES = ["Disk full on host {h} volume data", "CPU throttled on node {h} core main",
             "VM Started on host {h} now", "Connection refused to db {h} port main",
             "Certificate expires for {h} soon ok", "Queue backlog on {h} size large",
             "Backup failed for {h} snapshot timeout", "DNS lookup failed for {h} resolver",
             "Redis evicting keys on {h} cache", "Nginx upstream timeout on {h} lb"]


def test_fresh_members_of_known_kinds_are_escalated_at_about_alpha() -> None:
    """The scorer's promise: ``is_novel`` holds familiar events' false-escalation rate near α.

    Ten kinds, five past members each, every member on its own host; then five fresh members of
    each kind, on hosts never seen. They are exchangeable with the KB's members, so about
    α = 5% of them may be escalated; three times that is a generous bound for 50 events.
    """
    encoder = HashingEncoder(384)
    hosts = iter(_HOSTS)
    texts = [mask(f.format(h=next(hosts))) for f in _FAMILIES for _ in range(5)]
    items = [Item(i + 1, fingerprint(t), t) for i, t in enumerate(texts)]
    scorer = NoveltyScorer(VectorIndex(384), min_reference=5)
    scorer.add(items, encoder.encode(texts))
    scorer.fit()
    fresh = [mask(f.format(h=next(hosts))) for f in _FAMILIES for _ in range(5)]
    results = scorer.score([Query(v, fingerprint(t), t)
                            for v, t in zip(encoder.encode(fresh), fresh, strict=True)],
                           alpha=0.05)
    escalated = [t for t, r in zip(fresh, results, strict=True) if r.is_novel]
    assert len(escalated) / len(fresh) <= 0.15, escalated
    unrelated = scorer.score([Query(encoder.encode([t])[0], fingerprint(t), t) for t in (
        "Payment provider webhook signature mismatch", "Badge reader rejected a valid card")],
        alpha=0.05)
    assert all(r.is_novel for r in unrelated)


def _kb(texts_and_keys: Sequence[tuple[str, str | None]], service: str = "svc"
        ) -> tuple[NoveltyScorer, HashingEncoder]:
    encoder = HashingEncoder(384)
    texts = [mask(t) for t, _ in texts_and_keys]
    items = [Item(i + 1, fingerprint(t), t, service, key)
             for i, (t, (_, key)) in enumerate(zip(texts, texts_and_keys, strict=True))]
    scorer = NoveltyScorer(VectorIndex(384), min_reference=5)
    scorer.add(items, encoder.encode(texts))
    return scorer.fit(), encoder


def _score(scorer: NoveltyScorer, encoder: HashingEncoder, text: str,
           service: str = "svc") -> NoveltyResult:
    t = mask(text)
    return _one(scorer, encoder.encode([t])[0], fingerprint(t), t, service=service)


def test_a_look_alike_the_miner_merged_is_apart_once_resolved_differently() -> None:
    """One mined template ("broadcast action:<*>"), two problems by their resolutions: a third
    action contradicts the template of the problem it is nearest to, so it is not familiar."""
    kb = [(f"broadcast action:SCREEN_ON from {u}", "screen") for u in _NATO[:6]] + \
         [(f"broadcast action:SCREEN_OFF from {u}", "dim") for u in _NATO[6:12]]
    scorer, encoder = _kb(kb)
    fresh = _score(scorer, encoder, f"broadcast action:SCREEN_ON from {_NATO[-2]}")
    other = _score(scorer, encoder, f"broadcast action:TIME_TICK from {_NATO[-1]}")
    assert fresh.components["template_contradiction"] == 0.0
    assert other.components["template_contradiction"] > 0.0
    assert other.raw > fresh.raw
    # Without resolutions the two are one kind whose action varies: no contradiction.
    plain, enc = _kb([(t, None) for t, _ in kb])
    assert _score(plain, enc, f"broadcast action:TIME_TICK from {_NATO[-1]}"
                  ).components["template_contradiction"] == 0.0


def _auth_kb(extra_resolution: str) -> tuple[NoveltyScorer, HashingEncoder]:
    """Login failures with and without a trailing field, resolved alike or apart."""
    kb: list[tuple[str, str | None]] = []
    for i, u in enumerate(_NATO[:12]):
        kb.append((f"auth failure for {u} rhost {_HOSTS[i]}", "lock"))
        kb.append((f"auth failure for {u} rhost {_HOSTS[i + 20]} user root", extra_resolution))
    return _kb(kb)


def test_the_meaning_of_another_length_is_learnt_from_resolutions() -> None:
    apart, enc = _auth_kb("audit-root")
    alike, enc2 = _auth_kb("lock")
    assert apart.length_penalty_["svc"] > 0.5 > alike.length_penalty_["svc"]
    query = f"auth failure for {_NATO[-1]} rhost {_HOSTS[50]} user admin"
    # The nearest kind may be either length; against the shorter one the extra field is full
    # contradiction where the KB resolved such pairs apart, and lenient where it did not.
    shorter = apart._problem_template[apart._problem(0)]
    assert len(shorter) != len(mask(query).split())
    assert apart._contradiction(mask(query).split(), 0) == 1.0
    assert alike._contradiction(mask(query).split(), 0) < 0.5
    assert _score(apart, enc, query).raw >= _score(alike, enc2, query).raw


def test_a_list_that_only_grew_is_not_another_structure() -> None:
    template = ["delete", "<*>"]
    member = words(["delete", "blk_<NUM>"])
    assert member == {"delete"}
    kind = constants(template)
    assert kind == {"delete"}
    assert same_words(words(["delete", "blk_<NUM>", "blk_<NUM>", "blk_<NUM>"]), kind, member)
    assert not same_words(words(["delete", "blk_<NUM>", "user=root"]), kind, member)
    assert not same_words(words(["delete"] * 3), constants(["delete", "now"]),
                          words(["delete", "now"]))


# -- conformal reference --------------------------------------------------------------------------

_REF = [0.4, 0.1, 0.3, 0.2]  # sorted: 0.1 0.2 0.3 0.4, n = 4


@pytest.mark.parametrize(
    ("raw", "p"),
    # p = (1 + #{s ≥ raw}) / (n + 1)
    [(0.0, 5 / 5), (0.1, 5 / 5), (0.15, 4 / 5), (0.25, 3 / 5), (0.3, 3 / 5), (0.4, 2 / 5),
     (0.41, 1 / 5), (9.0, 1 / 5)],
)
def test_reference_p_value(raw: float, p: float) -> None:
    assert Reference(_REF, "toy").p_value(raw) == pytest.approx(p)


@pytest.mark.parametrize(
    ("alpha", "duplicate_rate", "threshold"),
    # rank = ⌈(n+1)(1 − α')⌉ with α' = min(0.5, α/(1 − π)); threshold = sorted[min(rank, n) − 1]
    [(0.2, 0.0, 0.4),    # ⌈5·0.8⌉ = 4
     (0.4, 0.0, 0.3),    # ⌈5·0.6⌉ = 3
     (0.5, 0.0, 0.3),    # ⌈2.5⌉ = 3
     (0.01, 0.0, 0.4),   # ⌈4.95⌉ = 5 → capped at n
     (0.1, 0.5, 0.4),    # α' = 0.2 → 4
     (0.2, 0.5, 0.3),    # α' = 0.4 → 3
     (0.4, 0.5, 0.3)],   # α' = min(0.5, 0.8) = 0.5 → 3
)
def test_reference_threshold(alpha: float, duplicate_rate: float, threshold: float) -> None:
    ref = Reference(_REF, "toy", duplicate_rate=duplicate_rate)
    assert ref.threshold(alpha) == pytest.approx(threshold)


@pytest.mark.parametrize(("alpha", "rate", "effective"),
                         [(0.05, 0.0, 0.05), (0.05, 0.5, 0.1), (0.2, 0.75, 0.5),
                          (0.05, 1.0, 0.5)])
def test_effective_alpha(alpha: float, rate: float, effective: float) -> None:
    assert Reference([0.1], "x", duplicate_rate=rate).effective_alpha(alpha) == pytest.approx(
        effective)


def test_empty_reference_has_an_infinite_threshold() -> None:
    ref = Reference([], "empty")
    assert len(ref) == 0
    assert math.isinf(ref.threshold(0.05))
    assert ref.p_value(0.3) == 1.0


@settings(max_examples=100)
@given(st.lists(st.floats(0, 2), min_size=1, max_size=40), st.floats(0.01, 0.5))
def test_reference_threshold_flags_at_most_alpha_of_its_own_scores(scores: list[float],
                                                                  alpha: float) -> None:
    ref = Reference(scores, "h")
    t = ref.threshold(alpha)
    assert t in ref.scores
    flagged = sum(s > t for s in scores)
    assert flagged <= alpha * (len(scores) + 1)
    # p-values fall as raw scores rise.
    grid = sorted({0.0, t, *scores, 3.0})
    ps = [ref.p_value(x) for x in grid]
    assert all(a >= b for a, b in itertools.pairwise(ps))


# -- template miner -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "kinds"),
    [
        (["VM Started", "VM Paused"], [0, 1]),  # 1 of 2 positions agree: not a majority
        (["VM Started", "VM Started"], [0, 0]),
        (["disk full on <IP>", "disk full on <NUM>"], [0, 0]),  # 3 of 4 agree
        (["disk full on host a", "disk full on host b", "cpu hot on node a"], [0, 0, 1]),
        (["disk full", "disk full on host"], [0, 1]),  # different lengths never join
        (["a b c d", "a b x y"], [0, 1]),  # exactly half is not more than half
        (["a b c", "a x c", "a y c"], [0, 0, 0]),  # the template generalises to "a <*> c"
        (["<NUM> b c", "<IP> b c"], [0, 0]),  # a placeholder head shares the wildcard bucket
        ([""], [0]),
    ],
)
def test_template_miner_groups(lines: list[str], kinds: list[int]) -> None:
    miner = TemplateMiner(similarity=0.5)
    assert [miner.add(line.split()) for line in lines] == kinds
    assert sum(miner.sizes) == len(lines)


def test_template_miner_sizes_count_members() -> None:
    miner = TemplateMiner()
    for line in ["VM Started on h", "VM Started on k", "VM Paused on h", "VM Started on j"]:
        miner.add(line.split())
    # "VM Paused on h" agrees with "VM Started on <*>" in 3 of 4 positions: it joins.
    assert miner.sizes == [4]
    strict = TemplateMiner(similarity=0.8)
    assert [strict.add(x.split()) for x in ["VM Started on h", "VM Paused on h"]] == [0, 1]


@pytest.mark.parametrize(
    ("tokens", "template", "share"),
    [
        (["VM", "Paused"], ["VM", "Started"], 0.5),
        (["VM", "Started"], ["VM", "Started"], 0.0),
        (["VM", "Paused", "on", "h"], ["VM", "Started", "on", "<*>"], 0.25),
        (["x", "y", "z"], ["<*>", "<*>", "<*>"], 0.0),
        (["a", "b"], ["a", "b", "c"], 2 / 3),  # a missing word, and one word shorter
        ([], [], 0.0),
    ],
)
def test_template_contradiction(tokens: list[str], template: list[str], share: float) -> None:
    assert contradiction(tokens, template) == pytest.approx(share)


def test_merge_keeps_common_tokens() -> None:
    assert merge([["VM", "Started", "on", "a"], ["VM", "Started", "on", "b"],
                  ["VM", "Started", "at", "a"]]) == ["VM", "Started", "<*>", "<*>"]
    assert merge([["only", "one"]]) == ["only", "one"]


def test_template_miner_records_each_kinds_template() -> None:
    miner = TemplateMiner()
    for line in ["VM Started on a", "VM Started on b", "disk full"]:
        miner.add(line.split())
    assert miner.templates == [["VM", "Started", "on", "<*>"], ["disk", "full"]]
