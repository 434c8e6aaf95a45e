"""Role-based routing and SLA arithmetic for escalations and reviews.

A :class:`Router` holds ordered :class:`RouteRule` s and a default :class:`Route`; the first rule
that matches an event (service, severity, source, labels) and the verdict kind wins. A route names
who owns the handoff (team, role, channel), how long they have to acknowledge and to resolve it, the
webhooks to notify, and an escalation chain (:class:`Step`) used each time the SLA is breached.

Everything here is pure: no clock, no I/O. Times are whatever the caller passes in (use aware
datetimes; mixing naive and aware ones raises ``TypeError`` in comparisons).

Webhook URLs are secrets (their paths carry tokens): they never appear in :meth:`Route.as_dict`,
in a ``repr`` or in a config error message; :func:`redact_url` keeps only scheme, host and port.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from types import MappingProxyType
from typing import Any, Literal, cast
from urllib.parse import urlsplit

__all__ = [
    "DEFAULT_ROUTING",
    "KINDS",
    "SEVERITIES",
    "Route",
    "RouteRule",
    "Router",
    "RoutingConfigError",
    "Step",
    "Webhook",
    "due_times",
    "is_breached",
    "next_step",
    "redact_url",
    "step_due_at",
]

WebhookFormat = Literal["slack", "generic"]
KINDS: tuple[str, ...] = ("escalate", "review")
SEVERITIES: tuple[str, ...] = ("critical", "error", "warning", "info")
STATES: tuple[str, ...] = ("open", "acked", "resolved", "breached")
_FORMATS: tuple[str, ...] = ("slack", "generic")


class RoutingConfigError(ValueError):
    """A routing config or route value is invalid; ``field`` is its path, e.g.
    ``routing.rules[2].route.ack_minutes``, and the message starts with it."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def redact_url(url: str) -> str:
    """``scheme://host[:port]`` of ``url``: path, query, fragment and credentials dropped, since
    webhook paths and queries carry tokens. Unparseable input gives ``"<invalid url>"``."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError:
        return "<invalid url>"
    if not parts.scheme or not host:
        return "<invalid url>"
    if ":" in host:  # IPv6 literals keep their brackets
        host = f"[{host}]"
    return f"{parts.scheme}://{host}" + (f":{port}" if port is not None else "")


@dataclass(frozen=True)
class Webhook:
    """Where to POST a notification, and in which payload format."""

    url: str
    format: WebhookFormat = "generic"

    def __post_init__(self) -> None:
        _check_url("url", self.url)
        _check_choice("format", self.format, _FORMATS)

    def __repr__(self) -> str:
        return f"Webhook(url={redact_url(self.url)!r}, format={self.format!r})"


@dataclass(frozen=True)
class Step:
    """One link of an escalation chain: who to notify once the SLA is breached.

    ``after_minutes`` is the delay after the breach before this step is used (see
    :func:`step_due_at`); 0 means at once.
    """

    team: str
    role: str
    channel: str
    webhook: str | None = field(default=None, repr=False)
    format: WebhookFormat = "generic"
    after_minutes: float = 0.0

    def __post_init__(self) -> None:
        for name in ("team", "role", "channel"):
            _check_text(name, getattr(self, name))
        if self.webhook is not None:
            _check_url("webhook", self.webhook)
        _check_choice("format", self.format, _FORMATS)
        _check_minutes("after_minutes", self.after_minutes, allow_zero=True)

    @property
    def target(self) -> Webhook | None:
        """The step's webhook, ready for :meth:`handoff.Notifier.send`, or None."""
        return None if self.webhook is None else Webhook(self.webhook, self.format)

    def as_dict(self) -> dict[str, Any]:
        """Team, role, channel and delay; never the webhook URL."""
        return {"team": self.team, "role": self.role, "channel": self.channel,
                "after_minutes": self.after_minutes}


@dataclass(frozen=True)
class Route:
    """Who owns a handoff and how fast: acknowledge within ``ack_minutes`` and resolve within
    ``resolve_minutes`` of its creation (``0 < ack_minutes <= resolve_minutes``)."""

    name: str
    team: str
    role: str
    channel: str
    ack_minutes: float
    resolve_minutes: float
    webhooks: tuple[Webhook, ...] = ()
    next_steps: tuple[Step, ...] = ()

    def __post_init__(self) -> None:
        for name in ("name", "team", "role", "channel"):
            _check_text(name, getattr(self, name))
        _check_minutes("ack_minutes", self.ack_minutes)
        _check_minutes("resolve_minutes", self.resolve_minutes)
        if self.resolve_minutes < self.ack_minutes:
            raise RoutingConfigError("resolve_minutes", "must be >= ack_minutes")
        # Lists are accepted for convenience; stored as tuples so the route stays immutable.
        object.__setattr__(self, "webhooks", tuple(self.webhooks))
        object.__setattr__(self, "next_steps", tuple(self.next_steps))
        for i, hook in enumerate(self.webhooks):
            if not isinstance(hook, Webhook):
                raise RoutingConfigError(f"webhooks[{i}]", "must be a Webhook")
        for i, step in enumerate(self.next_steps):
            if not isinstance(step, Step):
                raise RoutingConfigError(f"next_steps[{i}]", "must be a Step")

    def as_dict(self) -> dict[str, Any]:
        """The API's ``route`` object (team, role, channel) plus name and SLA minutes. Webhook
        URLs are secrets and are never included."""
        return {"name": self.name, "team": self.team, "role": self.role, "channel": self.channel,
                "ack_minutes": self.ack_minutes, "resolve_minutes": self.resolve_minutes}


@dataclass(frozen=True)
class RouteRule:
    """When to use ``route``. Every given criterion must hold:

    - ``services`` / ``sources``: case-insensitive ``fnmatch`` globs; ``"*"`` also matches an
      event without a service / source, any other glob does not;
    - ``severities``: the event's severity is one of them (empty = any, even none);
    - ``labels``: every pair is present in the event's labels with exactly that value;
    - ``kinds``: the verdict kind (``escalate`` / ``review``) is one of them.
    """

    route: Route
    services: tuple[str, ...] = ("*",)
    severities: tuple[str, ...] = ()
    sources: tuple[str, ...] = ("*",)
    # Excluded from the hash (a mapping is unhashable); equality still compares it.
    labels: Mapping[str, str] = field(default_factory=dict, hash=False)
    kinds: tuple[str, ...] = KINDS

    def __post_init__(self) -> None:
        for name in ("services", "severities", "sources", "kinds"):
            value = getattr(self, name)
            # A bare string would otherwise be iterated character by character.
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        object.__setattr__(self, "severities", tuple(s.lower() for s in self.severities))
        object.__setattr__(self, "labels", MappingProxyType(dict(self.labels)))
        if not self.kinds:
            raise RoutingConfigError("kinds", "must not be empty")
        for kind in self.kinds:
            _check_choice("kinds", kind, KINDS)

    def matches(self, *, service: str | None, severity: str | None, source: str | None,
                labels: Mapping[str, str], kind: str) -> bool:
        """Whether an event with these attributes and verdict kind falls under this rule."""
        return (kind in self.kinds
                and _glob(service, self.services)
                and _glob(source, self.sources)
                and (not self.severities
                     or (severity is not None and severity.lower() in self.severities))
                and all(labels.get(k) == v for k, v in self.labels.items()))


class Router:
    """Ordered rules plus a default route: :meth:`match` returns the first matching rule's
    route, else the default, so every event has an owner."""

    def __init__(self, rules: Sequence[RouteRule], default: Route) -> None:
        self.rules: tuple[RouteRule, ...] = tuple(rules)
        self.default = default

    def match(self, *, service: str | None, severity: str | None, source: str | None,
              labels: Mapping[str, str], kind: str) -> Route:
        """The route of the first rule that matches, else the default route.

        Raises ``ValueError`` for a ``kind`` other than ``escalate`` or ``review``.
        """
        if kind not in KINDS:
            raise ValueError(f"kind: must be one of {', '.join(KINDS)}, not {kind!r}")
        for rule in self.rules:
            if rule.matches(service=service, severity=severity, source=source, labels=labels,
                            kind=kind):
                return rule.route
        return self.default

    def routes(self) -> list[Route]:
        """Every distinct route, default first (e.g. to list webhooks to health-check)."""
        seen: list[Route] = [self.default]
        for rule in self.rules:
            if rule.route not in seen:
                seen.append(rule.route)
        return seen

    @classmethod
    def from_config(cls, data: Mapping[str, Any], *, path: str = "routing") -> Router:
        """Build a router from JSON-like data (see ``DEFAULT_ROUTING`` for the shape).

        ``default`` is optional (``DEFAULT_ROUTING``'s default route is used); a rule's ``route``
        may omit fields, which it then takes from the default route (except ``name``, which
        defaults to ``rule-<i>``). ``match.service`` / ``source`` / ``severity`` take a string
        or a list. Unknown keys are rejected so that a typo cannot silently misroute pages, and
        two different routes may not share a name (rules may share one route).

        Raises :class:`RoutingConfigError` (a ``ValueError``) whose message starts with the
        offending field's path, e.g. ``routing.rules[2].route.ack_minutes: must be > 0``.
        """
        _check_keys(path, data, {"default", "rules"})
        default_data = data.get("default", DEFAULT_ROUTING["default"])
        default = _parse_route(f"{path}.default", default_data, base=None, name="default")
        rules_data = data.get("rules", [])
        if not isinstance(rules_data, list | tuple):
            raise RoutingConfigError(f"{path}.rules", "must be a list")
        rules = [_parse_rule(f"{path}.rules[{i}]", r, default, i)
                 for i, r in enumerate(rules_data)]
        # A stored escalation keeps only its route's name: one name must mean one route.
        named = {default.name: default}
        for i, rule in enumerate(rules):
            if named.setdefault(rule.route.name, rule.route) != rule.route:
                raise RoutingConfigError(f"{path}.rules[{i}].route.name",
                                         "another route already has this name")
        return cls(rules, default)


DEFAULT_ROUTING: dict[str, Any] = {
    "default": {"name": "default", "team": "operations", "role": "on-call",
                "channel": "#ops-alerts", "ack_minutes": 15, "resolve_minutes": 240},
    "rules": [
        {"match": {"severity": ["critical"]}, "kinds": ["escalate"],
         "route": {"name": "critical", "team": "operations", "role": "incident-commander",
                   "channel": "#ops-incidents", "ack_minutes": 5, "resolve_minutes": 240}},
        {"kinds": ["review"],
         "route": {"name": "review", "team": "operations", "role": "reviewer",
                   "channel": "#ops-review", "ack_minutes": 60, "resolve_minutes": 480}},
    ],
}
"""The routing used when a policy names none: novel events page the on-call engineer (ack in
15 min), critical ones the incident commander (ack in 5 min); reviews go to a reviewer (ack in
60 min)."""


# -- SLA arithmetic ---------------------------------------------------------------------------

def due_times(route: Route, created_at: datetime) -> tuple[datetime, datetime]:
    """(ack due, resolve due): both counted from ``created_at``, in its timezone."""
    return (created_at + timedelta(minutes=route.ack_minutes),
            created_at + timedelta(minutes=route.resolve_minutes))


def is_breached(state: str, created_at: datetime, acked_at: datetime | None, now: datetime,
                route: Route) -> bool:
    """Whether the SLA is broken at ``now``: not acknowledged after the ack deadline, or
    acknowledged but not resolved after the resolve deadline. A resolved handoff is never
    breached; a ``breached`` one stays breached while its deadline is past. Exactly at the
    deadline is still in time.

    Raises ``ValueError`` for an unknown state.
    """
    if state not in STATES:
        raise ValueError(f"state: must be one of {', '.join(STATES)}, not {state!r}")
    if state == "resolved":
        return False
    ack_due, resolve_due = due_times(route, created_at)
    # "breached" carries no ack information of its own: acked_at says which clock applies.
    return now > (ack_due if acked_at is None else resolve_due)


def next_step(route: Route, breaches_so_far: int) -> Step | None:
    """The chain step for the next breach: ``next_steps[breaches_so_far]``, or None once the
    chain is exhausted (the route's own channel keeps the handoff)."""
    if breaches_so_far < 0:
        raise ValueError("breaches_so_far: must be >= 0")
    return route.next_steps[breaches_so_far] if breaches_so_far < len(route.next_steps) else None


def step_due_at(step: Step, breached_at: datetime) -> datetime:
    """When ``step`` may be notified: ``after_minutes`` after the breach."""
    return breached_at + timedelta(minutes=step.after_minutes)


# -- validation and parsing -------------------------------------------------------------------

def _glob(value: str | None, patterns: tuple[str, ...]) -> bool:
    if value is None:
        return "*" in patterns
    value = value.lower()
    return any(fnmatchcase(value, p.lower()) for p in patterns)


def _check_text(name: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise RoutingConfigError(name, "must be a non-empty string")


def _check_minutes(name: str, value: object, *, allow_zero: bool = False) -> None:
    # bool is an int subclass; "ack_minutes": true is a mistake, not 1 minute.
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise RoutingConfigError(name, "must be a number")
    if value < 0 or (value == 0 and not allow_zero):
        raise RoutingConfigError(name, "must be >= 0" if allow_zero else "must be > 0")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise RoutingConfigError(name, f"must be one of {', '.join(choices)}")


def _check_url(name: str, value: object) -> None:
    # The message never echoes the value: a webhook URL is a secret.
    if not isinstance(value, str) or redact_url(value) == "<invalid url>" \
            or urlsplit(value).scheme not in ("http", "https"):
        raise RoutingConfigError(name, "must be an http(s) URL with a host")


def _check_keys(path: str, data: object, allowed: set[str]) -> None:
    if not isinstance(data, Mapping):
        raise RoutingConfigError(path, "must be an object")
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise RoutingConfigError(f"{path}.{unknown[0]}",
                                 f"unknown field (expected one of {', '.join(sorted(allowed))})")


def _relocated(path: str, err: RoutingConfigError) -> RoutingConfigError:
    return RoutingConfigError(f"{path}.{err.field}", err.problem)


def _str_list(path: str, value: object, *,
              choices: tuple[str, ...] | None = None) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise RoutingConfigError(path, "must be a string or a non-empty list of strings")
    for i, item in enumerate(items):
        if not isinstance(item, str) or not item.strip():
            raise RoutingConfigError(f"{path}[{i}]", "must be a non-empty string")
        if choices is not None and item not in choices:
            raise RoutingConfigError(f"{path}[{i}]", f"must be one of {', '.join(choices)}")
    return tuple(items)


_ROUTE_KEYS = {"name", "team", "role", "channel", "ack_minutes", "resolve_minutes", "webhooks",
               "next_steps"}
_STEP_KEYS = {"team", "role", "channel", "webhook", "format", "after_minutes"}


def _parse_webhook(path: str, data: object) -> Webhook:
    _check_keys(path, data, {"url", "format"})
    data = cast(Mapping[str, Any], data)
    if "url" not in data:
        raise RoutingConfigError(f"{path}.url", "is required")
    try:
        return Webhook(data["url"], data.get("format", "generic"))
    except RoutingConfigError as err:
        raise _relocated(path, err) from None


def _parse_step(path: str, data: object) -> Step:
    _check_keys(path, data, _STEP_KEYS)
    data = cast(Mapping[str, Any], data)
    for key in ("team", "role", "channel"):
        if key not in data:
            raise RoutingConfigError(f"{path}.{key}", "is required")
    try:
        return Step(data["team"], data["role"], data["channel"], data.get("webhook"),
                    data.get("format", "generic"), data.get("after_minutes", 0.0))
    except RoutingConfigError as err:
        raise _relocated(path, err) from None


def _parse_list(path: str, data: object) -> list[Any]:
    if not isinstance(data, list | tuple):
        raise RoutingConfigError(path, "must be a list")
    return list(data)


def _parse_route(path: str, data: object, *, base: Route | None, name: str) -> Route:
    _check_keys(path, data, _ROUTE_KEYS)
    data = cast(Mapping[str, Any], data)
    values: dict[str, Any] = {}
    for key in ("name", "team", "role", "channel", "ack_minutes", "resolve_minutes"):
        if key in data:
            values[key] = data[key]
        elif key == "name":
            values[key] = name
        elif base is not None:
            values[key] = getattr(base, key)
        else:
            raise RoutingConfigError(f"{path}.{key}", "is required")
    if "webhooks" in data:
        hooks = _parse_list(f"{path}.webhooks", data["webhooks"])
        values["webhooks"] = tuple(_parse_webhook(f"{path}.webhooks[{i}]", h)
                                   for i, h in enumerate(hooks))
    else:
        values["webhooks"] = base.webhooks if base is not None else ()
    if "next_steps" in data:
        steps = _parse_list(f"{path}.next_steps", data["next_steps"])
        values["next_steps"] = tuple(_parse_step(f"{path}.next_steps[{i}]", s)
                                     for i, s in enumerate(steps))
    else:
        values["next_steps"] = base.next_steps if base is not None else ()
    try:
        return Route(**values)
    except RoutingConfigError as err:
        raise _relocated(path, err) from None


def _parse_rule(path: str, data: object, default: Route, index: int) -> RouteRule:
    _check_keys(path, data, {"match", "kinds", "route"})
    data = cast(Mapping[str, Any], data)
    if "route" not in data:
        raise RoutingConfigError(f"{path}.route", "is required")
    route = _parse_route(f"{path}.route", data["route"], base=default, name=f"rule-{index}")
    match = data.get("match", {})
    _check_keys(f"{path}.match", match, {"service", "severity", "source", "labels"})
    kwargs: dict[str, Any] = {}
    if "service" in match:
        kwargs["services"] = _str_list(f"{path}.match.service", match["service"])
    if "source" in match:
        kwargs["sources"] = _str_list(f"{path}.match.source", match["source"])
    if "severity" in match:
        kwargs["severities"] = _str_list(f"{path}.match.severity", match["severity"],
                                         choices=SEVERITIES)
    if "labels" in match:
        labels = match["labels"]
        if not isinstance(labels, Mapping):
            raise RoutingConfigError(f"{path}.match.labels", "must be an object")
        for key, value in labels.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise RoutingConfigError(f"{path}.match.labels.{key}", "must be a string")
        kwargs["labels"] = dict(labels)
    if "kinds" in data:
        kwargs["kinds"] = _str_list(f"{path}.kinds", data["kinds"], choices=KINDS)
    try:
        return RouteRule(route, **kwargs)
    except RoutingConfigError as err:
        raise _relocated(path, err) from None
