"""Hand-computed cases for the benchmark metrics and the LogHub split."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bench import metrics as m
from bench.loghub import LogLine, split, to_event


@pytest.mark.parametrize(
    ("known", "novel", "expected"),
    [
        ([0.1, 0.2], [0.3, 0.4], 1.0),
        ([0.4, 0.3], [0.1, 0.2], 0.0),
        ([0.5], [0.5], 0.5),  # a tie counts half
        ([0.1, 0.5], [0.3], 0.5),
        ([0.1, 0.2, 0.6], [0.3, 0.7], 5 / 6),
    ],
)
def test_auroc(known: list[float], novel: list[float], expected: float) -> None:
    assert m.auroc(known, novel) == pytest.approx(expected)


@pytest.mark.parametrize(("known", "novel"), [([], [0.1]), ([0.1], [])])
def test_auroc_undefined_is_nan(known: list[float], novel: list[float]) -> None:
    assert math.isnan(m.auroc(known, novel))


@pytest.mark.parametrize(
    ("scores", "labels", "templates", "balanced", "plain"),
    [
        # known A x3 at 0.1, known B x1 at 0.9, novel C x1 at 0.5.
        # plain: C beats 3 of 4 known; balanced: A weighs 1 (1/3 each), B weighs 1 -> 1/2.
        ([0.1, 0.1, 0.1, 0.9, 0.5], [0, 0, 0, 0, 1], ["A", "A", "A", "B", "C"], 0.5, 0.75),
        # known F at 0.5; novel D x2 at 0.95 / 0.05 (weight 1/2 each), novel E at 0.95.
        # plain: 2 of 3; balanced: (0.5 + 0 + 1) / 2 = 0.75.
        ([0.5, 0.95, 0.05, 0.95], [0, 1, 1, 1], ["F", "D", "D", "E"], 0.75, 2 / 3),
        # one sample per template: balanced equals plain.
        ([0.1, 0.6, 0.3, 0.7], [0, 0, 1, 1], ["a", "b", "c", "d"], 0.75, 0.75),
    ],
)
def test_template_balanced_auroc(
    scores: list[float], labels: list[int], templates: list[str], balanced: float, plain: float
) -> None:
    flags = [bool(v) for v in labels]
    assert m.template_balanced_auroc(scores, flags, templates) == pytest.approx(balanced)
    known = [s for s, f in zip(scores, flags, strict=True) if not f]
    novel = [s for s, f in zip(scores, flags, strict=True) if f]
    assert m.auroc(known, novel) == pytest.approx(plain)


def test_template_weights_are_per_class() -> None:
    # The same template name in both classes is counted separately per class.
    w = m.template_weights([False, False, True], ["T", "T", "T"])
    assert w.tolist() == pytest.approx([0.5, 0.5, 1.0])


def test_template_balanced_one_class_is_nan() -> None:
    assert math.isnan(m.template_balanced_auroc([0.1, 0.2], [False, False], ["a", "b"]))


@pytest.mark.parametrize(
    ("predicted", "true", "expected"),
    [
        (["a", "b", None], ["a", "a", "a"], 1 / 3),
        (["a", "b"], ["a", "b"], 1.0),
        ([None, None], ["a", "b"], 0.0),
        (["b", "a", "c", "c"], ["a", "a", "c", "d"], 0.5),
    ],
)
def test_recall_at_1(predicted: list[str | None], true: list[str], expected: float) -> None:
    assert m.recall_at_1(predicted, true) == pytest.approx(expected)


def test_recall_at_1_empty_is_nan_and_length_checked() -> None:
    assert math.isnan(m.recall_at_1([], []))
    with pytest.raises(ValueError):
        m.recall_at_1(["a"], [])


@pytest.mark.parametrize(
    ("flags", "false_esc", "missed"),
    [
        ([True, False, False, False], 0.25, 0.75),
        ([True, True], 1.0, 0.0),
        ([False], 0.0, 1.0),
    ],
)
def test_escalation_rates(flags: list[bool], false_esc: float, missed: float) -> None:
    assert m.false_escalation_rate(flags) == pytest.approx(false_esc)
    assert m.missed_novelty_rate(flags) == pytest.approx(missed)


@pytest.mark.parametrize(
    ("decisions", "actions", "expected", "wrong"),
    [
        # wrong action replayed; novel (expected None) replayed; review never counts.
        (["replay", "replay", "review", "replay"], ["x", "y", "x", None], ["x", "x", "y", None], 2),
        (["replay", "escalate"], ["x", None], [None, None], 1),  # any novel replay is wrong
        (["replay", "replay"], ["x", "z"], [{"x", "y"}, {"x", "y"}], 1),  # sets of right actions
        (["replay"], [None], ["x"], 1),  # a replay without resolution is wrong
        (["review", "escalate"], ["y", "y"], ["x", "x"], 0),
    ],
)
def test_wrong_replays(
    decisions: list[str], actions: list[str | None], expected: list[m.Expected], wrong: int
) -> None:
    assert m.wrong_replays(decisions, actions, expected) == wrong


@pytest.mark.parametrize(
    ("decisions", "actions", "expected", "rate"),
    [
        (["replay", "replay", "review"], ["x", "y", "x"], ["x", "x", "x"], 1 / 3),
        (["replay", "replay"], ["x", "y"], ["x", "y"], 1.0),
        (["escalate", "review"], [None, "x"], ["x", "x"], 0.0),
    ],
)
def test_replay_rate_known(
    decisions: list[str], actions: list[str | None], expected: list[m.Expected], rate: float
) -> None:
    assert m.replay_rate_known(decisions, actions, expected) == pytest.approx(rate)


def test_replay_metrics_check_lengths() -> None:
    with pytest.raises(ValueError):
        m.wrong_replays(["replay"], [], ["x"])
    assert math.isnan(m.replay_rate_known([], [], []))


def test_max_cosine_novelty() -> None:
    kb = np.array([[1.0, 0.0], [0.0, 1.0]])
    q = np.array([[1.0, 0.0], [0.6, 0.8], [-1.0, 0.0]])
    score, best = m.max_cosine_novelty(q, kb)
    assert score.tolist() == pytest.approx([0.0, 0.2, 1.0])
    assert best.tolist() == [0, 1, 1]  # cos -1 vs 0: the orthogonal row is nearer


def _lines(counts: dict[str, int]) -> list[LogLine]:
    out: list[LogLine] = []
    for t, n in counts.items():
        for i in range(n):
            out.append(LogLine(f"{t} line {i}", t, f"{t} <*>", len(out)))
    return out


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_split_partitions_by_template(seed: int) -> None:
    counts = {f"E{i}": n for i, n in enumerate([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])}
    lines = _lines(counts)
    s = split(lines, seed)
    assert len(s.known_templates) == 7 and len(s.novel_templates) == 3
    assert sorted(s.kb + s.known + s.novel, key=lambda x: x.line_no) == sorted(
        lines, key=lambda x: x.line_no
    )
    assert {x.event_id for x in s.novel} == set(s.novel_templates)
    assert {x.event_id for x in s.kb} == set(s.known_templates)  # every known template in KB
    for t in s.known_templates:
        n_kb = sum(x.event_id == t for x in s.kb)
        assert n_kb == max(1, counts[t] // 2)
    assert {x.event_id for x in s.known} <= set(s.known_templates)
    assert split(lines, seed) == s  # seeded


def test_split_singleton_goes_to_kb_and_cap_applies() -> None:
    lines = _lines({"A": 1, "B": 50})
    s = split(lines, 0, known_fraction=1.0, max_per_template=10)
    assert [x.event_id for x in s.kb].count("A") == 1
    assert all(x.event_id == "B" for x in s.known)
    assert len(s.kb) + len(s.known) == 11


def test_to_event_shapes() -> None:
    line = LogLine("x" * 2500, "E3", "<*>", 0)
    kb = to_event(line, "HDFS", idx=4, with_resolution=True)
    assert kb["id"] == "HDFS-4" and len(kb["title"]) == 2000
    assert kb["resolution"] == {"action": "apply runbook for HDFS E3", "automatable": True}
    assert kb["outcome"] == "resolved"
    q = to_event(line, "HDFS", idx=5, with_resolution=False)
    assert set(q) == {"id", "title", "service", "source"}


def test_calibration_curve_replays_the_services_own_call() -> None:
    """``novel_at`` re-decides a verdict at another α as the service would: by p-value against
    the effective level, by the fixed raw threshold where there was no reference, never for an
    exact repeat, always above the scorer's largest threshold."""
    from bench.quality import Outcomes, novel_at

    o = Outcomes(p_value=[0.04, 0.04, 0.5, 0.9, 0.04], dup_rate=[0.0, 0.5, 0.0, 0.0, 0.0],
                 exact=[False, False, False, False, True], raw=[0.2, 0.2, 0.3, 1.2, 0.2],
                 raw_threshold=[0.1, 0.1, 0.25, 0.5, 0.1],
                 reference_size=[30.0, 30.0, 0.0, 30.0, 30.0])
    assert novel_at(o, 0.05) == [True, True, True, True, False]
    # α = 0.02: the first needs p ≤ 0.02, the second (half the KB repeats) p ≤ 0.04.
    assert novel_at(o, 0.02) == [False, True, True, True, False]
    o.raw[2] = 0.2  # below the fixed threshold of a service without a reference
    assert novel_at(o, 0.5)[2] is False
