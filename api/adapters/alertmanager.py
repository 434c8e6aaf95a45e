"""Alertmanager webhook (version 4) → Events.

Alertmanager posts one notification per alert group::

    {"version": "4", "groupKey": "...", "status": "firing|resolved", "receiver": "...",
     "groupLabels": {...}, "commonLabels": {...}, "commonAnnotations": {...},
     "externalURL": "...", "truncatedAlerts": 0,
     "alerts": [{"status": "firing|resolved", "labels": {...}, "annotations": {...},
                 "startsAt": "...", "endsAt": "...", "generatorURL": "...", "fingerprint": "..."}]}

A notification repeats every alert of the group that is still firing (on each group change and
every ``repeat_interval``), and a resolved alert keeps the fingerprint and ``startsAt`` it fired
with; so one firing of one alert has the same Event id and ``dedup_key`` in every notification.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from api.adapters import (
    MAX_LABEL_VALUE,
    MAX_LABELS,
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
from api.scenarios import normalize_severity

__all__ = [
    "SERVICE_LABELS",
    "AlertmanagerBatch",
    "ConvertedAlert",
    "label_fingerprint",
    "parse_alertmanager",
]

#: Labels that name the Event's service, first present wins. ``job`` is the scrape job, usually
#: the exporter or application; ``namespace`` is the last resort of Kubernetes alerts.
SERVICE_LABELS = ("service", "job", "app", "app_kubernetes_io_name", "namespace")

# Kept first when an alert has more labels than an Event may carry.
_KEEP_FIRST = ("alertname", "severity", *SERVICE_LABELS, "instance")

# Prometheus' label-set fingerprint: FNV-1a 64 over sorted name/value pairs, each followed by the
# byte 255 (prometheus/common model/signature.go). Alertmanager's alert fingerprint is exactly this.
_FNV_OFFSET = 14695981039346656037
_FNV_PRIME = 1099511628211
_SEPARATOR = 255


@dataclass(frozen=True)
class ConvertedAlert:
    """One alert of a notification.

    ``event`` is an API.md Event dict; ``dedup_key`` (fingerprint and start time) is the same for
    every notification of this firing, firing or resolved; ``ended_at`` is when a resolved alert
    ended, None while it fires (a firing alert's ``endsAt`` is only Alertmanager's resolve-timeout
    estimate) or when Alertmanager sent the zero time.
    """

    event: dict[str, Any]
    dedup_key: str
    ended_at: datetime | None


@dataclass(frozen=True)
class AlertmanagerBatch:
    """A parsed notification: its alerts split by status, in payload order, plus the group's
    identity (``group_key``, ``receiver``) and how many alerts Alertmanager left out
    (``truncated``, its ``max_alerts`` setting)."""

    firing: list[ConvertedAlert] = field(default_factory=list)
    resolved: list[ConvertedAlert] = field(default_factory=list)
    group_key: str | None = None
    receiver: str | None = None
    truncated: int = 0


def label_fingerprint(labels: Mapping[str, str]) -> str:
    """The 16-hex-digit fingerprint Alertmanager gives an alert with these labels."""
    h = _FNV_OFFSET
    for name in sorted(labels):
        for part in (name, labels[name]):
            for byte in (*part.encode("utf-8", "surrogatepass"), _SEPARATOR):
                h = ((h ^ byte) * _FNV_PRIME) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def parse_alertmanager(payload: Mapping[str, Any]) -> AlertmanagerBatch:
    """Convert a version-4 webhook payload; raise :class:`AdapterError` naming the bad field.

    Each alert becomes an Event: ``id`` ``am-<fingerprint>-<startsAt>`` (a SHA-256 when that would
    exceed 128 characters), ``title`` ``"<alertname>: <summary>"`` (or the alert name),
    ``text`` the description plus a ``Source: <generatorURL>`` line, ``service`` from the first of
    :data:`SERVICE_LABELS` present, ``severity`` the ``severity`` label mapped onto
    critical|error|warning|info (absent stays absent), ``source`` ``"alertmanager"``, every label
    as a string, and ``occurred_at`` ``startsAt``. A missing fingerprint is computed from the
    labels the way Alertmanager computes it. An alert without a status takes the group's.
    """
    body = _mapping(payload, "body")
    version = body.get("version")
    if version is not None and str(version) != "4":
        raise AdapterError(f"unsupported webhook version {str(version)[:16]!r}; expected '4'",
                           "version")
    alerts = body.get("alerts")
    if not isinstance(alerts, Sequence) or isinstance(alerts, str | bytes):
        raise AdapterError("required list of alerts" if alerts is None else "must be a list",
                           "alerts")
    group_status = body.get("status")
    truncated = body.get("truncatedAlerts")
    batch = AlertmanagerBatch(
        group_key=_optional_str(body.get("groupKey")),
        receiver=_optional_str(body.get("receiver")),
        truncated=truncated if isinstance(truncated, int) and truncated > 0 else 0)
    for i, raw in enumerate(alerts):
        status, alert = _convert(raw, f"alerts[{i}]", group_status)
        (batch.firing if status == "firing" else batch.resolved).append(alert)
    return batch


def _convert(raw: object, path: str, group_status: object) -> tuple[str, ConvertedAlert]:
    alert = _mapping(raw, path)
    status = alert.get("status", group_status)
    if status not in ("firing", "resolved"):
        raise AdapterError("must be 'firing' or 'resolved'", f"{path}.status")
    labels = _labels(alert.get("labels"), f"{path}.labels")
    name = labels.get("alertname", "")
    if not name.strip():
        raise AdapterError("required non-empty string", f"{path}.labels.alertname")
    annotations = _mapping(alert.get("annotations"), f"{path}.annotations", required=False)
    started = _timestamp(alert.get("startsAt"), f"{path}.startsAt", required=True)
    ended = _timestamp(alert.get("endsAt"), f"{path}.endsAt", required=False)
    fingerprint = _string(alert.get("fingerprint"), f"{path}.fingerprint", required=False)
    generator = _string(alert.get("generatorURL"), f"{path}.generatorURL", required=False)

    starts = _rfc3339(started)
    dedup_key = f"{fingerprint or label_fingerprint(labels)}-{starts}"
    summary = _annotation(annotations, "summary")
    description = _annotation(annotations, "description") or _annotation(annotations, "message")
    title = f"{name}: {summary}" if summary and summary != name else name
    lines = [description or "", f"Source: {generator}" if generator else ""]
    text = "\n".join(line for line in lines if line)

    event: dict[str, Any] = {
        "id": _bounded_id("am-", dedup_key),
        "title": _clip(title, MAX_TITLE),
        "source": "alertmanager",
        "labels": _fit_labels(labels),
        "occurred_at": starts,
    }
    if text:
        event["text"] = _clip(text, MAX_TEXT)
    service = next((labels[k] for k in SERVICE_LABELS if labels.get(k, "").strip()), None)
    if service is not None:
        event["service"] = _clip(service, MAX_SHORT)
    if labels.get("severity", "").strip():
        event["severity"] = normalize_severity(labels["severity"])
    return status, ConvertedAlert(event=event, dedup_key=dedup_key,
                                  ended_at=ended if status == "resolved" else None)


def _labels(value: object, path: str) -> dict[str, str]:
    """Labels as strings; a non-string value (a number from a hand-made payload) as JSON."""
    raw = _mapping(value, path)
    out: dict[str, str] = {}
    for key, val in raw.items():
        if not isinstance(key, str) or not key.strip():
            raise AdapterError("label names must be non-empty strings", path)
        out[key] = _as_text(val)
    return out


def _fit_labels(labels: Mapping[str, str]) -> dict[str, str]:
    """At most 64 labels that EventIn accepts: the identifying ones first, then by name."""
    order = [k for k in _KEEP_FIRST if k in labels]
    order += sorted(k for k in labels if k not in _KEEP_FIRST)
    out: dict[str, str] = {}
    for key in order:
        clean = _clip(key, MAX_SHORT)
        if clean and clean not in out:
            out[clean] = _clip(labels[key], MAX_LABEL_VALUE)
        if len(out) == MAX_LABELS:
            break
    return out


def _annotation(annotations: Mapping[str, Any], key: str) -> str | None:
    value = annotations.get(key)
    if value is None:
        return None
    text = _as_text(value).strip()
    return text or None


def _optional_str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None
