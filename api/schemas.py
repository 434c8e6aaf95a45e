"""HTTP schemas, split by direction (``…In`` arrives, the rest leaves). Names follow API.md."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

Severity = Literal["critical", "error", "warning", "info"]
Outcome = Literal["resolved", "failed", "unknown"]
DecisionKind = Literal["replay", "review", "escalate"]


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be blank")
    return value


Text = Annotated[str, AfterValidator(_no_nul)]
ShortText = Annotated[str, StringConstraints(max_length=200), AfterValidator(_no_nul)]
Title = Annotated[str, StringConstraints(min_length=1, max_length=2000),
                  AfterValidator(_no_nul), AfterValidator(_not_blank)]
LabelKey = Annotated[str, StringConstraints(min_length=1, max_length=200), AfterValidator(_no_nul)]
LabelValue = Annotated[str, StringConstraints(max_length=2000), AfterValidator(_no_nul)]


class _In(BaseModel):
    # Clients may send fields this version does not know; they are ignored, never an error.
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)


class ResolutionIn(_In):
    action: Title
    runbook: Annotated[Text, StringConstraints(max_length=2000)] | None = None
    rollback: Annotated[Text, StringConstraints(max_length=2000)] | None = None
    automatable: bool = True


class EventIn(_In):
    id: Annotated[Text, StringConstraints(min_length=1, max_length=128)] | None = None
    title: Title
    text: Annotated[Text, StringConstraints(max_length=20000)] | None = None
    service: ShortText | None = None
    severity: Severity | None = None
    source: ShortText | None = None
    labels: Annotated[dict[LabelKey, LabelValue], Field(max_length=64)] = Field(
        default_factory=dict)
    occurred_at: datetime | None = None
    resolution: ResolutionIn | None = None
    outcome: Outcome | None = None


class CheckIn(EventIn):
    dry_run: bool = False


class EventsIn(_In):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=1000)]


class BatchCheckIn(_In):
    events: Annotated[list[EventIn], Field(min_length=1, max_length=1000)]
    dry_run: bool = False


class FeedbackIn(_In):
    correct: bool
    novel: bool | None = None
    resolution: ResolutionIn | None = None
    outcome: Literal["resolved", "failed"] | None = None
    note: Annotated[Text, StringConstraints(max_length=5000)] | None = None


class Resolution(BaseModel):
    action: str
    runbook: str | None = None
    rollback: str | None = None
    automatable: bool = True


class Neighbour(BaseModel):
    id: str
    kb_id: str
    title: str
    service: str | None
    similarity: float
    resolution: Resolution | None
    outcome: str | None
    occurred_at: datetime | None
    occurrences: int = 1


class Novelty(BaseModel):
    score: float
    is_novel: bool
    threshold: float
    nearest_similarity: float
    components: dict[str, float]


class Verdict(BaseModel):
    decision_id: str | None
    decision: DecisionKind
    novelty: Novelty
    confidence: float
    resolution: Resolution | None
    neighbors: list[Neighbour]
    reasons: list[str]
    policy_version: int
    model: str
    dry_run: bool = False
    escalation_id: str | None = None


class BatchVerdicts(BaseModel):
    results: list[Verdict]


class IngestOut(BaseModel):
    ids: list[str]
    created: int


class FeedbackOut(BaseModel):
    feedback_id: str
    decision_id: str
    incident: str | None


class DecisionOut(BaseModel):
    decision_id: str
    created_at: datetime | None
    decision: DecisionKind
    event: dict[str, Any]
    score: float
    is_novel: bool
    threshold: float
    confidence: float
    components: dict[str, float]
    neighbor_ids: list[str]
    neighbor_similarities: list[float]
    reasons: list[str]
    resolution: Resolution | None
    policy_version: int
    model: str


class DecisionList(BaseModel):
    decisions: list[DecisionOut]


class TrackRecordOut(BaseModel):
    successes: int
    failures: int
    lower_bound: float


class IncidentOut(BaseModel):
    id: str
    kb_id: str
    title: str
    text: str | None
    service: str | None
    severity: str | None
    source: str | None
    labels: dict[str, str]
    occurred_at: datetime | None
    created_at: datetime
    fingerprint: str
    resolution: Resolution | None
    outcome: str | None
    origin: str
    track_record: TrackRecordOut | None


class NeighbourList(BaseModel):
    query: str
    neighbors: list[Neighbour]


class Stats(BaseModel):
    incidents: int
    indexed: int
    decisions: int
    open_escalations: int
    policy_version: int
    model: str
    index: dict[str, Any] = Field(description=(
        "kind (flat, ivf-flat, ivf-fp16 or ivf-sq8), vectors, status, last_kb_id, and how the "
        "index was built: recall_at_10 against exact search measured at build time (1.0 for "
        "flat), recall_target(_met), recall_sample, nlist, nprobe, build_seconds, "
        "built_vectors, memory_bytes, memory_budget_bytes, rebuilding, rebuild_error"))
    calibration: dict[str, Any]
    cache: dict[str, int]


EscalationState = Literal["open", "acked", "resolved", "breached"]


class EscalationOut(BaseModel):
    id: str
    decision_id: str
    kind: Literal["escalate", "review"]
    state: EscalationState
    route: dict[str, Any]
    due_at: datetime
    resolve_due_at: datetime
    events: int
    created_at: datetime
    acked_at: datetime | None
    resolved_at: datetime | None
    breached_at: datetime | None
    breaches: int
    service: str | None
    briefing: dict[str, Any]
    suggested_resolution: dict[str, Any] | None
    resolution: dict[str, Any] | None
    acked_by: str | None = None
    resolved_by: str | None = None
    deliveries: list[dict[str, Any]] | None = None


class EscalationList(BaseModel):
    escalations: list[EscalationOut]


Actor = Annotated[Text, StringConstraints(min_length=1, max_length=200)]
Note = Annotated[Text, StringConstraints(max_length=5000)]


class AckIn(_In):
    by: Actor | None = None


class ResolveIn(_In):
    resolution: ResolutionIn
    outcome: Literal["resolved", "failed"] = "resolved"
    note: Note | None = None
    by: Actor | None = None


class ApproveIn(_In):
    outcome: Literal["resolved", "failed"] = "resolved"
    note: Note | None = None
    by: Actor | None = None


class RejectIn(_In):
    resolution: ResolutionIn
    outcome: Literal["resolved", "failed"] = "resolved"
    note: Note | None = None
    by: Actor | None = None


class ChangeIn(_In):
    service: Annotated[Text, StringConstraints(min_length=1, max_length=200)]
    summary: Title
    at: datetime | None = None
    author: ShortText | None = None
    ref: Annotated[Text, StringConstraints(max_length=2000)] | None = None


class ChangeOut(BaseModel):
    id: str


class OutcomeIn(_In):
    outcome: Literal["resolved", "failed", "rolled_back"]
    note: Note | None = None


class OutcomeOut(BaseModel):
    decision_id: str
    outcome: str
    resolution: Resolution | None
    track_record: TrackRecordOut | None


class PolicyIn(_In):
    """Changes to the active policy; fields left out keep their active values."""

    alpha: Annotated[float, Field(gt=0, lt=1)] | None = None
    service_alpha: dict[ShortText, Annotated[float, Field(gt=0, lt=1)]] | None = None
    service_threshold: dict[ShortText, Annotated[float, Field(ge=0, le=4)]] | None = None
    max_threshold: Annotated[float, Field(gt=0, le=4)] | None = None
    alpha_bounds: tuple[Annotated[float, Field(gt=0, lt=1)],
                        Annotated[float, Field(gt=0, lt=1)]] | None = None
    weak_match_factor: Annotated[float, Field(ge=0)] | None = None
    min_agreement: Annotated[float, Field(ge=0, le=1)] | None = None
    min_success: Annotated[float, Field(ge=0, le=1)] | None = None
    credibility: Annotated[float, Field(ge=0, le=1)] | None = None
    automate_services: list[ShortText] | None = None
    automate_severities: list[Severity] | None = None
    neighbours: Annotated[int, Field(ge=1, le=50)] | None = None
    learn_min_feedback: Annotated[int, Field(ge=1)] | None = None
    routing: dict[str, Any] | None = None
    note: Annotated[Text, StringConstraints(max_length=2000)] | None = None


class PolicyOut(BaseModel):
    """A policy version: its fields (alpha, service_alpha, routing, …) plus bookkeeping."""

    model_config = ConfigDict(extra="allow")

    version: int
    state: str
    origin: str
    note: str | None
    proposed_by: str
    proposed_at: datetime
    activated_by: str | None
    activated_at: datetime | None
    alpha: float


class PolicyList(BaseModel):
    policies: list[PolicyOut]


class OverrideIn(_In):
    decision: DecisionKind
    note: Note | None = None


class AuditOut(BaseModel):
    id: int
    at: datetime
    actor: str
    role: str
    action: str
    target: str | None
    detail: dict[str, Any] | None


class AuditList(BaseModel):
    entries: list[AuditOut]


class KeyIn(_In):
    name: Annotated[Text, StringConstraints(min_length=1, max_length=200)]
    role: Literal["viewer", "operator", "approver", "admin"]


class KeyOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(BaseModel):
    id: str
    name: str
    role: str
    key: str


class KeyList(BaseModel):
    keys: list[KeyOut]


class BackupIn(_In):
    path: Annotated[Text, StringConstraints(min_length=1, max_length=4096)]


class AlertmanagerIngestOut(BaseModel):
    results: list[Verdict]
    ids: list[str]
    duplicates: list[str]
    resolved: list[str]
    truncated: int = 0


class PagerDutyIngestOut(BaseModel):
    status: str = "success"
    message: str
    dedup_key: str
    verdict: Verdict | None = None


class ChangeRecordOut(BaseModel):
    id: str
    service: str
    summary: str
    at: datetime
    author: str | None
    ref: str | None


class ChangeList(BaseModel):
    changes: list[ChangeRecordOut]
