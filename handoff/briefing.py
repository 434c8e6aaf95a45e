"""Briefings: what a human needs to pick up an escalation or a review in one read.

:func:`build_briefing` is pure: the caller gathers the event, the verdict's novelty and neighbours,
the recent changes to the implicated services (see :func:`affected_services`) and the grouping
counts, and gets back the API's ``briefing`` object, JSON-ready (datetimes as RFC3339 strings).
Naive datetimes are taken to be UTC; times are shown in UTC.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

__all__ = ["SCOPE_LABELS", "SERVICE_LABELS", "affected_services", "build_briefing", "jsonable"]

SERVICE_LABELS: tuple[str, ...] = ("service", "app", "application")
"""Label keys that name a service, besides the event's own ``service``."""

SCOPE_LABELS: tuple[tuple[str, str], ...] = (
    ("host", "Host"), ("hostname", "Host"), ("instance", "Instance"), ("node", "Node"),
    ("pod", "Pod"), ("container", "Container"), ("namespace", "Namespace"),
    ("cluster", "Cluster"), ("region", "Region"), ("zone", "Zone"),
    ("environment", "Environment"), ("env", "Environment"),
)
"""Label keys that say where an event happened, with the name shown in the scope line."""

_TITLE_CHARS = 80


def affected_services(event: Mapping[str, Any]) -> list[str]:
    """The services an event implicates: its ``service`` first, then service-naming labels
    (``SERVICE_LABELS``), without repeats. Use it to fetch the recent changes to pass in."""
    labels = event.get("labels") or {}
    names = [event.get("service")] + [labels.get(k) for k in SERVICE_LABELS]
    out: list[str] = []
    for name in names:
        if isinstance(name, str) and name.strip() and name.strip() not in out:
            out.append(name.strip())
    return out


def build_briefing(*, event: Mapping[str, Any], kind: str, novelty: Mapping[str, Any],
                   neighbours: Sequence[Mapping[str, Any]],
                   recent_changes: Sequence[Mapping[str, Any]], events_count: int,
                   first_seen: datetime, last_seen: datetime, reasons: Sequence[str],
                   escalation_id: str | None = None) -> dict[str, Any]:
    """The API's briefing for an ``escalate`` or ``review`` handoff.

    Returns ``summary`` (one paragraph: what, why it was handed off, how many events since when,
    recent changes), ``impact`` (severity, count, services), ``scope`` (services, hosts and
    other placement labels, time span), ``services``, ``recent_changes`` (newest first, each
    with ``minutes_before`` the first event, negative when after it), ``evidence`` (the
    neighbours, most similar first), ``suggested_actions`` and ``novelty`` (score, threshold,
    components, nearest similarity).

    ``suggested_actions`` lists the neighbours' distinct resolution actions, most similar first,
    each with its track record (``track_record`` {successes, failures} on a neighbour, else the
    neighbours' outcomes) and nearest incident; when none has one, a generic first step naming
    ``escalation_id`` (or ``{id}``). A recent change adds a last "check this change" action.

    Raises ``ValueError`` for a ``kind`` other than ``escalate`` or ``review``.
    """
    if kind not in ("escalate", "review"):
        raise ValueError(f"kind: must be escalate or review, not {kind!r}")
    first, last = _utc(first_seen), _utc(last_seen)
    services = affected_services(event)
    evidence = sorted((dict(n) for n in neighbours), key=_similarity, reverse=True)
    changes = _changes(recent_changes, first)
    nov = _novelty(novelty, evidence)
    title = _shorten(str(event.get("title") or "untitled event"), _TITLE_CHARS)
    severity = _severity(event)

    where = f" on {', '.join(services)}" if services else ""
    where += f" ({severity})" if severity else ""
    if kind == "escalate":
        head = f"Novel event{where}: '{title}'. {_why_novel(nov, reasons)}"
    else:
        head = (f"Familiar but ambiguous: '{title}'{where}{_resembles(evidence)}. "
                f"{_sentence(reasons, 'the policy asked for a human check')} "
                "A reviewer should approve or reject the suggested resolution.")
    summary = " ".join([head, _counting(events_count, first, last),
                        _changes_sentence(changes, services)]).strip()

    return {
        "title": str(event.get("title") or ""),
        "summary": summary,
        "impact": _impact(severity, events_count, first, last, services),
        "scope": _scope(services, event.get("labels") or {}, first, last),
        "services": services,
        "recent_changes": [c.as_dict() for c in changes],
        "evidence": [jsonable(n) for n in evidence],
        "suggested_actions": _suggestions(evidence, changes, services, escalation_id),
        "novelty": nov,
    }


def jsonable(value: Any) -> Any:
    """``value`` with datetimes/dates as ISO strings, tuples as lists and mappings as dicts,
    so that ``json.dumps`` accepts it; other values unchanged."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


# -- pieces -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Change:
    service: str | None
    summary: str
    at: datetime | None
    author: str | None
    ref: str | None
    minutes_before: float | None

    def describe(self) -> str:
        text = self.summary + (f" by {self.author}" if self.author else "")
        if self.minutes_before is not None:
            gap = _duration(timedelta(minutes=abs(self.minutes_before)))
            text += (f" {gap} before the first event" if self.minutes_before >= 0
                     else f" {gap} after the first event")
        return text

    def as_dict(self) -> dict[str, Any]:
        return {"service": self.service, "summary": self.summary,
                "at": None if self.at is None else self.at.isoformat(),
                "author": self.author, "ref": self.ref,
                "minutes_before": (None if self.minutes_before is None
                                   else round(self.minutes_before, 1))}


def _changes(raw: Sequence[Mapping[str, Any]], first: datetime) -> list[_Change]:
    out = []
    for c in raw:
        at = _parse_time(c.get("at"))
        out.append(_Change(
            service=c.get("service"), summary=str(c.get("summary") or "change"), at=at,
            author=c.get("author"), ref=c.get("ref"),
            minutes_before=None if at is None else (first - at).total_seconds() / 60))
    # Newest first; a change without a time sorts last rather than failing the briefing.
    far_past = datetime.min.replace(tzinfo=UTC)
    return sorted(out, key=lambda c: c.at or far_past, reverse=True)


def _novelty(novelty: Mapping[str, Any], evidence: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    nearest = novelty.get("nearest_similarity")
    if nearest is None and evidence:
        nearest = _similarity(evidence[0])
    out: dict[str, Any] = {"score": _float(novelty.get("score")),
                           "threshold": _float(novelty.get("threshold")),
                           "components": dict(novelty.get("components") or {}),
                           "nearest_similarity": _float(nearest)}
    if "is_novel" in novelty:
        out["is_novel"] = bool(novelty["is_novel"])
    return out


def _why_novel(nov: Mapping[str, Any], reasons: Sequence[str]) -> str:
    score, threshold, nearest = nov["score"], nov["threshold"], nov["nearest_similarity"]
    figures = [] if nearest is None else [f"nearest similarity {nearest:.2f}"]
    if score is not None and threshold is not None:
        sign = "≥" if score >= threshold else "<"
        figures.append(f"novelty {score:.2f} {sign} threshold {threshold:.2f}")
        if score < threshold:
            # Escalated for another reason than novelty: the reasons are the explanation.
            return ("Escalated although the knowledge base has look-alikes "
                    f"({', '.join(figures)}): {_sentence(reasons, 'the policy asked for people')}")
    detail = f" ({', '.join(figures)})" if figures else ""
    if nearest is None:
        return f"The knowledge base has nothing to compare it with{detail}."
    return f"Nothing in the knowledge base is close{detail}."


def _resembles(evidence: Sequence[Mapping[str, Any]]) -> str:
    if not evidence:
        return ""
    top = evidence[0]
    name = top.get("id") or top.get("kb_id") or "a past incident"
    title = f" '{_shorten(str(top['title']), 60)}'" if top.get("title") else ""
    return f" resembles {name}{title} (similarity {_similarity(top):.2f})"


def _sentence(reasons: Sequence[str], fallback: str) -> str:
    parts = [r.strip().rstrip(".") for r in reasons if r and r.strip()]
    text = "; ".join(parts) if parts else fallback
    return text[0].upper() + text[1:] + "."


def _counting(count: int, first: datetime, last: datetime) -> str:
    if count <= 1:
        return f"1 event at {_clock(first, last)}."
    return f"{count} events since {_clock(first, last)}."


def _changes_sentence(changes: Sequence[_Change], services: Sequence[str]) -> str:
    to = f" to {', '.join(services)}" if services else ""
    if not changes:
        return f"No recent changes recorded for {', '.join(services)}." if services else ""
    if len(changes) == 1:
        return f"1 recent change{to}: {changes[0].describe()}."
    return f"{len(changes)} recent changes{to}; latest: {changes[0].describe()}."


def _impact(severity: str | None, count: int, first: datetime, last: datetime,
            services: Sequence[str]) -> str:
    sev = f"Severity {severity}" if severity else "Severity not given"
    events = "1 event" if count <= 1 else f"{count} events over {_duration(last - first)}"
    where = (f"affects {', '.join(services)}" if services
             else "no service named: the owner is unknown")
    return f"{sev}; {events}; {where}."


def _scope(services: Sequence[str], labels: Mapping[str, Any], first: datetime,
           last: datetime) -> str:
    parts = [f"Services: {', '.join(services)}." if services else "Services: not given."]
    placed: dict[str, list[str]] = {}
    for key, name in SCOPE_LABELS:
        value = labels.get(key)
        if isinstance(value, str) and value and value not in placed.get(name, []):
            placed.setdefault(name, []).append(value)
    parts += [f"{name}: {', '.join(values)}." for name, values in placed.items()]
    if last <= first:
        parts.append(f"At {_clock(first, last)}.")
    else:
        parts.append(f"From {_clock(first, last)} to {_clock(last, first)} "
                     f"({_duration(last - first)}).")
    return " ".join(parts)


def _suggestions(evidence: Sequence[Mapping[str, Any]], changes: Sequence[_Change],
                 services: Sequence[str], escalation_id: str | None) -> list[str]:
    groups: dict[str, dict[str, Any]] = {}
    for n in evidence:  # most similar first, so each group's first member is its nearest
        resolution = n.get("resolution") or {}
        action = str(resolution.get("action") or "").strip()
        if not action:
            continue
        # Same normalisation as novelty.resolution_key: one action however it is spelt.
        group = groups.setdefault(" ".join(action.lower().split()), {
            "action": action, "nearest": n, "runbook": resolution.get("runbook"),
            "rollback": resolution.get("rollback"), "track": None, "resolved": 0, "failed": 0})
        if group["track"] is None and isinstance(n.get("track_record"), Mapping):
            group["track"] = n["track_record"]
        outcome = n.get("outcome")
        if outcome in ("resolved", "failed"):
            group[outcome] += 1

    actions = [_suggestion(g) for g in groups.values()]
    if not actions:
        runbook = f"the {services[0]} runbook" if services else "the service's runbook"
        actions.append(f"No known resolution: start from {runbook} and record what fixes it with "
                       f"POST /v1/escalations/{escalation_id or '{id}'}/resolve")
    if changes:
        c = changes[0]
        ref = f" ({c.ref})" if c.ref else ""
        actions.append(f"Check whether {c.describe()}{ref} caused it; roll it back if so")
    return actions


def _suggestion(group: Mapping[str, Any]) -> str:
    track = group["track"]
    successes = int(track.get("successes", 0)) if track else 0
    failures = int(track.get("failures", 0)) if track else 0
    if successes + failures:
        record = f"worked {successes}/{successes + failures} times"
    elif group["resolved"] + group["failed"]:
        seen = group["resolved"] + group["failed"]
        record = f"resolved {group['resolved']} of {seen} similar incidents"
    else:
        record = "no track record yet"
    nearest = group["nearest"]
    name = nearest.get("id") or nearest.get("kb_id") or "unknown"
    parts = [record, f"nearest incident {name}, similarity {_similarity(nearest):.2f}"]
    if group["runbook"]:
        parts.append(f"runbook: {group['runbook']}")
    if group["rollback"]:
        parts.append(f"rollback: {group['rollback']}")
    return f"{group['action']} ({'; '.join(parts)})"


# -- small helpers ----------------------------------------------------------------------------

def _severity(event: Mapping[str, Any]) -> str | None:
    value = event.get("severity") or (event.get("labels") or {}).get("severity")
    return str(value).lower() if value else None


def _similarity(n: Mapping[str, Any]) -> float:
    return _float(n.get("similarity")) or 0.0


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _utc(dt: datetime) -> datetime:
    return dt.replace(tzinfo=UTC) if dt.tzinfo is None else dt.astimezone(UTC)


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return _utc(value)
    if isinstance(value, str):
        try:
            return _utc(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def _clock(dt: datetime, other: datetime) -> str:
    # The date only matters when the span crosses midnight; briefings are read as they happen.
    fmt = "%H:%M UTC" if dt.date() == other.date() else "%Y-%m-%d %H:%M UTC"
    return dt.strftime(fmt)


def _duration(delta: timedelta) -> str:
    minutes = round(delta.total_seconds() / 60)
    if minutes < 1:
        return "under a minute"
    if minutes < 120:
        return f"{minutes} min"
    hours, rest = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {rest} min" if rest else f"{hours} h"
    return f"{hours // 24} d"


def _shorten(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"
