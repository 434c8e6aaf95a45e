"""The ingest adapters and /metrics, through the app."""

from __future__ import annotations

import re
from typing import Any

from fastapi.testclient import TestClient

AM: dict[str, Any] = {
    "version": "4", "groupKey": "{}:{alertname=\"DiskFull\"}", "status": "firing",
    "receiver": "deja", "groupLabels": {"alertname": "DiskFull"}, "commonLabels": {},
    "commonAnnotations": {}, "externalURL": "http://alertmanager:9093", "truncatedAlerts": 0,
    "alerts": [
        {"status": "firing", "labels": {"alertname": "DiskFull", "instance": "db-1:9100",
                                        "job": "node", "severity": "warning"},
         "annotations": {"summary": "Disk almost full on db-1", "description": "92% used"},
         "startsAt": "2026-11-27T06:00:00Z", "endsAt": "0001-01-01T00:00:00Z",
         "generatorURL": "http://prometheus:9090/graph", "fingerprint": "a1b2c3d4e5f60718"},
        {"status": "resolved", "labels": {"alertname": "CPUHigh", "instance": "web-1:9100"},
         "annotations": {"summary": "CPU high"}, "startsAt": "2026-11-27T05:00:00Z",
         "endsAt": "2026-11-27T05:30:00Z", "generatorURL": "", "fingerprint": "0f0e0d0c0b0a0908"},
    ],
}


def _metric(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_alertmanager_checks_firing_alerts_once(client: TestClient) -> None:
    r = client.post("/v1/ingest/alertmanager", json=AM)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["results"]) == 1 and len(body["resolved"]) == 1
    decision_id = body["results"][0]["decision_id"]
    assert any(d["decision_id"] == decision_id
               for d in client.get("/v1/decisions").json()["decisions"])
    again = client.post("/v1/ingest/alertmanager", json=AM).json()
    assert again["results"] == [] and again["duplicates"] == body["ids"]


def test_alertmanager_malformed_is_a_4xx_naming_the_field(client: TestClient) -> None:
    bad = {**AM, "alerts": [{**AM["alerts"][0], "labels": {"instance": "x"}}]}
    r = client.post("/v1/ingest/alertmanager", json=bad)
    assert r.status_code == 422
    assert r.json()["error"]["field"].startswith("alerts[0].labels")


def test_pagerduty_trigger_accepted_and_malformed_refused(client: TestClient) -> None:
    ok = client.post("/v1/ingest/pagerduty", json={
        "routing_key": "R0UTINGKEY", "event_action": "trigger", "dedup_key": "srv-1",
        "payload": {"summary": "API latency above 2s", "source": "api-1",
                    "severity": "error", "component": "api"}})
    assert ok.status_code == 202 and ok.json()["verdict"]["decision_id"]
    assert "R0UTINGKEY" not in ok.text
    bad = client.post("/v1/ingest/pagerduty", json={"event_action": "trigger",
                                                    "payload": {"source": "x"}})
    assert 400 <= bad.status_code < 500 and bad.json()["error"]["field"]


def test_metrics_are_exposed_without_a_key_and_move(client: TestClient,
                                                    anonymous: TestClient) -> None:
    assert anonymous.get("/metrics").status_code == 200
    before = client.get("/metrics")
    for name in ("deja_decisions_total", "deja_check_duration_seconds", "deja_novelty_score",
                 "deja_escalations_open", "deja_kb_incidents", "deja_index_vectors",
                 "deja_embedding_cache_hits_total", "deja_embedding_cache_misses_total",
                 "deja_handoff_ack_seconds", "deja_handoff_resolve_seconds"):
        assert re.search(rf"^# (HELP|TYPE) {name}", before.text, re.M), name
    client.post("/v1/events", json={"events": [{"title": "Disk full on db-1"}]})
    client.post("/v1/check", json={"title": "Kernel panic on db-7"})
    after = client.get("/metrics").text
    assert _metric(after, "deja_decisions_total") == _metric(before.text,
                                                            "deja_decisions_total") + 1
    assert _metric(after, "deja_kb_incidents") == 1
    assert _metric(after, "deja_check_duration_seconds_count") >= 1
