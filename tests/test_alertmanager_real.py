"""Debian's real Alertmanager (0.25) delivering its webhook to a real `deja serve` on loopback.

An alert fired with ``amtool`` goes through Alertmanager's routing and grouping to the
``/v1/ingest/alertmanager`` receiver, authenticated with a bearer key from ``http_config``; it must
come out as a Deja decision. The alert ends a few seconds later, and ``send_resolved`` delivers the
resolution, which Deja records in its audit log. Both processes are stopped in ``finally``.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from api.scenarios import demo_kb
from tests.serving import Server

T = TypeVar("T")
DEADLINE = 60.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")
    if found is None:
        pytest.fail(f"{name} not found: run scripts/system-deps.sh "
                    "(Debian's prometheus-alertmanager)")
    return found


def _poll(what: str, probe: Callable[[], T | None], timeout: float = DEADLINE) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = probe()
        if found is not None:
            return found
        time.sleep(0.5)
    raise TimeoutError(f"no {what} within {timeout} s")


def _config(deja_url: str, key: str) -> dict[str, Any]:
    return {
        "route": {"receiver": "deja", "group_by": ["alertname"], "group_wait": "1s",
                  "group_interval": "1s", "repeat_interval": "1h"},
        "receivers": [{
            "name": "deja",
            "webhook_configs": [{
                "url": f"{deja_url}/v1/ingest/alertmanager",
                "send_resolved": True,
                "http_config": {"authorization": {"type": "Bearer", "credentials": key}},
            }],
        }],
    }


@pytest.mark.slow
def test_real_alertmanager_webhook_reaches_deja(tmp_path: Path) -> None:
    alertmanager, amtool = _tool("prometheus-alertmanager"), _tool("amtool")
    server = Server(tmp_path / "data")
    am_proc: subprocess.Popen[bytes] | None = None
    am_log = tmp_path / "alertmanager.log"
    try:
        server.start()
        http = server.client()
        r = http.post("/v1/events", json={"events": demo_kb(0)[:30]})
        assert r.status_code == 201, r.text

        config = tmp_path / "alertmanager.yml"
        config.write_text(yaml.safe_dump(_config(server.url, server.key), sort_keys=False))
        checked = subprocess.run([amtool, "check-config", str(config)], capture_output=True,
                                 text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr

        am_url = f"http://127.0.0.1:{_free_port()}"
        with am_log.open("wb") as log:
            am_proc = subprocess.Popen(
                [alertmanager, f"--config.file={config}",
                 f"--storage.path={tmp_path / 'am-data'}",
                 f"--web.listen-address={am_url.removeprefix('http://')}",
                 "--cluster.listen-address=", "--log.level=debug"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)

        def ready() -> bool | None:
            assert am_proc is not None and am_proc.poll() is None, am_log.read_text()[-3000:]
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{am_url}/-/ready", timeout=2).status_code == 200:
                    return True
            return None

        _poll("ready Alertmanager", ready, 30)

        # Firing now, ending by itself a few seconds later: Alertmanager then sends the resolved
        # notification too (send_resolved).
        end = (datetime.now(UTC) + timedelta(seconds=8)).strftime("%Y-%m-%dT%H:%M:%SZ")
        fired = subprocess.run(
            [amtool, "alert", "add", "alertname=DiskAlmostFull", "instance=db-9:9100",
             "severity=warning", "--annotation=summary=Disk almost full on db-9",
             f"--end={end}", f"--alertmanager.url={am_url}"],
            capture_output=True, text=True, timeout=30)
        assert fired.returncode == 0, fired.stdout + fired.stderr

        def decision() -> dict[str, Any] | None:
            r = http.get("/v1/decisions", params={"limit": 50})
            assert r.status_code == 200, r.text
            return next((d for d in r.json()["decisions"]
                         if "DiskAlmostFull" in d["event"]["title"]), None)

        try:
            found = _poll("decision for DiskAlmostFull", decision)
        except TimeoutError as exc:
            raise AssertionError(f"{exc}\nalertmanager log:\n{am_log.read_text()[-3000:]}") from exc
        event = found["event"]
        assert event["title"] == "DiskAlmostFull: Disk almost full on db-9"
        assert event["source"] == "alertmanager"
        assert event["severity"] == "warning"
        assert event["labels"]["instance"] == "db-9:9100"
        assert event["id"].startswith("am-")
        assert found["decision"] in ("replay", "review", "escalate")

        def resolved() -> list[dict[str, Any]] | None:
            r = http.get("/v1/audit", params={"action": "alert.resolved"})
            assert r.status_code == 200, r.text
            return r.json()["entries"] or None

        entries = _poll("alert.resolved audit entry", resolved)
        assert [e["target"] for e in entries] == [event["id"].removeprefix("am-")]
        # Re-sent notifications of the same alert were not checked twice.
        again = http.get("/v1/decisions", params={"limit": 50}).json()["decisions"]
        assert sum("DiskAlmostFull" in d["event"]["title"] for d in again) == 1
    finally:
        if am_proc is not None and am_proc.poll() is None:
            am_proc.terminate()
            try:
                am_proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                am_proc.kill()
                am_proc.wait()
        server.stop()
