"""The knowledge base: one DuckDB file (or ``":memory:"``), the source of truth.

Threads share one :class:`Store`; each thread reads through its own cursor, and writes are
serialised by a lock and wrapped in a transaction, so a write is all-or-nothing and a 2xx answer is
only sent after it committed. A check's writes commit in the journal instead (:mod:`kb.journal`,
one fsync) and reach DuckDB in batches behind it; every read and every transaction first applies
what is pending, so nothing reads around an acknowledged write.

The check path reads no table: incidents are never updated once written, so they are served from
an LRU, and the active escalation of each fingerprint is kept in memory, changed only when the
transaction that changed the table commits (see :meth:`Store.after_commit`).
"""

from __future__ import annotations

import atexit
import json
import logging
import threading
import time
import uuid
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import numpy.typing as npt

from kb.errors import DataDirLocked, IncidentNotFound
from kb.escalations import (
    EscalationStore,
    count_joins,
    insert_escalation_events,
    insert_escalations,
)
from kb.governance import GovernanceStore
from kb.journal import Journal, Op, decode_matrix, encode_matrix
from kb.migrations import migrate
from kb.sql import insert_rows

__all__ = ["DecisionRecord", "Incident", "NewIncident", "Store"]

Vectors = npt.NDArray[np.float32]
#: Incidents kept by :meth:`Store.incidents_by_id` (a check shows at most a few dozen; ~1 kB each).
INCIDENT_CACHE = 20_000
#: Up to this many vectors, :meth:`Store.put_vectors` passes the matrix as one parameter.
_NESTED_ROWS = 64
#: The journal's flusher waits up to this long (seconds) or this many checks before applying
#: them to DuckDB in one transaction; readers never wait for it (they apply what is pending).
FLUSH_DELAY = 1.0
FLUSH_GROUPS = 1024

log = logging.getLogger(__name__)

#: Stores with a running flusher. At exit each is stopped before the interpreter kills daemon
#: threads (one killed inside DuckDB aborts the process); what stays pending is in the journal.
_OPEN_STORES: weakref.WeakSet[Store] = weakref.WeakSet()


@atexit.register
def _stop_flushers() -> None:
    for store in list(_OPEN_STORES):
        store._stop_flusher()


@dataclass(frozen=True)
class NewIncident:
    """An incident to add; ``masked`` and ``fingerprint`` come from the caller's normaliser."""

    title: str
    masked: str
    fingerprint: str
    origin: str = "ingest"
    client_id: str | None = None
    text: str | None = None
    service: str | None = None
    severity: str | None = None
    source: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    occurred_at: datetime | None = None
    resolution: dict[str, Any] | None = None
    resolution_key: str | None = None
    outcome: str | None = None
    decision_id: str | None = None


@dataclass(frozen=True)
class Incident:
    kb_id: int
    client_id: str | None
    title: str
    text: str | None
    service: str | None
    severity: str | None
    source: str | None
    labels: dict[str, str]
    occurred_at: datetime | None
    masked: str
    fingerprint: str
    resolution: dict[str, Any] | None
    resolution_key: str | None
    outcome: str | None
    origin: str
    created_at: datetime

    @property
    def ref(self) -> str:
        """The id clients know it by: their own id, else the KB id."""
        return self.client_id or kb_ref(self.kb_id)


@dataclass(frozen=True)
class DecisionRecord:
    """One audited verdict: enough to see later why it was taken."""

    decision_id: str
    event: dict[str, Any]
    fingerprint: str
    service: str | None
    severity: str | None
    decision: str
    score: float
    is_novel: bool
    threshold: float
    confidence: float
    components: dict[str, float]
    neighbor_ids: list[int]
    neighbor_similarities: list[float]
    reasons: list[str]
    resolution: dict[str, Any] | None
    policy_version: int
    model_id: str
    created_at: datetime | None = None
    actor: str | None = None
    evidence: dict[str, Any] | None = None


def kb_ref(kb_id: int) -> str:
    return f"kb-{kb_id}"


def parse_kb_ref(ref: str) -> int | None:
    if ref.startswith("kb-") and ref[3:].isdigit():
        return int(ref[3:])
    return None


_INCIDENT_COLS = ("kb_id, client_id, title, text, service, severity, source, labels, occurred_at, "
                  "masked, fingerprint, resolution, resolution_key, outcome, origin, created_at")
_DECISION_COLS = ("decision_id, event, fingerprint, service, severity, decision, score, "
                  "is_novel, threshold, confidence, components, neighbor_ids, "
                  "neighbor_similarities, reasons, resolution, policy_version, model_id, "
                  "created_at, actor, evidence")


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _incident(row: tuple[Any, ...]) -> Incident:
    return Incident(
        kb_id=row[0], client_id=row[1], title=row[2], text=row[3], service=row[4], severity=row[5],
        source=row[6], labels=_loads(row[7]) or {}, occurred_at=row[8], masked=row[9],
        fingerprint=row[10], resolution=_loads(row[11]), resolution_key=row[12], outcome=row[13],
        origin=row[14], created_at=row[15])


def _decision(row: tuple[Any, ...]) -> DecisionRecord:
    return DecisionRecord(
        decision_id=row[0], event=_loads(row[1]), fingerprint=row[2], service=row[3],
        severity=row[4], decision=row[5], score=row[6], is_novel=row[7], threshold=row[8],
        confidence=row[9], components=_loads(row[10]), neighbor_ids=_loads(row[11]),
        neighbor_similarities=_loads(row[12]), reasons=_loads(row[13]),
        resolution=_loads(row[14]), policy_version=row[15], model_id=row[16], created_at=row[17],
        actor=row[18], evidence=_loads(row[19]))


class Store(EscalationStore, GovernanceStore):
    """DuckDB-backed knowledge base. ``Store(":memory:")`` for tests, ``Store(path)`` to persist."""

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = str(path)
        try:
            self._con = duckdb.connect(self.path)
        except duckdb.IOException as exc:
            if "lock" in str(exc).lower():
                raise DataDirLocked(f"{self.path} is in use by another process: {exc}") from exc
            raise
        # Lock order: _write_lock, then _db_lock. _write_lock serialises writers (transactions
        # and a check's deferred writes) and the in-memory mirrors; _db_lock serialises DuckDB
        # write transactions, the journal's among them, which take only it.
        self._write_lock = threading.RLock()
        self._db_lock = threading.RLock()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._incidents: OrderedDict[int, Incident] = OrderedDict()
        self._incidents_lock = threading.Lock()
        # Journalled (acknowledged) check writes not yet applied to DuckDB, oldest first, and
        # the vectors among them by (model, fingerprint), for readers of the embedding cache.
        self._pending: list[tuple[int, list[Op]]] = []
        self._pending_vectors: dict[tuple[str, str], Vectors] = {}
        self._pending_lock = threading.Lock()
        self._vector_keys: dict[str, set[int]] = {}
        self._collecting: dict[str, set[int]] = {}
        self._keys_loading = threading.Lock()
        self._seq = 0
        self._journal: Journal | None = None
        self._flusher: threading.Thread | None = None
        self._flush_wanted = threading.Event()
        self._flush_now = threading.Event()
        self._closing = False
        with self._write_lock:
            migrate(self._con)
            if self.path != ":memory:":
                self._open_journal(Path(self.path + ".journal"))
            self._load_active_escalations()
            self._load_recent_changes()
            self._preload_incidents()

    # -- plumbing ---------------------------------------------------------------------------
    def _raw_cur(self) -> duckdb.DuckDBPyConnection:
        cur: duckdb.DuckDBPyConnection | None = getattr(self._local, "cur", None)
        if cur is None:
            cur = self._con.cursor()
            self._local.cur = cur
            self._cursors.append(cur)
        return cur

    def _cur(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor, for reading: acknowledged check writes still in the journal
        are applied first, so every read sees every acknowledged write."""
        if self._pending and not getattr(self._local, "depth", 0):
            self.sync()
        return self._raw_cur()

    @contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One writer at a time; everything inside commits together or not at all."""
        if getattr(self._local, "deferred", None) is not None:
            raise RuntimeError("a transaction cannot open inside deferred (journalled) writes")
        with self._write_lock:
            cur = self._raw_cur()
            depth = getattr(self._local, "depth", 0)
            if depth:
                # Nested use joins the outer transaction: it commits or rolls back as one.
                self._local.depth = depth + 1
                try:
                    yield cur
                finally:
                    self._local.depth = depth
                return
            with self._db_lock:
                # Journalled writes were acknowledged first: they apply first.
                self.sync()
                cur.execute("BEGIN TRANSACTION")
                self._local.depth = 1
                self._local.hooks = []
                try:
                    yield cur
                except BaseException:
                    cur.execute("ROLLBACK")
                    raise
                else:
                    cur.execute("COMMIT")
                    # Still under the write lock: no writer sees the tables and the in-memory
                    # mirrors disagree.
                    for hook in self._local.hooks:
                        hook()
                finally:
                    self._local.depth = 0
                    self._local.hooks = []

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A check's writes, made durable in the journal (one fsync) when the block exits and
        applied to DuckDB behind it; without a journal (``":memory:"``), one transaction.

        Inside, :meth:`put_vectors`, :meth:`add_decisions`, :meth:`add_escalation` and
        :meth:`join_escalation` are recorded instead of run; :meth:`after_commit` hooks run once
        the group is durable. An exception discards the group: nothing is half-written."""
        if self._journal is None:
            with self.transaction():
                yield
            return
        with self._write_lock:
            if getattr(self._local, "depth", 0) or getattr(self._local, "deferred", None):
                raise RuntimeError("deferred writes cannot nest in a transaction")
            ops: list[Op] = []
            self._local.deferred = ops
            self._local.hooks = []
            try:
                yield
                if ops:
                    self._journal_append(ops)
                for hook in self._local.hooks:
                    hook()
            finally:
                self._local.deferred = None
                self._local.hooks = []

    def _journal_append(self, ops: list[Op]) -> None:
        assert self._journal is not None
        # Append and queue under one lock, so that a concurrent sync never empties the file
        # between the two and leaves an acknowledged group only in memory.
        with self._pending_lock:
            seq = self._seq + 1
            self._journal.append(seq, ops)
            self._seq = seq
            self._pending.append((seq, ops))
            for kind, data in ops:
                if kind == "vectors":
                    for key, vec in zip(data["keys"], decode_matrix(data["m"]), strict=True):
                        self._pending_vectors[(data["model"], key)] = vec
        self._flush_wanted.set()
        if len(self._pending) >= FLUSH_GROUPS:
            self._flush_now.set()

    def _write(self, ops: list[Op]) -> None:
        """Record ``ops`` in the open deferred group, or apply them in a transaction now."""
        group: list[Op] | None = getattr(self._local, "deferred", None)
        if group is not None:
            group.extend(ops)
            return
        with self.transaction() as cur:
            _apply(cur, ops)

    def sync(self) -> None:
        """Apply every journalled write to DuckDB now (a no-op when none is pending)."""
        if not self._pending:
            return
        with self._db_lock:
            with self._pending_lock:
                batch = list(self._pending)
            if not batch:
                return
            _apply_groups(self._raw_cur(), batch)
            with self._pending_lock:
                del self._pending[:len(batch)]
                for _, ops in batch:
                    for kind, data in ops:
                        if kind == "vectors":
                            for key in data["keys"]:
                                self._pending_vectors.pop((data["model"], key), None)
                if not self._pending and self._journal is not None:
                    self._journal.reset()

    def wait_applied(self, timeout: float) -> bool:
        """Wait until the flusher has applied every journalled write; False on timeout."""
        deadline = time.monotonic() + timeout
        while self._pending:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return True

    def _open_journal(self, path: Path) -> None:
        """Replay what a crash left unapplied (each group once), then start the flusher."""
        cur = self._raw_cur()
        row = cur.execute("SELECT applied_seq FROM journal_state").fetchone()
        applied = int(row[0]) if row else 0
        journal = Journal(path)
        groups = [g for g in journal.read() if g[0] > applied]
        if groups:
            log.info("journal: applying %d acknowledged check(s) left by the last run",
                     len(groups))
            try:
                _apply_groups(cur, groups)
            except BaseException:
                journal.close()
                raise
        journal.reset()
        self._seq = max([applied, *(g[0] for g in groups)])
        self._journal = journal
        self._flusher = threading.Thread(target=self._flush_loop, name="deja-journal",
                                         daemon=True)
        self._flusher.start()
        _OPEN_STORES.add(self)

    def _stop_flusher(self) -> None:
        self._closing = True
        self._flush_wanted.set()
        self._flush_now.set()
        if self._flusher is not None:
            self._flusher.join(timeout=10)
            self._flusher = None

    def _flush_loop(self) -> None:
        while not self._closing:
            self._flush_wanted.wait()
            self._flush_wanted.clear()
            # Let a burst of checks gather: one transaction applies them all.
            self._flush_now.wait(FLUSH_DELAY)
            self._flush_now.clear()
            try:
                self.sync()
            except Exception:
                # Readers and writers call sync() too and see the error; keep the groups.
                log.exception("journal: applying acknowledged checks to DuckDB failed")
                time.sleep(1.0)
                self._flush_wanted.set()

    def after_commit(self, hook: Callable[[], None]) -> None:
        """Run ``hook`` once the current transaction commits (at once outside one); a rollback
        drops it. For in-memory mirrors of tables, which must never show uncommitted rows."""
        with self._write_lock:
            if getattr(self._local, "depth", 0) or getattr(self._local, "deferred", None) \
                    is not None:
                self._local.hooks.append(hook)
            else:
                hook()

    @contextmanager
    def transaction_lock(self) -> Iterator[None]:
        """Hold the write lock (no transaction): writers wait until it is released."""
        with self._write_lock:
            yield

    def checkpoint(self) -> None:
        with self._write_lock, self._db_lock:
            self.sync()
            self._raw_cur().execute("CHECKPOINT")

    def close(self) -> None:
        self._stop_flusher()
        _OPEN_STORES.discard(self)
        with self._write_lock, self._db_lock:
            if self._journal is not None:
                self.sync()
                self._journal.close()
                self._journal = None
            for cur in self._cursors:
                cur.close()
            self._cursors.clear()
            self._con.close()

    def sql(self, query: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """Run a read-only query on this thread's cursor (for notebooks and reports)."""
        return self._cur().execute(query, list(params)).fetchall()

    # -- incidents ------------------------------------------------------------------------------
    def add_incidents(self, items: Sequence[NewIncident]) -> list[tuple[int, bool]]:
        """Insert incidents in one transaction; return ``(kb_id, created)`` per item, in order.

        An item whose ``client_id`` is already in the KB (or earlier in ``items``) is not inserted
        again: its existing kb_id is returned with ``created=False``.
        """
        if not items:
            return []
        with self.transaction() as cur:
            ids = [i.client_id for i in items if i.client_id is not None]
            existing: dict[str, int] = {}
            if ids:
                rows = cur.execute(
                    "SELECT client_id, kb_id FROM incidents WHERE client_id IN "
                    "(SELECT unnest($1))", [ids]).fetchall()
                existing = {r[0]: r[1] for r in rows}
            fresh: list[NewIncident] = []
            seen: set[str] = set()
            for item in items:
                if item.client_id is not None:
                    if item.client_id in existing or item.client_id in seen:
                        continue
                    seen.add(item.client_id)
                fresh.append(item)
            new_ids: list[int] = []
            if fresh:
                new_ids = [r[0] for r in cur.execute(
                    "SELECT nextval('incident_seq') FROM range($1)", [len(fresh)]).fetchall()]
                cols = _columns(fresh, new_ids)
                cur.execute(
                    "INSERT INTO incidents (kb_id, client_id, title, text, service, severity, "
                    "source, labels, occurred_at, masked, fingerprint, resolution, resolution_key, "
                    "outcome, origin, decision_id) SELECT unnest($1), unnest($2), unnest($3), "
                    "unnest($4), unnest($5), unnest($6), unnest($7), unnest($8)::JSON, "
                    "unnest($9)::TIMESTAMPTZ, unnest($10), unnest($11), unnest($12)::JSON, "
                    "unnest($13), unnest($14), unnest($15), unnest($16)", cols)
                # The newest incident of a fingerprint is what checks show as its neighbour:
                # cached once committed, a check never queries for it.
                latest = sorted({item.fingerprint: kb_id for item, kb_id
                                 in zip(fresh, new_ids, strict=True)}.values())[-INCIDENT_CACHE:]
                rows = cur.execute(
                    f"SELECT {_INCIDENT_COLS} FROM incidents WHERE kb_id IN (SELECT unnest($1))",
                    [latest]).fetchall()
                self.after_commit(lambda: self._remember_incidents(map(_incident, rows)))
        out: list[tuple[int, bool]] = []
        fresh_iter = iter(new_ids)
        assigned: dict[str, int] = dict(existing)
        for item in items:
            if item.client_id is not None and item.client_id in assigned:
                out.append((assigned[item.client_id], False))
                continue
            kb_id = next(fresh_iter)
            if item.client_id is not None:
                assigned[item.client_id] = kb_id
            out.append((kb_id, True))
        return out

    def get_incident(self, ref: str) -> Incident:
        """By client id first, then by KB id (``kb-<n>``); raises :class:`IncidentNotFound`."""
        cur = self._cur()
        row = cur.execute(f"SELECT {_INCIDENT_COLS} FROM incidents WHERE client_id = ?",
                          [ref]).fetchone()
        kb_id = parse_kb_ref(ref)
        if row is None and kb_id is not None:
            row = cur.execute(f"SELECT {_INCIDENT_COLS} FROM incidents WHERE kb_id = ?",
                              [kb_id]).fetchone()
        if row is None:
            raise IncidentNotFound(ref)
        return _incident(row)

    def incidents_by_id(self, kb_ids: Sequence[int]) -> dict[int, Incident]:
        """Incidents by KB id (unknown ids are absent). Rows are never updated once written,
        so they are served from an LRU; a check's neighbours cost no query once seen."""
        if not kb_ids:
            return {}
        out: dict[int, Incident] = {}
        with self._incidents_lock:
            for kb_id in kb_ids:
                hit = self._incidents.get(kb_id)
                if hit is not None:
                    self._incidents.move_to_end(kb_id)
                    out[kb_id] = hit
        missing = [k for k in kb_ids if k not in out]
        if not missing:
            return out
        # Incidents are never journalled: no need to wait for pending check writes.
        rows = self._raw_cur().execute(
            f"SELECT {_INCIDENT_COLS} FROM incidents WHERE kb_id IN (SELECT unnest($1))",
            [missing]).fetchall()
        found = {r[0]: _incident(r) for r in rows}
        out.update(found)
        # A row read inside this thread's open transaction may yet be rolled back.
        if not getattr(self._local, "depth", 0):
            self._remember_incidents(found.values())
        return out

    def _remember_incidents(self, incidents: Iterable[Incident]) -> None:
        with self._incidents_lock:
            for inc in incidents:
                self._incidents[inc.kb_id] = inc
                self._incidents.move_to_end(inc.kb_id)
            while len(self._incidents) > INCIDENT_CACHE:
                self._incidents.popitem(last=False)

    def _preload_incidents(self) -> None:
        """The newest incident of each of the most recent fingerprints: what checks show."""
        rows = self._raw_cur().execute(
            f"SELECT {_INCIDENT_COLS} FROM incidents WHERE kb_id IN (SELECT max(kb_id) AS k "
            f"FROM incidents GROUP BY fingerprint ORDER BY k DESC LIMIT ?) ORDER BY kb_id",
            [INCIDENT_CACHE]).fetchall()
        self._remember_incidents(map(_incident, rows))

    def incidents_after(self, kb_id: int) -> list[tuple[int, str, str, str | None, str | None]]:
        """``(kb_id, fingerprint, masked, service, resolution_key)`` of rows above ``kb_id``."""
        return [tuple(r) for r in self._cur().execute(
            "SELECT kb_id, fingerprint, masked, service, resolution_key FROM incidents "
            "WHERE kb_id > ? ORDER BY kb_id", [kb_id]).fetchall()]

    def count_incidents(self) -> int:
        row = self._cur().execute("SELECT count(*) FROM incidents").fetchone()
        return int(row[0]) if row else 0

    def max_kb_id(self) -> int:
        row = self._cur().execute("SELECT coalesce(max(kb_id), 0) FROM incidents").fetchone()
        return int(row[0]) if row else 0

    # -- embedding cache (embeddings.VectorStore) -------------------------------------------------
    def get_vectors(self, model_id: str, keys: Sequence[str]) -> dict[str, Vectors]:
        if not keys:
            return {}
        # Journalled vectors first (a miss must not pay the pending checks' DuckDB writes), then
        # the table: a vector leaves the overlay only after its rows committed.
        out: dict[str, Vectors] = {}
        if self._pending_vectors:
            with self._pending_lock:
                for key in keys:
                    vec = self._pending_vectors.get((model_id, key))
                    if vec is not None:
                        out[key] = vec
        rest = [k for k in keys if k not in out]
        stored = self._stored_keys(model_id)
        # A fingerprint never stored (a novel event's) costs no query: the set of stored keys'
        # hashes answers "certainly not" (a hash collision only costs the query).
        rest = [k for k in rest if hash(k) in stored]
        if not rest:
            return out
        res = self._raw_cur().execute(
            "SELECT fingerprint, vector FROM embeddings WHERE model_id = $1 AND fingerprint IN "
            "(SELECT unnest($2))", [model_id, rest]).fetchnumpy()
        out.update((str(k), np.asarray(v, dtype=np.float32))
                   for k, v in zip(res["fingerprint"], res["vector"], strict=True))
        return out

    def _stored_keys(self, model_id: str) -> set[int]:
        """Hashes of the fingerprints with a stored or journalled vector of ``model_id`` (loaded
        once; ~60 B a key). Keys are added when written: a key in it whose vector is not (yet)
        stored only costs a query."""
        keys = self._vector_keys.get(model_id)
        if keys is not None:
            return keys
        with self._keys_loading:
            keys = self._vector_keys.get(model_id)
            if keys is not None:
                return keys
            # Keys written while the table is read are collected too (see _note_keys).
            with self._pending_lock:
                collecting = {hash(k) for m, k in self._pending_vectors if m == model_id}
                self._collecting[model_id] = collecting
            res = self._raw_cur().execute("SELECT fingerprint FROM embeddings WHERE model_id = ?",
                                          [model_id]).fetchnumpy()
            loaded = {hash(str(k)) for k in res["fingerprint"]}
            with self._pending_lock:
                collecting |= loaded
                del self._collecting[model_id]
                self._vector_keys[model_id] = collecting
            return collecting

    def _note_keys(self, model_id: str, keys: Iterable[str]) -> None:
        with self._pending_lock:
            known = self._vector_keys.get(model_id, self._collecting.get(model_id))
            if known is not None:
                known.update(hash(k) for k in keys)

    def forget_stored_keys(self) -> None:
        """Drop the stored-key sets (after vectors were written around :meth:`put_vectors`)."""
        with self._pending_lock:
            self._vector_keys.clear()

    def put_vectors(self, model_id: str, items: dict[str, Vectors]) -> None:
        """Store vectors; keys already present are left as they are. Inside :meth:`deferred`,
        journalled with the check that made them."""
        if not items:
            return
        keys = list(items)
        matrix = np.stack([items[k] for k in keys]).astype(np.float32)
        self._note_keys(model_id, keys)
        if getattr(self._local, "deferred", None) is not None:
            self._write([("vectors", {"model": model_id, "keys": keys,
                                      "m": encode_matrix(matrix)})])
            return
        with self.transaction() as cur:
            _insert_vectors(cur, model_id, keys, matrix)

    def vectors_for_incidents(self, model_id: str, after_kb_id: int = 0
                              ) -> tuple[npt.NDArray[np.int64], Vectors, list[str]]:
        """KB ids above ``after_kb_id`` that have a stored vector, with it, in kb_id order.

        Also returns the fingerprints of rows that have no vector for this model yet.
        """
        cur = self._cur()
        res = cur.execute(
            "SELECT i.kb_id, e.vector FROM incidents i JOIN embeddings e "
            "ON e.fingerprint = i.fingerprint AND e.model_id = $1 WHERE i.kb_id > $2 "
            "ORDER BY i.kb_id", [model_id, after_kb_id]).fetchnumpy()
        missing = [r[0] for r in cur.execute(
            "SELECT DISTINCT i.fingerprint FROM incidents i ANTI JOIN embeddings e "
            "ON e.fingerprint = i.fingerprint AND e.model_id = $1 WHERE i.kb_id > $2",
            [model_id, after_kb_id]).fetchall()]
        ids = np.asarray(res["kb_id"], dtype=np.int64)
        matrix = (np.stack(list(res["vector"])).astype(np.float32) if len(ids)
                  else np.zeros((0, 0), dtype=np.float32))
        return ids, matrix, missing

    # -- decisions, feedback, track records -----------------------------------------------------
    def add_decisions(self, records: Sequence[DecisionRecord]) -> None:
        """Audit verdicts; inside :meth:`deferred`, journalled with their check."""
        if not records:
            return
        # One timestamp per record, a microsecond apart, keeps "newest first" in batch order.
        base = datetime.now(UTC)
        rows = [[r.decision_id, json.dumps(r.event), r.fingerprint, r.service, r.severity,
                 r.decision, r.score, r.is_novel, r.threshold, r.confidence,
                 json.dumps(r.components), json.dumps(r.neighbor_ids),
                 json.dumps(r.neighbor_similarities), json.dumps(r.reasons),
                 json.dumps(r.resolution) if r.resolution is not None else None,
                 r.policy_version, r.model_id, (base + timedelta(microseconds=i)).isoformat(),
                 r.actor, json.dumps(r.evidence) if r.evidence is not None else None]
                for i, r in enumerate(records)]
        self._write([("decisions", rows)])

    def get_decision(self, decision_id: str) -> DecisionRecord | None:
        row = self._cur().execute(f"SELECT {_DECISION_COLS} FROM decisions WHERE decision_id = ?",
                                  [decision_id]).fetchone()
        return _decision(row) if row else None

    def list_decisions(self, limit: int = 50, decision: str | None = None
                       ) -> list[DecisionRecord]:
        query = f"SELECT {_DECISION_COLS} FROM decisions"
        params: list[Any] = []
        if decision is not None:
            query += " WHERE decision = ?"
            params.append(decision)
        query += " ORDER BY created_at DESC, decision_id DESC LIMIT ?"
        params.append(limit)
        return [_decision(r) for r in self._cur().execute(query, params).fetchall()]

    def count_decisions(self) -> int:
        row = self._cur().execute("SELECT count(*) FROM decisions").fetchone()
        return int(row[0]) if row else 0

    def add_feedback(self, decision_id: str, *, correct: bool, novel: bool | None,
                     resolution: dict[str, Any] | None, resolution_key: str | None,
                     outcome: str | None, note: str | None,
                     incident: NewIncident | None) -> tuple[str, int | None, bool]:
        """Record feedback, the incident it teaches and the outcome, all in one transaction.

        Returns the feedback id, the incident's kb_id and whether the incident is new (a client
        id already in the KB is not added twice).
        """
        feedback_id = f"fb-{uuid.uuid4().hex}"
        with self.transaction():
            kb_id, created = (self.add_incidents([incident])[0] if incident is not None
                              else (None, False))
            cur = self._cur()
            cur.execute(
                "INSERT INTO feedback (feedback_id, decision_id, correct, novel, resolution, "
                "outcome, note, kb_id) VALUES (?, ?, ?, ?, ?::JSON, ?, ?, ?)",
                [feedback_id, decision_id, correct, novel,
                 json.dumps(resolution) if resolution is not None else None, outcome, note,
                 kb_id])
            # An incident created here already carries its outcome; recording it again would
            # count it twice in the track record.
            if outcome is not None and resolution_key is not None and incident is None:
                cur.execute(
                    "INSERT INTO resolution_outcomes (resolution_key, outcome, source, ref) "
                    "VALUES (?, ?, 'feedback', ?)", [resolution_key, outcome, decision_id])
        return feedback_id, kb_id, created

    def track_records(self) -> dict[str, tuple[int, int]]:
        """Per resolution key: (successes, failures) over KB incidents and recorded outcomes."""
        rows = self._cur().execute("""
            SELECT resolution_key, count(*) FILTER (WHERE outcome = 'resolved'),
                   count(*) FILTER (WHERE outcome = 'failed')
            FROM (SELECT resolution_key, outcome FROM incidents WHERE resolution_key IS NOT NULL
                  UNION ALL SELECT resolution_key, outcome FROM resolution_outcomes)
            GROUP BY resolution_key""").fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}


def _apply_groups(cur: duckdb.DuckDBPyConnection, groups: Sequence[tuple[int, list[Op]]]
                  ) -> None:
    """Apply journal groups in one transaction that also records the last one as applied."""
    cur.execute("BEGIN TRANSACTION")
    try:
        _apply(cur, [op for _, ops in groups for op in ops])
        cur.execute("UPDATE journal_state SET applied_seq = ?", [groups[-1][0]])
        cur.execute("COMMIT")
    except BaseException:
        cur.execute("ROLLBACK")
        raise


def _apply(cur: duckdb.DuckDBPyConnection, ops: Sequence[Op]) -> None:
    """Run deferred writes (see :meth:`Store.deferred`) inside the caller's transaction, a few
    statements for any number of checks: rows of a kind are inserted together."""
    vectors: dict[str, dict[str, Vectors]] = {}
    decisions: list[list[Any]] = []
    escalations: list[list[Any]] = []
    events: list[tuple[str, str, Any, str]] = []
    joins: dict[str, tuple[int, datetime]] = {}
    for kind, data in ops:
        if kind == "vectors":
            found = vectors.setdefault(data["model"], {})
            for key, vec in zip(data["keys"], decode_matrix(data["m"]), strict=True):
                found.setdefault(key, vec)
        elif kind == "decisions":
            decisions.extend(data)
        elif kind == "escalation":
            row = data["row"]
            escalations.append(row)
            events.append((row[0], row[1], data["event"], row[14]))
        elif kind == "join":
            at = datetime.fromisoformat(data["at"])
            events.extend((data["id"], d, e, data["at"]) for d, e in data["joined"])
            n, last = joins.get(data["id"], (0, at))
            joins[data["id"]] = (n + len(data["joined"]), max(last, at))
        else:
            raise ValueError(f"unknown journalled write {kind!r}")
    for model_id, items in vectors.items():
        _insert_vectors(cur, model_id, list(items), np.stack(list(items.values())))
    if decisions:
        _insert_decisions(cur, decisions)
    if escalations:
        insert_escalations(cur, escalations)
    if events:
        insert_escalation_events(cur, events)
    count_joins(cur, joins)


def _insert_vectors(cur: duckdb.DuckDBPyConnection, model_id: str, keys: list[str],
                    matrix: Vectors) -> None:
    matrix = np.asarray(matrix, dtype=np.float32)
    if len(keys) <= _NESTED_ROWS:
        # A few vectors: the matrix as one parameter costs ~4 ms of CPU, the
        # column-per-dimension statement below ~22 ms whatever the row count.
        cur.execute(
            "INSERT INTO embeddings (fingerprint, model_id, vector) "
            "SELECT unnest($1), $2, unnest($3)::FLOAT[] ON CONFLICT DO NOTHING",
            [keys, model_id, matrix])
        return
    # One numpy column per dimension, assembled into a list in SQL: ~40x faster than
    # passing Python lists of floats, and ~2x faster than the matrix at ingest sizes.
    dim = matrix.shape[1]
    unnests = ", ".join(f"unnest(${i + 3}) AS c{i}" for i in range(dim))
    listed = ", ".join(f"c{i}" for i in range(dim))
    cur.execute(
        f"INSERT INTO embeddings (fingerprint, model_id, vector) "
        f"SELECT k, $2, [{listed}]::FLOAT[] FROM (SELECT unnest($1) AS k, {unnests}) "
        f"ON CONFLICT DO NOTHING",
        [keys, model_id, *[np.ascontiguousarray(matrix[:, i]) for i in range(dim)]])


_DECISION_JSON = (1, 10, 11, 12, 13, 14, 19)
_DECISION_INSERT = (
    "INSERT INTO decisions (decision_id, event, fingerprint, service, severity, decision, score, "
    "is_novel, threshold, confidence, components, neighbor_ids, neighbor_similarities, reasons, "
    "resolution, policy_version, model_id, created_at, actor, evidence) ")


def _insert_decisions(cur: duckdb.DuckDBPyConnection, rows: Sequence[Sequence[Any]]) -> None:
    """Rows as :meth:`Store.add_decisions` builds them (created_at in ISO form)."""
    insert_rows(cur, _DECISION_INSERT,
                [[*r[:17], datetime.fromisoformat(r[17]), *r[18:]] for r in rows],
                _DECISION_JSON)


def _columns(items: Sequence[NewIncident], kb_ids: Sequence[int]) -> list[list[Any]]:
    cols: list[list[Any]] = [list(kb_ids)] + [[] for _ in range(15)]
    for it in items:
        values = (it.client_id, it.title, it.text, it.service, it.severity, it.source,
                  json.dumps(it.labels), it.occurred_at, it.masked, it.fingerprint,
                  json.dumps(it.resolution) if it.resolution is not None else None,
                  it.resolution_key, it.outcome, it.origin, it.decision_id)
        for col, value in zip(cols[1:], values, strict=True):
            col.append(value)
    return cols
