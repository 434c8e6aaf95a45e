"""Handoff: who gets an escalation or review (routing, SLA clocks), what they read (briefing)
and how they hear of it (webhook notifications).

Pure and storage-free: the facade stores escalations and deliveries in the KB and calls these.
Webhook URLs are secrets: routes, deliveries and reprs only ever show scheme, host and port.
"""

from handoff.briefing import affected_services, build_briefing
from handoff.notify import Delivery, Notifier, generic_payload, slack_payload
from handoff.routing import (
    DEFAULT_ROUTING,
    Route,
    Router,
    RouteRule,
    RoutingConfigError,
    Step,
    Webhook,
    due_times,
    is_breached,
    next_step,
    redact_url,
    step_due_at,
)

__all__ = [
    "DEFAULT_ROUTING",
    "Delivery",
    "Notifier",
    "Route",
    "RouteRule",
    "Router",
    "RoutingConfigError",
    "Step",
    "Webhook",
    "affected_services",
    "build_briefing",
    "due_times",
    "generic_payload",
    "is_breached",
    "next_step",
    "redact_url",
    "slack_payload",
    "step_due_at",
]
