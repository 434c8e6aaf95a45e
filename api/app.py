"""The FastAPI application: routes as API.md names them, errors mapped in one place.

Route functions are plain ``def``: FastAPI runs them in its thread pool, so model calls and DuckDB
never block the event loop.
"""

from __future__ import annotations

import html
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.deja import Deja
from api.schemas import (
    AckIn,
    ApproveIn,
    BatchCheckIn,
    BatchVerdicts,
    ChangeIn,
    ChangeOut,
    CheckIn,
    DecisionKind,
    DecisionList,
    EscalationList,
    EscalationOut,
    EscalationState,
    EventsIn,
    FeedbackIn,
    FeedbackOut,
    IncidentOut,
    IngestOut,
    NeighbourList,
    OutcomeIn,
    OutcomeOut,
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
)

log = logging.getLogger("deja.http")

_STATUS: dict[type[DejaError], tuple[int, str]] = {
    IncidentNotFound: (404, "incident_not_found"),
    DecisionNotFound: (404, "decision_not_found"),
    EscalationNotFound: (404, "escalation_not_found"),
    InvalidState: (409, "invalid_state"),
    InvalidInput: (422, "invalid"),
    DataDirLocked: (503, "data_dir_locked"),
}


def _error(status: int, code: str, message: str, field: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}},
                        status_code=status, headers=headers)


def get_deja(request: Request) -> Deja:
    deja: Deja | None = getattr(request.app.state, "deja", None)
    if deja is None:
        raise StarletteHTTPException(503, "the service is starting")
    return deja


DejaDep = Annotated[Deja, Depends(get_deja)]


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
    _install_errors(app, settings)
    _install_routes(app, settings)
    return app


def _install_errors(app: FastAPI, settings: Settings) -> None:
    @app.middleware("http")
    async def limit_body(request: Request,
                         call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            return _error(413, "body_too_large",
                          f"request body exceeds {settings.max_body_bytes} bytes", "body")
        return await call_next(request)

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
        field = getattr(exc, "field", None)
        not_found = {IncidentNotFound: "id", DecisionNotFound: "decision_id",
                     EscalationNotFound: "escalation_id"}
        if type(exc) in not_found:
            field = not_found[type(exc)]
            return _error(status, code, f"no such {field}: {exc}", field)
        return _error(status, code, str(exc), field)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 503: "unavailable"}.get(
            exc.status_code, "error")
        headers = {"Retry-After": "1"} if exc.status_code == 503 else None
        return _error(exc.status_code, code, str(exc.detail), None, headers)


def _install_routes(app: FastAPI, settings: Settings) -> None:
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
    def add_events(body: EventsIn, deja: DejaDep) -> IngestOut:
        added = deja.ingest(body.events)
        return IngestOut(ids=[i for i, _ in added], created=sum(1 for _, c in added if c))

    @app.post("/v1/check")
    def check(body: CheckIn, deja: DejaDep) -> Verdict:
        return deja.check([body], dry_run=body.dry_run)[0]

    @app.post("/v1/check/batch")
    def check_batch(body: BatchCheckIn, deja: DejaDep) -> BatchVerdicts:
        return BatchVerdicts(results=deja.check(body.events, dry_run=body.dry_run))

    @app.get("/v1/similar")
    def similar(deja: DejaDep,
                q: Annotated[str, Query(min_length=1, max_length=2000)],
                k: Annotated[int, Query(ge=1)] = 5) -> NeighbourList:
        if k > settings.max_k:
            raise InvalidInput(f"k: at most {settings.max_k}", "k")
        if "\x00" in q or not q.strip():
            raise InvalidInput("q: must be non-blank text without NUL characters", "q")
        return NeighbourList(query=q, neighbors=deja.similar(q, k))

    @app.post("/v1/decisions/{decision_id}/feedback", status_code=201)
    def feedback(decision_id: str, body: FeedbackIn, deja: DejaDep) -> FeedbackOut:
        return deja.feedback(decision_id, body)

    @app.post("/v1/decisions/{decision_id}/outcome", status_code=201)
    def outcome(decision_id: str, body: OutcomeIn, deja: DejaDep) -> OutcomeOut:
        return deja.record_outcome(decision_id, body)

    @app.get("/v1/escalations")
    def escalations(deja: DejaDep, state: EscalationState | None = None,
                    limit: Annotated[int, Query(ge=1, le=1000)] = 100) -> EscalationList:
        return EscalationList(escalations=deja.escalations(state, limit))

    @app.get("/v1/escalations/{escalation_id}")
    def escalation(escalation_id: str, deja: DejaDep) -> EscalationOut:
        return deja.escalation(escalation_id)

    @app.post("/v1/escalations/{escalation_id}/ack")
    def ack(escalation_id: str, deja: DejaDep, body: AckIn | None = None) -> EscalationOut:
        return deja.ack(escalation_id, body.by if body else None)

    @app.post("/v1/escalations/{escalation_id}/resolve")
    def resolve(escalation_id: str, body: ResolveIn, deja: DejaDep) -> EscalationOut:
        return deja.resolve(escalation_id, body.resolution, outcome=body.outcome, by=body.by)

    @app.post("/v1/escalations/{escalation_id}/approve")
    def approve(escalation_id: str, deja: DejaDep, body: ApproveIn | None = None
                ) -> EscalationOut:
        body = body or ApproveIn()
        return deja.approve(escalation_id, outcome=body.outcome, by=body.by)

    @app.post("/v1/escalations/{escalation_id}/reject")
    def reject(escalation_id: str, body: RejectIn, deja: DejaDep) -> EscalationOut:
        return deja.reject(escalation_id, body.resolution, outcome=body.outcome, by=body.by)

    @app.post("/v1/changes", status_code=201)
    def change(body: ChangeIn, deja: DejaDep) -> ChangeOut:
        return ChangeOut(id=deja.add_change(body))

    @app.get("/v1/decisions")
    def decisions(deja: DejaDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50,
                  decision: DecisionKind | None = None) -> DecisionList:
        return DecisionList(decisions=deja.decisions(limit, decision))

    @app.get("/v1/incidents/{incident_id}")
    def incident(incident_id: str, deja: DejaDep) -> IncidentOut:
        return deja.incident(incident_id)

    @app.get("/v1/stats")
    def stats(deja: DejaDep) -> Stats:
        return deja.stats()

    @app.get("/v1/policies/active")
    def active_policy(deja: DejaDep) -> dict[str, Any]:
        return deja.policy.as_dict()

    @app.get("/", response_class=HTMLResponse)
    def page(deja: DejaDep, q: str | None = None) -> HTMLResponse:
        return HTMLResponse(_page(deja, q))


_CSS = """body{font-family:system-ui,sans-serif;margin:2rem;color:#222}
table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:.35rem .5rem;text-align:left;font-size:.9rem;
vertical-align:top}.replay{color:#17803d}.review{color:#b26b00}.escalate{color:#c0262d}
input[type=text]{width:32rem;padding:.3rem}.muted{color:#777}"""


def _page(deja: Deja, q: str | None) -> str:
    e = html.escape
    stats = deja.stats()
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>Deja</title>"
             f"<style>{_CSS}</style></head><body><h1>Deja</h1>",
             f"<p class='muted'>{stats.incidents} incidents, {stats.decisions} decisions, policy "
             f"v{stats.policy_version}, model {e(stats.model)}</p>",
             "<form method='get' action='/'><label>Have we seen this before? "
             f"<input type='text' name='q' value='{e(q or '')}'></label> "
             "<button>Search</button></form>"]
    if q and q.strip() and "\x00" not in q:
        rows = "".join(
            f"<tr><td>{n.similarity:.3f}</td><td>{e(n.title)}</td><td>{e(n.service or '')}</td>"
            f"<td>{e(n.resolution.action if n.resolution else '')}</td></tr>"
            for n in deja.similar(q[:2000], 10))
        parts.append("<h2>Similar incidents</h2><table><tr><th>similarity</th><th>title</th>"
                     f"<th>service</th><th>resolution</th></tr>{rows}</table>")
    rows = "".join(
        f"<tr><td>{e(str(d.created_at)[:19])}</td><td class='{d.decision}'>{d.decision}</td>"
        f"<td>{d.score:.3f}</td><td>{d.confidence:.2f}</td>"
        f"<td>{e(str(d.event.get('title', '')))}</td><td>{e('; '.join(d.reasons))}</td></tr>"
        for d in deja.decisions(50))
    parts.append("<h2>Recent decisions</h2><table><tr><th>time</th><th>decision</th>"
                 "<th>novelty</th><th>confidence</th><th>event</th><th>reasons</th></tr>"
                 f"{rows}</table></body></html>")
    return "".join(parts)
