"""The human handoff through a real `deja serve`: escalate, group, notify, breach, resolve."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from api.scenarios import demo_kb
from tests.serving import Server


class Receiver:
    """A webhook receiver on loopback that records every JSON body by path."""

    def __init__(self) -> None:
        self.bodies: list[tuple[str, dict[str, Any]]] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", "0"))
                received.append((self.path, json.loads(self.rfile.read(length))))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = int(self.httpd.server_address[1])
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def wait_for(self, pred: Callable[[str, dict[str, Any]], bool], timeout: float = 20.0
                 ) -> tuple[str, dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for path, body in list(self.bodies):
                if pred(path, body):
                    return path, body
            time.sleep(0.1)
        raise AssertionError(f"no matching delivery; got {[p for p, _ in self.bodies]}")


def _wait(fn: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return
        time.sleep(0.2)
    raise AssertionError("condition not met in time")


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


@pytest.fixture
def server(tmp_path: Path, receiver: Receiver) -> Iterator[Server]:
    routing = {
        "default": {
            "name": "default", "team": "payments", "role": "on-call", "channel": "#payments",
            # 1.2 s to acknowledge, so the sweep finds a breach within the test.
            "ack_minutes": 0.02, "resolve_minutes": 60,
            "webhooks": [{"url": receiver.url("/slack/T0KEN-SECRET"), "format": "slack"},
                         {"url": receiver.url("/generic"), "format": "generic"}],
            "next_steps": [{"team": "sre", "role": "manager", "channel": "#sre",
                            "webhook": receiver.url("/breach"), "format": "generic"}],
        },
        "rules": [],
    }
    srv = Server(tmp_path / "data", env={
        "DEJA_ROUTING": json.dumps(routing), "DEJA_SWEEP_SECONDS": "0.3",
        "DEJA_NOTIFY_BACKOFF_SECONDS": "0.2", "DEJA_NOTIFY_ATTEMPTS": "4"})
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


NOVEL = {"title": "Payment provider webhook signature mismatch for merchant 4411",
         "text": "HMAC verification failed for 37 callbacks from provider acme-pay",
         "service": "payments", "severity": "error", "source": "payments-api"}


@pytest.mark.slow
def test_escalate_group_notify_breach_resolve_and_learn(server: Server,
                                                        receiver: Receiver) -> None:
    http = server.client()
    assert http.post("/v1/events", json={"events": demo_kb(0)[:60]}).status_code == 201
    assert http.post("/v1/changes", json={
        "service": "payments", "summary": "deploy payments-api v2.3.1",
        "author": "alice", "ref": "PR-812"}).status_code == 201

    first = http.post("/v1/check", json=NOVEL).json()
    assert first["decision"] == "escalate" and first["escalation_id"]
    esc_id = first["escalation_id"]
    queue = http.get("/v1/escalations", params={"state": "open"}).json()["escalations"]
    esc = next(e for e in queue if e["id"] == esc_id)
    assert esc["route"]["team"] == "payments" and esc["kind"] == "escalate"
    assert esc["due_at"] > esc["created_at"]
    briefing = esc["briefing"]
    assert "payments" in briefing["services"] and briefing["summary"]
    assert any("v2.3.1" in json.dumps(c) for c in briefing["recent_changes"])

    # The same event again joins the open escalation instead of paging again.
    again = http.post("/v1/check", json={**NOVEL, "title": NOVEL["title"].replace("4411", "97")})
    assert again.json()["escalation_id"] == esc_id
    assert http.get(f"/v1/escalations/{esc_id}").json()["events"] == 2

    _, slack = receiver.wait_for(lambda p, b: p.startswith("/slack/") and "blocks" in b)
    assert slack["text"] and isinstance(slack["blocks"], list)
    _, generic = receiver.wait_for(
        lambda p, b: p == "/generic" and b.get("type") == "deja.escalation.opened")
    assert generic["escalation"]["id"] == esc_id
    assert sum(1 for p, _ in receiver.bodies if p == "/generic") == 1  # grouped: no second page

    # Nobody acknowledged within 1.2 s: the sweep marks it breached and pages the next step.
    _wait(lambda: http.get(f"/v1/escalations/{esc_id}").json()["state"] == "breached")
    receiver.wait_for(lambda p, b: p == "/breach"
                      and b.get("type") == "deja.escalation.breached")
    deliveries = http.get(f"/v1/escalations/{esc_id}").json()["deliveries"]
    assert deliveries and all("T0KEN" not in d["target"] for d in deliveries)

    human = {"action": "Rotate the provider webhook signing secret", "rollback": "restore old"}
    done = http.post(f"/v1/escalations/{esc_id}/resolve", json={"resolution": human})
    assert done.status_code == 200 and done.json()["state"] == "resolved"
    variant = http.post("/v1/check", json={**NOVEL, "title": NOVEL["title"].replace(
        "4411", "5120"), "text": NOVEL["text"].replace("37", "12")}).json()
    assert variant["decision"] in ("replay", "review"), variant["reasons"]
    assert variant["resolution"]["action"] == human["action"]

    # With the receiver down a check still answers at once and the delivery is retried.
    receiver.stop()
    t0 = time.monotonic()
    other = http.post("/v1/check", json={
        "title": "Badge reader at door 7 rejects every valid card", "service": "facilities"})
    assert other.status_code == 200 and time.monotonic() - t0 < 10
    other_id = other.json()["escalation_id"]

    def retried() -> bool:
        ds = http.get(f"/v1/escalations/{other_id}").json()["deliveries"]
        return any(d["status"] == "retrying" for d in ds)

    _wait(retried)
    assert http.get("/healthz").status_code == 200
