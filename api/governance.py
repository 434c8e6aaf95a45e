"""Governance on the facade: keys, versioned policies (two-person activation), backtests,
learning proposals from feedback, overrides and the audit log. Mixed into :class:`api.Deja`."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from api.auth import SYSTEM, Principal
from api.schemas import Novelty, Verdict
from handoff import Router, RoutingConfigError, redact_url
from kb import ApiKey, AuditEntry, InvalidInput, InvalidState, PolicyRecord
from novelty import parse_policy, resolution_key
from novelty.backtest import HistoryItem, Truth, backtest, threshold_at

if TYPE_CHECKING:
    from api.deja import Deja

__all__ = ["LEARNER", "Forbidden", "Governance", "redact_policy"]

log = logging.getLogger("deja.governance")

#: The actor of policies Deja proposes itself; it can never activate them.
LEARNER = Principal(actor="deja-learner", role="admin")


class Forbidden(InvalidState):
    """The caller's role or identity may not do this (e.g. activate their own proposal)."""


def redact_policy(body: Mapping[str, Any]) -> dict[str, Any]:
    """A policy as shown to clients: webhook URLs reduced to scheme://host[:port]."""
    def walk(value: Any, key: str = "") -> Any:
        if isinstance(value, Mapping):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, key) for v in value]
        if key in ("url", "webhook") and isinstance(value, str):
            return redact_url(value)
        return value
    out: dict[str, Any] = walk(dict(body))
    return out


class Governance:
    """Policy, key and audit operations of the facade."""

    def _deja(self) -> Deja:
        return self  # type: ignore[return-value]

    # -- keys -----------------------------------------------------------------------------------
    def create_key(self, name: str, role: str, *, actor: Principal = SYSTEM) -> tuple[str, str]:
        d = self._deja()
        try:
            key_id, key = d.store.create_key(name, role, created_by=actor.actor)
        except ValueError as exc:
            raise InvalidInput(str(exc), "role") from exc
        d.store.audit(actor.actor, actor.role, "key.create", key_id, {"name": name, "role": role})
        return key_id, key

    def list_keys(self) -> list[ApiKey]:
        return self._deja().store.list_keys()

    def revoke_key(self, key_id: str, *, actor: Principal = SYSTEM) -> bool:
        d = self._deja()
        done = d.store.revoke_key(key_id)
        if done:
            d.auth.forget()
            d.store.audit(actor.actor, actor.role, "key.revoke", key_id)
        return done

    # -- policies -------------------------------------------------------------------------------
    def policies(self) -> list[PolicyRecord]:
        return self._deja().store.list_policies()

    def policy_record(self, version: int) -> PolicyRecord:
        rec = self._deja().store.get_policy(version)
        if rec is None:
            raise InvalidInput(f"no policy version {version}", "version")
        return rec

    def propose_policy(self, changes: Mapping[str, Any], *, note: str | None = None,
                       actor: Principal = SYSTEM, origin: str = "human") -> PolicyRecord:
        """Version n+1: the active policy with ``changes`` applied; not active until an approver
        other than its proposer activates it."""
        d = self._deja()
        active = d.store.active_policy()
        base = dict(active.body) if active is not None else {}
        base.pop("version", None)
        body = {**base, **changes}
        try:
            parse_policy(body, 0)
            Router.from_config(body.get("routing") or {"rules": []})
        except RoutingConfigError as exc:
            raise InvalidInput(str(exc), exc.field) from exc
        except (ValueError, TypeError) as exc:
            raise InvalidInput(str(exc), str(exc).split(":", 1)[0]) from exc
        with d.store.transaction():
            version = d.store.add_policy(body, state="proposed", origin=origin,
                                         proposed_by=actor.actor, note=note)
            d.store.audit(actor.actor, actor.role, "policy.propose", f"v{version}",
                          {"changes": redact_policy(changes), "note": note, "origin": origin})
        return self.policy_record(version)

    def activate_policy(self, version: int, *, actor: Principal = SYSTEM) -> PolicyRecord:
        """Two-person rule: the proposer may not activate their own proposal."""
        d = self._deja()
        rec = self.policy_record(version)
        if rec.state != "proposed":
            raise InvalidState(f"policy v{version} is {rec.state}; only a proposed one can be "
                               "activated")
        if rec.proposed_by == actor.actor:
            raise Forbidden(f"policy v{version} was proposed by {actor.actor}; another approver "
                            "must activate it")
        with d._mutate, d.store.transaction():
            d.store.activate_policy(version, actor.actor)
            d.store.audit(actor.actor, actor.role, "policy.activate", f"v{version}",
                          {"previous": d.policy.version})
        fresh = self.policy_record(version)
        d._activate(fresh)
        return fresh

    def backtest(self, version: int) -> dict[str, Any]:
        """Stored history replayed under policy ``version`` and under the active one."""
        d = self._deja()
        candidate = parse_policy(self.policy_record(version).body, version)
        history = self.history()
        return {"candidate": backtest(history, candidate),
                "active": backtest(history, d.policy),
                "decisions": len(history)}

    def history(self) -> list[HistoryItem]:
        """Every audited verdict with its evidence and what people later said about it."""
        rows = self._deja().store.sql("""
            SELECT d.decision_id, d.service, d.severity, d.decision, d.evidence,
                (SELECT arg_max(f.novel, f.created_at) FROM feedback f
                    WHERE f.decision_id = d.decision_id),
                (SELECT arg_max(f.correct, f.created_at) FROM feedback f
                    WHERE f.decision_id = d.decision_id),
                (SELECT arg_max(f.resolution, f.created_at) FROM feedback f
                    WHERE f.decision_id = d.decision_id AND f.resolution IS NOT NULL),
                (SELECT list(o.resolution_key) FROM decision_outcomes o
                    WHERE o.decision_id = d.decision_id AND o.outcome <> 'resolved'
                      AND o.resolution_key IS NOT NULL),
                (SELECT any_value(e.resolution) FROM escalation_events ee
                    JOIN escalations e ON e.escalation_id = ee.escalation_id
                    WHERE ee.decision_id = d.decision_id AND e.resolution IS NOT NULL)
            FROM decisions d WHERE d.evidence IS NOT NULL ORDER BY d.created_at""")
        out = []
        for (decision_id, service, severity, decision, evidence, novel, correct, fb_res,
             failed, esc_res) in rows:
            fixed = _json(fb_res) or _json(esc_res)
            unnecessary = decision == "escalate" and (novel is False or (
                correct is False and novel is not True))
            out.append(HistoryItem(
                decision_id=decision_id, service=service, severity=severity, decision=decision,
                evidence=_json(evidence) or {},
                truth=Truth(novel=novel, unnecessary_escalation=unnecessary,
                            resolution_key=resolution_key(fixed["action"]) if fixed else None,
                            failed_keys=frozenset(failed or ()))))
        return out

    # -- learning ---------------------------------------------------------------------------------
    def _learn_from_feedback(self, service: str | None) -> PolicyRecord | None:
        """Propose (never activate) a recalibrated α for a service whose escalations feedback
        keeps calling unnecessary, or whose misses it keeps reporting.

        The new α is the one closest to the current that would have turned at least 90% of those
        verdicts around, within the policy's ``alpha_bounds``.
        """
        d = self._deja()
        policy = d.policy
        if service is None:
            return None
        rows = d.store.sql("""
            SELECT d.decision, d.evidence, arg_max(f.novel, f.created_at),
                   arg_max(f.correct, f.created_at)
            FROM decisions d JOIN feedback f ON f.decision_id = d.decision_id
            WHERE d.service = ? AND d.evidence IS NOT NULL GROUP BY d.decision_id, d.decision,
                  d.evidence""", [service])
        escalated = [(_json(ev), novel, correct) for dec, ev, novel, correct in rows
                     if dec == "escalate"]
        unnecessary = [ev for ev, novel, correct in escalated
                       if novel is False or (correct is False and novel is not True)]
        missed = [_json(ev) for dec, ev, novel, _ in rows if dec != "escalate" and novel is True]
        current = policy.alpha_for(service)
        floor = policy.threshold_floor(service)
        lo, hi = policy.alpha_bounds
        target, new_floor = None, floor
        if (len(unnecessary) >= policy.learn_min_feedback
                and len(unnecessary) >= 0.5 * max(1, len(escalated))):
            seen = [e for e in unnecessary if e]
            target = _turning_alpha(seen, current, lo, want_novel=False, floor=floor)
            if target is None or _still_novel(seen, target, floor) > 0.1:
                # Even the lowest α escalates them: the KB's own spread does not reach these
                # events, so feedback sets a raw floor (within the policy's bound) instead.
                raws = sorted(float(e["raw"]) for e in seen)
                new_floor = min(policy.max_threshold,
                                round(raws[min(len(raws) - 1, int(0.9 * len(raws)))] + 1e-6, 6))
        elif len(missed) >= policy.learn_min_feedback:
            target = _turning_alpha([e for e in missed if e], current, hi, want_novel=True,
                                    floor=0.0)
            new_floor = 0.0
        if target is None:
            return None
        if math.isclose(target, current, rel_tol=1e-6) and math.isclose(new_floor, floor):
            return None
        for p in d.store.list_policies():
            if p.state == "proposed" and p.origin == "learned" and math.isclose(
                    float((p.body.get("service_alpha") or {}).get(service, -1)), target,
                    rel_tol=1e-6) and math.isclose(
                    float((p.body.get("service_threshold") or {}).get(service, 0.0)),
                    new_floor):
                return None
        changes: dict[str, Any] = {
            "service_alpha": {**dict(policy.service_alpha), service: target},
            "service_threshold": {**dict(policy.service_threshold), service: new_floor}}
        note = (f"learned from feedback on {service}: {len(unnecessary)} of {len(escalated)} "
                f"escalations called unnecessary, {len(missed)} misses reported; α "
                f"{current:g} → {target:g}, raw floor {floor:g} → {new_floor:g}")
        log.info("proposing a recalibrated policy: %s", note)
        return self.propose_policy(changes, note=note, actor=LEARNER, origin="learned")

    # -- overrides and audit ----------------------------------------------------------------------
    def override(self, decision_id: str, decision: str, note: str | None, *,
                 actor: Principal = SYSTEM) -> Verdict:
        """An operator forces a verdict (e.g. escalate what Deja would replay): recorded as an
        override in the audit log; escalate/review open a handoff like any other."""
        d = self._deja()
        rec = d.store.get_decision(decision_id)
        if rec is None:
            from kb import DecisionNotFound
            raise DecisionNotFound(decision_id)
        verdict = Verdict(
            decision_id=decision_id, decision=decision,  # type: ignore[arg-type]
            novelty=Novelty(score=rec.score, is_novel=rec.is_novel, threshold=rec.threshold,
                            nearest_similarity=rec.neighbor_similarities[0]
                            if rec.neighbor_similarities else 0.0,
                            components=rec.components),
            confidence=rec.confidence, resolution=None, neighbors=[],
            reasons=[f"override by {actor.actor}: {rec.decision} → {decision}"
                     + (f" ({note})" if note else "")],
            policy_version=rec.policy_version, model=rec.model_id)
        with d.store.transaction():
            d.store.audit(actor.actor, actor.role, "decision.override", decision_id,
                          {"from": rec.decision, "to": decision, "note": note})
            new = False
            if decision != "replay":
                verdict.escalation_id, new = d.desk.receive(
                    [(verdict, rec.event, rec.fingerprint)])[0]
        if new and verdict.escalation_id:
            d.desk.announce(verdict.escalation_id)
        return verdict

    def audit_log(self, limit: int = 100, action: str | None = None) -> list[AuditEntry]:
        return self._deja().store.audit_log(limit, action)


def _novel_at(e: Mapping[str, Any], alpha: float, floor: float) -> bool:
    return float(e["raw"]) > max(threshold_at(e.get("thresholds") or {}, alpha), floor)


def _still_novel(evidence: list[Mapping[str, Any]], alpha: float, floor: float) -> float:
    return sum(_novel_at(e, alpha, floor) for e in evidence) / max(1, len(evidence))


def _turning_alpha(evidence: list[Mapping[str, Any]], current: float, bound: float, *,
                   want_novel: bool, floor: float) -> float | None:
    """The α nearest ``current`` (towards ``bound``) that makes ≥ 90% of ``evidence`` come out
    as ``want_novel``; ``bound`` if none does."""
    if not evidence:
        return None
    steps = 40
    for i in range(1, steps + 1):
        a = math.exp(math.log(current) + (math.log(bound) - math.log(current)) * i / steps)
        if sum(_novel_at(e, a, floor) == want_novel for e in evidence) >= 0.9 * len(evidence):
            return round(a, 6)
    return round(bound, 6)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value

