"""The HTTP contract of API.md (api/app.py, api/schemas.py, api/deja.py), with the fake encoder."""

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

KINDS = [
    ("disk", "Disk full on db-{i} volume /var/lib/postgresql", "Clean up old WAL files",
     "storage"),
    ("cpu", "High CPU load on web-{i}: load average {i}5", "Restart the worker pool", "web"),
    ("lag", "Replication lag {i}0 seconds on replica pg-{i}", "Resync the replica", "db"),
    ("cert", "TLS certificate for api-{i}.example.com expires in {i} days",
     "Renew the certificate", "edge"),
    ("oom", "Out of memory: killed process {i}234 (java) on node-{i}", "Raise the heap limit",
     "compute"),
]
# Four past occurrences of each kind, each resolved by the kind's action.
KB: list[dict[str, Any]] = [
    {"id": f"{kind}-{i}", "title": title.format(i=i + 1), "service": service,
     "severity": "warning", "labels": {"team": kind}, "occurred_at": "2024-03-01T12:00:00Z",
     "resolution": {"action": action, "runbook": f"https://runbooks/{kind}"},
     "outcome": "resolved"}
    for kind, title, action, service in KINDS for i in range(4)]
NOVEL = "Payment provider webhook signature mismatch"

VERDICT_FIELDS = {"decision_id", "decision", "novelty", "confidence", "resolution", "neighbors",
                  "reasons", "policy_version"}
NOVELTY_FIELDS = {"score", "is_novel", "threshold", "nearest_similarity", "components"}
NEIGHBOUR_FIELDS = {"id", "kb_id", "title", "service", "similarity", "resolution", "outcome",
                    "occurred_at"}
STATS_FIELDS = {"incidents", "indexed", "decisions", "open_escalations", "policy_version", "model"}


@pytest.fixture
def kb(client: TestClient) -> TestClient:
    r = client.post("/v1/events", json={"events": KB})
    assert r.status_code == 201, r.text
    return client


@pytest.fixture(scope="module")
def shared_kb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One loaded KB for tests that only read, or must not write (bad input)."""
    with Deja.open(tmp_path_factory.mktemp("shared"), encoder=HashingEncoder(64),
                   settings=Settings(sweep_seconds=0)) as deja, \
            TestClient(create_app(deja), headers=_auth(deja)) as client:
        assert client.post("/v1/events", json={"events": KB}).status_code == 201
        yield client


def _auth(deja: Deja) -> dict[str, str]:
    assert deja.bootstrap_key is not None
    return {"Authorization": f"Bearer {deja.bootstrap_key}"}


def _stats(client: TestClient) -> dict[str, Any]:
    r = client.get("/v1/stats")
    assert r.status_code == 200
    body: dict[str, Any] = r.json()
    return body


def _check(client: TestClient, **event: Any) -> dict[str, Any]:
    r = client.post("/v1/check", json=event)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _assert_verdict(v: dict[str, Any]) -> None:
    assert set(v) >= VERDICT_FIELDS
    assert v["decision"] in ("replay", "review", "escalate")
    assert set(v["novelty"]) >= NOVELTY_FIELDS
    assert 0.0 <= v["novelty"]["score"] <= 1.0
    assert 0.0 <= v["novelty"]["threshold"] <= 1.0
    assert v["novelty"]["is_novel"] == (v["decision"] == "escalate")
    assert all(isinstance(x, float) for x in v["novelty"]["components"].values())
    assert 0.0 <= v["confidence"] <= 1.0
    assert v["reasons"] and all(isinstance(r, str) and r for r in v["reasons"])
    assert isinstance(v["policy_version"], int)
    for n in v["neighbors"]:
        assert set(n) >= NEIGHBOUR_FIELDS
    sims = [n["similarity"] for n in v["neighbors"]]
    assert sims == sorted(sims, reverse=True)


# -- /healthz, /v1/stats, /v1/policies/active ------------------------------------------------------


def test_healthz_and_stats_on_an_empty_kb(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200 and r.json()["status"] == "ok"
    stats = _stats(client)
    assert set(stats) >= STATS_FIELDS
    assert stats["incidents"] == stats["indexed"] == stats["decisions"] == 0
    assert stats["model"] == "hashing-64"


def test_stats_count_incidents_decisions_and_agree_on_indexed(kb: TestClient) -> None:
    _check(kb, title="Disk full on db-9 volume /var/lib/postgresql")
    _check(kb, title=NOVEL, dry_run=True)
    stats = _stats(kb)
    assert stats["incidents"] == stats["indexed"] == len(KB)
    assert stats["decisions"] == 1
    assert stats["policy_version"] == kb.get("/v1/policies/active").json()["version"]


def test_active_policy(client: TestClient) -> None:
    policy = client.get("/v1/policies/active").json()
    assert policy["version"] == 1
    assert policy["alpha"] == Settings().alpha


# -- POST /v1/events ---------------------------------------------------------------------------


def test_events_are_created_with_ids_and_searchable_at_once(client: TestClient) -> None:
    r = client.post("/v1/events", json={"events": [
        {"id": "a", "title": "Disk full on db-1"}, {"title": "CPU hot on web-2"}]})
    assert r.status_code == 201
    body = r.json()
    assert body["ids"][0] == "a"
    assert body["ids"][1].startswith("kb-")
    assert body["created"] == 2
    top = client.get("/v1/similar", params={"q": "CPU hot on web-3", "k": 1}).json()
    assert top["neighbors"][0]["id"] == body["ids"][1]
    assert _stats(client)["indexed"] == 2


def test_re_sending_events_with_the_same_ids_does_not_duplicate(kb: TestClient) -> None:
    before = _stats(kb)
    r = kb.post("/v1/events", json={"events": [*KB[:3], {"id": "new-1", "title": "Fan failed"}]})
    assert r.status_code == 201
    assert r.json()["ids"] == [e["id"] for e in KB[:3]] + ["new-1"]
    assert r.json()["created"] == 1
    after = _stats(kb)
    assert after["incidents"] == after["indexed"] == before["incidents"] + 1


def test_duplicate_ids_within_one_request_create_one_incident(client: TestClient) -> None:
    r = client.post("/v1/events", json={"events": [{"id": "x", "title": "one"},
                                                   {"id": "x", "title": "two"}]})
    assert r.status_code == 201
    assert r.json() == {"ids": ["x", "x"], "created": 1}
    assert client.get("/v1/incidents/x").json()["title"] == "one"
    stats = _stats(client)
    assert stats["incidents"] == stats["indexed"] == 1


# -- POST /v1/check --------------------------------------------------------------------------------


def test_check_returns_a_full_verdict(kb: TestClient) -> None:
    v = _check(kb, title="Disk full on db-9 volume /var/lib/mysql", service="storage")
    _assert_verdict(v)
    assert v["decision_id"]
    top = v["neighbors"][0]
    assert top["id"].startswith("disk-") and top["kb_id"].startswith("kb-")
    assert top["title"].startswith("Disk full")
    assert top["resolution"]["action"] == "Clean up old WAL files"
    assert top["outcome"] == "resolved"
    assert top["service"] == "storage"


def test_a_novel_event_is_escalated_without_a_resolution(kb: TestClient) -> None:
    v = _check(kb, title=NOVEL)
    _assert_verdict(v)
    assert v["decision"] == "escalate" and v["novelty"]["is_novel"]
    assert v["resolution"] is None
    assert v["novelty"]["score"] > v["novelty"]["threshold"]


@pytest.mark.parametrize("kind", [k[0] for k in KINDS])
def test_an_exact_repeat_of_a_consistently_resolved_incident_is_replayed(
        kb: TestClient, kind: str) -> None:
    """Four past occurrences, all fixed by the same action, and nothing else alike."""
    _, title, action, service = next(k for k in KINDS if k[0] == kind)
    v = _check(kb, title=title.format(i=7), service=service, severity="warning")
    _assert_verdict(v)
    assert v["novelty"]["components"]["exact_match"] == 1.0
    assert v["neighbors"][0]["similarity"] == 1.0
    assert v["decision"] == "replay", v["reasons"]
    assert v["resolution"]["action"] == action


def test_critical_severity_goes_to_review(kb: TestClient) -> None:
    v = _check(kb, title="High CPU load on web-7: load average 75", severity="critical")
    assert v["decision"] == "review"
    assert any("critical" in r for r in v["reasons"])
    assert v["resolution"]["action"] == "Restart the worker pool"


def test_dry_run_writes_no_decision(kb: TestClient) -> None:
    v = _check(kb, title=NOVEL, dry_run=True)
    _assert_verdict(v)
    assert v["decision_id"] is None
    assert _stats(kb)["decisions"] == 0
    assert kb.get("/v1/decisions").json()["decisions"] == []


def test_a_check_is_audited_before_it_is_answered(kb: TestClient) -> None:
    v = _check(kb, title=NOVEL, service="payments", labels={"env": "prod"})
    [d] = kb.get("/v1/decisions").json()["decisions"]
    assert d["decision_id"] == v["decision_id"]
    assert d["decision"] == v["decision"]
    assert d["event"]["title"] == NOVEL and d["event"]["labels"] == {"env": "prod"}
    assert d["score"] == pytest.approx(v["novelty"]["score"])
    assert d["reasons"] == v["reasons"]
    assert d["policy_version"] == v["policy_version"]
    assert len(d["neighbor_ids"]) == len(v["neighbors"])
    assert d["neighbor_similarities"] == pytest.approx(
        [n["similarity"] for n in v["neighbors"]], abs=1e-5)


# -- POST /v1/check/batch --------------------------------------------------------------------------


def test_batch_preserves_order(kb: TestClient) -> None:
    titles = [NOVEL, "Replication lag 90 seconds on replica pg-9", "Disk full on db-9 volume /x",
              "Out of memory: killed process 9999 (java) on node-9", NOVEL + " again"]
    r = kb.post("/v1/check/batch", json={"events": [{"title": t} for t in titles]})
    assert r.status_code == 200
    results = r.json()["results"]
    assert len(results) == len(titles)
    for v in results:
        _assert_verdict(v)
    assert results[1]["neighbors"][0]["id"].startswith("lag-")
    assert results[2]["neighbors"][0]["id"].startswith("disk-")
    assert results[3]["neighbors"][0]["id"].startswith("oom-")
    assert results[0]["decision"] == "escalate"
    # Each verdict is the one a single check would give.
    single = _check(kb, title=titles[1], dry_run=True)
    assert single["novelty"]["score"] == pytest.approx(results[1]["novelty"]["score"])
    ids = [v["decision_id"] for v in results]
    assert len(set(ids)) == len(titles) and all(ids)
    assert _stats(kb)["decisions"] == len(titles)


def test_batch_dry_run_writes_nothing(kb: TestClient) -> None:
    r = kb.post("/v1/check/batch", json={"events": [{"title": NOVEL}] * 3, "dry_run": True})
    assert [v["decision_id"] for v in r.json()["results"]] == [None, None, None]
    assert _stats(kb)["decisions"] == 0


# -- GET /v1/similar -------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 3, 5, 100])
def test_similar_returns_at_most_k_best_first(shared_kb: TestClient, k: int) -> None:
    q = "Replication lag 5 seconds on replica pg-3"
    r = shared_kb.get("/v1/similar", params={"q": q, "k": k})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == q
    neighbours = body["neighbors"]
    assert 1 <= len(neighbours) <= min(k, len(KINDS))  # one entry per fingerprint group
    assert neighbours[0]["id"].startswith("lag-")
    assert neighbours[0]["similarity"] == 1.0
    sims = [n["similarity"] for n in neighbours]
    assert sims == sorted(sims, reverse=True)
    for n in neighbours:
        assert set(n) >= NEIGHBOUR_FIELDS


def test_similar_on_an_empty_kb_is_empty(client: TestClient) -> None:
    r = client.get("/v1/similar", params={"q": "anything"})
    assert r.status_code == 200 and r.json()["neighbors"] == []


# -- feedback ----------------------------------------------------------------------------------


def test_feedback_with_a_resolution_teaches_the_very_next_check(kb: TestClient) -> None:
    first = _check(kb, title=NOVEL, service="payments")
    assert first["decision"] == "escalate"
    r = kb.post(f"/v1/decisions/{first['decision_id']}/feedback",
                json={"correct": True, "novel": True, "outcome": "resolved",
                      "resolution": {"action": "Rotate the webhook signing secret"},
                      "note": "provider rotated keys"})
    assert r.status_code == 201, r.text
    fb = r.json()
    assert fb["decision_id"] == first["decision_id"] and fb["feedback_id"]
    assert fb["incident"]

    stats = _stats(kb)
    assert stats["incidents"] == stats["indexed"] == len(KB) + 1

    again = _check(kb, title=NOVEL, service="payments")
    assert again["neighbors"][0]["id"] == fb["incident"]
    assert again["neighbors"][0]["similarity"] == 1.0
    assert again["neighbors"][0]["resolution"]["action"] == "Rotate the webhook signing secret"
    assert again["decision"] != "escalate"

    incident = kb.get(f"/v1/incidents/{fb['incident']}").json()
    assert incident["title"] == NOVEL
    assert incident["origin"] == "feedback"
    assert incident["outcome"] == "resolved"
    assert incident["resolution"]["action"] == "Rotate the webhook signing secret"


def test_feedback_without_a_resolution_adds_no_incident(kb: TestClient) -> None:
    v = _check(kb, title="Disk full on db-9 volume /var/lib/mysql")
    r = kb.post(f"/v1/decisions/{v['decision_id']}/feedback", json={"correct": True})
    assert r.status_code == 201
    assert r.json()["incident"] is None
    assert _stats(kb)["incidents"] == len(KB)


def test_feedback_outcome_updates_the_track_record(kb: TestClient) -> None:
    v = _check(kb, title="Disk full on db-9 volume /var/lib/mysql")
    assert v["resolution"]["action"] == "Clean up old WAL files"
    before = kb.get("/v1/incidents/disk-0").json()["track_record"]
    r = kb.post(f"/v1/decisions/{v['decision_id']}/feedback",
                json={"correct": False, "outcome": "failed"})
    assert r.status_code == 201
    after = kb.get("/v1/incidents/disk-0").json()["track_record"]
    assert (after["successes"], after["failures"]) == (before["successes"],
                                                       before["failures"] + 1)
    assert after["lower_bound"] < before["lower_bound"]


def test_repeated_feedback_keeps_the_index_in_step_with_the_kb(kb: TestClient) -> None:
    """Sending the same feedback twice (a client retry) must not index one incident twice."""
    v = _check(kb, id="evt-42", title=NOVEL)
    body = {"correct": False, "resolution": {"action": "Rotate the webhook signing secret"}}
    for _ in range(2):
        r = kb.post(f"/v1/decisions/{v['decision_id']}/feedback", json=body)
        assert r.status_code == 201
        assert r.json()["incident"] == "evt-42"
    stats = _stats(kb)
    assert stats["incidents"] == len(KB) + 1
    assert stats["indexed"] == stats["incidents"]
    assert kb.get("/healthz").status_code == 200


def test_feedback_on_an_event_whose_id_is_already_in_the_kb_keeps_counts_equal(
        kb: TestClient) -> None:
    v = _check(kb, id="disk-0", title="Disk full on db-1 volume /var/lib/postgresql")
    r = kb.post(f"/v1/decisions/{v['decision_id']}/feedback",
                json={"correct": True, "resolution": {"action": "Clean up old WAL files"}})
    assert r.status_code == 201
    stats = _stats(kb)
    assert stats["incidents"] == stats["indexed"] == len(KB)


# -- GET /v1/decisions -------------------------------------------------------------------------


def test_decisions_newest_first_and_filtered(kb: TestClient) -> None:
    made = [_check(kb, title=t) for t in
            (NOVEL, "Disk full on db-9 volume /var/lib/mysql", "Zebra crossing sensor offline")]
    listed = kb.get("/v1/decisions").json()["decisions"]
    assert [d["decision_id"] for d in listed] == [v["decision_id"] for v in reversed(made)]
    escalated = kb.get("/v1/decisions", params={"decision": "escalate"}).json()["decisions"]
    want = [v["decision_id"] for v in reversed(made) if v["decision"] == "escalate"]
    assert want and [d["decision_id"] for d in escalated] == want
    assert all(d["decision"] == "escalate" for d in escalated)
    limited = kb.get("/v1/decisions", params={"limit": 1}).json()["decisions"]
    assert [d["decision_id"] for d in limited] == [made[-1]["decision_id"]]


# -- GET /v1/incidents/{id} ----------------------------------------------------------------------


def test_incident_by_client_id_and_by_kb_id(kb: TestClient) -> None:
    by_client = kb.get("/v1/incidents/cert-2")
    assert by_client.status_code == 200
    inc = by_client.json()
    assert inc["id"] == "cert-2"
    assert inc["title"] == KB[14]["title"]
    assert inc["labels"] == {"team": "cert"}
    assert inc["severity"] == "warning" and inc["service"] == "edge"
    assert inc["resolution"]["action"] == "Renew the certificate"
    assert inc["resolution"]["runbook"] == "https://runbooks/cert"
    assert inc["outcome"] == "resolved"
    assert inc["track_record"]["successes"] == 4 and inc["track_record"]["failures"] == 0
    assert inc["occurred_at"].startswith("2024-03-01T12:00:00")
    by_kb = kb.get(f"/v1/incidents/{inc['kb_id']}")
    assert by_kb.status_code == 200
    assert by_kb.json() == inc


# -- GET / -------------------------------------------------------------------------------------


def test_the_page_is_a_static_shell_that_calls_the_api(anonymous: TestClient) -> None:
    # The page holds no data (it is served without a key) and reads the API with the user's.
    r = anonymous.get("/")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    for path in ("/v1/decisions", "/v1/escalations", "/v1/similar", "/v1/stats"):
        assert path in r.text
    assert "Authorization" in r.text


def test_the_page_data_is_escaped_by_the_page(kb: TestClient) -> None:
    title = "<script>alert('x')</script> & Disk full on db-9"
    _check(kb, title=title)
    decisions = kb.get("/v1/decisions", params={"limit": 1}).json()["decisions"]
    assert decisions[0]["event"]["title"] == title
    # The page renders every API string through its escaping helper, never raw.
    page = kb.get("/").text
    assert "esc(d.event.title)" in page and "innerHTML" in page


# -- bad input -------------------------------------------------------------------------------------

_EV = {"title": "Disk full on db-1"}
_BAD: list[tuple[str, str, str, Any, str]] = [
    # (name, method, url, json body or raw bytes, field the error must name); 422 unless below
    ("missing title", "POST", "/v1/check", {"service": "db"}, "title"),
    ("blank title", "POST", "/v1/check", {"title": "   "}, "title"),
    ("empty title", "POST", "/v1/check", {"title": ""}, "title"),
    ("title too long", "POST", "/v1/check", {"title": "x" * 2001}, "title"),
    ("title not a string", "POST", "/v1/check", {"title": 5}, "title"),
    ("NUL in title", "POST", "/v1/check", {"title": "disk\x00full"}, "title"),
    ("id too long", "POST", "/v1/check", {**_EV, "id": "i" * 129}, "id"),
    ("bad severity", "POST", "/v1/check", {**_EV, "severity": "urgent"}, "severity"),
    ("bad outcome", "POST", "/v1/check", {**_EV, "outcome": "fixed"}, "outcome"),
    ("labels a list", "POST", "/v1/check", {**_EV, "labels": ["a"]}, "labels"),
    ("labels a string", "POST", "/v1/check", {**_EV, "labels": "a=b"}, "labels"),
    ("bad occurred_at", "POST", "/v1/check", {**_EV, "occurred_at": "yesterday"}, "occurred_at"),
    ("dry_run a word", "POST", "/v1/check", {**_EV, "dry_run": "maybe"}, "dry_run"),
    ("dry_run a number", "POST", "/v1/check", {**_EV, "dry_run": 2}, "dry_run"),
    ("dry_run null", "POST", "/v1/check", {**_EV, "dry_run": None}, "dry_run"),
    ("malformed JSON", "POST", "/v1/check", b'{"title": "x",', "body"),
    ("body a list", "POST", "/v1/check", [_EV], "body"),
    ("events missing title", "POST", "/v1/events", {"events": [{"service": "db"}]}, "title"),
    ("events blank title", "POST", "/v1/events", {"events": [_EV, {"title": " "}]}, "title"),
    ("events title too long", "POST", "/v1/events", {"events": [{"title": "x" * 2001}]},
     "title"),
    ("events id too long", "POST", "/v1/events", {"events": [{**_EV, "id": "i" * 129}]}, "id"),
    ("events bad severity", "POST", "/v1/events", {"events": [{**_EV, "severity": "sev1"}]},
     "severity"),
    ("events bad outcome", "POST", "/v1/events", {"events": [{**_EV, "outcome": "ok"}]},
     "outcome"),
    ("events labels not a dict", "POST", "/v1/events", {"events": [{**_EV, "labels": 3}]},
     "labels"),
    ("events NUL in title", "POST", "/v1/events", {"events": [{"title": "a\x00"}]}, "title"),
    ("events empty", "POST", "/v1/events", {"events": []}, "events"),
    ("events too many", "POST", "/v1/events", {"events": [_EV] * 1001}, "events"),
    ("events missing", "POST", "/v1/events", {}, "events"),
    ("events malformed JSON", "POST", "/v1/events", b"not json", "body"),
    ("batch empty", "POST", "/v1/check/batch", {"events": []}, "events"),
    ("batch too many", "POST", "/v1/check/batch", {"events": [_EV] * 1001}, "events"),
    ("batch bad title", "POST", "/v1/check/batch", {"events": [{"title": ""}]}, "title"),
    ("batch dry_run wrong type", "POST", "/v1/check/batch",
     {"events": [_EV], "dry_run": [True]}, "dry_run"),
    ("similar k=0", "GET", "/v1/similar?q=disk&k=0", None, "k"),
    ("similar k=10000", "GET", "/v1/similar?q=disk&k=10000", None, "k"),
    ("similar k not a number", "GET", "/v1/similar?q=disk&k=many", None, "k"),
    ("similar q missing", "GET", "/v1/similar", None, "q"),
    ("similar q blank", "GET", "/v1/similar?q=%20%20", None, "q"),
    ("similar q with NUL", "GET", "/v1/similar?q=a%00b", None, "q"),
    ("decisions bad kind", "GET", "/v1/decisions?decision=maybe", None, "decision"),
    ("decisions limit 0", "GET", "/v1/decisions?limit=0", None, "limit"),
    ("feedback correct missing", "POST", "/v1/decisions/{decision}/feedback", {}, "correct"),
    ("feedback correct wrong type", "POST", "/v1/decisions/{decision}/feedback",
     {"correct": "perhaps"}, "correct"),
    ("feedback bad outcome", "POST", "/v1/decisions/{decision}/feedback",
     {"correct": True, "outcome": "unknown"}, "outcome"),
    ("feedback resolution without action", "POST", "/v1/decisions/{decision}/feedback",
     {"correct": True, "resolution": {"runbook": "x"}}, "action"),
    ("feedback unknown decision", "POST", "/v1/decisions/dec-nope/feedback",
     {"correct": True, "resolution": {"action": "restart"}}, "decision_id"),
    ("unknown incident", "GET", "/v1/incidents/nope", None, "id"),
    ("unknown kb id", "GET", "/v1/incidents/kb-9999", None, "id"),
]


_NOT_FOUND = {"feedback unknown decision", "unknown incident", "unknown kb id"}


@pytest.mark.parametrize(("method", "url", "body", "field", "status"),
                         [(*b[1:], 404 if b[0] in _NOT_FOUND else 422) for b in _BAD],
                         ids=[b[0] for b in _BAD])
def test_bad_input_is_a_4xx_naming_the_field_and_writes_nothing(
        shared_kb: TestClient, method: str, url: str, body: Any, field: str, status: int) -> None:
    kb = shared_kb
    decision = _check(kb, title=NOVEL)["decision_id"]
    url = url.replace("{decision}", decision)
    before = _stats(kb)
    if isinstance(body, bytes):
        r = kb.request(method, url, content=body, headers={"content-type": "application/json"})
    else:
        r = kb.request(method, url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"code", "message", "field"}
    assert error["code"] and error["message"]
    assert error["field"] == field or error["field"].endswith(f".{field}"), error
    after = _stats(kb)
    assert after["incidents"] == after["indexed"] == before["incidents"]
    assert after["decisions"] == before["decisions"]


def test_an_oversized_body_is_refused(tmp_path: Path) -> None:
    settings = Settings(max_body_bytes=1000)
    with Deja.open(tmp_path, settings=settings, encoder=HashingEncoder(64)) as deja, \
            TestClient(create_app(deja), headers=_auth(deja)) as client:
        r = client.post("/v1/events", json={"events": [{"title": "x" * 1500}]})
        assert r.status_code == 413
        assert r.json()["error"]["field"] == "body"
        assert _stats(client)["incidents"] == 0


@pytest.mark.parametrize(("method", "url"), [("GET", "/v1/nope"), ("DELETE", "/v1/events")])
def test_unknown_routes_use_the_error_shape(client: TestClient, method: str, url: str) -> None:
    r = client.request(method, url)
    assert r.status_code in (404, 405)
    assert set(r.json()["error"]) == {"code", "message", "field"}
