"""Webhook notifications: payload shapes and a background, retrying deliverer.

:func:`slack_payload` and :func:`generic_payload` turn the API's Escalation object into a POST
body. :class:`Notifier` delivers bodies on worker threads so that the request that opened an
escalation never waits on a webhook: :meth:`Notifier.send` only enqueues. Failed attempts are
retried from a queue ordered by due time, so a receiver that is down delays only its own
deliveries. Every attempt is reported to the ``record`` callback as a :class:`Delivery` whose URL
keeps only scheme, host and port (webhook paths carry tokens).
"""

from __future__ import annotations

import heapq
import itertools
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx

from handoff.briefing import jsonable
from handoff.routing import Webhook, redact_url

__all__ = ["EVENT_TYPES", "Delivery", "DeliveryStatus", "Notifier", "generic_payload",
           "slack_payload"]

log = logging.getLogger(__name__)

DeliveryStatus = Literal["delivered", "retrying", "failed"]
EVENT_TYPES: tuple[str, ...] = ("opened", "breached", "resolved")

# Slack Block Kit limits; longer text makes Slack reject the whole message.
_SLACK_HEADER = 150
_SLACK_TEXT = 3000
_SLACK_FIELD = 2000


# -- payloads ---------------------------------------------------------------------------------

def generic_payload(escalation: Mapping[str, Any], event_type: str) -> dict[str, Any]:
    """``{"type": "deja.escalation.<event_type>", "escalation": <the Escalation, JSON-ready>}``.

    ``event_type`` is ``opened``, ``breached`` or ``resolved`` (the ``deja.escalation.`` prefix
    may be included); anything else raises ``ValueError``.
    """
    short = event_type.removeprefix("deja.escalation.")
    if short not in EVENT_TYPES:
        raise ValueError(f"event_type: must be one of {', '.join(EVENT_TYPES)}, "
                         f"not {event_type!r}")
    return {"type": f"deja.escalation.{short}", "escalation": jsonable(escalation)}


def slack_payload(escalation: Mapping[str, Any]) -> dict[str, Any]:
    """A Slack incoming-webhook body: ``text`` (the notification fallback) and ``blocks`` —
    a header, the briefing summary, fields (kind, route, due, events, state), the top suggested
    actions when there are any, and a context line with the decision and escalation ids.

    Event text is escaped for Slack (``&``, ``<``, ``>``), so an alert title cannot mention
    ``<!channel>`` or forge links; texts are cut to Slack's block limits.
    """
    briefing = escalation.get("briefing") or {}
    route = escalation.get("route") or {}
    kind = str(escalation.get("kind") or "escalate")
    state = str(escalation.get("state") or "open")
    services = [str(s) for s in briefing.get("services") or []]

    what = "Novel event" if kind == "escalate" else "Review needed"
    prefix = {"breached": "SLA breached: ", "resolved": "Resolved: "}.get(state, "")
    header = f"{prefix}{what}" + (f" on {', '.join(services)}" if services else "")
    summary = str(briefing.get("summary") or briefing.get("title") or "(no briefing)")
    due = escalation.get("due_at")
    due_text = due.isoformat() if isinstance(due, datetime) else str(due or "not set")
    owner = " / ".join(str(route[k]) for k in ("team", "role") if route.get(k)) or "unrouted"
    if route.get("channel"):
        owner += f" ({route['channel']})"

    fields = [("Kind", kind), ("Route", owner), ("Due", due_text),
              ("Events", str(escalation.get("events", 1))), ("State", state)]
    blocks: list[dict[str, Any]] = [
        {"type": "header",
         "text": {"type": "plain_text", "text": _cut(header, _SLACK_HEADER), "emoji": False}},
        {"type": "section", "text": {"type": "mrkdwn", "text": _cut(_esc(summary), _SLACK_TEXT)}},
        {"type": "section", "fields": [
            {"type": "mrkdwn", "text": _cut(f"*{name}*\n{_esc(value)}", _SLACK_FIELD)}
            for name, value in fields]},
    ]
    actions = [str(a) for a in briefing.get("suggested_actions") or []][:3]
    if actions:
        text = "*Suggested*\n" + "\n".join(f"• {_esc(a)}" for a in actions)
        blocks.append({"type": "section", "text": {"type": "mrkdwn",
                                                   "text": _cut(text, _SLACK_TEXT)}})
    ids = f"decision {escalation.get('decision_id', '?')} · escalation {escalation.get('id', '?')}"
    blocks.append({"type": "context",
                   "elements": [{"type": "mrkdwn", "text": _cut(_esc(ids), _SLACK_FIELD)}]})
    # The fallback text is what phones and screen readers show: the summary already says what.
    return {"text": _cut(_esc(prefix + summary), _SLACK_TEXT), "blocks": blocks}


def _esc(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- delivery ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Delivery:
    """One delivery attempt, as reported to ``record``. ``url_redacted`` is scheme://host[:port]
    only; ``error`` never contains the webhook URL."""

    escalation_id: str
    url_redacted: str
    format: str
    attempt: int
    status: DeliveryStatus
    http_status: int | None
    error: str | None
    at: datetime


@dataclass
class _Job:
    escalation_id: str
    webhook: Webhook
    body: bytes
    attempt: int = 0


class Notifier:
    """Delivers webhook POSTs on background daemon threads, retrying transient failures.

    Parameters (the trade-offs):

    - ``record``: called after every attempt, on a worker thread; should be quick and must be
      thread-safe. Its exceptions are logged and do not stop delivery.
    - ``max_attempts``: total tries per delivery (>= 1). Retried: connection errors, timeouts,
      HTTP 5xx and 429; not retried: other 4xx and 3xx (redirects are not followed, so a token
      cannot leak to another host).
    - ``backoff_seconds`` / ``backoff_max``: wait ``backoff_seconds * 2**(attempt-1)`` (plus up
      to 10% jitter, at most ``backoff_max``) before a retry; a 429/503 ``Retry-After`` of a
      few seconds is honoured up to ``backoff_max``. Larger values spare a struggling receiver
      but delay the page.
    - ``timeout``: per-request seconds; a receiver that hangs holds one worker this long.
    - ``workers``: concurrent deliveries; more keep one slow receiver from delaying others.
    """

    def __init__(self, *, record: Callable[[Delivery], None], max_attempts: int = 5,
                 backoff_seconds: float = 1.0, backoff_max: float = 60.0, timeout: float = 5.0,
                 workers: int = 2) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts: must be >= 1")
        if backoff_seconds < 0 or backoff_max < 0:
            raise ValueError("backoff_seconds, backoff_max: must be >= 0")
        if timeout <= 0:
            raise ValueError("timeout: must be > 0")
        if workers < 1:
            raise ValueError("workers: must be >= 1")
        self.record = record
        self.max_attempts = max_attempts
        self.backoff_seconds = backoff_seconds
        self.backoff_max = backoff_max
        self.timeout = timeout
        self.workers = workers
        self._cond = threading.Condition()
        self._heap: list[tuple[float, int, _Job]] = []  # (monotonic due time, seq, job)
        self._seq = itertools.count()
        self._in_flight = 0
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._stopped = False

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker threads (idempotent). Raises ``RuntimeError`` after :meth:`stop`."""
        with self._cond:
            if self._stopped or self._stopping:
                raise RuntimeError("notifier is stopped")
            if self._threads:
                return
            self._threads = [threading.Thread(target=self._work, name=f"deja-notifier-{i}",
                                              daemon=True) for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def stop(self, timeout: float = 5.0) -> bool:
        """Stop within about ``timeout`` seconds (plus at most one request ``timeout`` for
        attempts in flight): wait for the queue to drain, then give up on what is left, reporting
        each abandoned delivery as ``failed``. Returns True when everything was delivered or
        finally failed before the deadline. Idempotent."""
        drained = self.flush(timeout) if self._threads else not self.pending()
        with self._cond:
            self._stopping = True
            left = [job for _, _, job in self._heap]
            self._heap.clear()
            self._cond.notify_all()
        for job in left:
            self._report(job, job.attempt, "failed", None, "notifier stopped before delivery")
        for t in self._threads:
            t.join(self.timeout + 1.0)
        with self._cond:
            self._stopped = True
        return drained

    def __enter__(self) -> Notifier:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- queue ------------------------------------------------------------------------------

    def send(self, escalation_id: str, webhook: Webhook, payload: Mapping[str, Any]) -> None:
        """Queue ``payload`` for ``webhook`` and return at once. The payload is serialised
        here (datetimes as ISO strings), so an unserialisable one raises ``TypeError`` to the
        caller rather than failing later. Raises ``RuntimeError`` after :meth:`stop`."""
        body = json.dumps(jsonable(payload), ensure_ascii=False).encode()
        job = _Job(escalation_id, webhook, body)
        with self._cond:
            if self._stopping or self._stopped:
                raise RuntimeError("notifier is stopped")
            heapq.heappush(self._heap, (time.monotonic(), next(self._seq), job))
            self._cond.notify()

    def pending(self) -> int:
        """Deliveries not finished yet: queued (including those waiting to retry) or in flight."""
        with self._cond:
            return len(self._heap) + self._in_flight

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait until nothing is queued or in flight; False if ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._heap or self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- worker -----------------------------------------------------------------------------

    def _next_job(self) -> _Job | None:
        """The next due job (marked in flight), or None when stopping."""
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if self._heap:
                    wait = self._heap[0][0] - time.monotonic()
                    if wait <= 0:
                        _, _, job = heapq.heappop(self._heap)
                        self._in_flight += 1
                        return job
                    self._cond.wait(wait)
                else:
                    self._cond.wait()

    def _work(self) -> None:
        # One client per thread: connection reuse without sharing a pool across threads.
        with httpx.Client(timeout=self.timeout, follow_redirects=False) as client:
            while (job := self._next_job()) is not None:
                retry_in: float | None = None
                try:
                    retry_in = self._attempt(client, job)
                except Exception:  # a bug must not kill the worker and strand the queue
                    log.exception("webhook delivery attempt crashed")
                with self._cond:
                    self._in_flight -= 1
                    requeued = retry_in is not None and not self._stopping
                    if requeued:
                        assert retry_in is not None
                        heapq.heappush(self._heap, (time.monotonic() + retry_in,
                                                    next(self._seq), job))
                    self._cond.notify_all()
                if retry_in is not None and not requeued:
                    self._report(job, job.attempt, "failed", None,
                                 "notifier stopped before delivery")

    def _attempt(self, client: httpx.Client, job: _Job) -> float | None:
        """POST once and report it; the delay before the next try, or None when done."""
        job.attempt += 1
        url = job.webhook.url
        status: int | None = None
        retry_after: float | None = None
        try:
            response = client.post(url, content=job.body,
                                   headers={"Content-Type": "application/json",
                                            "User-Agent": "deja-notifier"})
        except httpx.TransportError as exc:  # connect, timeout, network, protocol
            error: str | None = _scrub(f"{type(exc).__name__}: {exc}", url)
            transient = True
        except Exception as exc:  # a bad URL or the like: retrying cannot help
            error = _scrub(f"{type(exc).__name__}: {exc}", url)
            transient = False
        else:
            status = response.status_code
            if 200 <= status < 300:
                self._report(job, job.attempt, "delivered", status, None)
                return None
            transient = status == 429 or status >= 500
            try:
                snippet = " ".join(response.text[:200].split())
            except Exception:  # an undecodable body is no reason to lose the status
                snippet = ""
            error = _scrub(f"HTTP {status}" + (f": {snippet}" if snippet else ""), url)
            retry_after = _retry_after(response.headers.get("Retry-After"))

        if not transient or job.attempt >= self.max_attempts:
            self._report(job, job.attempt, "failed", status, error)
            log.warning("webhook delivery to %s failed after %d attempt(s): %s",
                        redact_url(url), job.attempt, error)
            return None
        self._report(job, job.attempt, "retrying", status, error)
        return self._delay(job.attempt, retry_after)

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        # Exponent capped: 2.0**1100 overflows, and backoff_max bounds the wait anyway.
        delay = self.backoff_seconds * 2.0 ** min(attempt - 1, 60)
        # Jitter spreads retries of many escalations hitting the same receiver.
        delay *= 1 + random.uniform(0, 0.1)
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.backoff_max)

    def _report(self, job: _Job, attempt: int, status: DeliveryStatus, http_status: int | None,
                error: str | None) -> None:
        delivery = Delivery(job.escalation_id, redact_url(job.webhook.url), job.webhook.format,
                            attempt, status, http_status, error, datetime.now(UTC))
        try:
            self.record(delivery)
        except Exception:
            log.exception("recording a webhook delivery failed")


def _scrub(message: str, url: str) -> str:
    """``message`` without the webhook URL, its path, query or password (some errors quote
    the URL, some receivers echo the path)."""
    message = message.replace(url, redact_url(url))
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return message[:500]
    secrets = [parts.path + (f"?{parts.query}" if parts.query else ""), parts.path, parts.query,
               password or ""]
    for secret in secrets:
        if len(secret) > 1:
            message = message.replace(secret, "…")
    return message[:500]


def _retry_after(value: str | None) -> float | None:
    # Only the delta-seconds form; an HTTP date is rare from webhook receivers.
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
