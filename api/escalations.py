"""The escalation desk: opens, groups, routes, notifies, sweeps and closes human handoffs.

It joins the pure ``handoff`` package (routing, briefings, webhooks) to the KB's escalation tables.
Learning from a resolution (new KB incidents, indexed at once) stays with the facade, which calls
:meth:`EscalationDesk.finish` inside its own write lock and transaction.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from api.schemas import EscalationOut, Verdict
from handoff import (
    DEFAULT_ROUTING,
    Delivery,
    Notifier,
    Route,
    Router,
    build_briefing,
    due_times,
    generic_payload,
    is_breached,
    next_step,
    slack_payload,
)
from handoff.routing import Webhook
from kb import EscalationNotFound, EscalationRecord, InvalidState, Store

__all__ = ["EscalationDesk"]

log = logging.getLogger("deja.handoff")


def _now() -> datetime:
    return datetime.now(UTC)


class EscalationDesk:
    """Every ``review`` and ``escalate`` verdict of a non-dry check lands here.

    ``sweep_seconds``: how often the SLA sweep runs (0 disables the thread; :meth:`sweep` can
    still be called). ``changes_window``: how far back a briefing looks for changes.
    """

    def __init__(self, store: Store, routing: Mapping[str, Any] | None, *,
                 sweep_seconds: float = 15.0, changes_window: timedelta = timedelta(hours=24),
                 notify_backoff: float = 1.0, notify_attempts: int = 5) -> None:
        self.store = store
        self.router = Router.from_config(routing or DEFAULT_ROUTING)
        self.changes_window = changes_window
        self.notifier = Notifier(record=self._record, backoff_seconds=notify_backoff,
                                 max_attempts=notify_attempts)
        self.notifier.start()
        self._sweep_seconds = sweep_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if sweep_seconds > 0:
            self._thread = threading.Thread(target=self._sweeper, name="deja-sla-sweep",
                                            daemon=True)
            self._thread.start()

    @property
    def router(self) -> Router:
        return self._router

    @router.setter
    def router(self, router: Router) -> None:
        self._router = router
        # Without a webhook anywhere, opening a handoff notifies nobody: skip reading it back.
        self._webhooks = any(r.webhooks for r in router.routes())

    def use_routing(self, routing: Mapping[str, Any] | None) -> None:
        """Route new handoffs by another policy's routing (open ones keep their route)."""
        self.router = Router.from_config(routing or DEFAULT_ROUTING)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.notifier.flush(timeout=2)
        self.notifier.stop(timeout=2)

    # -- opening --------------------------------------------------------------------------------
    def receive(self, items: Sequence[tuple[Verdict, dict[str, Any], str]]
                ) -> list[tuple[str, bool]]:
        """Open escalations for review/escalate verdicts ``(verdict, event, fingerprint)``, or
        join the active one of the same fingerprint. Returns each one's escalation id and
        whether it is new. Runs inside the caller's KB transaction; a batch costs one lookup
        and one write per fingerprint."""
        now = _now()
        # From the store's in-memory mirror: we run under its write lock, so no other check
        # opens or joins one meanwhile.
        active = self.store.active_escalation_ids(sorted({fp for _, _, fp in items}))
        out: list[tuple[str, bool]] = []
        joining: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for verdict, event, fp in items:
            assert verdict.decision_id is not None and verdict.decision != "replay"
            escalation_id = active.get(fp)
            if escalation_id is not None:
                joining.setdefault(escalation_id, []).append((verdict.decision_id, event))
                out.append((escalation_id, False))
                continue
            escalation_id = self._open(verdict, event, fp, now).escalation_id
            active[fp] = escalation_id
            out.append((escalation_id, True))
        for escalation_id, joined in joining.items():
            self.store.join_escalation(escalation_id, joined, now)
        return out

    def _open(self, verdict: Verdict, event: dict[str, Any], fingerprint: str,
              now: datetime) -> EscalationRecord:
        assert verdict.decision_id is not None
        service = event.get("service") or event.get("source")
        route = self.router.match(service=service, severity=event.get("severity"),
                                  source=event.get("source"), labels=event.get("labels") or {},
                                  kind=verdict.decision)
        ack_due, resolve_due = due_times(route, now)
        escalation_id = f"esc-{uuid.uuid4().hex}"
        changes = self.store.recent_changes(
            [service] if service else [], now - self.changes_window, now)
        briefing = build_briefing(
            event=event, kind=verdict.decision,
            novelty=verdict.novelty.model_dump(),
            neighbours=[n.model_dump() for n in verdict.neighbors],
            recent_changes=[{"service": c.service, "summary": c.summary, "at": c.at,
                             "author": c.author, "ref": c.ref} for c in changes],
            events_count=1, first_seen=now, last_seen=now, reasons=verdict.reasons,
            escalation_id=escalation_id)
        rec = EscalationRecord(
            escalation_id=escalation_id, decision_id=verdict.decision_id, kind=verdict.decision,
            state="open", fingerprint=fingerprint, service=service, route=route.as_dict(),
            due_at=ack_due, resolve_due_at=resolve_due, events=1, briefing=briefing,
            suggested_resolution=verdict.resolution.model_dump() if verdict.resolution else None,
            resolution=None, policy_version=verdict.policy_version, created_at=now,
            last_event_at=now, acked_at=None, acked_by=None, resolved_at=None, resolved_by=None,
            breached_at=None, breaches=0)
        self.store.add_escalation(rec, event)
        return rec

    def announce(self, escalation_id: str) -> None:
        """Notify the route's webhooks that an escalation opened (after its commit)."""
        if not self._webhooks:
            return
        rec = self.store.get_escalation(escalation_id)
        if rec is not None:
            self._notify(rec, self._route(rec).webhooks, "opened")

    # -- reading and state changes --------------------------------------------------------------
    def get(self, escalation_id: str) -> EscalationRecord:
        rec = self.store.get_escalation(escalation_id)
        if rec is None:
            raise EscalationNotFound(escalation_id)
        return rec

    def out(self, rec: EscalationRecord, *, deliveries: bool = False) -> EscalationOut:
        return EscalationOut(
            id=rec.escalation_id, decision_id=rec.decision_id, kind=rec.kind,  # type: ignore[arg-type]
            state=rec.state, route=rec.route, due_at=rec.due_at,  # type: ignore[arg-type]
            resolve_due_at=rec.resolve_due_at, events=rec.events, created_at=rec.created_at,
            acked_at=rec.acked_at, resolved_at=rec.resolved_at, breached_at=rec.breached_at,
            breaches=rec.breaches, service=rec.service, briefing=rec.briefing,
            suggested_resolution=rec.suggested_resolution, resolution=rec.resolution,
            acked_by=rec.acked_by, resolved_by=rec.resolved_by,
            deliveries=self.store.deliveries(rec.escalation_id) if deliveries else None)

    def ack(self, escalation_id: str, by: str | None) -> EscalationRecord:
        rec = self.get(escalation_id)
        if rec.state == "resolved":
            raise InvalidState(f"escalation {escalation_id} is already resolved")
        if rec.acked_at is None:
            self.store.ack_escalation(escalation_id, by, _now())
        return self.get(escalation_id)

    def check_open(self, escalation_id: str, *, kind: str | None = None) -> EscalationRecord:
        rec = self.get(escalation_id)
        if rec.state == "resolved":
            raise InvalidState(f"escalation {escalation_id} is already resolved")
        if kind is not None and rec.kind != kind:
            raise InvalidState(f"escalation {escalation_id} is a {rec.kind}, not a {kind}")
        return rec

    def finish(self, escalation_id: str, resolution: dict[str, Any] | None,
               by: str | None) -> None:
        """Mark resolved (inside the caller's transaction); notify after commit via
        :meth:`announce_resolved`."""
        self.store.resolve_escalation(escalation_id, resolution, by, _now())

    def announce_resolved(self, escalation_id: str) -> None:
        rec = self.store.get_escalation(escalation_id)
        if rec is not None:
            self._notify(rec, self._route(rec).webhooks, "resolved")

    # -- SLA sweep -------------------------------------------------------------------------------
    def sweep(self, now: datetime | None = None) -> list[str]:
        """Mark every active escalation past its deadline as breached and notify the next step
        of its route's chain (or its own channel again). Returns the ids newly breached."""
        now = now or _now()
        breached = []
        for rec in list(self.store.active_escalations()):
            route = self._route(rec)
            if rec.state == "breached":
                continue
            if not is_breached(rec.state, rec.created_at, rec.acked_at, now, route):
                continue
            self.store.mark_breached(rec.escalation_id, now)
            step = next_step(route, rec.breaches)
            targets: Sequence[Webhook] = (
                (step.target,) if step is not None and step.target is not None
                else route.webhooks)
            fresh = self.store.get_escalation(rec.escalation_id)
            if fresh is not None:
                self._notify(fresh, targets, "breached")
            breached.append(rec.escalation_id)
        return breached

    def _sweeper(self) -> None:
        while not self._stop.wait(self._sweep_seconds):
            try:
                self.sweep()
            except Exception:  # the sweep must outlive one bad pass
                log.exception("SLA sweep failed")

    # -- notifications ---------------------------------------------------------------------------
    def _route(self, rec: EscalationRecord) -> Route:
        name = rec.route.get("name")
        for route in self.router.routes():
            if route.name == name:
                return route
        return self.router.default

    def _notify(self, rec: EscalationRecord, targets: Sequence[Webhook], event_type: str) -> None:
        if not targets:
            return
        body = self.out(rec).model_dump(mode="json")
        for hook in targets:
            payload = (slack_payload(body) if hook.format == "slack"
                       else generic_payload(body, event_type))
            self.notifier.send(rec.escalation_id, hook, payload)

    def _record(self, d: Delivery) -> None:
        try:
            self.store.add_delivery(d.escalation_id, d.url_redacted, d.format, d.attempt,
                                    d.status, d.http_status, d.error, d.at)
        except Exception:  # a closed store at shutdown must not kill the worker
            log.warning("could not record delivery for %s", d.escalation_id)
