"""Running a real `deja serve` process for tests, the way a client meets it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

__all__ = ["Server", "deja_command"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def deja_command() -> list[str]:
    exe = Path(sys.executable).with_name("deja")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "api.cli"]


class Server:
    """A real `deja serve` process on a free loopback port; ``env`` adds settings."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.extra_env = env or {}
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = data_dir.parent / f"serve-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.key = ""

    def start(self, timeout: float = 120.0, *, read_key: bool = True) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **self.extra_env}
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*deja_command(), "serve", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"deja serve exited: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    if read_key:
                        self.key = (self.data_dir / "admin.key").read_text().strip()
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"deja serve not healthy: {self.log.read_text()[-2000:]}")

    def client(self, key: str | None = None) -> httpx.Client:
        """An HTTP client with a bearer key (the admin key written at first start by default)."""
        return httpx.Client(base_url=self.url, timeout=120,
                            headers={"Authorization": f"Bearer {key or self.key}"})

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
