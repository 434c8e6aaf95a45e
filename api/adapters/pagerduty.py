"""PagerDuty Events API v2 → an Event.

The body PagerDuty's ``/v2/enqueue`` accepts::

    {"routing_key": "...", "event_action": "trigger|acknowledge|resolve", "dedup_key": "...",
     "payload": {"summary": "...", "source": "...", "severity": "critical|error|warning|info",
                 "timestamp": "...", "component": "...", "group": "...", "class": "...",
                 "custom_details": {...}},
     "links": [{"href": "...", "text": "..."}], "images": [{"src": "...", ...}],
     "client": "...", "client_url": "..."}

Only a trigger carries an event; acknowledge and resolve name an earlier trigger by its
``dedup_key``. The routing key is an integration secret: it never appears in the Event.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from api.adapters import (
    MAX_SHORT,
    MAX_TEXT,
    MAX_TITLE,
    AdapterError,
    _as_text,
    _bounded_id,
    _clip,
    _mapping,
    _rfc3339,
    _string,
    _timestamp,
)

__all__ = ["PagerDutyEvent", "parse_pagerduty"]

Action = Literal["trigger", "acknowledge", "resolve"]
_ACTIONS: tuple[Action, ...] = ("trigger", "acknowledge", "resolve")
_SEVERITIES = ("critical", "error", "warning", "info")
# Payload fields copied into the Event's labels (they are short identifiers in PagerDuty too).
_LABEL_FIELDS = ("source", "component", "group", "class")


@dataclass(frozen=True)
class PagerDutyEvent:
    """A parsed Events v2 call: the action, the ``dedup_key`` that ties a trigger to its
    acknowledge and resolve, and for a trigger the API.md Event (None otherwise)."""

    action: Action
    dedup_key: str
    event: dict[str, Any] | None


def parse_pagerduty(payload: Mapping[str, Any]) -> PagerDutyEvent:
    """Convert an Events API v2 body; raise :class:`AdapterError` naming the bad field.

    A trigger needs ``payload.summary``, ``payload.source`` and ``payload.severity`` (one of
    critical|error|warning|info, any case); acknowledge and resolve need ``dedup_key``. A trigger
    without ``dedup_key`` gets one derived from its routing key and payload, so a retried trigger
    keeps its key (PagerDuty itself would mint a fresh one). The Event: ``id`` ``pd-<dedup_key>``
    (a SHA-256 when longer than 128 characters), ``title`` the summary, ``text`` the custom
    details (``key: value`` lines) and links, ``service`` the first of component, group and
    source, ``source`` ``"pagerduty"``, ``labels`` source/component/group/class, ``occurred_at``
    ``payload.timestamp`` when given.
    """
    body = _mapping(payload, "body")
    action = body.get("event_action")
    if action not in _ACTIONS:
        raise AdapterError("must be one of trigger, acknowledge, resolve", "event_action")
    if action != "trigger":
        return PagerDutyEvent(action=action, dedup_key=_string(body.get("dedup_key"), "dedup_key"),
                              event=None)
    dedup_key = _string(body.get("dedup_key"), "dedup_key", required=False)

    inner = _mapping(body.get("payload"), "payload")
    summary = _string(inner.get("summary"), "payload.summary")
    source = _string(inner.get("source"), "payload.source")
    severity = _string(inner.get("severity"), "payload.severity")
    if severity.strip().lower() not in _SEVERITIES:
        raise AdapterError("must be one of critical, error, warning, info", "payload.severity")
    occurred = _timestamp(inner.get("timestamp"), "payload.timestamp", required=False)
    fields = {"source": source}
    for name in _LABEL_FIELDS[1:]:
        value = _string(inner.get(name), f"payload.{name}", required=False)
        if value is not None:
            fields[name] = value
    if dedup_key is None:
        dedup_key = _derived_key(body.get("routing_key"), inner)

    text = "\n".join(part for part in (_details(inner.get("custom_details")),
                                        _links(body.get("links"))) if part)
    event: dict[str, Any] = {
        "id": _bounded_id("pd-", dedup_key),
        "title": _clip(summary, MAX_TITLE),
        "service": _clip(fields.get("component") or fields.get("group") or source, MAX_SHORT),
        "severity": severity.strip().lower(),
        "source": "pagerduty",
        "labels": {k: _clip(v, MAX_SHORT) for k, v in fields.items()},
    }
    if text:
        event["text"] = _clip(text, MAX_TEXT)
    if occurred is not None:
        event["occurred_at"] = _rfc3339(occurred)
    return PagerDutyEvent(action="trigger", dedup_key=dedup_key, event=event)


def _derived_key(routing_key: object, inner: Mapping[str, Any]) -> str:
    """A stable key for a trigger sent without one: same integration and payload, same key."""
    canonical = json.dumps([_as_text(routing_key), inner], sort_keys=True, default=str,
                           separators=(",", ":"))
    return "deja-" + hashlib.sha256(canonical.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _details(value: object) -> str:
    """``custom_details`` as text: an object as ``key: value`` lines in the sender's order."""
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return "\n".join(f"{k}: {_as_text(v)}" for k, v in value.items())
    return _as_text(value)


def _links(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise AdapterError("must be a list", "links")
    lines = []
    for i, raw in enumerate(value):
        link = _mapping(raw, f"links[{i}]")
        href = _string(link.get("href"), f"links[{i}].href")
        label = _string(link.get("text"), f"links[{i}].text", required=False)
        lines.append(f"{label}: {href}" if label else f"Link: {href}")
    return "\n".join(lines)
