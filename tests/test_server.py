"""One real `deja serve` process, driven over HTTP like a client would, then restarted."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.scenarios import demo_checks, demo_kb
from tests.serving import Server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = Server(tmp_path / "data")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.mark.slow
def test_real_server_loop_and_restart(server: Server) -> None:
    http = server.client()
    kb = demo_kb(0)
    r = http.post("/v1/events", json={"events": kb})
    assert r.status_code == 201, r.text
    assert len(r.json()["ids"]) == len(kb)

    stats = http.get("/v1/stats").json()
    assert stats["incidents"] == stats["indexed"] == len(kb)

    checks = demo_checks(0)
    verdicts = http.post("/v1/check/batch", json={"events": checks}).json()["results"]
    decisions = {v["decision"] for v in verdicts}
    assert "escalate" in decisions
    novel = verdicts[-1]
    assert novel["decision"] == "escalate" and novel["novelty"]["is_novel"]

    # Teach the novel event, then a variant of it is recognised in the very next request.
    fb = http.post(f"/v1/decisions/{novel['decision_id']}/feedback",
                   json={"correct": False, "outcome": "resolved",
                         "resolution": {"action": "Rotate the webhook signing secret"}})
    assert fb.status_code == 201, fb.text
    variant = {**checks[-1], "id": None, "title": checks[-1]["title"] + " "}
    again = http.post("/v1/check", json=variant).json()
    assert again["decision"] != "escalate"
    assert again["neighbors"][0]["id"] == fb.json()["incident"]

    sim = http.get("/v1/similar", params={"q": kb[0]["title"], "k": 3}).json()
    assert sim["neighbors"][0]["id"] == kb[0]["id"]
    page = http.get("/")
    assert page.status_code == 200 and "Recent decisions" in page.text
    bad = http.post("/v1/check", json={"title": 5})
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "title"

    server.stop()
    server.start()
    stats = http.get("/v1/stats").json()
    assert stats["incidents"] == stats["indexed"] == len(kb) + 1
    assert stats["index"]["status"] == "loaded"
    assert stats["decisions"] == len(checks) + 1
