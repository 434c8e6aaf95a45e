"""Keys and roles, versioned policies with two-person activation, audit, backtest, learning."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.deja import Deja
from api.settings import Settings
from embeddings import HashingEncoder
from tests.serving import Server

_FAMILIES = ["Disk full on host {h} volume data", "CPU throttled on node {h} core main",
             "VM Started on host {h} now", "Connection refused to db {h} port main",
             "Certificate expires for {h} soon ok", "Queue backlog on {h} size large",
             "Backup failed for {h} snapshot timeout", "DNS lookup failed for {h} resolver",
             "Redis evicting keys on {h} cache", "Nginx upstream timeout on {h} lb"]
_NATO = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
         "juliet", "kilo", "lima", "mike", "november", "oscar", "papa", "quebec", "romeo"]
_HOSTS = iter([a + b for a in _NATO for b in _NATO if a != b])


def _as(client: TestClient, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_keys_are_hashed_and_roles_nest(client: TestClient, deja: Deja) -> None:
    made = client.post("/v1/keys", json={"name": "bot", "role": "viewer"}).json()
    stored = deja.store.sql("SELECT key_hash FROM api_keys WHERE key_id = ?", [made["id"]])
    assert stored and made["key"] not in stored[0][0]
    listed = client.get("/v1/keys").json()["keys"]
    assert all("key" not in k for k in listed)
    viewer = _as(client, made["key"])
    assert client.get("/v1/stats", headers=viewer).status_code == 200
    assert client.post("/v1/check", json={"title": "x", "dry_run": True},
                       headers=viewer).status_code == 200
    r = client.post("/v1/check", json={"title": "x"}, headers=viewer)
    assert r.status_code == 403 and r.json()["error"]["code"] == "forbidden"
    assert client.post("/v1/keys/" + made["id"] + "/revoke").status_code == 200
    assert client.get("/v1/stats", headers=viewer).status_code == 401


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
def test_without_a_valid_key_every_api_route_is_401(anonymous: TestClient,
                                                    header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, url in [("GET", "/v1/stats"), ("POST", "/v1/check"), ("GET", "/v1/audit"),
                        ("POST", "/v1/events"), ("GET", "/v1/policies/active")]:
        r = anonymous.request(method, url, headers=headers, json={"title": "x"})
        assert r.status_code == 401, (method, url)
        assert r.json()["error"]["field"] == "authorization"
    assert anonymous.get("/healthz").status_code == 200


def test_two_person_rule_and_a_new_version_applies_to_the_next_verdict(
        client: TestClient) -> None:
    approver = client.post("/v1/keys", json={"name": "bob", "role": "approver"}).json()
    proposed = client.post("/v1/policies", json={"alpha": 0.02, "note": "fewer pages"})
    assert proposed.status_code == 201
    v = proposed.json()["version"]
    assert proposed.json()["state"] == "proposed"
    own = client.post(f"/v1/policies/{v}/activate")
    assert own.status_code == 403
    ok = client.post(f"/v1/policies/{v}/activate", headers=_as(client, approver["key"]))
    assert ok.status_code == 200 and ok.json()["state"] == "active"
    assert client.get("/v1/policies/active").json()["alpha"] == 0.02
    verdict = client.post("/v1/check", json={"title": "Disk full on db-1"}).json()
    assert verdict["policy_version"] == v
    audit = client.get("/v1/audit", params={"action": "policy.activate"}).json()["entries"]
    assert audit[0]["actor"] == "bob" and audit[0]["target"] == f"v{v}"
    again = client.post(f"/v1/policies/{v}/activate", headers=_as(client, approver["key"]))
    assert again.status_code == 409


@pytest.mark.parametrize(("body", "field"), [
    ({"alpha": 1.5}, "alpha"),
    ({"service_alpha": {"db": 0.9}}, "service_alpha"),
    ({"routing": {"default": {"ack_minutes": -1}}}, "routing"),
    ({"automate_severities": ["urgent"]}, "automate_severities"),
])
def test_a_bad_proposal_is_a_4xx_naming_the_field(client: TestClient, body: dict[str, Any],
                                                  field: str) -> None:
    r = client.post("/v1/policies", json=body)
    assert r.status_code == 422
    assert r.json()["error"]["field"].startswith(field)
    assert len(client.get("/v1/policies").json()["policies"]) == 1


def test_webhook_urls_never_leave_in_policies_or_audit(client: TestClient) -> None:
    secret = "https://hooks.example.com/services/T000/SECRET-TOKEN"
    routing = {"default": {"name": "default", "team": "ops", "role": "on-call",
                           "channel": "#ops", "ack_minutes": 5, "resolve_minutes": 60,
                           "webhooks": [{"url": secret, "format": "slack"}]}, "rules": []}
    v = client.post("/v1/policies", json={"routing": routing}).json()["version"]
    shown = client.get(f"/v1/policies/{v}").text + client.get("/v1/audit").text
    assert "SECRET-TOKEN" not in shown and "hooks.example.com" in shown


def test_every_mutation_is_audited_with_its_actor(client: TestClient) -> None:
    operator = client.post("/v1/keys", json={"name": "olga", "role": "operator"}).json()
    op = _as(client, operator["key"])
    client.post("/v1/events", json={"events": [{"title": "Disk full on db-1"}]}, headers=op)
    verdict = client.post("/v1/check", json={"title": "Kernel panic on db-1"}, headers=op).json()
    client.post(f"/v1/decisions/{verdict['decision_id']}/feedback",
                json={"correct": False, "novel": True}, headers=op)
    client.post(f"/v1/decisions/{verdict['decision_id']}/override",
                json={"decision": "review", "note": "check by hand"}, headers=op)
    actions = {(e["action"], e["actor"]) for e in client.get("/v1/audit").json()["entries"]}
    assert {("ingest", "olga"), ("feedback", "olga"), ("decision.override", "olga"),
            ("key.create", "admin")} <= actions


@pytest.fixture
def billing(tmp_path: Path) -> Iterator[tuple[Deja, TestClient]]:
    deja = Deja.open(tmp_path, encoder=HashingEncoder(64), settings=Settings(sweep_seconds=0))
    kb = [{"title": f.format(h=next(_HOSTS)), "service": "billing", "outcome": "resolved",
           "resolution": {"action": f"fix {i}"}} for i, f in enumerate(_FAMILIES)
          for _ in range(6)]
    with TestClient(create_app(deja), headers=_as_key(deja)) as client:
        assert client.post("/v1/events", json={"events": kb}).status_code == 201
        yield deja, client
    deja.close()


def _as_key(deja: Deja) -> dict[str, str]:
    assert deja.bootstrap_key is not None
    return {"Authorization": f"Bearer {deja.bootstrap_key}"}


def test_feedback_proposes_a_recalibrated_policy_that_backtests_better(
        billing: tuple[Deja, TestClient]) -> None:
    _, client = billing
    extra = ["again", "twice", "still", "later", "maybe"]
    escalated = 0
    for i in range(200):
        title = _FAMILIES[i % 10].format(h=next(_HOSTS)) + " " + extra[i % 5]
        v = client.post("/v1/check", json={"title": title, "service": "billing"}).json()
        if v["decision"] != "escalate":
            continue
        escalated += 1
        fb = client.post(f"/v1/decisions/{v['decision_id']}/feedback",
                         json={"correct": False, "novel": False, "note": "routine"})
        assert fb.status_code == 201
    assert escalated >= 100
    policies = client.get("/v1/policies").json()["policies"]
    learned = [p for p in policies if p["origin"] == "learned"]
    assert learned, "no proposal learned from 200 feedback events"
    proposal = learned[0]
    assert proposal["state"] == "proposed" and proposal["proposed_by"] == "deja-learner"
    assert client.get("/v1/policies/active").json()["version"] == 1
    assert proposal["service_threshold"]["billing"] > 0 or \
        proposal["service_alpha"]["billing"] < 0.05
    report = client.post(f"/v1/policies/{proposal['version']}/backtest").json()
    cand = report["candidate"]["services"]["billing"]
    active = report["active"]["services"]["billing"]
    assert cand["escalate_rate"] < active["escalate_rate"]
    assert cand["wrong_replays"] <= active["wrong_replays"]
    assert cand["unnecessary_escalations"] < active["unnecessary_escalations"]


@pytest.mark.slow
def test_roles_through_a_real_server(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    server.start()
    try:
        admin = server.client()
        anon = server.client(key="deja_not-a-key")
        assert anon.get("/v1/stats").status_code == 401
        keys = {role: admin.post("/v1/keys", json={"name": role, "role": role}).json()["key"]
                for role in ("viewer", "operator", "approver")}
        viewer, operator = server.client(keys["viewer"]), server.client(keys["operator"])
        approver = server.client(keys["approver"])
        assert viewer.post("/v1/events", json={"events": [{"title": "x"}]}).status_code == 403
        assert operator.post("/v1/events", json={"events": [
            {"title": "Disk full on db-1", "resolution": {"action": "clean up"},
             "outcome": "resolved"}]}).status_code == 201
        v = operator.post("/v1/check", json={"title": "Disk full on db-2"}).json()
        assert operator.post(f"/v1/decisions/{v['decision_id']}/feedback",
                             json={"correct": True}).status_code == 201
        version = admin.post("/v1/policies", json={"alpha": 0.1}).json()["version"]
        assert admin.post(f"/v1/policies/{version}/activate").status_code == 403
        assert operator.post(f"/v1/policies/{version}/activate").status_code == 403
        assert approver.post(f"/v1/policies/{version}/activate").status_code == 200
        after = operator.post("/v1/check", json={"title": "Disk full on db-3"}).json()
        assert after["policy_version"] == version
        audit = admin.get("/v1/audit", params={"action": "policy.activate"}).json()["entries"]
        assert audit[0]["actor"] == "approver"
        report = viewer.post(f"/v1/policies/{version}/backtest").json()
        assert {"candidate", "active"} <= set(report)
        assert report["candidate"]["events"] == report["active"]["events"] >= 1
    finally:
        server.stop()
