"""Handoff: routing rules and config errors, SLA arithmetic, briefings, webhook payloads, and the
background notifier against a real HTTP receiver on loopback."""

from __future__ import annotations

import ast
import copy
import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from handoff import (
    DEFAULT_ROUTING,
    Delivery,
    Notifier,
    Route,
    Router,
    RouteRule,
    RoutingConfigError,
    Step,
    Webhook,
    affected_services,
    build_briefing,
    due_times,
    generic_payload,
    is_breached,
    next_step,
    redact_url,
    slack_payload,
    step_due_at,
)

T0 = datetime(2025, 1, 6, 10, 2, tzinfo=UTC)
SECRET = "T000/B000/s3cr3t-token"


def _route(name: str, **kw: Any) -> Route:
    values: dict[str, Any] = {"team": "ops", "role": "on-call", "channel": "#ops",
                              "ack_minutes": 15, "resolve_minutes": 240}
    values.update(kw)
    return Route(name=name, **values)


def _match(router: Router, service: str | None = "payments", severity: str | None = "error",
           source: str | None = "prometheus", labels: dict[str, str] | None = None,
           kind: str = "escalate") -> str:
    return router.match(service=service, severity=severity, source=source, labels=labels or {},
                        kind=kind).name


# -- routing ----------------------------------------------------------------------------------

def test_first_matching_rule_wins_else_default() -> None:
    router = Router([RouteRule(_route("first"), services=("pay*",)),
                     RouteRule(_route("second"), services=("payments",))], _route("default"))
    assert _match(router, service="payments") == "first"
    assert _match(router, service="checkout") == "default"


@pytest.mark.parametrize(("service", "expected"), [
    ("payments", "pay"), ("Payments-API", "pay"), ("checkout", "shop"), ("cart", "shop"),
    ("search", "default"), (None, "default"),
])
def test_service_globs_are_case_insensitive_and_need_a_service(service: str | None,
                                                               expected: str) -> None:
    router = Router([RouteRule(_route("pay"), services=("payments*",)),
                     RouteRule(_route("shop"), services=("checkout", "cart"))],
                    _route("default"))
    assert _match(router, service=service) == expected


def test_star_matches_events_without_service_or_source() -> None:
    router = Router([RouteRule(_route("any"))], _route("default"))
    assert _match(router, service=None, source=None, severity=None) == "any"


@pytest.mark.parametrize(("severity", "expected"), [
    ("critical", "crit"), ("CRITICAL", "crit"), ("error", "default"), (None, "default"),
])
def test_severity_rule(severity: str | None, expected: str) -> None:
    router = Router([RouteRule(_route("crit"), severities=("critical",))], _route("default"))
    assert _match(router, severity=severity) == expected


@pytest.mark.parametrize(("labels", "expected"), [
    ({"env": "prod", "team": "core"}, "prod"),
    ({"env": "prod", "team": "core", "extra": "x"}, "prod"),
    ({"env": "prod"}, "default"),
    ({"env": "Prod", "team": "core"}, "default"),
    ({}, "default"),
])
def test_every_label_must_match_exactly(labels: dict[str, str], expected: str) -> None:
    router = Router([RouteRule(_route("prod"), labels={"env": "prod", "team": "core"})],
                    _route("default"))
    assert _match(router, labels=labels) == expected


def test_source_and_kinds() -> None:
    router = Router([RouteRule(_route("reviews"), kinds=("review",)),
                     RouteRule(_route("am"), sources=("alertmanager",))], _route("default"))
    assert _match(router, kind="review") == "reviews"
    assert _match(router, source="alertmanager") == "am"
    assert _match(router, source="pagerduty") == "default"
    with pytest.raises(ValueError, match="kind"):
        _match(router, kind="replay")


@pytest.mark.parametrize(("severity", "kind", "role", "ack"), [
    ("critical", "escalate", "incident-commander", 5),
    ("warning", "escalate", "on-call", 15),
    (None, "escalate", "on-call", 15),
    ("critical", "review", "reviewer", 60),
    ("info", "review", "reviewer", 60),
])
def test_default_routing(severity: str | None, kind: str, role: str, ack: float) -> None:
    route = Router.from_config(DEFAULT_ROUTING).match(
        service="payments", severity=severity, source=None, labels={}, kind=kind)
    assert (route.team, route.role, route.ack_minutes) == ("operations", role, ack)
    assert Router.from_config({}).default.channel == "#ops-alerts"


def test_config_rule_routes_inherit_from_the_default() -> None:
    router = Router.from_config({
        "default": {"name": "default", "team": "operations", "role": "on-call",
                    "channel": "#ops-alerts", "ack_minutes": 15, "resolve_minutes": 240,
                    "webhooks": [{"url": f"https://hooks.example.com/{SECRET}",
                                  "format": "slack"}],
                    "next_steps": [{"team": "operations", "role": "manager",
                                    "channel": "#ops-leads", "after_minutes": 10}]},
        "rules": [{"match": {"service": "payments*", "labels": {"env": "prod"}},
                   "route": {"role": "payments-on-call", "ack_minutes": 5}}],
    })
    route = router.match(service="payments-api", severity=None, source=None,
                         labels={"env": "prod"}, kind="escalate")
    assert (route.name, route.team, route.role, route.channel) == (
        "rule-0", "operations", "payments-on-call", "#ops-alerts")
    assert (route.ack_minutes, route.resolve_minutes) == (5, 240)
    assert route.webhooks == (Webhook(f"https://hooks.example.com/{SECRET}", "slack"),)
    assert route.next_steps[0].role == "manager"
    assert router.routes() == [router.default, route]


def test_webhook_urls_never_leave_a_route() -> None:
    step = Step("ops", "manager", "#leads", webhook=f"https://hooks.example.com/{SECRET}")
    route = _route("r", webhooks=(Webhook(f"https://hooks.example.com:8443/{SECRET}?t=x"),),
                   next_steps=(step,))
    assert route.as_dict() == {"name": "r", "team": "ops", "role": "on-call", "channel": "#ops",
                               "ack_minutes": 15, "resolve_minutes": 240}
    for text in (json.dumps(route.as_dict()), json.dumps(step.as_dict()), repr(route)):
        assert "s3cr3t" not in text
    assert "https://hooks.example.com:8443" in repr(route)


def _config() -> dict[str, Any]:
    return {
        "default": {"name": "default", "team": "ops", "role": "on-call", "channel": "#ops",
                    "ack_minutes": 15, "resolve_minutes": 240},
        "rules": [
            {"match": {"severity": ["critical"]}, "kinds": ["escalate"],
             "route": {"name": "crit", "role": "ic", "ack_minutes": 5,
                       "webhooks": [{"url": "https://hooks.example.com/x", "format": "slack"}],
                       "next_steps": [{"team": "ops", "role": "manager", "channel": "#leads"},
                                      {"team": "ops", "role": "vp", "channel": "#leads",
                                       "after_minutes": 30}]}},
            {"match": {"service": ["payments*", "billing"], "labels": {"env": "prod"}},
             "route": {"name": "pay", "team": "payments"}},
            {"kinds": ["review"], "route": {"name": "review", "role": "reviewer",
                                            "ack_minutes": 60, "resolve_minutes": 480}},
        ],
    }


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation of ``_config()``: set the value at a dotted/indexed path (deleting if ...)."""
    def mutate(cfg: dict[str, Any]) -> None:
        keys: list[Any] = [int(k) if k.isdigit() else k
                           for k in path.replace("[", ".").replace("]", "").split(".")]
        target: Any = cfg
        for key in keys[:-1]:
            target = target[key]
        if value is ...:
            del target[keys[-1]]
        else:
            target[keys[-1]] = value
    return mutate


@pytest.mark.parametrize(("mutate", "message"), [
    (_set("rules[2].route.ack_minutes", 0), "routing.rules[2].route.ack_minutes: must be > 0"),
    (_set("rules[2].route.ack_minutes", "5"), "routing.rules[2].route.ack_minutes: must be a num"),
    (_set("rules[2].route.ack_minutes", True), "routing.rules[2].route.ack_minutes: must be a num"),
    (_set("default.resolve_minutes", 10), "routing.default.resolve_minutes: must be >= ack_min"),
    (_set("default.team", ...), "routing.default.team: is required"),
    (_set("default.channel", " "), "routing.default.channel: must be a non-empty string"),
    (_set("default.ack_minute", 3), "routing.default.ack_minute: unknown field"),
    (_set("rules", {}), "routing.rules: must be a list"),
    (_set("rules[1]", "payments"), "routing.rules[1]: must be an object"),
    (_set("rules[1].route", ...), "routing.rules[1].route: is required"),
    (_set("rules[0].match.severity", ["fatal"]), "routing.rules[0].match.severity[0]: must be"),
    (_set("rules[0].match.severity", []), "routing.rules[0].match.severity: must be a string or"),
    (_set("rules[0].match.host", "x"), "routing.rules[0].match.host: unknown field"),
    (_set("rules[0].kinds", ["replay"]), "routing.rules[0].kinds[0]: must be one of"),
    (_set("rules[1].match.service", ["pay", 3]), "routing.rules[1].match.service[1]: must be"),
    (_set("rules[1].match.labels", {"env": 1}), "routing.rules[1].match.labels.env: must be a s"),
    (_set("rules[0].route.webhooks[0].url", "ftp://hooks.example.com/s3cr3t"),
     "routing.rules[0].route.webhooks[0].url: must be an http(s) URL"),
    (_set("rules[0].route.webhooks[0].format", "teams"),
     "routing.rules[0].route.webhooks[0].format: must be one of slack, generic"),
    (_set("rules[0].route.webhooks", "https://x"), "routing.rules[0].route.webhooks: must be a l"),
    (_set("rules[0].route.next_steps[1].after_minutes", -1),
     "routing.rules[0].route.next_steps[1].after_minutes: must be >= 0"),
    (_set("rules[0].route.next_steps[1].role", ...),
     "routing.rules[0].route.next_steps[1].role: is required"),
    (_set("rules[2].route.name", "crit"), "routing.rules[2].route.name: another route already"),
    (_set("rules[1].route.name", "default"), "routing.rules[1].route.name: another route alre"),
    (_set("rules[0].route.next_steps[0].webhook", "not a url"),
     "routing.rules[0].route.next_steps[0].webhook: must be an http(s) URL"),
])
def test_config_errors_name_the_field(mutate: Callable[[dict[str, Any]], None],
                                      message: str) -> None:
    Router.from_config(_config())  # the unmutated config is valid
    cfg = copy.deepcopy(_config())
    mutate(cfg)
    with pytest.raises(ValueError) as info:
        Router.from_config(cfg)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, RoutingConfigError)
    assert str(info.value).startswith(info.value.field + ": ")
    assert "s3cr3t" not in str(info.value)


def test_rules_may_share_one_route() -> None:
    cfg = _config()
    cfg["rules"].append(copy.deepcopy(cfg["rules"][2]))
    router = Router.from_config(cfg)
    assert router.rules[2].route == router.rules[3].route
    assert [r.name for r in router.routes()] == ["default", "crit", "pay", "review"]


def test_route_validates_when_built_directly() -> None:
    with pytest.raises(RoutingConfigError, match="resolve_minutes: must be >= ack_minutes"):
        _route("r", ack_minutes=30, resolve_minutes=10)
    with pytest.raises(RoutingConfigError, match="kinds: must be one of"):
        RouteRule(_route("r"), kinds=("replay",))


@given(st.text(alphabet="abcXYZ019-_~.%/=&", min_size=2, max_size=40))
def test_redacted_urls_keep_only_scheme_host_port(token: str) -> None:
    url = f"https://user:pw@hooks.example.com:8443/{token}?token={token}#{token}"
    assert redact_url(url) == "https://hooks.example.com:8443"


@pytest.mark.parametrize(("url", "redacted"), [
    ("http://127.0.0.1:8080/hook", "http://127.0.0.1:8080"),
    ("https://[::1]/x", "https://[::1]"),
    ("not a url", "<invalid url>"),
    ("http://host:99999/x", "<invalid url>"),
])
def test_redact_url_cases(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


# -- SLA arithmetic ---------------------------------------------------------------------------

ROUTE = _route("sla", ack_minutes=15, resolve_minutes=240,
               next_steps=(Step("ops", "manager", "#leads"),
                           Step("ops", "vp", "#leads", webhook="https://h.example.com/x",
                                format="slack", after_minutes=30)))


def test_due_times() -> None:
    assert due_times(ROUTE, T0) == (T0 + timedelta(minutes=15), T0 + timedelta(minutes=240))


@pytest.mark.parametrize(("state", "acked_after", "now_after", "breached"), [
    ("open", None, 14, False),
    ("open", None, 15, False),  # exactly at the deadline is still in time
    ("open", None, 15.1, True),
    ("acked", 5, 100, False),
    ("acked", 5, 240, False),
    ("acked", 5, 241, True),
    ("resolved", 5, 10_000, False),
    ("resolved", None, 10_000, False),
    ("breached", None, 16, True),
    ("breached", 20, 241, True),
])
def test_is_breached(state: str, acked_after: float | None, now_after: float,
                     breached: bool) -> None:
    acked = None if acked_after is None else T0 + timedelta(minutes=acked_after)
    now = T0 + timedelta(minutes=now_after)
    assert is_breached(state, T0, acked, now, ROUTE) is breached


def test_is_breached_rejects_unknown_states() -> None:
    with pytest.raises(ValueError, match="state"):
        is_breached("closed", T0, None, T0, ROUTE)


def test_escalation_chain() -> None:
    assert next_step(ROUTE, 0) == ROUTE.next_steps[0]
    second = next_step(ROUTE, 1)
    assert second is not None and second.role == "vp"
    assert next_step(ROUTE, 2) is None
    assert next_step(_route("no-chain"), 0) is None
    with pytest.raises(ValueError):
        next_step(ROUTE, -1)
    assert step_due_at(second, T0) == T0 + timedelta(minutes=30)
    assert second.target == Webhook("https://h.example.com/x", "slack")
    assert ROUTE.next_steps[0].target is None


# -- briefing ---------------------------------------------------------------------------------

EVENT = {"title": "Payment provider webhook signature verification failing",
         "service": "payments", "severity": "critical", "source": "prometheus",
         "labels": {"instance": "10.0.0.5:9100", "host": "web-1", "app": "payments-gateway"}}
NEIGHBOURS = [
    {"id": "kb-3", "kb_id": "kb-3", "title": "Exporter flapping", "service": "payments",
     "similarity": 0.22, "resolution": {"action": "restart  the EXPORTER"}, "outcome": "failed",
     "occurred_at": datetime(2024, 12, 1, tzinfo=UTC)},
    {"id": "kb-12", "kb_id": "kb-12", "title": "Exporter down", "service": "payments",
     "similarity": 0.31, "resolution": {"action": "Restart the exporter", "runbook": "rb/exp"},
     "outcome": "resolved", "track_record": {"successes": 5, "failures": 1}},
    {"id": "kb-7", "kb_id": "kb-7", "title": "Key expired", "service": "payments",
     "similarity": 0.27, "resolution": {"action": "Rotate the signing key",
                                        "rollback": "restore the old key"},
     "outcome": "resolved"},
    {"id": "kb-9", "kb_id": "kb-9", "title": "No fix", "similarity": 0.25, "resolution": None},
]
CHANGES = [{"service": "payments", "summary": "deploy v2.3.1", "at": "2025-01-06T09:50:00Z",
            "author": "alice", "ref": "PR-12"}]
NOVELTY = {"score": 0.97, "threshold": 0.59, "nearest_similarity": 0.31, "is_novel": True,
           "components": {"knn": 0.95, "density": 0.9}}


def _briefing(**kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = {
        "event": EVENT, "kind": "escalate", "novelty": NOVELTY, "neighbours": NEIGHBOURS,
        "recent_changes": CHANGES, "events_count": 3, "first_seen": T0,
        "last_seen": T0 + timedelta(minutes=12), "reasons": ["novel: nothing close"]}
    args.update(kw)
    return build_briefing(**args)


def test_escalation_briefing() -> None:
    b = _briefing()
    s = b["summary"]
    assert s.startswith("Novel event on payments, payments-gateway (critical): 'Payment provider")
    assert "Nothing in the knowledge base is close (nearest similarity 0.31, " \
           "novelty 0.97 ≥ threshold 0.59)" in s
    assert "3 events since 10:02 UTC" in s
    assert "1 recent change to payments, payments-gateway: deploy v2.3.1 by alice " \
           "12 min before the first event" in s
    assert "\n" not in s
    assert b["services"] == ["payments", "payments-gateway"]
    assert "critical" in b["impact"] and "3 events over 12 min" in b["impact"]
    assert "payments" in b["impact"]
    assert "Host: web-1" in b["scope"] and "Instance: 10.0.0.5:9100" in b["scope"]
    assert "10:02 UTC" in b["scope"] and "10:14 UTC" in b["scope"]
    assert b["recent_changes"] == [{"service": "payments", "summary": "deploy v2.3.1",
                                    "at": "2025-01-06T09:50:00+00:00", "author": "alice",
                                    "ref": "PR-12", "minutes_before": 12.0}]
    assert [n["id"] for n in b["evidence"]] == ["kb-12", "kb-7", "kb-9", "kb-3"]
    assert b["novelty"] == {"score": 0.97, "threshold": 0.59, "nearest_similarity": 0.31,
                            "is_novel": True, "components": {"knn": 0.95, "density": 0.9}}
    json.dumps(b)  # JSON-ready: the neighbour's datetime became a string
    assert b["evidence"][-1]["occurred_at"] == "2024-12-01T00:00:00+00:00"


def test_suggested_actions_follow_similarity_and_merge_duplicates() -> None:
    actions = _briefing()["suggested_actions"]
    assert actions == [
        "Restart the exporter (worked 5/6 times; nearest incident kb-12, similarity 0.31; "
        "runbook: rb/exp)",
        "Rotate the signing key (resolved 1 of 1 similar incidents; nearest incident kb-7, "
        "similarity 0.27; rollback: restore the old key)",
        "Check whether deploy v2.3.1 by alice 12 min before the first event (PR-12) caused it; "
        "roll it back if so",
    ]


def test_review_briefing_explains_the_ambiguity() -> None:
    b = _briefing(kind="review", novelty={"score": 0.3, "threshold": 0.59},
                  reasons=["neighbours disagree: the top resolution has 50% of 4 votes.",
                           "thin or poor track record"], recent_changes=[], events_count=1,
                  last_seen=T0)
    s = b["summary"]
    assert s.startswith("Familiar but ambiguous: 'Payment provider webhook signature")
    assert "resembles kb-12 'Exporter down' (similarity 0.31)" in s
    assert "Neighbours disagree: the top resolution has 50% of 4 votes; thin or poor track" in s
    assert "1 event at 10:02 UTC" in s
    assert "No recent changes recorded for payments" in s
    assert "1 event;" in b["impact"] and "At 10:02 UTC" in b["scope"]
    assert b["suggested_actions"][0].startswith("Restart the exporter")


@pytest.mark.parametrize("neighbours", [[], [NEIGHBOURS[3]]])
def test_no_known_resolution_gives_a_first_step(neighbours: list[dict[str, Any]]) -> None:
    b = _briefing(neighbours=neighbours, recent_changes=[], escalation_id="esc-42",
                  novelty={"score": 1.0, "threshold": 0.59})
    assert b["suggested_actions"] == [
        "No known resolution: start from the payments runbook and record what fixes it with "
        "POST /v1/escalations/esc-42/resolve"]
    if not neighbours:
        assert "The knowledge base has nothing to compare it with" in b["summary"]


def test_briefing_without_service_severity_or_ids() -> None:
    b = build_briefing(event={"title": "Something odd"}, kind="escalate", novelty={},
                       neighbours=[], recent_changes=[], events_count=1,
                       first_seen=datetime(2025, 1, 6, 23, 50), last_seen=datetime(2025, 1, 7),
                       reasons=[])
    assert b["summary"].startswith("Novel event: 'Something odd'.")
    assert b["services"] == []
    assert "Severity not given" in b["impact"] and "owner is unknown" in b["impact"]
    assert "From 2025-01-06 23:50 UTC to 2025-01-07 00:00 UTC (10 min)" in b["scope"]
    assert "POST /v1/escalations/{id}/resolve" in b["suggested_actions"][0]
    with pytest.raises(ValueError, match="kind"):
        _briefing(kind="replay")


def test_affected_services() -> None:
    assert affected_services({"service": "a", "labels": {"app": "b", "service": "a"}}) == ["a", "b"]
    assert affected_services({"labels": {"application": "c"}}) == ["c"]


# -- payloads ---------------------------------------------------------------------------------

def _escalation(**kw: Any) -> dict[str, Any]:
    esc: dict[str, Any] = {
        "id": "esc-1", "decision_id": "dec-1", "kind": "escalate", "state": "open",
        "route": {"name": "default", "team": "operations", "role": "on-call",
                  "channel": "#ops-alerts"},
        "due_at": T0 + timedelta(minutes=15), "events": 3, "created_at": T0,
        "acked_at": None, "resolved_at": None, "briefing": _briefing()}
    esc.update(kw)
    return esc


def test_slack_payload_shape() -> None:
    p = slack_payload(_escalation())
    assert p["text"].startswith("Novel event on payments")
    blocks = p["blocks"]
    assert [b["type"] for b in blocks] == ["header", "section", "section", "section", "context"]
    assert blocks[0]["text"]["text"] == "Novel event on payments, payments-gateway"
    assert blocks[1]["text"]["text"] == _briefing()["summary"]
    fields = "\n".join(f["text"] for f in blocks[2]["fields"])
    for part in ("*Kind*\nescalate", "operations / on-call (#ops-alerts)",
                 "2025-01-06T10:17:00+00:00", "*Events*\n3"):
        assert part in fields
    assert "Restart the exporter" in blocks[3]["text"]["text"]
    assert "dec-1" in blocks[-1]["elements"][0]["text"]
    json.dumps(p)


def test_slack_payload_escapes_event_text_and_marks_breaches() -> None:
    briefing = _briefing(event={**EVENT, "title": "<!channel> <https://evil|click> & co"})
    p = slack_payload(_escalation(state="breached", kind="review", briefing=briefing))
    text = json.dumps(p)
    assert "<!channel>" not in text and "<https://evil" not in text
    assert "&lt;!channel&gt;" in text and "&amp; co" in text
    assert p["blocks"][0]["text"]["text"].startswith("SLA breached: Review needed")
    assert p["text"].startswith("SLA breached: ")


@pytest.mark.parametrize(("event_type", "expected"), [
    ("opened", "deja.escalation.opened"), ("breached", "deja.escalation.breached"),
    ("deja.escalation.resolved", "deja.escalation.resolved"),
])
def test_generic_payload(event_type: str, expected: str) -> None:
    p = generic_payload(_escalation(), event_type)
    assert p["type"] == expected
    assert p["escalation"]["id"] == "esc-1"
    assert p["escalation"]["due_at"] == "2025-01-06T10:17:00+00:00"
    assert p["escalation"]["briefing"]["summary"] == _briefing()["summary"]
    assert json.loads(json.dumps(p)) == p


def test_generic_payload_rejects_unknown_types() -> None:
    with pytest.raises(ValueError, match="event_type"):
        generic_payload(_escalation(), "acked")


# -- notifier against a real receiver ---------------------------------------------------------

class _Receiver(ThreadingHTTPServer):
    """Answers each POST with the next scripted status (200 once the script runs out)."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.script: list[int] = []
        self.requests: list[tuple[str, dict[str, Any], str]] = []
        self.lock = threading.Lock()

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: _Receiver

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with self.server.lock:
            self.server.requests.append((self.path, body, self.headers["Content-Type"]))
            status = self.server.script.pop(0) if self.server.script else 200
        # Echo the path back: some receivers quote the URL in errors; it must not be recorded.
        reply = f"error at {self.path}".encode() if status >= 400 else b"ok"
        self.send_response(status)
        self.send_header("Content-Length", str(len(reply)))
        self.end_headers()
        self.wfile.write(reply)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[_Receiver]:
    server = _Receiver()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(2)


@pytest.fixture
def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


class _Recorder:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.lock = threading.Lock()

    def __call__(self, d: Delivery) -> None:
        with self.lock:
            self.deliveries.append(d)

    def of(self, escalation_id: str) -> list[Delivery]:
        with self.lock:
            return [d for d in self.deliveries if d.escalation_id == escalation_id]


@pytest.fixture
def recorder() -> _Recorder:
    return _Recorder()


@pytest.fixture
def notifier(recorder: _Recorder) -> Iterator[Notifier]:
    n = Notifier(record=recorder, max_attempts=3, backoff_seconds=0.01, backoff_max=0.05,
                 timeout=2.0)
    n.start()
    try:
        yield n
    finally:
        n.stop(1.0)


def _no_secret(deliveries: list[Delivery]) -> None:
    for d in deliveries:
        assert "s3cr3t" not in repr(d)
        assert "/hooks" not in d.url_redacted


PAYLOAD = {"type": "deja.escalation.opened", "escalation": {"id": "esc-1", "at": T0}}


def test_delivered_on_first_try(notifier: Notifier, recorder: _Recorder,
                                receiver: _Receiver) -> None:
    hook = Webhook(f"{receiver.base}/hooks/{SECRET}?token=s3cr3t", "generic")
    notifier.send("esc-1", hook, PAYLOAD)
    assert notifier.flush(5)
    [d] = recorder.of("esc-1")
    assert (d.status, d.attempt, d.http_status, d.error) == ("delivered", 1, 200, None)
    assert (d.url_redacted, d.format) == (receiver.base, "generic")
    assert d.at.tzinfo is not None
    [(path, body, content_type)] = receiver.requests
    assert path == f"/hooks/{SECRET}?token=s3cr3t"
    assert body == {"type": "deja.escalation.opened",
                    "escalation": {"id": "esc-1", "at": "2025-01-06T10:02:00+00:00"}}
    assert content_type == "application/json"
    assert notifier.pending() == 0
    _no_secret(recorder.deliveries)


def test_server_errors_are_retried_until_delivered(notifier: Notifier, recorder: _Recorder,
                                                   receiver: _Receiver) -> None:
    receiver.script = [500, 503]
    notifier.send("esc-2", Webhook(f"{receiver.base}/hooks/{SECRET}", "slack"), PAYLOAD)
    assert notifier.flush(5)
    ds = recorder.of("esc-2")
    assert [(d.status, d.attempt, d.http_status) for d in ds] == [
        ("retrying", 1, 500), ("retrying", 2, 503), ("delivered", 3, 200)]
    assert ds[0].error is not None and ds[0].error.startswith("HTTP 500")
    assert len(receiver.requests) == 3
    _no_secret(ds)


@pytest.mark.parametrize(("script", "statuses"), [
    ([404], [("failed", 404)]),
    ([400], [("failed", 400)]),
    ([429, 200], [("retrying", 429), ("delivered", 200)]),
    ([502, 502, 502], [("retrying", 502), ("retrying", 502), ("failed", 502)]),
])
def test_which_statuses_are_retried(notifier: Notifier, recorder: _Recorder, receiver: _Receiver,
                                    script: list[int], statuses: list[tuple[str, int]]) -> None:
    receiver.script = list(script)
    notifier.send("esc-3", Webhook(f"{receiver.base}/hooks/{SECRET}"), PAYLOAD)
    assert notifier.flush(5)
    assert [(d.status, d.http_status) for d in recorder.of("esc-3")] == statuses
    _no_secret(recorder.deliveries)


def test_receiver_down_fails_after_max_attempts_without_blocking(
        notifier: Notifier, recorder: _Recorder, closed_port: int) -> None:
    hook = Webhook(f"http://127.0.0.1:{closed_port}/hooks/{SECRET}")
    started = time.perf_counter()
    notifier.send("esc-4", hook, PAYLOAD)
    assert time.perf_counter() - started < 0.05
    assert notifier.flush(5)
    ds = recorder.of("esc-4")
    assert [(d.status, d.attempt) for d in ds] == [("retrying", 1), ("retrying", 2),
                                                   ("failed", 3)]
    assert all(d.http_status is None and d.error and "ConnectError" in d.error for d in ds)
    assert ds[0].url_redacted == f"http://127.0.0.1:{closed_port}"
    _no_secret(ds)


def test_retries_do_not_hold_up_other_deliveries(recorder: _Recorder, receiver: _Receiver,
                                                 closed_port: int) -> None:
    # One worker and a slow backoff: the healthy receiver must be served while the dead one
    # waits for its retry, not after it.
    with Notifier(record=recorder, max_attempts=2, backoff_seconds=0.3, backoff_max=0.3,
                  workers=1) as n:
        n.send("down", Webhook(f"http://127.0.0.1:{closed_port}/x"), PAYLOAD)
        n.send("up", Webhook(f"{receiver.base}/y"), PAYLOAD)
        assert n.flush(5)
    order = [(d.escalation_id, d.status) for d in recorder.deliveries]
    assert order == [("down", "retrying"), ("up", "delivered"), ("down", "failed")]


def test_stop_gives_up_on_waiting_retries(recorder: _Recorder, closed_port: int) -> None:
    n = Notifier(record=recorder, max_attempts=5, backoff_seconds=30, backoff_max=30)
    n.start()
    n.send("esc-5", Webhook(f"http://127.0.0.1:{closed_port}/hooks/{SECRET}"), PAYLOAD)
    deadline = time.monotonic() + 5
    while not recorder.of("esc-5") and time.monotonic() < deadline:
        time.sleep(0.005)
    assert n.pending() == 1
    started = time.perf_counter()
    assert n.stop(0.1) is False
    assert time.perf_counter() - started < 2
    ds = recorder.of("esc-5")
    assert [d.status for d in ds] == ["retrying", "failed"]
    assert ds[-1].error == "notifier stopped before delivery"
    with pytest.raises(RuntimeError):
        n.send("esc-6", Webhook("http://127.0.0.1:1/x"), PAYLOAD)
    _no_secret(ds)


def test_a_failing_recorder_does_not_stop_delivery(receiver: _Receiver) -> None:
    calls: list[str] = []

    def record(d: Delivery) -> None:
        calls.append(d.escalation_id)
        raise RuntimeError("database is gone")

    with Notifier(record=record, backoff_seconds=0.01) as n:
        n.send("a", Webhook(f"{receiver.base}/a"), PAYLOAD)
        n.send("b", Webhook(f"{receiver.base}/b"), PAYLOAD)
        assert n.flush(5)
    assert sorted(calls) == ["a", "b"]


def test_send_serialises_eagerly_and_validates_arguments(notifier: Notifier) -> None:
    with pytest.raises(TypeError):
        notifier.send("esc-7", Webhook("http://127.0.0.1:1/x"), {"x": object()})
    assert notifier.pending() == 0
    with pytest.raises(ValueError, match="max_attempts"):
        Notifier(record=lambda d: None, max_attempts=0)


def test_handoff_never_imports_api() -> None:
    for path in Path(__file__).parent.parent.joinpath("handoff").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "api" or n.startswith("api.") for n in names), path
