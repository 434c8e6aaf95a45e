"""Ingest adapters: pure converters from alerting tools' payloads to API.md Events.

Each adapter takes the decoded JSON body a tool sends and returns Event dicts (the shape
``EventIn`` validates) plus what the caller needs to act on them; none does I/O or touches the KB.

- :func:`parse_alertmanager`: an Alertmanager webhook (version 4) → firing and resolved alerts.
- :func:`parse_pagerduty`: a PagerDuty Events API v2 event → trigger / acknowledge / resolve.

Ids are deterministic, so a retried delivery maps to the same Event ``id`` as the first one.
Every produced Event fits API.md's limits (lengths, at most 64 labels, no NUL characters); text
that is too long is truncated rather than rejected, because refusing a webhook loses the alert.

Errors::

    DejaError                (kb.errors)
     └── InvalidInput        a value the caller sent cannot be used (names the field)
          └── AdapterError   a payload does not have the tool's documented shape; ``field`` is
                             its path in the payload, e.g. ``alerts[0].labels.alertname``
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Literal, overload

from kb.errors import InvalidInput

__all__ = [
    "AdapterError",
    "AlertmanagerBatch",
    "ConvertedAlert",
    "PagerDutyEvent",
    "parse_alertmanager",
    "parse_pagerduty",
]

# API.md's limits on an Event, kept here so converted events always validate.
MAX_ID = 128
MAX_TITLE = 2000
MAX_TEXT = 20000
MAX_SHORT = 200
MAX_LABELS = 64
MAX_LABEL_VALUE = 2000


class AdapterError(InvalidInput):
    """A payload does not have the documented shape; ``field`` is the offending path in it."""

    field: str

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}", field)


def _mapping(value: object, field: str, *, required: bool = True) -> Mapping[str, Any]:
    """``value`` as a JSON object, or an empty one when it is absent and not ``required``."""
    if value is None and not required:
        return {}
    if not isinstance(value, Mapping):
        raise AdapterError("required object" if value is None else "must be an object", field)
    return value


@overload
def _string(value: object, field: str, *, required: Literal[True] = True) -> str: ...


@overload
def _string(value: object, field: str, *, required: bool) -> str | None: ...


def _string(value: object, field: str, *, required: bool = True) -> str | None:
    """``value`` as a non-blank string; ``None`` when it is absent (or blank) and not required."""
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise AdapterError("required non-empty string", field)
        return None
    if not isinstance(value, str):
        raise AdapterError("must be a string", field)
    return value


def _as_text(value: object) -> str:
    """Any JSON value as text: strings as they are, everything else as compact JSON."""
    if isinstance(value, str):
        return value
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def _clip(text: str, limit: int) -> str:
    """Text that fits an Event field: NUL characters dropped (EventIn refuses them), truncated."""
    return text.replace("\x00", "")[:limit]


@overload
def _timestamp(value: object, field: str, *, required: Literal[True]) -> datetime: ...


@overload
def _timestamp(value: object, field: str, *, required: bool) -> datetime | None: ...


def _timestamp(value: object, field: str, *, required: bool) -> datetime | None:
    """An RFC3339 / ISO 8601 time as an aware UTC datetime; a time without offset is UTC.

    Go's zero time (``0001-01-01T00:00:00Z``), which Alertmanager sends for "not set", is None.
    """
    text = _string(value, field, required=required)
    if text is None:
        return None
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        raise AdapterError(f"not an RFC3339 time: {text[:64]!r}", field) from None
    if parsed.year <= 1:
        if required:
            raise AdapterError("the zero time is not a valid time here", field)
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _rfc3339(t: datetime) -> str:
    """The one canonical spelling of a UTC time, so equal instants give equal ids."""
    frac = f".{t.microsecond:06d}" if t.microsecond else ""
    return t.strftime("%Y-%m-%dT%H:%M:%S") + frac + "Z"


def _bounded_id(prefix: str, key: str) -> str:
    """``prefix + key`` when it is a valid Event id, else ``prefix`` + the SHA-256 of ``key``.

    Either way the result depends only on ``key``, so retries keep their id.
    """
    candidate = prefix + key
    if len(candidate) <= MAX_ID and key.isprintable():
        return candidate
    return prefix + hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()


# The converters import the error and the helpers above from this module, so they come last.
from api.adapters.alertmanager import (  # noqa: E402
    AlertmanagerBatch,
    ConvertedAlert,
    parse_alertmanager,
)
from api.adapters.pagerduty import PagerDutyEvent, parse_pagerduty  # noqa: E402
