"""A screenshot of the dashboard, rendered by Debian's headless Chromium over the DevTools Protocol.

``python -m bench.screenshot --out bench/results/dashboard.png`` starts a demo ``deja serve`` on a
temp dir (the demo KB, then the demo checks, so the queue and decisions are populated), opens ``/``
in headless Chromium with the admin key in localStorage, waits until the tables are filled, and
saves a full-page PNG.

The Chrome DevTools Protocol helpers here (:class:`Chromium`, :class:`CDP`, :class:`Page`) need
only the standard library: a minimal synchronous WebSocket client over ``socket``. The browser
test (``tests/test_dashboard_browser.py``) uses them too.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

__all__ = ["CDP", "FAVICON_404", "CDPError", "Chromium", "Page", "check_png", "console_errors",
           "main"]

# As on the machine notes: headless, no sandbox (root), and no background traffic to Google's hosts.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-default-apps", "--disable-extensions", "--hide-scrollbars", "--mute-audio",
)
_DEVTOOLS_LINE = re.compile(rb"DevTools listening on (ws://\S+)")
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Chromium fetches /favicon.ico by itself; the page declares no icon and Deja answers 404, which
# the browser logs as an error. Nothing else is excused.
FAVICON_404 = ("/favicon.ico",)


class CDPError(RuntimeError):
    """A DevTools command failed, timed out, or the browser went away."""


def chromium_binary() -> str:
    """The Chromium executable: ``$CHROMIUM``, else ``chromium`` on PATH (Debian's package)."""
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which(
        "chromium-browser")
    if not found:
        raise FileNotFoundError("chromium not found; run scripts/system-deps.sh")
    return found


class _WebSocket:
    """The client side of RFC 6455, enough for CDP: masked text frames out, unmasked frames in."""

    def __init__(self, url: str, timeout: float) -> None:
        parts = urlsplit(url)
        if parts.scheme != "ws" or parts.hostname is None or parts.port is None:
            raise ValueError(f"need a ws://host:port/... url, got {url!r}")
        self._sock = socket.create_connection((parts.hostname, parts.port), timeout=timeout)
        self._buf = bytearray()
        key = base64.b64encode(os.urandom(16))
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        request = (f"GET {path} HTTP/1.1\r\nHost: {parts.hostname}:{parts.port}\r\n"
                   "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                   f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self._sock.sendall(request.encode())
        while b"\r\n\r\n" not in self._buf:
            self._fill(time.monotonic() + timeout)
        head, _, rest = bytes(self._buf).partition(b"\r\n\r\n")
        self._buf = bytearray(rest)
        status = head.split(b"\r\n", 1)[0]
        accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
        if b" 101 " not in status + b" " or accept not in head:
            raise CDPError(f"websocket handshake refused: {head[:300]!r}")

    def _fill(self, deadline: float) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("websocket read timed out")
        self._sock.settimeout(left)
        chunk = self._sock.recv(1 << 20)
        if not chunk:
            raise CDPError("browser closed the DevTools connection")
        self._buf += chunk

    def _take(self, n: int, deadline: float) -> bytes:
        while len(self._buf) < n:
            self._fill(deadline)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def _send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
        elif n < 1 << 16:
            header = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
        mask = os.urandom(4)
        # XOR with the repeated mask as one big integer: fast for any payload size.
        repeated = (mask * (n // 4 + 1))[:n]
        masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
            n, "big")
        self._sock.sendall(header + mask + masked)

    def send_text(self, text: str) -> None:
        self._send_frame(0x1, text.encode())

    def recv_text(self, deadline: float) -> str:
        """The next whole text message (continuation frames joined); answers pings."""
        message = bytearray()
        while True:
            b0, b1 = self._take(2, deadline)
            opcode, n = b0 & 0x0F, b1 & 0x7F
            if n == 126:
                (n,) = struct.unpack("!H", self._take(2, deadline))
            elif n == 127:
                (n,) = struct.unpack("!Q", self._take(8, deadline))
            mask = self._take(4, deadline) if b1 & 0x80 else b""
            payload = self._take(n, deadline)
            if mask:
                payload = bytes(c ^ mask[i % 4] for i, c in enumerate(payload))
            if opcode == 0x8:
                raise CDPError("browser closed the DevTools connection")
            if opcode == 0x9:
                self._send_frame(0xA, payload)
                continue
            if opcode in (0x0, 0x1, 0x2):
                message += payload
                if b0 & 0x80:
                    return message.decode()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._send_frame(0x8, b"")
        self._sock.close()


class CDP:
    """One DevTools connection: commands by id, events kept in :attr:`events` as they arrive."""

    def __init__(self, ws_url: str, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._ws = _WebSocket(ws_url, timeout)
        self._next_id = 0
        self.events: list[dict[str, Any]] = []

    def send(self, method: str, params: dict[str, Any] | None = None, *,
             session_id: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """Send a command and wait for its result; events read meanwhile go to :attr:`events`."""
        self._next_id += 1
        msg_id = self._next_id
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session_id:
            msg["sessionId"] = session_id
        self._ws.send_text(json.dumps(msg))
        deadline = time.monotonic() + (timeout or self.timeout)
        while True:
            try:
                reply = json.loads(self._ws.recv_text(deadline))
            except TimeoutError as exc:
                raise CDPError(f"{method}: no answer in {timeout or self.timeout} s") from exc
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise CDPError(f"{method}: {reply['error']}")
                result: dict[str, Any] = reply.get("result", {})
                return result
            if "method" in reply:
                self.events.append(reply)

    def pump(self, seconds: float) -> None:
        """Read events for up to ``seconds`` (returns early on none)."""
        deadline = time.monotonic() + seconds
        with contextlib.suppress(TimeoutError):
            while time.monotonic() < deadline:
                reply = json.loads(self._ws.recv_text(deadline))
                if "method" in reply:
                    self.events.append(reply)

    def close(self) -> None:
        self._ws.close()


class Chromium:
    """Headless Chromium on a new empty profile; the DevTools port is read off its stderr.

    A context manager: on exit the browser's whole process group is killed and the profile removed.
    """

    def __init__(self, *, width: int = 1280, height: int = 900, timeout: float = 30.0) -> None:
        self.width, self.height, self.timeout = width, height, timeout
        self._dir = Path(tempfile.mkdtemp(prefix="deja-chromium-"))
        self.log = self._dir / "chromium.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cdp: CDP | None = None

    def __enter__(self) -> Chromium:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> CDP:
        profile = self._dir / "profile"
        profile.mkdir()
        with self.log.open("wb") as err:
            self.proc = subprocess.Popen(
                [chromium_binary(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}",
                 "--remote-debugging-port=0", f"--window-size={self.width},{self.height}",
                 "about:blank"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                start_new_session=True)
        deadline = time.monotonic() + self.timeout
        while True:
            found = _DEVTOOLS_LINE.search(self.log.read_bytes())
            if found:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise CDPError(f"chromium gave no DevTools url: {self.log_tail()}")
            time.sleep(0.05)
        self.cdp = CDP(found.group(1).decode(), self.timeout)
        return self.cdp

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def new_page(self) -> Page:
        if self.cdp is None:
            raise CDPError("chromium is not started")
        target = self.cdp.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.cdp.send("Target.attachToTarget",
                                {"targetId": target, "flatten": True})["sessionId"]
        page = Page(self.cdp, session)
        for domain in ("Page", "Runtime", "Log"):
            page.send(f"{domain}.enable")
        page.send("Emulation.setDeviceMetricsOverride",
                  {"width": self.width, "height": self.height, "deviceScaleFactor": 1,
                   "mobile": False})
        return page

    def stop(self) -> None:
        if self.cdp is not None:
            with contextlib.suppress(OSError, CDPError):
                self.cdp.send("Browser.close", timeout=5)
            with contextlib.suppress(OSError):
                self.cdp.close()
            self.cdp = None
        if self.proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=5)
            # The renderer and helper processes share the browser's new session: end them all.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=10)
            self.proc = None
        shutil.rmtree(self._dir, ignore_errors=True)


class Page:
    """One tab, attached in flat mode: commands carry its session id."""

    def __init__(self, cdp: CDP, session_id: str) -> None:
        self.cdp, self.session_id = cdp, session_id

    def send(self, method: str, params: dict[str, Any] | None = None,
             timeout: float | None = None) -> dict[str, Any]:
        return self.cdp.send(method, params, session_id=self.session_id, timeout=timeout)

    def events(self) -> list[dict[str, Any]]:
        """The events of this tab received so far."""
        return [e for e in self.cdp.events if e.get("sessionId") == self.session_id]

    def pump(self, seconds: float) -> None:
        """Let ``seconds`` pass while collecting events (console messages arrive as events)."""
        self.cdp.pump(seconds)

    def evaluate(self, expression: str) -> Any:
        """The JSON value of ``expression`` in the page; raises on a thrown exception."""
        res = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                             "awaitPromise": True})
        if "exceptionDetails" in res:
            raise CDPError(f"evaluate {expression[:80]!r}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def navigate(self, url: str, timeout: float = 30.0) -> None:
        res = self.send("Page.navigate", {"url": url})
        if res.get("errorText"):
            raise CDPError(f"navigate {url}: {res['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout, what=f"load of {url}")

    def wait_for(self, expression: str, timeout: float, *, what: str = "") -> Any:
        """Poll ``expression`` until it is truthy; its last value is in the timeout's message."""
        deadline = time.monotonic() + timeout
        value: Any = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression)
            except CDPError as exc:  # a navigation in progress destroys the context: retry
                value = str(exc)[:300]
            else:
                if value:
                    return value
            self.cdp.pump(0.2)
        raise TimeoutError(f"waited {timeout} s for {what or expression}; last: {value!r}")

    def screenshot(self, out: Path) -> bytes:
        """A full-page PNG (the whole document, not only the viewport), written to ``out``."""
        size = self.send("Page.getLayoutMetrics")["cssContentSize"]
        clip = {"x": 0, "y": 0, "width": max(1, int(size["width"])),
                "height": max(1, int(size["height"])), "scale": 1}
        shot = self.send("Page.captureScreenshot", {"format": "png", "clip": clip,
                                                     "captureBeyondViewport": True}, timeout=60)
        png = base64.b64decode(shot["data"])
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(png)
        return png

    def open_dashboard(self, base_url: str, key: str, timeout: float = 30.0) -> None:
        """Open ``/``, store ``key`` where the page keeps it, reload, wait for the first refresh."""
        self.navigate(f"{base_url}/", timeout)
        self.send("Runtime.evaluate", {
            "expression": f"localStorage.setItem('deja.key', {json.dumps(key)}); "
                          "location.reload()"})
        self.wait_for("document.readyState === 'complete' && "
                      "document.querySelectorAll('#decisions tr').length > 0",
                      timeout, what="the dashboard's first refresh")


def console_errors(events: list[dict[str, Any]], ignore: tuple[str, ...] = ()) -> list[str]:
    """Console errors, uncaught exceptions and browser log errors among CDP ``events``.

    An error whose message contains one of the strings in ``ignore`` is left out.
    """
    found: list[str] = []
    for e in events:
        method, params = e.get("method"), e.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") == "error":
            args = params.get("args", [])
            found.append("console.error: " + " ".join(
                str(a.get("value", a.get("description", ""))) for a in args))
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            found.append("exception: " + str(details.get("exception", {}).get(
                "description", details.get("text", ""))))
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            found.append(f"log: {entry.get('text', '')} {entry.get('url', '')}".strip())
    return [f for f in found if not any(s in f for s in ignore)]


def check_png(png: bytes, *, min_width: int = 800, min_height: int = 400) -> tuple[int, int]:
    """Check ``png`` is a real, non-blank picture at least this big; return (width, height)."""
    if png[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    width, height = struct.unpack("!II", png[16:24])
    if width < min_width or height < min_height:
        raise ValueError(f"PNG only {width}x{height}")
    idat, pos = bytearray(), 8
    while pos < len(png):
        (length,) = struct.unpack("!I", png[pos:pos + 4])
        if png[pos + 4:pos + 8] == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    pixels = zlib.decompress(bytes(idat))
    if len(set(pixels)) < 32:  # a blank or single-colour page has only a handful of byte values
        raise ValueError(f"PNG {width}x{height} looks blank ({len(set(pixels))} byte values)")
    return width, height


@contextlib.contextmanager
def _demo_server() -> Iterator[Any]:
    from api.scenarios import demo_checks, demo_kb
    from tests.serving import Server

    with tempfile.TemporaryDirectory(prefix="deja-screenshot-") as tmp:
        srv = Server(Path(tmp) / "data")
        srv.start()
        try:
            with srv.client() as http:
                r = http.post("/v1/events", json={"events": demo_kb(0)})
                r.raise_for_status()
                r = http.post("/v1/check/batch", json={"events": demo_checks(0),
                                                        "dry_run": False})
                r.raise_for_status()
            yield srv
        finally:
            srv.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results/dashboard.png"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=900)
    ap.add_argument("--timeout", type=float, default=60.0)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    started = time.monotonic()
    with _demo_server() as srv, Chromium(width=args.width, height=args.height,
                                         timeout=args.timeout) as browser:
        page = browser.new_page()
        page.open_dashboard(srv.url, srv.key, args.timeout)
        page.wait_for("document.querySelectorAll('#queue tr').length > 1", args.timeout,
                      what="the escalation queue")
        page.pump(0.5)
        png = page.screenshot(args.out)
        width, height = check_png(png)
        errors = console_errors(page.events(), FAVICON_404)
    for line in errors:
        print(f"browser error: {line}", file=sys.stderr)
    print(f"wrote {args.out} ({width}x{height}, {len(png)} bytes) in "
          f"{time.monotonic() - started:.1f} s")
    return 1 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
