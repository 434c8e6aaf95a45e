"""KB tables of the human handoff: escalations, their grouped events, changes, deliveries,
and what automation reported back about replayed decisions. Mixed into :class:`kb.Store`."""

from __future__ import annotations

import bisect
import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import duckdb

from kb.sql import insert_rows

__all__ = ["Change", "EscalationRecord", "EscalationStore", "count_joins",
           "insert_escalation_events", "insert_escalations"]

ACTIVE_STATES = ("open", "acked", "breached")
#: Changes newer than this (at start) are also kept in memory for opening checks' briefings.
CHANGES_IN_MEMORY = timedelta(days=7)

_COLS = ("escalation_id, decision_id, kind, state, fingerprint, service, route, due_at, "
         "resolve_due_at, events, briefing, suggested_resolution, resolution, policy_version, "
         "created_at, last_event_at, acked_at, acked_by, resolved_at, resolved_by, breached_at, "
         "breaches")


def _iso(at: datetime | None) -> str | None:
    return at.isoformat() if at is not None else None


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value is not None else None


_ROW_TIMES = (7, 8, 14, 15, 16, 18, 20)
_ROW_JSON = (6, 10, 11, 12)


def insert_escalations(cur: duckdb.DuckDBPyConnection, rows: Sequence[Sequence[Any]]) -> None:
    """Rows as :meth:`EscalationStore.add_escalation` journals them, in one statement."""
    table = [list(row) for row in rows]
    for values in table:
        for i in _ROW_TIMES:
            values[i] = _at(values[i])
        for i in _ROW_JSON:
            values[i] = _dump(values[i])
    insert_rows(cur, f"INSERT INTO escalations ({_COLS}) ", table, _ROW_JSON)


def insert_escalation_events(cur: duckdb.DuckDBPyConnection,
                             rows: Sequence[tuple[str, str, Any, str]]) -> None:
    """``(escalation_id, decision_id, event, joined_at ISO)`` rows, in one statement."""
    cur.execute("INSERT INTO escalation_events SELECT unnest($1), unnest($2), unnest($3)::JSON, "
                "unnest($4)", [[r[0] for r in rows], [r[1] for r in rows],
                               [json.dumps(r[2]) for r in rows],
                               [datetime.fromisoformat(r[3]) for r in rows]])


def count_joins(cur: duckdb.DuckDBPyConnection, joins: dict[str, tuple[int, datetime]]) -> None:
    """Add ``n`` events to each escalation id, its last event at ``at``."""
    if not joins:
        return
    # One statement for any number of escalations: the flusher applies a second of checks.
    ids = list(joins)
    cur.execute("UPDATE escalations SET events = events + j.n, "
                "last_event_at = greatest(last_event_at, j.at) FROM "
                "(SELECT unnest($1) AS id, unnest($2) AS n, unnest($3) AS at) AS j "
                "WHERE escalations.escalation_id = j.id",
                [ids, [joins[i][0] for i in ids], [joins[i][1] for i in ids]])


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


@dataclass(frozen=True)
class EscalationRecord:
    escalation_id: str
    decision_id: str
    kind: str
    state: str
    fingerprint: str
    service: str | None
    route: dict[str, Any]
    due_at: datetime
    resolve_due_at: datetime
    events: int
    briefing: dict[str, Any]
    suggested_resolution: dict[str, Any] | None
    resolution: dict[str, Any] | None
    policy_version: int
    created_at: datetime
    last_event_at: datetime
    acked_at: datetime | None
    acked_by: str | None
    resolved_at: datetime | None
    resolved_by: str | None
    breached_at: datetime | None
    breaches: int


def _escalation(row: tuple[Any, ...]) -> EscalationRecord:
    values = list(row)
    for i in (6, 10, 11, 12):
        values[i] = _loads(values[i])
    return EscalationRecord(*values)


@dataclass(frozen=True)
class Change:
    change_id: str
    service: str
    summary: str
    at: datetime
    author: str | None
    ref: str | None


class EscalationStore:
    """Escalation persistence; relies on the host class's cursor and transaction."""

    if TYPE_CHECKING:  # provided by kb.Store, which mixes this class in
        def _cur(self) -> duckdb.DuckDBPyConnection: ...

        def transaction(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]: ...

        def after_commit(self, hook: Callable[[], None]) -> None: ...

        def _write(self, ops: list[tuple[str, Any]]) -> None: ...

        def _raw_cur(self) -> duckdb.DuckDBPyConnection: ...

    #: fingerprint -> its active escalation, and back: every check of a review/escalate verdict
    #: asks, so it is answered from memory. Changed only by committed writes, under the write lock.
    _active_by_fp: dict[str, str]
    _active_fp_of: dict[str, str]
    #: Changes at or after ``_changes_since``, oldest first: the briefings' recent changes.
    _changes: list[Change]
    _changes_since: datetime

    def _load_active_escalations(self) -> None:
        self._active_by_fp, self._active_fp_of = {}, {}
        for fp, escalation_id in self._cur().execute(
                "SELECT fingerprint, escalation_id FROM escalations WHERE state IN "
                "('open', 'acked', 'breached') ORDER BY created_at").fetchall():
            self._mark_active(fp, escalation_id)

    def _mark_active(self, fingerprint: str, escalation_id: str) -> None:
        old = self._active_by_fp.get(fingerprint)
        if old is not None:
            self._active_fp_of.pop(old, None)
        self._active_by_fp[fingerprint] = escalation_id
        self._active_fp_of[escalation_id] = fingerprint

    def _mark_resolved(self, escalation_id: str) -> None:
        fp = self._active_fp_of.pop(escalation_id, None)
        if fp is not None and self._active_by_fp.get(fp) == escalation_id:
            del self._active_by_fp[fp]

    # -- escalations ----------------------------------------------------------------------------
    def active_escalation_ids(self, fingerprints: Sequence[str]) -> dict[str, str]:
        """The active (not resolved) escalation id of each fingerprint that has one, without a
        query. Call it under the write lock (inside a transaction) to act on the answer."""
        active = self._active_by_fp
        return {fp: active[fp] for fp in fingerprints if fp in active}

    def open_escalation_for(self, fingerprint: str) -> EscalationRecord | None:
        """The active (not resolved) escalation of this fingerprint, if any."""
        row = self._cur().execute(
            f"SELECT {_COLS} FROM escalations WHERE fingerprint = ? AND state IN "
            f"('open', 'acked', 'breached') ORDER BY created_at DESC LIMIT 1",
            [fingerprint]).fetchone()
        return _escalation(row) if row else None

    def add_escalation(self, rec: EscalationRecord, event: dict[str, Any]) -> None:
        """Insert an escalation with its first event; inside ``Store.deferred``, journalled with
        the check that opened it."""
        row = [rec.escalation_id, rec.decision_id, rec.kind, rec.state, rec.fingerprint,
               rec.service, rec.route, _iso(rec.due_at), _iso(rec.resolve_due_at), rec.events,
               rec.briefing, rec.suggested_resolution, rec.resolution, rec.policy_version,
               _iso(rec.created_at), _iso(rec.last_event_at), _iso(rec.acked_at), rec.acked_by,
               _iso(rec.resolved_at), rec.resolved_by, _iso(rec.breached_at), rec.breaches]
        self._write([("escalation", {"row": row, "event": event})])
        if rec.state in ACTIVE_STATES:
            self.after_commit(lambda: self._mark_active(rec.fingerprint, rec.escalation_id))

    def open_escalations_for(self, fingerprints: Sequence[str]) -> dict[str, EscalationRecord]:
        """The active escalation of each fingerprint that has one."""
        if not fingerprints:
            return {}
        rows = self._cur().execute(
            f"SELECT {_COLS} FROM escalations WHERE fingerprint IN (SELECT unnest($1)) AND "
            f"state IN ('open', 'acked', 'breached') ORDER BY created_at",
            [list(fingerprints)]).fetchall()
        return {rec.fingerprint: rec for rec in map(_escalation, rows)}

    def join_escalation(self, escalation_id: str, joined: Sequence[tuple[str, dict[str, Any]]],
                        at: datetime) -> None:
        """Near-identical events (``(decision_id, event)``) join an active escalation instead
        of opening another."""
        if joined:
            self._write([("join", {"id": escalation_id, "at": at.isoformat(),
                                   "joined": [[d, e] for d, e in joined]})])

    def get_escalation(self, escalation_id: str) -> EscalationRecord | None:
        row = self._cur().execute(f"SELECT {_COLS} FROM escalations WHERE escalation_id = ?",
                                  [escalation_id]).fetchone()
        return _escalation(row) if row else None

    def list_escalations(self, state: str | None = None, limit: int = 100
                         ) -> list[EscalationRecord]:
        query = f"SELECT {_COLS} FROM escalations"
        params: list[Any] = []
        if state is not None:
            query += " WHERE state = ?"
            params.append(state)
        query += " ORDER BY created_at DESC LIMIT ?"
        params.append(limit)
        return [_escalation(r) for r in self._cur().execute(query, params).fetchall()]

    def count_active_escalations(self) -> int:
        row = self._cur().execute(
            "SELECT count(*) FROM escalations WHERE state IN ('open', 'acked', 'breached')"
        ).fetchone()
        return int(row[0]) if row else 0

    def escalation_events(self, escalation_id: str) -> list[tuple[str, dict[str, Any]]]:
        """``(decision_id, event)`` of every event grouped into the escalation, oldest first."""
        rows = self._cur().execute(
            "SELECT decision_id, event FROM escalation_events WHERE escalation_id = ? "
            "ORDER BY joined_at", [escalation_id]).fetchall()
        return [(r[0], _loads(r[1])) for r in rows]

    def ack_escalation(self, escalation_id: str, by: str | None, at: datetime) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE escalations SET state = 'acked', acked_at = ?, acked_by = ? "
                        "WHERE escalation_id = ?", [at, by, escalation_id])

    def resolve_escalation(self, escalation_id: str, resolution: dict[str, Any] | None,
                           by: str | None, at: datetime) -> None:
        with self.transaction() as cur:
            cur.execute(
                "UPDATE escalations SET state = 'resolved', resolved_at = ?, resolved_by = ?, "
                "resolution = ?::JSON, acked_at = coalesce(acked_at, ?) WHERE escalation_id = ?",
                [at, by, _dump(resolution), at, escalation_id])
            self.after_commit(lambda: self._mark_resolved(escalation_id))

    def mark_breached(self, escalation_id: str, at: datetime) -> None:
        with self.transaction() as cur:
            cur.execute("UPDATE escalations SET state = 'breached', breached_at = ?, "
                        "breaches = breaches + 1 WHERE escalation_id = ?", [at, escalation_id])

    def active_escalations(self) -> Iterator[EscalationRecord]:
        rows = self._cur().execute(
            f"SELECT {_COLS} FROM escalations WHERE state IN ('open', 'acked', 'breached')"
        ).fetchall()
        return (_escalation(r) for r in rows)

    def handoff_latencies(self) -> list[tuple[float | None, float | None]]:
        """Seconds from creation to ack and to resolution, per escalation."""
        rows = self._cur().execute(
            "SELECT epoch(acked_at) - epoch(created_at), epoch(resolved_at) - epoch(created_at) "
            "FROM escalations").fetchall()
        return [(r[0], r[1]) for r in rows]

    # -- changes, deliveries, outcomes ---------------------------------------------------------
    def _load_recent_changes(self) -> None:
        self._changes_since = datetime.now(UTC) - CHANGES_IN_MEMORY
        rows = self._raw_cur().execute(
            "SELECT change_id, service, summary, changed_at, author, ref FROM changes "
            "WHERE changed_at >= ? ORDER BY changed_at", [self._changes_since]).fetchall()
        self._changes = [Change(*r) for r in rows]

    def add_change(self, service: str, summary: str, at: datetime, author: str | None,
                   ref: str | None) -> str:
        change_id = f"chg-{uuid.uuid4().hex}"
        with self.transaction() as cur:
            cur.execute("INSERT INTO changes (change_id, service, summary, changed_at, author, "
                        "ref) VALUES (?, ?, ?, ?, ?, ?) RETURNING changed_at",
                        [change_id, service, summary, at, author, ref])
            row = cur.fetchone()
            change = Change(change_id, service, summary, row[0] if row else at, author, ref)
            self.after_commit(lambda: self._remember_change(change))
        return change_id

    def _remember_change(self, change: Change) -> None:
        if change.at >= self._changes_since:
            bisect.insort(self._changes, change, key=lambda c: c.at)

    def recent_changes(self, services: Sequence[str], since: datetime, until: datetime
                       ) -> list[Change]:
        """Newest first, at most 20; from memory when the window is recent (every opening
        check asks), from the table otherwise."""
        if not services:
            return []
        if since >= self._changes_since:
            wanted = set(services)
            found = []
            for c in reversed(self._changes):
                if c.service in wanted and since <= c.at <= until:
                    found.append(c)
                    if len(found) == 20:
                        break
            return found
        rows = self._raw_cur().execute(
            "SELECT change_id, service, summary, changed_at, author, ref FROM changes "
            "WHERE service IN (SELECT unnest($1)) AND changed_at >= $2 AND changed_at <= $3 "
            "ORDER BY changed_at DESC LIMIT 20",
            [list(services), since, until]).fetchall()
        return [Change(*r) for r in rows]

    def list_changes(self, limit: int = 100, service: str | None = None) -> list[Change]:
        query = "SELECT change_id, service, summary, changed_at, author, ref FROM changes"
        params: list[Any] = []
        if service is not None:
            query += " WHERE service = ?"
            params.append(service)
        query += " ORDER BY changed_at DESC LIMIT ?"
        params.append(limit)
        return [Change(*r) for r in self._cur().execute(query, params).fetchall()]

    def add_delivery(self, escalation_id: str, target: str, fmt: str, attempt: int, status: str,
                     http_status: int | None, error: str | None, at: datetime) -> None:
        with self.transaction() as cur:
            cur.execute("INSERT INTO deliveries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                        [escalation_id, target, fmt, attempt, status, http_status, error, at])

    def deliveries(self, escalation_id: str) -> list[dict[str, Any]]:
        rows = self._cur().execute(
            "SELECT target, format, attempt, status, http_status, error, attempted_at "
            "FROM deliveries WHERE escalation_id = ? ORDER BY attempted_at",
            [escalation_id]).fetchall()
        return [{"target": r[0], "format": r[1], "attempt": r[2], "status": r[3],
                 "http_status": r[4], "error": r[5], "at": r[6]} for r in rows]

    def add_decision_outcome(self, decision_id: str, outcome: str, resolution_key: str | None,
                             note: str | None) -> None:
        """What automation did with a verdict; a replayed resolution's outcome joins its track
        record (a rollback counts as a failure)."""
        with self.transaction() as cur:
            cur.execute("INSERT INTO decision_outcomes (decision_id, outcome, resolution_key, "
                        "note) VALUES (?, ?, ?, ?)", [decision_id, outcome, resolution_key, note])
            if resolution_key is not None:
                counted = "resolved" if outcome == "resolved" else "failed"
                cur.execute("INSERT INTO resolution_outcomes (resolution_key, outcome, source, "
                            "ref) VALUES (?, ?, 'decision', ?)",
                            [resolution_key, counted, decision_id])


def _dump(value: dict[str, Any] | None) -> str | None:
    return json.dumps(value) if value is not None else None
