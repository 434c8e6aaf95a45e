"""The alert catalogue, event rendering, known/novel scenarios and the demo KB (no model needed)."""

from __future__ import annotations

import random
import re
from collections import Counter, defaultdict
from typing import Any

import pytest

from api.scenarios import (
    SEVERITIES,
    AlertRule,
    alert_name,
    demo_checks,
    demo_expected,
    demo_kb,
    load_catalogue,
    make_scenario,
    normalize_severity,
    render_event,
    resolution_for,
    service_slug,
)

RFC3339_UTC = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$")
EVENT_KEYS = {"id", "title", "text", "service", "severity", "source", "labels", "occurred_at"}


@pytest.fixture(scope="module")
def catalogue() -> list[AlertRule]:
    return load_catalogue()


@pytest.fixture(scope="module")
def scenario_small() -> Any:
    return make_scenario(7, max_rules=200)


def _rule(catalogue: list[AlertRule], service: str, name_part: str) -> AlertRule:
    return next(r for r in catalogue if r.service == service and name_part in r.name.lower())


def _check_event_limits(event: dict[str, Any]) -> None:
    """The Event limits and types of API.md."""
    assert 1 <= len(event["title"]) <= 2000
    assert len(event.get("text", "")) <= 20000
    assert len(event["id"]) <= 128
    assert event["severity"] in SEVERITIES
    assert RFC3339_UTC.match(event["occurred_at"])
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in event["labels"].items())
    if "outcome" in event:
        assert event["outcome"] in ("resolved", "failed", "unknown")


# --------------------------------------------------------------------------------------------
# Catalogue


def test_catalogue_is_large_with_valid_severities(catalogue: list[AlertRule]) -> None:
    assert len(catalogue) >= 1100
    assert {r.severity for r in catalogue} <= set(SEVERITIES)
    assert len({r.service for r in catalogue}) >= 80
    assert all(r.name and r.description and r.query for r in catalogue)


def test_rule_keys_are_unique(catalogue: list[AlertRule]) -> None:
    keys = [r.key for r in catalogue]
    assert len(keys) == len(set(keys))
    assert catalogue[0].key == f"{catalogue[0].service}/{catalogue[0].name}"


def test_load_catalogue_returns_fresh_list(catalogue: list[AlertRule]) -> None:
    again = load_catalogue()
    assert again == catalogue
    assert again is not catalogue


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("critical", "critical"),
        ("CRITICAL", "critical"),
        ("page", "critical"),
        ("error", "error"),
        ("major", "error"),
        ("warning", "warning"),
        ("warn", "warning"),
        ("info", "info"),
        ("none", "info"),
        ("something-odd", "warning"),
        (None, "warning"),
    ],
)
def test_normalize_severity(raw: object, expected: str) -> None:
    assert normalize_severity(raw) == expected


@pytest.mark.parametrize(
    ("service", "slug"),
    [("PostgreSQL", "postgresql"), ("Host and hardware", "node"), ("SSL/TLS", "tls-certificates"),
     ("Apache Flink", "flink"), ("PHP-FPM", "php-fpm")],
)
def test_service_slug(service: str, slug: str) -> None:
    assert service_slug(service) == slug


def test_service_slugs_are_distinct(catalogue: list[AlertRule]) -> None:
    services = {r.service for r in catalogue}
    assert len({service_slug(s) for s in services}) == len(services)


def test_alert_name_is_camel_case(catalogue: list[AlertRule]) -> None:
    rule = _rule(catalogue, "PostgreSQL", "too many connections")
    assert alert_name(rule) == "PostgresqlTooManyConnections"
    assert all(re.fullmatch(r"[A-Za-z0-9]+", alert_name(r)) for r in catalogue)


# --------------------------------------------------------------------------------------------
# Rendering


@pytest.mark.parametrize("index", [0, 100, 400, 800, 1100])
def test_render_is_seeded(catalogue: list[AlertRule], index: int) -> None:
    rule = catalogue[index]
    a = render_event(rule, random.Random(42), with_resolution=True)
    b = render_event(rule, random.Random(42), with_resolution=True)
    assert a == b


@pytest.mark.parametrize("index", [0, 57, 250, 600, 999])
def test_renders_differ_but_keep_the_rule(catalogue: list[AlertRule], index: int) -> None:
    rule = catalogue[index]
    rng = random.Random(1)
    a = render_event(rule, rng, with_resolution=False)
    b = render_event(rule, rng, with_resolution=False)
    assert a["id"] != b["id"]
    assert (a["title"], a["text"], a["labels"]) != (b["title"], b["text"], b["labels"])
    for e in (a, b):
        assert e["labels"]["alertname"] == alert_name(rule)
        assert e["severity"] == rule.severity
        assert e["source"] == "prometheus"
        assert "resolution" not in e and "outcome" not in e
        assert set(e) >= EVENT_KEYS


def test_render_shape_over_whole_catalogue(catalogue: list[AlertRule]) -> None:
    rng = random.Random(3)
    for rule in catalogue:
        event = render_event(rule, rng, with_resolution=True)
        _check_event_limits(event)
        # Go templates of the descriptions are expanded, never shown raw.
        assert "{{" not in event["title"] + event["text"]
        # The rule stays recognisable: its name or alertname is in the title or text.
        blob = event["title"] + "\n" + event["text"]
        assert rule.name in blob or alert_name(rule) in blob or rule.name.lower() in blob
        assert event["resolution"] == resolution_for(rule)


def test_render_expands_labels_and_values(catalogue: list[AlertRule]) -> None:
    rule = next(r for r in catalogue if "{{ $labels.instance }}" in r.description)
    event = render_event(rule, random.Random(5), with_resolution=False)
    assert event["labels"]["instance"] in event["text"]


def test_service_is_realistic(catalogue: list[AlertRule]) -> None:
    rule = _rule(catalogue, "PostgreSQL", "too many connections")
    rng = random.Random(9)
    services = {render_event(rule, rng, with_resolution=False)["service"] for _ in range(40)}
    assert "postgresql" in services
    assert all(s == "postgresql" or s.endswith("-postgresql") for s in services)


def test_outcomes_mostly_resolved(catalogue: list[AlertRule]) -> None:
    rng = random.Random(11)
    outcomes = Counter(
        render_event(r, rng, with_resolution=True)["outcome"] for r in catalogue[:600]
    )
    assert set(outcomes) <= {"resolved", "failed"}
    assert outcomes["resolved"] > 0.8 * 600
    assert outcomes["failed"] > 0


# --------------------------------------------------------------------------------------------
# Resolutions


def test_resolution_deterministic_per_rule(catalogue: list[AlertRule]) -> None:
    rule = _rule(catalogue, "PostgreSQL", "too many connections")
    res = resolution_for(rule)
    assert set(res) == {"action", "runbook", "rollback", "automatable"}
    assert res == resolution_for(rule)
    assert res["runbook"].startswith("https://runbooks.example.com/")
    assert isinstance(res["automatable"], bool)
    rng = random.Random(0)
    actions = {render_event(rule, rng, with_resolution=True)["resolution"]["action"]
               for _ in range(10)}
    assert actions == {res["action"]}


def test_resolutions_differ_between_rules(catalogue: list[AlertRule]) -> None:
    actions = [resolution_for(r)["action"] for r in catalogue]
    runbooks = [resolution_for(r)["runbook"] for r in catalogue]
    assert len(set(actions)) == len(catalogue)
    assert len(set(runbooks)) == len(catalogue)


# --------------------------------------------------------------------------------------------
# Scenarios


def test_scenario_holds_out_whole_services(
    catalogue: list[AlertRule], scenario_small: Any
) -> None:
    sc = scenario_small
    by_key = {r.key: r for r in catalogue}
    kb_services = {by_key[k].service for k in sc.kb_rules}
    known_services = {by_key[k].service for k in sc.known_rules}
    novel_services = {by_key[k].service for k in sc.novel_rules}
    assert novel_services
    assert novel_services.isdisjoint(kb_services)
    assert known_services <= kb_services
    assert set(sc.novel_services) >= novel_services
    # No rule of a held-out service is in the sampled KB at all, and every known rule is.
    assert set(sc.known_rules) == set(sc.kb_rules)
    # The rendered service names do not leak across the split either.
    assert {e["service"] for e in sc.kb}.isdisjoint(e["service"] for e in sc.novel)


def test_scenario_sizes_and_alignment(catalogue: list[AlertRule], scenario_small: Any) -> None:
    sc = scenario_small
    by_key = {r.key: r for r in catalogue}
    assert len(sc.kb) == len(sc.kb_rules)
    assert len(sc.known) == len(sc.known_rules)
    assert len(sc.novel) == len(sc.novel_rules)
    kb_counts = Counter(sc.kb_rules)
    assert set(kb_counts.values()) == {3}
    assert set(Counter(sc.known_rules).values()) == {2}
    assert set(Counter(sc.novel_rules).values()) == {2}
    assert len(kb_counts) + len(set(sc.novel_rules)) == 200
    for event, key in zip(sc.kb, sc.kb_rules, strict=True):
        assert event["labels"]["alertname"] == alert_name(by_key[key])
    for event, key in zip(sc.novel, sc.novel_rules, strict=True):
        assert event["labels"]["alertname"] == alert_name(by_key[key])


def test_scenario_events_carry_no_truth(scenario_small: Any) -> None:
    sc = scenario_small
    for e in sc.known + sc.novel:
        assert "resolution" not in e and "outcome" not in e
        assert not any("scenario" in k or "rule" in k for k in e["labels"])
    for e in sc.kb:
        assert "resolution" in e and e["outcome"] in ("resolved", "failed")
        assert not any("scenario" in k for k in e["labels"])


def test_scenario_ids_unique_and_limits(scenario_small: Any) -> None:
    sc = scenario_small
    events = sc.kb + sc.known + sc.novel
    assert len({e["id"] for e in events}) == len(events)
    for e in events:
        _check_event_limits(e)


def test_scenario_known_queries_are_fresh(scenario_small: Any) -> None:
    sc = scenario_small
    kb_texts = {(e["title"], e["text"]) for e in sc.kb}
    fresh = sum((e["title"], e["text"]) not in kb_texts for e in sc.known)
    assert fresh >= 0.95 * len(sc.known)


def test_scenario_is_seeded() -> None:
    a = make_scenario(3, max_rules=60)
    b = make_scenario(3, max_rules=60)
    c = make_scenario(4, max_rules=60)
    assert a == b
    assert (a.kb, a.novel_services) != (c.kb, c.novel_services)


@pytest.mark.parametrize("fraction", [0.1, 0.3, 0.6])
def test_holdout_fraction_counts_services(catalogue: list[AlertRule], fraction: float) -> None:
    sc = make_scenario(1, holdout_fraction=fraction, kb_per_rule=1, queries_per_rule=1)
    n_services = len({r.service for r in catalogue})
    assert len(sc.novel_services) == round(fraction * n_services)


def test_default_scenario_covers_catalogue(catalogue: list[AlertRule]) -> None:
    sc = make_scenario(0, kb_per_rule=1, queries_per_rule=1)
    assert len(set(sc.known_rules)) + len(set(sc.novel_rules)) == len(catalogue)


@pytest.mark.parametrize(
    "kwargs",
    [{"holdout_fraction": 0.0}, {"holdout_fraction": 1.0}, {"kb_per_rule": 0},
     {"queries_per_rule": 0}, {"max_rules": 1}],
)
def test_scenario_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        make_scenario(0, **kwargs)


# --------------------------------------------------------------------------------------------
# Demo


def test_demo_kb_shape() -> None:
    kb = demo_kb(0)
    assert 300 <= len(kb) <= 600
    assert kb == demo_kb(0)
    assert len({e["id"] for e in kb}) == len(kb)
    for e in kb:
        _check_event_limits(e)
        assert e["resolution"]["action"]
        assert e["outcome"] in ("resolved", "failed")


def test_demo_kb_has_consistent_conflicting_and_failing_rules() -> None:
    kb = demo_kb(0)
    actions: dict[str, set[str]] = defaultdict(set)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for e in kb:
        name = e["labels"]["alertname"]
        actions[name].add(e["resolution"]["action"])
        outcomes[name][e["outcome"]] += 1
    conflicting = {n for n, a in actions.items() if len(a) > 1}
    failing = {n for n, c in outcomes.items() if c["failed"] > c["resolved"]}
    clean = {n for n in actions if n not in conflicting and outcomes[n]["failed"] == 0}
    assert 2 <= len(conflicting) <= 10
    assert 2 <= len(failing) <= 10
    assert len(clean) > 0.8 * len(actions)


def test_demo_checks_match_expectations() -> None:
    checks = demo_checks(0)
    expected = demo_expected(0)
    assert len(checks) == len(expected)
    assert set(expected) == {"replay", "review", "escalate"}
    assert checks == demo_checks(0)
    assert len({e["id"] for e in checks}) == len(checks)
    kb = demo_kb(0)
    kb_ids = {e["id"] for e in kb}
    actions: dict[str, set[str]] = defaultdict(set)
    outcomes: dict[str, Counter[str]] = defaultdict(Counter)
    for e in kb:
        actions[e["labels"]["alertname"]].add(e["resolution"]["action"])
        outcomes[e["labels"]["alertname"]][e["outcome"]] += 1
    for event, decision in zip(checks, expected, strict=True):
        _check_event_limits(event)
        assert event["id"] not in kb_ids
        assert "resolution" not in event and "outcome" not in event
        name = event["labels"].get("alertname")
        if decision == "replay":
            assert len(actions[name]) == 1 and outcomes[name]["failed"] == 0
            assert event["severity"] != "critical"
        elif decision == "review":
            assert len(actions[name]) > 1 or outcomes[name]["failed"] > 0
        else:
            assert name is None
            assert event["source"] != "prometheus"

