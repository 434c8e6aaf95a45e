"""The dashboard page in Debian's headless Chromium, driven over the DevTools Protocol.

A real `deja serve` with a small KB gets one novel event, which escalates. The page, given the admin
key through localStorage as a user's "Use key" would, must show the event among the decisions and
its escalation in the queue, answer a search, log no console error, and render to a real PNG.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from api.scenarios import demo_kb
from bench.screenshot import FAVICON_404, Chromium, check_png, console_errors
from tests.serving import Server

TIMEOUT = 30.0
NOVEL = {
    "id": "browser-novel-1",
    "title": "Tape library robot arm jammed in vault B during nightly backup rotation",
    "text": "The robot arm of tape library TL-4 stopped between slots 112 and 113; 38 backup "
            "jobs are queued behind it and the nightly rotation window closes at 06:00.",
    "service": "backup-vault",
    "severity": "critical",
    "source": "tape-library",
    "labels": {"library": "TL-4", "vault": "B"},
}


def _text(selector: str) -> str:
    return f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"


@pytest.mark.slow
def test_dashboard_shows_decisions_and_queue_in_chromium(tmp_path: Path) -> None:
    if not (shutil.which("chromium") or shutil.which("chromium-browser")):
        pytest.fail("chromium not found: run scripts/system-deps.sh (Debian chromium)")
    kb = demo_kb(0)[:30]
    server = Server(tmp_path / "data")
    try:
        server.start()
        http = server.client()
        r = http.post("/v1/events", json={"events": kb})
        assert r.status_code == 201, r.text
        verdict = http.post("/v1/check", json=NOVEL).json()
        assert verdict["decision"] == "escalate", verdict
        queue = http.get("/v1/escalations", params={"state": "open"}).json()["escalations"]
        assert len(queue) == 1 and queue[0]["decision_id"] == verdict["decision_id"]

        with Chromium(timeout=TIMEOUT) as browser:
            page = browser.new_page()
            page.open_dashboard(server.url, server.key, TIMEOUT)
            title = json.dumps(NOVEL["title"])
            page.wait_for(f"{_text('#decisions')}.includes({title})", TIMEOUT,
                          what="the novel event among the decisions")
            page.wait_for(f"{_text('#queue')}.includes({title}) && "
                          f"{_text('#queue')}.includes('escalate')", TIMEOUT,
                          what="the escalation in the queue")
            cards = page.evaluate(_text("#cards"))
            assert "30incidents" in cards and "1open escalations" in cards, cards
            assert page.evaluate(_text("#error")) == ""

            # "Have we seen this before?": the search form answers from the KB.
            page.evaluate(f"document.getElementById('q').value = {json.dumps(kb[0]['title'])}; "
                          "document.getElementById('search').requestSubmit(); true")
            page.wait_for(f"{_text('#similar')}.includes({json.dumps(kb[0]['title'])})",
                          TIMEOUT, what="search results")

            page.pump(0.5)
            png = page.screenshot(tmp_path / "dashboard.png")
            width, height = check_png(png)
            assert (tmp_path / "dashboard.png").stat().st_size == len(png) > 20_000
            # Every console error, uncaught exception and failed request the page logged, but
            # the browser's own favicon request (the page declares no icon).
            errors = console_errors(page.events(), FAVICON_404)
            assert errors == [], errors
            assert width >= 1000 and height >= 600
    finally:
        server.stop()
