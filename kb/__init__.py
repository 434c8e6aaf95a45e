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
from kb.governance import ROLES, ApiKey, AuditEntry, PolicyRecord, hash_key
from kb.store import DecisionRecord, Incident, NewIncident, Store, kb_ref, parse_kb_ref

__all__ = [
    "ROLES",
    "ApiKey",
    "AuditEntry",
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
    "PolicyRecord",
    "Store",
    "hash_key",
    "kb_ref",
    "parse_kb_ref",
]
