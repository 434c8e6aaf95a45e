"""The FastAPI application: routes as API.md names them, errors mapped in one place.

Route functions are plain ``def``: FastAPI runs them in its thread pool, so model calls and DuckDB
never block the event loop.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from api.adapters import AdapterError, parse_alertmanager, parse_pagerduty
from api.auth import Forbidden, Principal, Unauthorized
from api.deja import Deja
from api.governance import Forbidden as GovernanceForbidden
from api.governance import redact_policy
from api.metrics import Metrics
from api.schemas import (
    AckIn,
    AlertmanagerIngestOut,
    ApproveIn,
    AuditList,
    AuditOut,
    BackupIn,
    BatchCheckIn,
    BatchVerdicts,
    ChangeIn,
    ChangeList,
    ChangeOut,
    ChangeRecordOut,
    CheckIn,
    DecisionKind,
    DecisionList,
    EscalationList,
    EscalationOut,
    EscalationState,
    EventIn,
    EventsIn,
    FeedbackIn,
    FeedbackOut,
    IncidentOut,
    IngestOut,
    KeyCreated,
    KeyIn,
    KeyList,
    KeyOut,
    NeighbourList,
    OutcomeIn,
    OutcomeOut,
    OverrideIn,
    PagerDutyIngestOut,
    PolicyIn,
    PolicyList,
    PolicyOut,
    RejectIn,
    ResolveIn,
    Stats,
    Verdict,
)
from api.settings import Settings
from kb import (
    DataDirLocked,
    DecisionNotFound,
    DejaError,
    EscalationNotFound,
    IncidentNotFound,
    InvalidInput,
    InvalidState,
    PolicyRecord,
)

log = logging.getLogger("deja.http")


class ReadOnly(DejaError):
    """A write sent to a read-only replica (``DEJA_READ_ONLY``)."""

    field = "dry_run"


_STATUS: dict[type[DejaError], tuple[int, str]] = {
    IncidentNotFound: (404, "incident_not_found"),
    DecisionNotFound: (404, "decision_not_found"),
    EscalationNotFound: (404, "escalation_not_found"),
    InvalidState: (409, "invalid_state"),
    GovernanceForbidden: (403, "forbidden"),
    AdapterError: (422, "invalid_payload"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    InvalidInput: (422, "invalid"),
    DataDirLocked: (503, "data_dir_locked"),
    ReadOnly: (405, "read_only"),
}


def _error(status: int, code: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}},
                        status_code=status, headers=headers)


# Dependencies are ``async``: a sync one costs a thread-pool hop per request, and these only read
# memory (a key not yet cached is looked up in the KB on the thread pool).
async def get_deja(request: Request) -> Deja:
    deja: Deja | None = getattr(request.app.state, "deja", None)
    if deja is None:
        raise StarletteHTTPException(503, "the service is starting")
    return deja


DejaDep = Annotated[Deja, Depends(get_deja)]


async def caller(request: Request, deja: DejaDep) -> Principal:
    """The principal behind ``Authorization: Bearer KEY`` (401 without a valid key)."""
    header = request.headers.get("authorization", "")
    scheme, _, key = header.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("Authorization: Bearer KEY required")
    p = deja.auth.cached(key.strip())
    if p is None:
        p = await run_in_threadpool(deja.auth.principal, key.strip())
    if p is None:
        raise Unauthorized("invalid or revoked key")
    return p


def require(role: str) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(p: Annotated[Principal, Depends(caller)]) -> Principal:
        if not p.has(role):
            raise Forbidden(f"role {p.role} may not do this; it needs {role}")
        return p
    return check


Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Approver = Annotated[Principal, Depends(require("approver"))]
Admin = Annotated[Principal, Depends(require("admin"))]


def create_app(deja: Deja | None = None, settings: Settings | None = None, *,
               close_on_shutdown: bool = False) -> FastAPI:
    """Build the app around an open :class:`Deja`, or open ``settings.data_dir`` on start-up.

    An app that opened its own Deja closes it on shutdown; one given a ``deja`` closes it only
    with ``close_on_shutdown`` (the server's case: uvicorn re-raises SIGTERM after shutdown, so
    code after ``uvicorn.run`` never runs).
    """
    settings = settings or (deja.settings if deja is not None else Settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = app.state.deja if close_on_shutdown else None
        if getattr(app.state, "deja", None) is None:
            owned = Deja.open(settings.data_dir, settings=settings)
            app.state.deja = owned
            _bind_metrics(app.state.metrics, owned)
        try:
            yield
        finally:
            if owned is not None:
                owned.close()
                app.state.deja = None

    app = FastAPI(title="Deja", version="1", lifespan=lifespan,
                  description="Have we seen this before? Novelty checks for operations events.")
    app.state.deja = deja
    app.state.settings = settings
    app.state.metrics = Metrics()
    if deja is not None:
        _bind_metrics(app.state.metrics, deja)
    _install_errors(app, settings)
    _install_routes(app, settings)
    return app


class _Guard:
    """413 for a declared body over the limit; 503 + Retry-After beyond ``max_inflight``.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware wraps
    every request and response in extra tasks and memory streams (~1 ms a request here).
    """

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.inflight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_body_bytes
        length = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if length is not None and length.isdigit() and int(length) > limit:
            await _error(413, "body_too_large", f"request body exceeds {limit} bytes",
                         "body")(scope, receive, send)
            return
        # Backpressure: beyond this many requests in flight, answer 503 at once rather than
        # queue without bound; clients (Alertmanager among them) retry a 503.
        if self.inflight >= self.settings.max_inflight and scope["path"] != "/healthz":
            await _error(503, "overloaded", "too many requests in flight; retry shortly",
                         None, {"Retry-After": "1"})(scope, receive, send)
            return
        if (self.settings.read_only and scope["method"] not in _READS
                and scope["path"] not in _READ_POSTS
                and not _BACKTEST.fullmatch(scope["path"])):
            await _error(405, "read_only", "this Deja is a read-only replica: send writes to "
                         "the writer", None, {"Allow": "GET, HEAD"})(scope, receive, send)
            return
        self.inflight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.inflight -= 1


#: What a read-only replica serves: reads, dry-run checks (the route refuses others) and
#: backtests, which replay stored history without writing it.
_READS = frozenset({"GET", "HEAD", "OPTIONS"})
_READ_POSTS = frozenset({"/v1/check", "/v1/check/batch"})
_BACKTEST = re.compile(r"/v1/policies/[^/]+/backtest")


def _install_errors(app: FastAPI, settings: Settings) -> None:
    app.add_middleware(_Guard, settings=settings)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {"loc": ("body",), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        field = ".".join(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
        if first.get("type") == "json_invalid":
            field = "body"
        message = f"{field or 'body'}: {first.get('msg', 'invalid')}"
        return _error(422, "invalid_request", message, field or "body")

    @app.exception_handler(DejaError)
    async def deja_error(request: Request, exc: DejaError) -> JSONResponse:
        status, code = _STATUS.get(type(exc), (400, "error"))
        if isinstance(exc, Unauthorized):
            return _error(status, code, str(exc), "authorization",
                          {"WWW-Authenticate": "Bearer"})
        field = getattr(exc, "field", None)
        not_found = {IncidentNotFound: "id", DecisionNotFound: "decision_id",
                     EscalationNotFound: "escalation_id"}
        if type(exc) in not_found:
            field = not_found[type(exc)]
            return _error(status, code, f"no such {field}: {exc}", field)
        return _error(status, code, str(exc), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed",
                503: "unavailable"}.get(exc.status_code, "error")
        headers = {"Retry-After": "1"} if exc.status_code == 503 else None
        return _error(exc.status_code, code, str(exc.detail),
                      "body" if exc.status_code == 400 else None, headers)


def _bind_metrics(metrics: Metrics, deja: Deja) -> None:
    metrics.bind(incidents=deja.store.count_incidents,
                 vectors=lambda: deja.index.ntotal,  # read each time: reindex swaps the index
                 open_escalations=deja.store.count_active_escalations,
                 cache=lambda: (deja.cache.stats.hits, deja.cache.stats.misses))


def _install_routes(app: FastAPI, settings: Settings) -> None:
    metrics: Metrics = app.state.metrics

    def run_checks(deja: Deja, events: Sequence[EventIn], dry_run: bool, who: Principal
                   ) -> list[Verdict]:
        started = time.perf_counter()
        verdicts = deja.check(events, dry_run=dry_run, actor=who)
        metrics.observe_verdicts(verdicts, time.perf_counter() - started)
        return verdicts

    def handoff_timing(out: EscalationOut, *, acked_now: bool = False) -> EscalationOut:
        if acked_now and out.acked_at is not None:
            metrics.observe_handoff((out.acked_at - out.created_at).total_seconds(), None)
        if out.resolved_at is not None:
            metrics.observe_handoff(None, (out.resolved_at - out.created_at).total_seconds())
        return out

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        body, content_type = metrics.render()
        return Response(content=body, media_type=content_type)

    @app.post("/v1/ingest/alertmanager")
    def ingest_alertmanager(body: Annotated[dict[str, Any], Body()], deja: DejaDep,
                            who: Operator) -> AlertmanagerIngestOut:
        batch = parse_alertmanager(body)
        events = [EventIn.model_validate(a.event) for a in batch.firing]
        # Alertmanager re-sends firing alerts (retries, repeat_interval): an alert already
        # checked (same fingerprint and start) is not checked or audited again.
        seen = deja.checked_event_ids([e.id for e in events if e.id])
        fresh = [e for e in events if e.id not in seen]
        verdicts = run_checks(deja, fresh, False, who) if fresh else []
        for alert in batch.resolved:
            deja.store.audit(who.actor, who.role, "alert.resolved", alert.dedup_key,
                             {"ended_at": alert.ended_at.isoformat() if alert.ended_at
                              else None})
        return AlertmanagerIngestOut(results=verdicts, ids=[e.id or "" for e in fresh],
                                     duplicates=sorted(seen),
                                     resolved=[a.dedup_key for a in batch.resolved],
                                     truncated=batch.truncated)

    @app.post("/v1/ingest/pagerduty", status_code=202)
    def ingest_pagerduty(body: Annotated[dict[str, Any], Body()], deja: DejaDep,
                         who: Operator) -> PagerDutyIngestOut:
        parsed = parse_pagerduty(body)
        verdict = None
        if parsed.event is not None:
            verdict = run_checks(deja, [EventIn.model_validate(parsed.event)], False, who)[0]
        else:
            deja.store.audit(who.actor, who.role, f"pagerduty.{parsed.action}",
                             parsed.dedup_key)
        return PagerDutyIngestOut(message="Event processed", dedup_key=parsed.dedup_key,
                                  verdict=verdict)

    @app.get("/healthz")
    def healthz(request: Request) -> JSONResponse:
        deja: Deja | None = getattr(request.app.state, "deja", None)
        if deja is None:
            return _error(503, "starting", "the model and index are loading")
        indexed, incidents = deja.scorer.incidents, deja.store.count_incidents()
        body = {"status": "ok" if indexed == incidents else "indexing",
                "indexed": indexed, "incidents": incidents, "model": deja.model_id}
        return JSONResponse(body, status_code=200 if indexed == incidents else 503)

    @app.post("/v1/events", status_code=201)
    def add_events(body: EventsIn, deja: DejaDep, who: Operator) -> IngestOut:
        added = deja.ingest(body.events, actor=who)
        return IngestOut(ids=[i for i, _ in added], created=sum(1 for _, c in added if c))

    # The hot routes answer with the model serialised once by pydantic: returning the model
    # would have FastAPI dump it, validate the dump against the response model and encode it
    # again. The schema still names the response model.
    @app.post("/v1/check", response_model=Verdict)
    def check(body: CheckIn, deja: DejaDep, who: Viewer) -> Response:
        _may_check(who, body.dry_run, settings)
        return _json_response(run_checks(deja, [body], body.dry_run, who)[0])

    @app.post("/v1/check/batch", response_model=BatchVerdicts)
    def check_batch(body: BatchCheckIn, deja: DejaDep, who: Viewer) -> Response:
        _may_check(who, body.dry_run, settings)
        return _json_response(BatchVerdicts(
            results=run_checks(deja, body.events, body.dry_run, who)))

    @app.get("/v1/similar")
    def similar(deja: DejaDep, who: Viewer,
                q: Annotated[str, Query(min_length=1, max_length=2000)],
                k: Annotated[int, Query(ge=1)] = 5) -> NeighbourList:
        if k > settings.max_k:
            raise InvalidInput(f"k: at most {settings.max_k}", "k")
        if "\x00" in q or not q.strip():
            raise InvalidInput("q: must be non-blank text without NUL characters", "q")
        return NeighbourList(query=q, neighbors=deja.similar(q, k))

    @app.post("/v1/decisions/{decision_id}/feedback", status_code=201)
    def feedback(decision_id: str, body: FeedbackIn, deja: DejaDep, who: Operator
                 ) -> FeedbackOut:
        return deja.feedback(decision_id, body, actor=who)

    @app.post("/v1/decisions/{decision_id}/outcome", status_code=201)
    def outcome(decision_id: str, body: OutcomeIn, deja: DejaDep, who: Operator) -> OutcomeOut:
        return deja.record_outcome(decision_id, body, actor=who)

    @app.get("/v1/escalations")
    def escalations(deja: DejaDep, who: Viewer, state: EscalationState | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EscalationList:
        return EscalationList(escalations=deja.escalations(state, limit))

    @app.get("/v1/escalations/{escalation_id}")
    def escalation(escalation_id: str, deja: DejaDep, who: Viewer) -> EscalationOut:
        return deja.escalation(escalation_id)

    @app.post("/v1/escalations/{escalation_id}/ack")
    def ack(escalation_id: str, deja: DejaDep, who: Operator, body: AckIn | None = None
            ) -> EscalationOut:
        first = deja.desk.get(escalation_id).acked_at is None
        return handoff_timing(deja.ack(escalation_id, body.by if body else None, actor=who),
                              acked_now=first)

    @app.post("/v1/escalations/{escalation_id}/resolve")
    def resolve(escalation_id: str, body: ResolveIn, deja: DejaDep, who: Operator
                ) -> EscalationOut:
        return handoff_timing(deja.resolve(escalation_id, body.resolution,
                                           outcome=body.outcome, by=body.by, actor=who))

    @app.post("/v1/escalations/{escalation_id}/approve")
    def approve(escalation_id: str, deja: DejaDep, who: Approver,
                body: ApproveIn | None = None) -> EscalationOut:
        body = body or ApproveIn()
        return handoff_timing(deja.approve(escalation_id, outcome=body.outcome, by=body.by,
                                           actor=who))

    @app.post("/v1/escalations/{escalation_id}/reject")
    def reject(escalation_id: str, body: RejectIn, deja: DejaDep, who: Approver
               ) -> EscalationOut:
        return handoff_timing(deja.reject(escalation_id, body.resolution, outcome=body.outcome,
                                          by=body.by, actor=who))

    @app.get("/v1/changes")
    def changes(deja: DejaDep, who: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
                service: Annotated[str | None, Query(max_length=200)] = None) -> ChangeList:
        return ChangeList(changes=[
            ChangeRecordOut(id=c.change_id, service=c.service, summary=c.summary, at=c.at,
                            author=c.author, ref=c.ref)
            for c in deja.store.list_changes(limit, service)])

    @app.post("/v1/changes", status_code=201)
    def change(body: ChangeIn, deja: DejaDep, who: Operator) -> ChangeOut:
        return ChangeOut(id=deja.add_change(body, actor=who))

    @app.get("/v1/decisions")
    def decisions(deja: DejaDep, who: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  decision: DecisionKind | None = None) -> DecisionList:
        return DecisionList(decisions=deja.decisions(limit, decision))

    @app.get("/v1/incidents/{incident_id}")
    def incident(incident_id: str, deja: DejaDep, who: Viewer) -> IncidentOut:
        return deja.incident(incident_id)

    @app.get("/v1/stats")
    def stats(deja: DejaDep, who: Viewer) -> Stats:
        return deja.stats()

    @app.get("/v1/policies/active")
    def active_policy(deja: DejaDep, who: Viewer) -> PolicyOut:
        return _policy_out(deja.policy_record(deja.policy.version))

    @app.get("/v1/policies")
    def policies(deja: DejaDep, who: Viewer) -> PolicyList:
        return PolicyList(policies=[_policy_out(p) for p in deja.policies()])

    @app.get("/v1/policies/{version}")
    def policy(version: int, deja: DejaDep, who: Viewer) -> PolicyOut:
        return _policy_out(deja.policy_record(version))

    @app.post("/v1/policies", status_code=201)
    def propose(body: PolicyIn, deja: DejaDep, who: Admin) -> PolicyOut:
        changes = body.model_dump(exclude_unset=True, exclude={"note"})
        return _policy_out(deja.propose_policy(changes, note=body.note, actor=who))

    @app.post("/v1/policies/{version}/activate")
    def activate(version: int, deja: DejaDep, who: Approver) -> PolicyOut:
        return _policy_out(deja.activate_policy(version, actor=who))

    @app.post("/v1/policies/{version}/backtest")
    def backtest(version: int, deja: DejaDep, who: Viewer) -> dict[str, Any]:
        return deja.backtest(version)

    @app.post("/v1/decisions/{decision_id}/override")
    def override(decision_id: str, body: OverrideIn, deja: DejaDep, who: Operator) -> Verdict:
        return deja.override(decision_id, body.decision, body.note, actor=who)

    @app.post("/v1/backup", status_code=201)
    def make_backup(body: BackupIn, deja: DejaDep, who: Admin) -> dict[str, Any]:
        from api.backup import backup

        try:
            info = backup(deja, Path(body.path))
        except (FileExistsError, ValueError, OSError) as exc:
            raise InvalidInput(str(exc), "path") from exc
        deja.store.audit(who.actor, who.role, "backup", body.path, info)
        return info

    @app.get("/v1/audit")
    def audit(deja: DejaDep, who: Viewer, limit: Annotated[int, Query(ge=1, le=1000)] = 100,
              action: Annotated[str | None, Query(max_length=100)] = None) -> AuditList:
        return AuditList(entries=[AuditOut(
            id=e.audit_id, at=e.at, actor=e.actor, role=e.role, action=e.action,
            target=e.target, detail=e.detail) for e in deja.audit_log(limit, action)])

    @app.post("/v1/keys", status_code=201)
    def create_key(body: KeyIn, deja: DejaDep, who: Admin) -> KeyCreated:
        key_id, key = deja.create_key(body.name, body.role, actor=who)
        return KeyCreated(id=key_id, name=body.name, role=body.role, key=key)

    @app.get("/v1/keys")
    def list_keys(deja: DejaDep, who: Admin) -> KeyList:
        return KeyList(keys=[KeyOut(id=k.key_id, name=k.name, role=k.role,
                                    created_at=k.created_at, revoked_at=k.revoked_at)
                             for k in deja.list_keys()])

    @app.post("/v1/keys/{key_id}/revoke")
    def revoke_key(key_id: str, deja: DejaDep, who: Admin) -> dict[str, bool]:
        if not deja.revoke_key(key_id, actor=who):
            raise InvalidInput(f"no active key {key_id}", "key_id")
        return {"revoked": True}

    @app.get("/", response_class=HTMLResponse)
    def page() -> HTMLResponse:
        # A static shell: it holds no data and calls the API with the key the user enters.
        return HTMLResponse(_PAGE)


def _json_response(model: BaseModel, status_code: int = 200) -> Response:
    return Response(model.model_dump_json(), status_code=status_code,
                    media_type="application/json")


def _may_check(who: Principal, dry_run: bool, settings: Settings) -> None:
    if not dry_run and settings.read_only:
        raise ReadOnly("dry_run: this Deja is a read-only replica; only dry-run checks "
                       "(\"dry_run\": true) are served, send audited checks to the writer")
    # Viewers may look (dry runs write nothing); acting on a verdict needs an operator.
    if not dry_run and not who.has("operator"):
        raise Forbidden(f"role {who.role} may only make dry-run checks; it needs operator")


def _policy_out(rec: PolicyRecord) -> PolicyOut:
    # The policy's own fields at the top level, with its version's bookkeeping beside them.
    return PolicyOut.model_validate({
        **redact_policy(rec.body), "version": rec.version, "state": rec.state,
        "origin": rec.origin, "note": rec.note, "proposed_by": rec.proposed_by,
        "proposed_at": rec.proposed_at, "activated_by": rec.activated_by,
        "activated_at": rec.activated_at})


_PAGE = (Path(__file__).parent / "web" / "index.html").read_text(encoding="utf-8")
