"""The knowledge base: incidents, decisions (audit), feedback and the embedding cache, in DuckDB."""

from kb.errors import (
    DataDirLocked,
    DecisionNotFound,
    DejaError,
    EscalationNotFound,
    IncidentNotFound,
    InvalidInput,
    InvalidState,
)
from kb.escalations import Change, EscalationRecord
from kb.store import DecisionRecord, Incident, NewIncident, Store, kb_ref, parse_kb_ref

__all__ = [
    "Change",
    "DataDirLocked",
    "DecisionNotFound",
    "DecisionRecord",
    "DejaError",
    "EscalationNotFound",
    "EscalationRecord",
    "Incident",
    "IncidentNotFound",
    "InvalidInput",
    "InvalidState",
    "NewIncident",
    "Store",
    "kb_ref",
    "parse_kb_ref",
]
