"""The knowledge base: incidents, decisions (audit), feedback and the embedding cache, in DuckDB."""

from kb.errors import DataDirLocked, DecisionNotFound, DejaError, IncidentNotFound, InvalidInput
from kb.store import DecisionRecord, Incident, NewIncident, Store, kb_ref, parse_kb_ref

__all__ = [
    "DataDirLocked",
    "DecisionNotFound",
    "DecisionRecord",
    "DejaError",
    "Incident",
    "IncidentNotFound",
    "InvalidInput",
    "NewIncident",
    "Store",
    "kb_ref",
    "parse_kb_ref",
]
