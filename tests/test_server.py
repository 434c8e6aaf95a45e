"""One real `deja serve` process, driven over HTTP like a client would, then restarted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from api.scenarios import demo_checks, demo_kb


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _deja_command() -> list[str]:
    exe = Path(sys.executable).with_name("deja")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "api.cli"]


class Server:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*_deja_command(), "serve", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deja serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"deja serve not healthy: {self.log.read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
    http = httpx.Client(base_url=server.url, timeout=120)
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
