"""Errors of the knowledge base.

DejaError
 ├── IncidentNotFound      no incident with that client id or KB id
 ├── DecisionNotFound      no audited decision with that id
 ├── EscalationNotFound    no escalation with that id
 ├── InvalidState          the action does not apply in the object's state (e.g. resolve twice)
 ├── DataDirLocked         another process owns the DuckDB file
 └── InvalidInput          a value the caller sent cannot be used (names the field)
"""

from __future__ import annotations


class DejaError(Exception):
    """Base of every error Deja raises on purpose."""


class IncidentNotFound(DejaError):
    """No incident with that client id or KB id."""


class DecisionNotFound(DejaError):
    """No audited decision with that id."""


class EscalationNotFound(DejaError):
    """No escalation with that id."""


class InvalidState(DejaError):
    """The action does not apply in the object's current state."""


class DataDirLocked(DejaError):
    """Another process owns the data directory's DuckDB file."""


class InvalidInput(DejaError):
    """A value the caller sent cannot be used; ``field`` names it."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field
