"""The decision policy (novelty/policy.py): replay | review | escalate, from hand-built results.

Track records are Beta(1 + s, 1 + f) posteriors. With no failures the CDF is x^(s+1), so the
lower bound at credibility c is (1 − c)^(1/(s+1)): at c = 0.9 that is 0.1, 0.316, 0.464, 0.562
for s = 0..3, and replay needs ≥ 0.5, i.e. at least three clean successes.
"""

from __future__ import annotations

from collections.abc import Mapping

import pytest
from hypothesis import given
from hypothesis import strategies as st

from novelty import Decision, NoveltyResult, Policy, TrackRecord, parse_policy, resolution_key
from novelty.scorer import Neighbour

GOOD = {"restart": TrackRecord(successes=10, failures=0)}


def _neighbour(similarity: float, *resolutions: tuple[str, int], kb_id: int = 1) -> Neighbour:
    return Neighbour(kb_ids=(kb_id,), similarity=similarity, cosine=similarity,
                     lexical=similarity, resolutions=tuple(resolutions))


def _result(*neighbours: Neighbour, novel: bool = False, p_value: float = 0.8,
            score: float = 0.1, raw_threshold: float = 0.3, exact: bool = False,
            effective_alpha: float = 0.05, contradiction: float = 0.0) -> NoveltyResult:
    return NoveltyResult(
        score=score, is_novel=novel, threshold=0.5, p_value=p_value, raw=1 - score,
        raw_threshold=raw_threshold,
        nearest_similarity=neighbours[0].similarity if neighbours else 0.0, reference="*",
        components={"effective_alpha": effective_alpha, "exact_match": 1.0 if exact else 0.0,
                    "template_contradiction": contradiction},
        neighbours=list(neighbours),
        # Alone against each neighbour (no density scaling, no contradiction): its distance.
        neighbour_raw=[max(0.0, 1.0 - n.similarity) for n in neighbours])


def _familiar(*resolutions: tuple[str, int]) -> NoveltyResult:
    return _result(_neighbour(0.95, *(resolutions or (("restart", 3),))))


def _decide(result: NoveltyResult, policy: Policy | None = None, *, service: str | None = "web",
            severity: str | None = "warning", records: Mapping[str, TrackRecord] = GOOD,
            automatable: Mapping[str, bool] | None = None) -> Decision:
    return (policy or Policy()).decide(result, service=service, severity=severity,
                                       records=records, automatable=automatable)


def test_replay_when_everything_is_good() -> None:
    d = _decide(_familiar())
    assert d.decision == "replay"
    assert d.resolution_key == "restart"
    assert d.agreement == 1.0
    assert d.track_record == GOOD["restart"]
    # confidence = familiarity · agreement · lower bound = 0.9 · 1 · 0.1^(1/11) (s = 10).
    assert d.confidence == pytest.approx(0.9 * 1.0 * 0.1 ** (1 / 11), abs=1e-6)
    assert len(d.reasons) == 3
    assert "familiar" in d.reasons[0] and "agree" in d.reasons[1]
    assert "track record 10 resolved / 0 failed" in d.reasons[2]


def test_escalate_when_novel_whatever_else_is_true() -> None:
    d = _decide(_result(_neighbour(0.99, ("restart", 50)), novel=True, p_value=0.01, score=0.9))
    assert d.decision == "escalate"
    assert d.resolution_key is None and d.track_record is None
    assert d.confidence == pytest.approx(0.99)
    assert len(d.reasons) == 1 and d.reasons[0].startswith("novel")
    assert "0.900" in d.reasons[0] and "threshold 0.500" in d.reasons[0]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("disagree", "neighbours disagree"),
        ("thin record", "thin or poor track record"),
        ("poor record", "thin or poor track record"),
        ("critical", "does not automate"),
        ("service not allowed", "does not automate"),
        ("not automatable", "not automatable"),
        ("no resolution", "no matching incident has a resolution"),
        ("weak match", "weak match"),
        ("look-alike", "look-alike"),
    ],
)
def test_review_rules_name_themselves(case: str, reason: str) -> None:
    result = _familiar()
    kwargs: dict[str, object] = {}
    policy = Policy()
    if case == "disagree":
        result = _result(_neighbour(0.95, ("restart", 1), kb_id=1),
                         _neighbour(0.94, ("rollback", 1), kb_id=2))
        kwargs["records"] = {**GOOD, "rollback": TrackRecord(10, 0)}
    elif case == "thin record":
        kwargs["records"] = {"restart": TrackRecord(1, 0)}
    elif case == "poor record":
        kwargs["records"] = {"restart": TrackRecord(10, 30)}
    elif case == "critical":
        kwargs["severity"] = "critical"
    elif case == "service not allowed":
        policy = Policy(automate_services=("web-*", "api"))
        kwargs["service"] = "db"
    elif case == "not automatable":
        kwargs["automatable"] = {"restart": False}
    elif case == "no resolution":
        result = _result(_neighbour(0.95))
    elif case == "weak match":
        result = _result(_neighbour(0.95, ("restart", 3)), p_value=0.08)
    elif case == "look-alike":
        result = _result(_neighbour(0.95, ("restart", 3)), contradiction=0.25)
    d = _decide(result, policy, **kwargs)  # type: ignore[arg-type]
    assert d.decision == "review"
    assert any(reason in r for r in d.reasons), d.reasons
    assert 0.0 <= d.confidence <= 1.0


@pytest.mark.parametrize(("successes", "lower", "decision"),
                         [(0, 0.1, "review"), (1, 0.1 ** 0.5, "review"),
                          (2, 0.1 ** (1 / 3), "review"), (3, 0.1 ** 0.25, "replay")])
def test_track_record_lower_bound_decides(successes: int, lower: float, decision: str) -> None:
    record = TrackRecord(successes, 0)
    assert record.lower_bound(0.9) == pytest.approx(lower, abs=1e-9)
    assert _decide(_familiar(), records={"restart": record}).decision == decision


def test_an_unknown_resolution_has_no_track_record() -> None:
    d = _decide(_familiar(), records={})
    assert d.decision == "review"
    assert d.track_record == TrackRecord(0, 0)
    assert any("0 resolved, 0 failed" in r for r in d.reasons)


@pytest.mark.parametrize(("votes", "agreement", "decision"),
                         [((9, 1), 0.9, "replay"), ((8, 2), 0.8, "review"),
                          ((1, 0), 1.0, "replay")])
def test_agreement_threshold(votes: tuple[int, int], agreement: float, decision: str) -> None:
    restart, rollback = votes
    neighbours = [_neighbour(0.95, ("restart", restart), kb_id=1)]
    if rollback:
        neighbours.append(_neighbour(0.93, ("rollback", rollback), kb_id=2))
    d = _decide(_result(*neighbours))
    assert d.agreement == pytest.approx(agreement)
    assert d.decision == decision


def test_far_neighbours_do_not_vote_but_the_nearest_always_does() -> None:
    # Alone, the second neighbour leaves raw 0.5 > raw_threshold 0.3: too far to disagree.
    near = _neighbour(0.95, ("restart", 2), kb_id=1)
    far = _neighbour(0.5, ("rollback", 9), kb_id=2)
    assert _decide(_result(near, far)).decision == "replay"
    # The nearest votes even when it is itself beyond the match radius.
    d = _decide(_result(_neighbour(0.6, ("restart", 2)), raw_threshold=0.1))
    assert d.resolution_key == "restart"


@pytest.mark.parametrize(("p_value", "contradiction"), [(0.08, 0.0), (0.8, 0.5)])
def test_an_exact_match_is_never_weak_nor_a_look_alike(p_value: float,
                                                       contradiction: float) -> None:
    top = _neighbour(1.0, ("restart", 3))
    flawed = _result(top, p_value=p_value, contradiction=contradiction)
    assert _decide(flawed).decision == "review"
    exact = _result(top, p_value=p_value, contradiction=contradiction, exact=True)
    assert _decide(exact).decision == "replay"


@pytest.mark.parametrize(
    ("services", "severities", "service", "severity", "allowed"),
    [
        (("*",), ("info", "warning", "error"), "db", "error", True),
        (("*",), ("info", "warning", "error"), "db", "critical", False),
        (("*",), ("info", "warning", "error"), None, None, True),
        (("web-*",), ("info",), "web-eu", "info", True),
        (("web-*",), ("info",), "db", "info", False),
        (("web-*",), ("info",), None, "info", False),
        ((), ("info",), "web", "info", False),
    ],
)
def test_allows_automation(services: tuple[str, ...], severities: tuple[str, ...],
                           service: str | None, severity: str | None, allowed: bool) -> None:
    policy = Policy(automate_services=services, automate_severities=severities)
    assert policy.allows_automation(service, severity) is allowed


_NEIGHBOURS = st.lists(
    st.builds(_neighbour, st.floats(0, 1),
              st.sampled_from(["restart", "rollback", "scale"]).flatmap(
                  lambda k: st.tuples(st.just(k), st.integers(1, 5))),
              kb_id=st.integers(1, 100)),
    max_size=6)


@given(neighbours=_NEIGHBOURS, novel=st.booleans(), p=st.floats(0.001, 1), score=st.floats(0, 1),
       raw_threshold=st.floats(0, 1), exact=st.booleans(),
       successes=st.integers(0, 20), failures=st.integers(0, 20),
       severity=st.sampled_from([None, "critical", "error", "warning", "info"]),
       automatable=st.booleans())
def test_every_decision_is_explained_and_confidence_is_bounded(
        neighbours: list[Neighbour], novel: bool, p: float, score: float, raw_threshold: float,
        exact: bool, successes: int, failures: int, severity: str | None,
        automatable: bool) -> None:
    result = _result(*neighbours, novel=novel, p_value=p, score=score,
                     raw_threshold=raw_threshold, exact=exact)
    records = {k: TrackRecord(successes, failures) for k in ("restart", "rollback", "scale")}
    d = _decide(result, severity=severity, records=records,
                automatable=dict.fromkeys(("restart", "rollback", "scale"), automatable))
    assert 0.0 <= d.confidence <= 1.0
    assert d.reasons and all(isinstance(r, str) and r.strip() for r in d.reasons)
    assert (d.decision == "escalate") == novel
    if d.decision == "replay":
        assert d.resolution_key is not None and d.agreement >= Policy().min_agreement
        assert d.track_record is not None and d.track_record.lower_bound(0.9) >= 0.5
        assert automatable and severity != "critical"


def test_resolution_key_ignores_case_and_spacing() -> None:
    assert resolution_key("  Restart   the  POD\n") == "restart the pod"
    assert len(resolution_key("x" * 1000)) == 500


def test_parse_policy_keeps_unknown_keys_apart() -> None:
    policy = parse_policy({"alpha": 0.1, "automate_services": ["web-*"], "version": 9,
                           "team": "sre"}, version=3)
    assert policy.version == 3 and policy.alpha == 0.1
    assert policy.automate_services == ("web-*",)
    assert dict(policy.extra) == {"team": "sre"}
    assert policy.as_dict()["automate_services"] == ["web-*"]
