"""Ingest adapters: Alertmanager webhook v4 and PagerDuty Events v2 payloads → API.md Events."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from api.adapters import (
    AdapterError,
    parse_alertmanager,
    parse_pagerduty,
)
from api.adapters.alertmanager import label_fingerprint
from api.schemas import EventIn
from kb import DejaError, InvalidInput

# -- fixtures: written from Alertmanager's webhook_config docs and a kube-prometheus setup -------

GENERATOR = ("http://prometheus-k8s-0:9090/graph?g0.expr=max_over_time%28kube_pod_container_"
             "status_waiting_reason%7Breason%3D%22CrashLoopBackOff%22%7D%5B5m%5D%29+%3E%3D+1"
             "&g0.tab=1")


def alertmanager_payload() -> dict[str, Any]:
    """A notification for a group with two firing alerts and one resolved alert."""
    return {
        "receiver": "deja",
        "status": "firing",
        "alerts": [
            {
                "status": "firing",
                "labels": {
                    "alertname": "KubePodCrashLooping",
                    "container": "checkout",
                    "job": "kube-state-metrics",
                    "namespace": "shop",
                    "pod": "checkout-7d9c6b9f5-x2x8q",
                    "prometheus": "monitoring/k8s",
                    "severity": "warning",
                },
                "annotations": {
                    "description": "Pod shop/checkout-7d9c6b9f5-x2x8q (checkout) is in waiting "
                                   "state (reason: \"CrashLoopBackOff\").",
                    "runbook_url": "https://runbooks.prometheus-operator.dev/runbooks/kubernetes/"
                                   "kubepodcrashlooping",
                    "summary": "Pod is crash looping.",
                },
                "startsAt": "2025-11-03T09:14:07.512838941Z",
                "endsAt": "0001-01-01T00:00:00Z",
                "generatorURL": GENERATOR,
                "fingerprint": "5c1f7d0a6f4e2b39",
            },
            {
                "status": "firing",
                "labels": {
                    "alertname": "NodeFilesystemSpaceFillingUp",
                    "device": "/dev/nvme0n1p1",
                    "fstype": "xfs",
                    "instance": "10.0.12.7:9100",
                    "job": "node-exporter",
                    "mountpoint": "/var/lib/containerd",
                    "namespace": "monitoring",
                    "severity": "critical",
                },
                "annotations": {
                    "description": "Filesystem on /dev/nvme0n1p1, mounted on "
                                   "/var/lib/containerd, at 10.0.12.7:9100 has only 2.91% "
                                   "available space left and is filling up fast.",
                    "summary": "Filesystem is predicted to run out of space within the next "
                               "4 hours.",
                },
                "startsAt": "2025-11-03T09:02:37.0Z",
                "endsAt": "2025-11-03T09:22:37.0Z",
                "generatorURL": "http://prometheus-k8s-1:9090/graph?g0.expr=node_filesystem"
                                "_avail_bytes&g0.tab=1",
                "fingerprint": "a3e9b7c2d1f04e58",
            },
            {
                "status": "resolved",
                "labels": {
                    "alertname": "TargetDown",
                    "job": "payments-api",
                    "namespace": "payments",
                    "service": "payments-api",
                    "severity": "warning",
                },
                "annotations": {
                    "description": "100% of the payments-api/payments-api targets in payments "
                                   "namespace are down.",
                    "summary": "One or more targets are unreachable.",
                },
                "startsAt": "2025-11-03T08:40:07Z",
                "endsAt": "2025-11-03T09:10:07Z",
                "generatorURL": "http://prometheus-k8s-0:9090/graph?g0.expr=up&g0.tab=1",
                "fingerprint": "0f4c1e2d3b5a6978",
            },
        ],
        "groupLabels": {"namespace": "shop"},
        "commonLabels": {"prometheus": "monitoring/k8s"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager-main-0:9093",
        "version": "4",
        "groupKey": "{}/{severity=~\"warning|critical\"}:{namespace=\"shop\"}",
        "truncatedAlerts": 0,
    }


def pagerduty_trigger() -> dict[str, Any]:
    """PagerDuty's documented Events v2 trigger example."""
    return {
        "payload": {
            "summary": "Example alert on host1.example.com",
            "timestamp": "2015-07-17T08:42:58.315+0000",
            "severity": "info",
            "source": "monitoringtool:cloudvendor:central-region-dc-01:852559987:cluster/"
                      "api-stats-prod-003",
            "component": "postgres",
            "group": "prod-datapipe",
            "class": "deploy",
            "custom_details": {
                "ping time": "1500ms",
                "load avg": 0.75,
            },
        },
        "routing_key": "R0123456789abcdef0123456789abcdef",
        "dedup_key": "srv01/HTTP",
        "event_action": "trigger",
        "client": "Sample Monitoring Service",
        "client_url": "https://monitoring.example.com",
        "links": [{"href": "http://pagerduty.example.com", "text": "An example link."}],
        "images": [{"src": "https://www.pagerduty.com/wp-content/uploads/2016/05/"
                           "pagerduty-logo-green.png",
                    "href": "https://example.com/", "alt": "Example text"}],
    }


def pd_control(action: str, dedup_key: str | None = "srv01/HTTP") -> dict[str, Any]:
    body: dict[str, Any] = {"routing_key": "R0123456789abcdef0123456789abcdef",
                            "event_action": action}
    if dedup_key is not None:
        body["dedup_key"] = dedup_key
    return body


def alert(**changes: Any) -> dict[str, Any]:
    """A one-alert notification; ``changes`` replace top-level fields of that alert."""
    payload = alertmanager_payload()
    first = {**payload["alerts"][0], **changes}
    payload["alerts"] = [{k: v for k, v in first.items() if v is not _DROP}]
    return payload


_DROP = object()


# -- Alertmanager ------------------------------------------------------------------------------


def test_alertmanager_splits_firing_from_resolved_in_order() -> None:
    batch = parse_alertmanager(alertmanager_payload())
    assert [a.event["labels"]["alertname"] for a in batch.firing] == [
        "KubePodCrashLooping", "NodeFilesystemSpaceFillingUp"]
    assert [a.event["labels"]["alertname"] for a in batch.resolved] == ["TargetDown"]
    assert batch.receiver == "deja"
    assert batch.group_key is not None and "namespace" in batch.group_key
    assert batch.truncated == 0


def test_alertmanager_event_fields() -> None:
    crash = parse_alertmanager(alertmanager_payload()).firing[0]
    e = crash.event
    assert e["id"] == "am-5c1f7d0a6f4e2b39-2025-11-03T09:14:07.512838Z"
    assert e["title"] == "KubePodCrashLooping: Pod is crash looping."
    assert e["text"].splitlines() == [
        'Pod shop/checkout-7d9c6b9f5-x2x8q (checkout) is in waiting state (reason: '
        '"CrashLoopBackOff").',
        f"Source: {GENERATOR}"]
    assert e["service"] == "kube-state-metrics"
    assert e["severity"] == "warning"
    assert e["source"] == "alertmanager"
    assert e["labels"]["pod"] == "checkout-7d9c6b9f5-x2x8q"
    assert e["occurred_at"] == "2025-11-03T09:14:07.512838Z"
    assert crash.dedup_key == "5c1f7d0a6f4e2b39-2025-11-03T09:14:07.512838Z"
    assert crash.ended_at is None


def test_every_converted_alert_is_a_valid_event() -> None:
    batch = parse_alertmanager(alertmanager_payload())
    for converted in [*batch.firing, *batch.resolved]:
        event = EventIn.model_validate(converted.event)
        assert event.id == converted.event["id"]
        assert event.occurred_at is not None and event.occurred_at.tzinfo is not None


def test_resolved_alert_ended_at_and_firing_alert_has_none() -> None:
    batch = parse_alertmanager(alertmanager_payload())
    # A firing alert's endsAt is Alertmanager's resolve-timeout guess, not an end.
    assert batch.firing[1].ended_at is None
    assert batch.resolved[0].ended_at == datetime(2025, 11, 3, 9, 10, 7, tzinfo=UTC)


def test_resolved_with_zero_end_time_has_no_end() -> None:
    batch = parse_alertmanager(alert(status="resolved", endsAt="0001-01-01T00:00:00Z"))
    assert batch.resolved[0].ended_at is None


def test_retried_and_resolved_notifications_keep_ids() -> None:
    first = parse_alertmanager(alertmanager_payload())
    retry = alertmanager_payload()
    retry["alerts"].reverse()  # a later notification of the group may order alerts differently
    retry["groupKey"] = "changed"
    again = parse_alertmanager(retry)
    ids = {a.event["id"] for a in [*first.firing, *first.resolved]}
    assert ids == {a.event["id"] for a in [*again.firing, *again.resolved]}
    assert len(ids) == 3

    # The crash loop resolves later: same firing, same id and dedup key.
    done = alert(status="resolved", endsAt="2025-11-03T10:01:00Z")
    resolved = parse_alertmanager(done).resolved[0]
    assert resolved.event["id"] == first.firing[0].event["id"]
    assert resolved.dedup_key == first.firing[0].dedup_key


def test_a_new_firing_of_the_same_alert_gets_a_new_id() -> None:
    before = parse_alertmanager(alert()).firing[0]
    after = parse_alertmanager(alert(startsAt="2025-11-04T01:00:00Z")).firing[0]
    assert before.event["id"] != after.event["id"]
    assert before.dedup_key != after.dedup_key


@pytest.mark.parametrize("spelling", [
    "2025-11-03T09:14:07Z", "2025-11-03T09:14:07.000Z", "2025-11-03T10:14:07+01:00",
    "2025-11-03T09:14:07.000000000Z"])
def test_equal_start_instants_give_equal_ids(spelling: str) -> None:
    converted = parse_alertmanager(alert(startsAt=spelling)).firing[0]
    assert converted.event["id"] == "am-5c1f7d0a6f4e2b39-2025-11-03T09:14:07Z"
    assert converted.event["occurred_at"] == "2025-11-03T09:14:07Z"


@pytest.mark.parametrize(("labels", "fingerprint"), [
    # Test vectors of Prometheus' labelSetToFingerprint (prometheus/common model/signature_test.go).
    ({"name": "garland, briggs", "fear": "love is not enough"}, 5799056148416392346),
    ({"first-label": "first-label-value"}, 5146282821936882169),
    ({"first-label": "first-label-value", "second-label": "second-label-value"},
     3195800080984914717),
])
def test_label_fingerprint_matches_prometheus(labels: dict[str, str], fingerprint: int) -> None:
    assert label_fingerprint(labels) == f"{fingerprint:016x}"


@pytest.mark.parametrize("missing", [_DROP, "", None])
def test_missing_fingerprint_is_computed_from_labels(missing: object) -> None:
    payload = alert(fingerprint=missing)
    labels = payload["alerts"][0]["labels"]
    converted = parse_alertmanager(payload).firing[0]
    assert converted.dedup_key.startswith(label_fingerprint(labels) + "-")
    assert converted.event["id"] == "am-" + converted.dedup_key
    # Stable across retries, and label order does not matter.
    reordered = alert(fingerprint=missing, labels=dict(reversed(list(labels.items()))))
    assert parse_alertmanager(reordered).firing[0].event["id"] == converted.event["id"]


def test_overlong_id_is_hashed_stably() -> None:
    converted = parse_alertmanager(alert(fingerprint="f" * 200)).firing[0]
    event_id = converted.event["id"]
    assert event_id.startswith("am-") and len(event_id) <= 128
    assert parse_alertmanager(alert(fingerprint="f" * 200)).firing[0].event["id"] == event_id
    assert parse_alertmanager(alert(fingerprint="f" * 201)).firing[0].event["id"] != event_id
    EventIn.model_validate(converted.event)


@pytest.mark.parametrize(("labels", "service"), [
    ({"service": "payments-api", "job": "blackbox", "namespace": "payments"}, "payments-api"),
    ({"job": "node-exporter", "namespace": "monitoring"}, "node-exporter"),
    ({"app": "checkout", "namespace": "shop"}, "checkout"),
    ({"namespace": "shop"}, "shop"),
    ({"service": "  ", "job": "mysqld-exporter"}, "mysqld-exporter"),
    ({"instance": "db1:9104"}, None),
])
def test_service_comes_from_the_first_service_label(labels: dict[str, str],
                                                    service: str | None) -> None:
    event = parse_alertmanager(alert(labels={"alertname": "X", **labels})).firing[0].event
    assert event.get("service") == service


@pytest.mark.parametrize(("severity", "expected"), [
    ("critical", "critical"), ("warning", "warning"), ("WARNING", "warning"), ("info", "info"),
    ("page", "critical"), ("error", "error"), ("major", "error"), ("none", "info"),
    ("something-else", "warning"), (None, None),
])
def test_severity_is_normalised(severity: str | None, expected: str | None) -> None:
    labels = {"alertname": "Watchdog"}
    if severity is not None:
        labels["severity"] = severity
    event = parse_alertmanager(alert(labels=labels)).firing[0].event
    assert event.get("severity") == expected


def test_title_and_text_without_annotations() -> None:
    event = parse_alertmanager(alert(annotations=_DROP, generatorURL=_DROP)).firing[0].event
    assert event["title"] == "KubePodCrashLooping"
    assert "text" not in event
    legacy = parse_alertmanager(alert(annotations={"message": "old-style message"})).firing[0]
    assert legacy.event["text"].startswith("old-style message\nSource: ")


def test_status_falls_back_to_the_group_status() -> None:
    payload = alert(status=_DROP)
    payload["status"] = "resolved"
    assert len(parse_alertmanager(payload).resolved) == 1


def test_oversized_alert_still_fits_the_event_limits() -> None:
    labels = {"alertname": "Huge", "severity": "info"}
    labels |= {f"label_{i:03d}": "v" * 3000 for i in range(100)}
    payload = alert(labels=labels, annotations={"summary": "s" * 3000,
                                                "description": "d\x00" * 30000})
    event = parse_alertmanager(payload).firing[0].event
    assert len(event["labels"]) == 64 and event["labels"]["alertname"] == "Huge"
    assert event["labels"]["severity"] == "info"
    assert len(event["title"]) == 2000 and len(event["text"]) == 20000
    assert "\x00" not in event["text"]
    EventIn.model_validate(event)


def test_non_string_label_values_become_strings() -> None:
    labels = {"alertname": "QueueDepth", "shard": 3, "critical_path": True, "ratio": 0.5}
    event = parse_alertmanager(alert(labels=labels)).firing[0].event
    assert event["labels"] == {"alertname": "QueueDepth", "shard": "3",
                               "critical_path": "true", "ratio": "0.5"}


def test_empty_notification_has_no_alerts() -> None:
    payload = alertmanager_payload()
    payload["alerts"] = []
    batch = parse_alertmanager(payload)
    assert batch.firing == [] and batch.resolved == []


def _broken(path: str, value: Any) -> dict[str, Any]:
    """The fixture with one field (a dotted path with [i] indexes) replaced or removed."""
    payload = copy.deepcopy(alertmanager_payload())
    *parents, last = path.replace("[", ".").replace("]", "").split(".")
    node: Any = payload
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    if value is _DROP:
        del node[int(last) if last.isdigit() else last]
    else:
        node[int(last) if last.isdigit() else last] = value
    return payload


@pytest.mark.parametrize(("path", "value", "field"), [
    ("version", "3", "version"),
    ("alerts", _DROP, "alerts"),
    ("alerts", {"0": {}}, "alerts"),
    ("alerts", "KubePodCrashLooping", "alerts"),
    ("alerts[0]", "oops", "alerts[0]"),
    ("alerts[1].labels", _DROP, "alerts[1].labels"),
    ("alerts[1].labels", ["alertname", "X"], "alerts[1].labels"),
    ("alerts[0].labels.alertname", _DROP, "alerts[0].labels.alertname"),
    ("alerts[2].labels.alertname", "   ", "alerts[2].labels.alertname"),
    ("alerts[0].status", "pending", "alerts[0].status"),
    ("alerts[0].startsAt", _DROP, "alerts[0].startsAt"),
    ("alerts[0].startsAt", "yesterday", "alerts[0].startsAt"),
    ("alerts[0].startsAt", 1730625247, "alerts[0].startsAt"),
    ("alerts[0].startsAt", "0001-01-01T00:00:00Z", "alerts[0].startsAt"),
    ("alerts[2].endsAt", "2025-13-01T00:00:00Z", "alerts[2].endsAt"),
    ("alerts[0].annotations", "summary", "alerts[0].annotations"),
    ("alerts[0].fingerprint", 1234, "alerts[0].fingerprint"),
    ("alerts[1].generatorURL", ["http://x"], "alerts[1].generatorURL"),
])
def test_malformed_alertmanager_payload_names_the_field(path: str, value: Any,
                                                        field: str) -> None:
    with pytest.raises(AdapterError) as info:
        parse_alertmanager(_broken(path, value))
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize("body", [[], "alerts", None, 4])
def test_alertmanager_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(AdapterError) as info:
        parse_alertmanager(body)
    assert info.value.field == "body"


def test_adapter_error_is_an_invalid_input() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_alertmanager({"version": "4"})
    assert isinstance(info.value, DejaError) and info.value.field == "alerts"


label_names = st.text(min_size=1, max_size=300).filter(lambda s: bool(s.strip()))


@given(labels=st.dictionaries(label_names, st.text(max_size=3000), max_size=80),
       summary=st.text(max_size=50), description=st.text(max_size=300))
def test_any_alert_converts_to_a_valid_event(labels: dict[str, str], summary: str,
                                             description: str) -> None:
    payload = alert(labels={**labels, "alertname": "Prop"}, fingerprint=_DROP,
                    annotations={"summary": summary, "description": description})
    converted = parse_alertmanager(payload).firing[0]
    EventIn.model_validate(converted.event)
    assert parse_alertmanager(payload).firing[0].event == converted.event


# -- PagerDuty ---------------------------------------------------------------------------------


def test_pagerduty_trigger_event_fields() -> None:
    parsed = parse_pagerduty(pagerduty_trigger())
    assert parsed.action == "trigger" and parsed.dedup_key == "srv01/HTTP"
    e = parsed.event
    assert e is not None
    assert e["id"] == "pd-srv01/HTTP"
    assert e["title"] == "Example alert on host1.example.com"
    assert e["service"] == "postgres"
    assert e["severity"] == "info"
    assert e["source"] == "pagerduty"
    assert e["labels"] == {
        "source": "monitoringtool:cloudvendor:central-region-dc-01:852559987:cluster/"
                  "api-stats-prod-003",
        "component": "postgres", "group": "prod-datapipe", "class": "deploy"}
    assert e["text"].splitlines() == ["ping time: 1500ms", "load avg: 0.75",
                                      "An example link.: http://pagerduty.example.com"]
    assert e["occurred_at"] == "2015-07-17T08:42:58.315000Z"
    EventIn.model_validate(e)


def test_pagerduty_routing_key_never_reaches_the_event() -> None:
    body = pagerduty_trigger()
    del body["dedup_key"]
    event = parse_pagerduty(body).event
    assert event is not None
    assert body["routing_key"] not in repr(event)


@pytest.mark.parametrize("action", ["acknowledge", "resolve"])
def test_pagerduty_acknowledge_and_resolve_carry_no_event(action: str) -> None:
    parsed = parse_pagerduty(pd_control(action))
    assert (parsed.action, parsed.dedup_key, parsed.event) == (action, "srv01/HTTP", None)


def test_pagerduty_trigger_without_dedup_key_derives_a_stable_one() -> None:
    body = pagerduty_trigger()
    del body["dedup_key"]
    first = parse_pagerduty(body)
    retry = parse_pagerduty(copy.deepcopy(body))
    assert first.dedup_key == retry.dedup_key
    assert first.event is not None and retry.event is not None
    assert first.event["id"] == retry.event["id"] == f"pd-{first.dedup_key}"
    other = copy.deepcopy(body)
    other["payload"]["summary"] = "Example alert on host2.example.com"
    assert parse_pagerduty(other).dedup_key != first.dedup_key


def test_pagerduty_long_dedup_key_is_hashed() -> None:
    body = pagerduty_trigger()
    body["dedup_key"] = "k" * 255
    parsed = parse_pagerduty(body)
    assert parsed.dedup_key == "k" * 255
    assert parsed.event is not None
    assert parsed.event["id"].startswith("pd-") and len(parsed.event["id"]) <= 128
    retry = parse_pagerduty(copy.deepcopy(body)).event
    assert retry is not None and retry["id"] == parsed.event["id"]


@pytest.mark.parametrize(("drop", "service"), [
    ((), "postgres"), (("component",), "prod-datapipe"),
    (("component", "group"), "monitoringtool:cloudvendor:central-region-dc-01:852559987:"
                             "cluster/api-stats-prod-003"),
])
def test_pagerduty_service_falls_back(drop: tuple[str, ...], service: str) -> None:
    body = pagerduty_trigger()
    for name in drop:
        del body["payload"][name]
    event = parse_pagerduty(body).event
    assert event is not None and event["service"] == service


def test_pagerduty_minimal_trigger() -> None:
    body = {"routing_key": "R0123456789abcdef0123456789abcdef", "event_action": "trigger",
            "payload": {"summary": "DISK at 99% on machine prod-datapipe03.example.com",
                        "source": "prod-datapipe03.example.com", "severity": "Critical"}}
    event = parse_pagerduty(body).event
    assert event is not None
    assert event["severity"] == "critical"
    assert event["service"] == "prod-datapipe03.example.com"
    assert "text" not in event and "occurred_at" not in event
    EventIn.model_validate(event)


def test_pagerduty_string_custom_details() -> None:
    body = pagerduty_trigger()
    body["payload"]["custom_details"] = "free text from a legacy integration"
    del body["links"]
    event = parse_pagerduty(body).event
    assert event is not None and event["text"] == "free text from a legacy integration"


@pytest.mark.parametrize(("body", "field"), [
    ({**pagerduty_trigger(), "event_action": "escalate"}, "event_action"),
    ({k: v for k, v in pagerduty_trigger().items() if k != "event_action"}, "event_action"),
    (pd_control("acknowledge", None), "dedup_key"),
    (pd_control("resolve", ""), "dedup_key"),
    ({**pd_control("resolve"), "dedup_key": 42}, "dedup_key"),
    ({**pagerduty_trigger(), "dedup_key": ["srv01"]}, "dedup_key"),
    ({k: v for k, v in pagerduty_trigger().items() if k != "payload"}, "payload"),
    ({**pagerduty_trigger(), "payload": "DISK at 99%"}, "payload"),
    ({**pagerduty_trigger(), "links": {"href": "http://x"}}, "links"),
    ({**pagerduty_trigger(), "links": [{"text": "no href"}]}, "links[0].href"),
    ({**pagerduty_trigger(), "links": [{"href": "http://x"}, "http://y"]}, "links[1]"),
])
def test_malformed_pagerduty_body_names_the_field(body: dict[str, Any], field: str) -> None:
    with pytest.raises(AdapterError) as info:
        parse_pagerduty(body)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")


@pytest.mark.parametrize(("name", "value"), [
    ("summary", _DROP), ("summary", " "), ("source", _DROP), ("severity", _DROP),
    ("severity", "high"), ("severity", 3), ("timestamp", "17 July 2015"),
    ("component", 5432), ("group", {"name": "prod"}), ("class", ["deploy"]),
])
def test_malformed_pagerduty_payload_names_the_field(name: str, value: Any) -> None:
    body = pagerduty_trigger()
    if value is _DROP:
        del body["payload"][name]
    else:
        body["payload"][name] = value
    with pytest.raises(AdapterError) as info:
        parse_pagerduty(body)
    assert info.value.field == f"payload.{name}"


@pytest.mark.parametrize("body", [[], "trigger", None])
def test_pagerduty_body_must_be_an_object(body: Any) -> None:
    with pytest.raises(AdapterError) as info:
        parse_pagerduty(body)
    assert info.value.field == "body"
