"""Failing safe through a real `deja serve`: kill -9 under load, torn index, a second owner,
oversized bodies, backup and restore."""

from __future__ import annotations

import os
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from api.scenarios import demo_checks, demo_kb
from tests.serving import Server, deja_command


@pytest.mark.slow
def test_kill_9_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    server.start()
    http = server.client()
    assert http.post("/v1/events", json={"events": demo_kb(0)[:40]}).status_code == 201
    acked: list[str] = []
    statuses: list[int] = []
    stop = threading.Event()
    lock = threading.Lock()

    def writer(w: int) -> None:
        c = server.client()
        n = 0
        while not stop.is_set():
            ids = [f"w{w}-{n + i}" for i in range(5)]
            events = [{"id": i, "title": f"Writer {w} event {i}: disk latency high on vol-{n}",
                       "resolution": {"action": f"rebalance volume {w}"}, "outcome": "resolved"}
                      for i in ids]
            n += 5
            try:
                r = c.post("/v1/events", json={"events": events})
            except httpx.HTTPError:
                return
            with lock:
                statuses.append(r.status_code)
                if r.status_code == 201:
                    acked.extend(ids)

    def checker(k: int) -> None:
        c = server.client()
        i = 0
        while not stop.is_set():
            i += 1
            try:
                r = c.post("/v1/check", json={"title": f"checker {k} probe {i} on node-{i}"})
            except httpx.HTTPError:
                return
            with lock:
                statuses.append(r.status_code)

    threads = [threading.Thread(target=writer, args=(w,)) for w in range(4)] + \
        [threading.Thread(target=checker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(6)
    with lock:
        before_kill = list(statuses)
    server.kill()
    stop.set()
    for t in threads:
        t.join(timeout=30)
    assert before_kill and not [s for s in before_kill if s >= 500], before_kill
    assert len(acked) >= 20

    server.start()
    http = server.client()
    missing = [i for i in acked if http.get(f"/v1/incidents/{i}").status_code != 200]
    assert not missing, missing[:10]
    stats = http.get("/v1/stats").json()
    assert stats["indexed"] == stats["incidents"]
    assert http.get("/healthz").status_code == 200
    server.stop()


@pytest.mark.slow
def test_torn_index_is_rebuilt_and_a_second_owner_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = Server(data)
    server.start()
    http = server.client()
    assert http.post("/v1/events", json={"events": demo_kb(0)[:80]}).status_code == 201

    t0 = time.monotonic()
    second = subprocess.run([*deja_command(), "serve", "--data-dir", str(data), "--port", "1"],
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert second.returncode != 0 and time.monotonic() - t0 < 60
    assert "in use by another process" in second.stderr and "PID" in second.stderr

    huge = b'{"events": [{"title": "' + b"x" * (60 * 1024 * 1024) + b'"}]}'
    r = http.post("/v1/events", content=huge, headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"

    server.stop()
    index = data / "index.faiss"
    index.write_bytes(index.read_bytes()[: index.stat().st_size // 2])
    server.start()
    stats = server.client().get("/v1/stats").json()
    assert stats["index"]["status"].startswith("rebuilt"), stats["index"]
    assert stats["indexed"] == stats["incidents"] == 80
    server.stop()


@pytest.mark.slow
def test_backup_then_restore_answers_the_same_verdicts(tmp_path: Path) -> None:
    server = Server(tmp_path / "data")
    server.start()
    http = server.client()
    assert http.post("/v1/events", json={"events": demo_kb(0)}).status_code == 201
    checks = {"events": demo_checks(0), "dry_run": True}
    before = http.post("/v1/check/batch", json=checks).json()["results"]
    r = http.post("/v1/backup", json={"path": str(tmp_path / "backup")})
    assert r.status_code == 201, r.text
    server.stop()

    restored = tmp_path / "restored"
    out = subprocess.run([*deja_command(), "restore", str(tmp_path / "backup"), str(restored)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # Served as a read replica: reads and dry runs answer, every write is refused.
    copy = Server(restored, env={"DEJA_READ_ONLY": "true"})
    copy.start(read_key=False)
    replica = copy.client(server.key)
    after = replica.post("/v1/check/batch", json=checks).json()["results"]
    kept = replica.get("/v1/stats").json()
    audited = replica.post("/v1/check", json=demo_checks(0)[0])
    assert audited.status_code == 405, audited.text
    assert audited.json()["error"]["field"] == "dry_run"
    for path, body in [("/v1/events", {"events": demo_kb(0)[:1]}),
                       ("/v1/changes", {"service": "db", "summary": "deploy"}),
                       (f"/v1/decisions/{before[0]['decision_id'] or 'x'}/feedback",
                        {"correct": True})]:
        r = replica.post(path, json=body)
        assert r.status_code == 405 and r.json()["error"]["code"] == "read_only", (path, r.text)
    assert replica.post("/v1/policies/1/backtest").status_code == 200
    assert replica.get("/v1/stats").json()["incidents"] == kept["incidents"]
    assert replica.get("/v1/decisions").json() == replica.get("/v1/decisions").json()
    copy.stop()
    assert [v["decision"] for v in after] == [v["decision"] for v in before]
    assert [round(v["novelty"]["score"], 6) for v in after] == \
        [round(v["novelty"]["score"], 6) for v in before]
    assert [v["neighbors"][0]["id"] for v in after] == [v["neighbors"][0]["id"] for v in before]
