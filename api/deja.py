"""The facade: one object that wires the KB, the encoder, the index, the scorer and the policy.

The HTTP app, the CLI and the notebooks all use :class:`Deja`; nothing else holds state.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from api.auth import SYSTEM, Authenticator, Principal
from api.escalations import EscalationDesk
from api.governance import Governance
from api.schemas import (
    ChangeIn,
    DecisionOut,
    EscalationOut,
    EventIn,
    FeedbackIn,
    FeedbackOut,
    IncidentOut,
    Neighbour,
    Novelty,
    OutcomeIn,
    OutcomeOut,
    Resolution,
    ResolutionIn,
    Stats,
    TrackRecordOut,
    Verdict,
)
from api.settings import Settings
from embeddings import CachedEncoder, Encoder, create_encoder, fingerprint, normalize
from kb import (
    DecisionNotFound,
    DecisionRecord,
    Incident,
    InvalidState,
    NewIncident,
    PolicyRecord,
    Store,
    kb_ref,
)
from novelty import (
    IndexUnusable,
    Item,
    NoveltyResult,
    NoveltyScorer,
    Policy,
    Query,
    TrackRecord,
    VectorIndex,
    parse_policy,
    resolution_key,
)
from novelty.backtest import evidence_of
from novelty.scorer import Neighbour as ScoredNeighbour

__all__ = ["Deja"]

log = logging.getLogger("deja")

INDEX_FILE = "index.faiss"
DB_FILE = "deja.duckdb"
#: A refit the KB's growth made due runs once no ingest has run for this long (seconds), or
#: once it has been due this long under continuous ingest; a check never waits longer than the
#: refit itself: it runs a due refit first. So a bulk load fits once, not every 5% of growth.
REFIT_QUIET = 0.5
REFIT_MAX_DELAY = 30.0
#: Under continuous ingest, background refits take at most this share of the time: a refit
#: holds the KB lock, and its cost grows with the KB, so a fit of T seconds waits T / share.
REFIT_MAX_SHARE = 0.05

#: Open instances with a refit thread, stopped at exit before daemon threads are killed.
_OPEN: weakref.WeakSet[Deja] = weakref.WeakSet()


@atexit.register
def _stop_refitters() -> None:
    for deja in list(_OPEN):
        deja._stop_refitter()


@dataclass(frozen=True)
class _Prepared:
    event: EventIn
    masked: str
    fingerprint: str

    @property
    def service(self) -> str | None:
        return self.event.service or self.event.source


def _prepare(events: Iterable[EventIn]) -> list[_Prepared]:
    out = []
    for e in events:
        masked = normalize({"title": e.title, "text": e.text})
        out.append(_Prepared(e, masked, fingerprint(masked)))
    return out


class Deja(Governance):
    """Knowledge base + novelty service. Open with :meth:`open`; close when done.

    Thread-safe: checks run concurrently; ingest, feedback and refits are serialised.
    """

    def __init__(self, store: Store, encoder: Encoder, settings: Settings,
                 data_dir: Path | None) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.store = store
        self.cache = CachedEncoder(encoder, store)
        self.index = VectorIndex(encoder.dim, memory_budget=_memory_budget(settings))
        self.scorer = NoveltyScorer(self.index, candidates=settings.candidates)
        self.policy = Policy(version=1, alpha=settings.alpha, routing=settings.routing)
        self.auth = Authenticator(store)
        #: The admin key created on this data dir's first start (None afterwards).
        self.bootstrap_key: str | None = None
        self.index_status = "new"
        self._mutate = threading.RLock()
        self._last_kb_id = 0
        self._saved_vectors = 0
        self._records: dict[str, TrackRecord] = {}
        self._resolutions: dict[str, dict[str, Any]] = {}
        # When a refit fell due (monotonic seconds; None: the fit is current), how many ingests
        # run, when the last ended and how long the last fit took; the refit thread waits for
        # ingest to pause.
        self._refit_due: float | None = None
        self._ingest_lock = threading.Lock()  # not _mutate: a running refit holds that
        self._ingesting = 0
        self._ingest_ended = 0.0
        self._fit_seconds = 0.0
        self._refit_wanted = threading.Event()
        self._closing = False
        self._refitter = threading.Thread(target=self._refit_loop, name="deja-refit",
                                          daemon=True)
        self._refitter.start()
        _OPEN.add(self)
        self.desk = EscalationDesk(
            store, settings.routing,
            sweep_seconds=0.0 if settings.read_only else settings.sweep_seconds,
            changes_window=timedelta(hours=settings.changes_hours),
            notify_backoff=settings.notify_backoff_seconds,
            notify_attempts=settings.notify_attempts)

    # -- lifecycle --------------------------------------------------------------------------------
    @classmethod
    def open(cls, data_dir: str | Path | None = None, *, settings: Settings | None = None,
             encoder: Encoder | None = None) -> Deja:
        """Open (or create) a data dir; ``None`` keeps everything in memory.

        The index is loaded and caught up with the KB, or rebuilt from stored vectors if it is
        missing, torn or from another model; :attr:`index_status` says which.
        """
        settings = settings or Settings()
        path = Path(data_dir) if data_dir is not None else None
        if path is not None:
            path.mkdir(parents=True, exist_ok=True)
        store = Store(path / DB_FILE if path is not None else ":memory:")
        try:
            enc = encoder or create_encoder(settings.model, settings.embedder,
                                            cache_dir=settings.model_cache_dir)
            deja = cls(store, enc, settings, path)
            try:
                deja._govern()
                deja._load()
            except BaseException:
                deja.desk.close()
                raise
        except BaseException:
            store.close()
            raise
        return deja

    def close(self) -> None:
        self._stop_refitter()
        _OPEN.discard(self)
        self.desk.close()
        with self._mutate:
            self.save_index()
            self.store.close()

    def __enter__(self) -> Deja:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def model_id(self) -> str:
        return self.cache.model_id

    def _index_path(self) -> Path | None:
        return self.data_dir / INDEX_FILE if self.data_dir is not None else None

    def _govern(self) -> None:
        """First start: the default policy becomes version 1 and an admin key is created,
        written to ``DIR/admin.key`` (0600) and logged once. Later starts load the active
        policy."""
        active = self.store.active_policy()
        if active is None:
            version = self.store.add_policy(_policy_body(self.policy), state="active",
                                            origin="default", proposed_by=SYSTEM.actor,
                                            note="defaults at first start")
            active = self.store.get_policy(version)
        assert active is not None
        self._activate(active)
        if self.store.count_keys() == 0:
            key_id, key = self.store.create_key("admin", "admin", created_by=SYSTEM.actor)
            self.bootstrap_key = key
            self.store.audit(SYSTEM.actor, SYSTEM.role, "key.create", key_id,
                             {"name": "admin", "role": "admin", "bootstrap": True})
            if self.data_dir is not None:
                path = self.data_dir / "admin.key"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(key + "\n")
                log.warning("created the admin key (shown once; also in %s): %s", path, key)

    def _activate(self, record: PolicyRecord) -> None:
        policy = parse_policy(record.body, record.version)
        # Swapped as one reference: a check that already read self.policy finishes under it.
        self.policy = policy
        self.desk.use_routing(policy.routing)

    def _load(self) -> None:
        path = self._index_path()
        covered = 0
        if path is not None and path.exists():
            try:
                index, manifest = VectorIndex.load(
                    path, model_id=self.model_id, dim=self.cache.dim,
                    memory_budget=_memory_budget(self.settings))
                rows = self.store.incidents_after(0)
                restored = [r for r in rows if r[0] <= manifest.last_kb_id]
                scorer = NoveltyScorer(index, candidates=self.settings.candidates)
                scorer.add([_item(r) for r in restored], None)
                if scorer.groups != index.ntotal:
                    raise IndexUnusable(f"index holds {index.ntotal} vectors for "
                                        f"{scorer.groups} fingerprints")
                self.index, self.scorer = index, scorer
                covered = manifest.last_kb_id
                self._last_kb_id = covered
                self.index_status = "loaded"
            except IndexUnusable as exc:
                log.warning("rebuilding the index: %s", exc)
                self.index_status = f"rebuilt ({exc})"
        pending = self.store.incidents_after(covered)
        if pending:
            self._index_rows(pending, progress=len(pending) > 5000)
            if self.index_status == "loaded":
                self.index_status = f"caught up {len(pending)} incidents"
            elif self.index_status == "new":
                self.index_status = "built"
        self._records = {k: TrackRecord(*v) for k, v in self.store.track_records().items()}
        for key, res in self.store.sql(
                "SELECT resolution_key, arg_max(resolution, kb_id) FROM incidents "
                "WHERE resolution_key IS NOT NULL GROUP BY resolution_key"):
            self._resolutions[key] = _json(res)
        self.scorer.fit()
        if pending:
            self.save_index()
        log.info("index %s: %d incidents, %d vectors", self.index_status, self.scorer.incidents,
                 self.index.ntotal)

    def _index_rows(self, rows: Sequence[tuple[int, str, str, str | None, str | None]], *,
                    progress: bool = False) -> None:
        """Add KB rows to the scorer and index; only fingerprints with no stored vector are
        embedded."""
        chunk = 4096
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(rows), desc="indexing", unit="incident")
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            vectors = self.cache.embed([r[1] for r in part], [r[2] for r in part])
            self.scorer.add([_item(r) for r in part], vectors)
            self._last_kb_id = max(self._last_kb_id, part[-1][0])
            if bar is not None:
                bar.update(len(part))
        if bar is not None:
            bar.close()

    def save_index(self) -> None:
        path = self._index_path()
        if path is None:
            return
        with self._mutate:
            self.index.save(path, model_id=self.model_id, last_kb_id=self._last_kb_id)
            self._saved_vectors = self.index.ntotal

    def reindex(self) -> int:
        """Rebuild the index from stored vectors (no re-embedding); returns the vector count."""
        with self._mutate:
            self.index = VectorIndex(self.cache.dim, memory_budget=_memory_budget(self.settings))
            self.scorer = NoveltyScorer(self.index, candidates=self.settings.candidates)
            self._last_kb_id = 0
            self._index_rows(self.store.incidents_after(0), progress=True)
            self.scorer.fit()
            self.save_index()
            self.index_status = "rebuilt (reindex)"
            return self.index.ntotal

    # -- the KB ---------------------------------------------------------------------------------
    def ingest(self, events: Sequence[EventIn], *, actor: Principal = SYSTEM
               ) -> list[tuple[str, bool]]:
        """Add past incidents; they are searchable when this returns. ``(id, created)`` each."""
        with self._ingest_running():
            prepared = _prepare(events)
            # Embed before writing: a model failure then leaves nothing half-written.
            vectors = self.cache.embed([p.fingerprint for p in prepared],
                                       [p.masked for p in prepared])
            with self._mutate:
                with self.store.transaction():
                    added = self.store.add_incidents(
                        [_new_incident(p, "ingest") for p in prepared])
                    self.store.audit(actor.actor, actor.role, "ingest", None,
                                     {"events": len(prepared),
                                      "created": sum(1 for _, c in added if c)})
                fresh = [i for i, (_, created) in enumerate(added) if created]
                self._learn([(added[i][0], prepared[i]) for i in fresh], vectors[fresh])
        return [(p.event.id or kb_ref(kb_id), created)
                for p, (kb_id, created) in zip(prepared, added, strict=True)]

    @contextmanager
    def _ingest_running(self) -> Iterator[None]:
        """Mark an ingest in progress (embedding included): a due refit waits for a pause."""
        with self._ingest_lock:
            self._ingesting += 1
        try:
            yield
        finally:
            with self._ingest_lock:
                self._ingesting -= 1
                self._ingest_ended = time.monotonic()

    def _learn(self, rows: list[tuple[int, _Prepared]], vectors: np.ndarray[Any, Any]) -> None:
        """Index committed incidents and update track records; refit when the KB grew enough."""
        if not rows:
            return
        items = []
        for kb_id, p in rows:
            key = resolution_key(p.event.resolution.action) if p.event.resolution else None
            items.append(Item(kb_id, p.fingerprint, p.masked, p.service, key))
            if key is not None and p.event.resolution is not None:
                self._resolutions[key] = p.event.resolution.model_dump()
                self._count_outcome(key, p.event.outcome)
        self.scorer.add(items, vectors)
        self._last_kb_id = max(self._last_kb_id, max(kb for kb, _ in rows))
        fitted = self.scorer.fitted_groups_
        if self.scorer.groups - fitted >= max(1, fitted // 20):
            if self._refit_due is None:
                self._refit_due = time.monotonic()
            self._refit_wanted.set()
        if self.index.ntotal - self._saved_vectors >= self.settings.index_save_every:
            self.save_index()

    def refit_if_due(self) -> bool:
        """Run a refit the KB's growth made due (under the KB mutation lock); True if one ran."""
        if self._refit_due is None:
            return False
        with self._mutate:
            if self._refit_due is None:
                return False
            t0 = time.monotonic()
            self.scorer.fit()
            self._fit_seconds = time.monotonic() - t0
            self._refit_due = None
            return True

    def _refit_loop(self) -> None:
        while not self._closing:
            self._refit_wanted.wait()
            self._refit_wanted.clear()
            while not self._closing and self._refit_due is not None:
                now = time.monotonic()
                if self._ingesting == 0 and now - self._ingest_ended >= REFIT_QUIET:
                    break
                if now - self._refit_due >= max(REFIT_MAX_DELAY,
                                                self._fit_seconds / REFIT_MAX_SHARE):
                    break
                time.sleep(0.05)
            if not self._closing:
                try:
                    self.refit_if_due()
                except Exception:
                    # The next check runs the due refit itself and reports what fails.
                    log.exception("background refit failed")

    def _stop_refitter(self) -> None:
        self._closing = True
        self._refit_wanted.set()
        if self._refitter.is_alive() and self._refitter is not threading.current_thread():
            self._refitter.join(timeout=60)

    def _count_outcome(self, key: str, outcome: str | None) -> None:
        rec = self._records.get(key, TrackRecord())
        if outcome == "resolved":
            rec = TrackRecord(rec.successes + 1, rec.failures)
        elif outcome == "failed":
            rec = TrackRecord(rec.successes, rec.failures + 1)
        self._records[key] = rec

    def incident(self, ref: str) -> IncidentOut:
        inc = self.store.get_incident(ref)
        record = self._records.get(inc.resolution_key) if inc.resolution_key else None
        return IncidentOut(
            id=inc.ref, kb_id=kb_ref(inc.kb_id), title=inc.title, text=inc.text,
            service=inc.service, severity=inc.severity, source=inc.source, labels=inc.labels,
            occurred_at=inc.occurred_at, created_at=inc.created_at, fingerprint=inc.fingerprint,
            resolution=Resolution(**inc.resolution) if inc.resolution else None,
            outcome=inc.outcome, origin=inc.origin,
            track_record=TrackRecordOut(
                successes=record.successes, failures=record.failures,
                lower_bound=record.lower_bound(self.policy.credibility)) if record else None)

    # -- checks ---------------------------------------------------------------------------------
    def check(self, events: Sequence[EventIn], *, dry_run: bool = False,
              actor: Principal = SYSTEM) -> list[Verdict]:
        """Score and decide each event; unless ``dry_run``, audit each verdict before returning."""
        # Calibration is current for every check: a refit the KB's growth made due runs first.
        self.refit_if_due()
        policy = self.policy  # one policy for the whole call, whatever happens meanwhile
        prepared = _prepare(events)
        vectors, fresh = self.cache.embed_unsaved([p.fingerprint for p in prepared],
                                                  [p.masked for p in prepared])
        if fresh and dry_run:
            self.store.put_vectors(self.model_id, fresh)
        queries = [Query(v, p.fingerprint, p.masked, p.service)
                   for v, p in zip(vectors, prepared, strict=True)]
        results = self.scorer.score(queries, alpha=policy.alpha_for,
                                    k=max(policy.neighbours, 5), floor=policy.threshold_floor)
        shown = self._display([r.neighbours for r in results])
        verdicts: list[Verdict] = []
        records: list[DecisionRecord] = []
        pending: list[tuple[Verdict, dict[str, Any], str]] = []
        for p, res, neighbours in zip(prepared, results, shown, strict=True):
            keys = {k for n in res.neighbours for k, _ in n.resolutions}
            automatable = {k: bool(self._resolutions.get(k, {}).get("automatable", True))
                           for k in keys}
            d = policy.decide(res, service=p.service, severity=p.event.severity,
                              records=self._records, automatable=automatable)
            resolution = self._resolutions.get(d.resolution_key) if d.resolution_key else None
            decision_id = None if dry_run else f"dec-{uuid.uuid4().hex}"
            verdict = Verdict(
                decision_id=decision_id, decision=d.decision,
                novelty=_novelty(res), confidence=d.confidence,
                resolution=Resolution(**resolution) if resolution else None,
                neighbors=neighbours, reasons=d.reasons, policy_version=policy.version,
                model=self.model_id, dry_run=dry_run)
            verdicts.append(verdict)
            if decision_id is not None:
                event = p.event.model_dump(mode="json", exclude_none=True)
                pending.append((verdict, event, p.fingerprint))
                records.append(DecisionRecord(
                    decision_id=decision_id,
                    event=event,
                    fingerprint=p.fingerprint, service=p.service, severity=p.event.severity,
                    decision=d.decision, score=res.score, is_novel=res.is_novel,
                    threshold=res.threshold, confidence=d.confidence,
                    components=res.components,
                    neighbor_ids=[n.kb_ids[0] for n in res.neighbours],
                    neighbor_similarities=[n.similarity for n in res.neighbours],
                    reasons=d.reasons, resolution=resolution, policy_version=policy.version,
                    model_id=self.model_id, actor=actor.actor,
                    evidence=evidence_of(res, service=p.service, severity=p.event.severity,
                                         records=self._records, automatable=automatable)))
        if dry_run:
            return verdicts
        # The audit rows, the handoffs they open and the new vectors are durable together
        # before the answer: one journal append (an fsync) per check, applied to DuckDB behind.
        opened: list[str] = []
        with self.store.deferred():
            if fresh:
                self.store.put_vectors(self.model_id, fresh)
            self.store.add_decisions(records)
            handed = [h for h in pending if h[0].decision != "replay"]
            ids = self.desk.receive(handed)
            for (verdict, _, _), (escalation_id, new) in zip(handed, ids, strict=True):
                verdict.escalation_id = escalation_id
                if new:
                    opened.append(escalation_id)
        for escalation_id in opened:
            self.desk.announce(escalation_id)
        return verdicts

    def similar(self, text: str, k: int = 5) -> list[Neighbour]:
        """"Have we seen this before?": the ``k`` nearest past incidents to free text."""
        p = _prepare([EventIn(title=text)])[0]
        vec = self.cache.embed([p.fingerprint], [p.masked])
        found = self.scorer.search([Query(vec[0], p.fingerprint, p.masked)], k)
        return self._display(found)[0]

    def _display(self, lists: Sequence[Sequence[ScoredNeighbour]]) -> list[list[Neighbour]]:
        """API neighbours: per fingerprint group, its latest incident with a resolution."""
        wanted = {_representative(n) for ns in lists for n in ns}
        incidents = self.store.incidents_by_id(sorted(wanted))
        return [[_neighbour(incidents[_representative(n)], n) for n in ns
                 if _representative(n) in incidents] for ns in lists]

    # -- learning -------------------------------------------------------------------------------
    def feedback(self, decision_id: str, fb: FeedbackIn, *, actor: Principal = SYSTEM
                 ) -> FeedbackOut:
        """Record feedback; a resolution makes the event a KB incident, indexed before returning."""
        record = self.store.get_decision(decision_id)
        if record is None:
            raise DecisionNotFound(decision_id)
        incident = None
        prepared = None
        if fb.resolution is not None:
            event = EventIn.model_validate(
                {**record.event, "resolution": fb.resolution.model_dump(),
                 "outcome": fb.outcome or "resolved"})
            prepared = _prepare([event])[0]
            incident = _new_incident(prepared, "feedback", decision_id=decision_id)
        applied = record.resolution
        applied_key = resolution_key(applied["action"]) if applied else None
        with self._mutate:
            vectors = (self.cache.embed([prepared.fingerprint], [prepared.masked])
                       if prepared is not None else None)
            with self.store.transaction():
                feedback_id, kb_id, created = self.store.add_feedback(
                    decision_id, correct=fb.correct, novel=fb.novel,
                    resolution=fb.resolution.model_dump() if fb.resolution else None,
                    resolution_key=applied_key, outcome=fb.outcome, note=fb.note,
                    incident=incident)
                self.store.audit(actor.actor, actor.role, "feedback", decision_id,
                                 {"correct": fb.correct, "novel": fb.novel,
                                  "resolution": fb.resolution is not None,
                                  "outcome": fb.outcome})
            if prepared is not None and kb_id is not None and vectors is not None and created:
                self._learn([(kb_id, prepared)], vectors)
            elif applied_key is not None and fb.outcome is not None:
                self._count_outcome(applied_key, fb.outcome)
        self._learn_from_feedback(record.service)
        return FeedbackOut(feedback_id=feedback_id, decision_id=decision_id,
                           incident=(prepared.event.id or kb_ref(kb_id))
                           if prepared is not None and kb_id is not None else None)

    # -- the human queue --------------------------------------------------------------------------
    def escalations(self, state: str | None = None, limit: int = 100) -> list[EscalationOut]:
        return [self.desk.out(r) for r in self.store.list_escalations(state, limit)]

    def escalation(self, escalation_id: str) -> EscalationOut:
        return self.desk.out(self.desk.get(escalation_id), deliveries=True)

    def ack(self, escalation_id: str, by: str | None = None, *, actor: Principal = SYSTEM
            ) -> EscalationOut:
        rec = self.desk.ack(escalation_id, by or actor.actor)
        self.store.audit(actor.actor, actor.role, "escalation.ack", escalation_id)
        return self.desk.out(rec)

    def resolve(self, escalation_id: str, resolution: ResolutionIn, *, outcome: str = "resolved",
                by: str | None = None, kind: str | None = None, actor: Principal = SYSTEM,
                action: str = "escalation.resolve") -> EscalationOut:
        """Close a handoff with what fixed it: every grouped event becomes a KB incident with
        that resolution, indexed before this returns."""
        with self._mutate:
            self.desk.check_open(escalation_id, kind=kind)
            events = [EventIn.model_validate(
                {**event, "resolution": resolution.model_dump(), "outcome": outcome})
                for _, event in self.store.escalation_events(escalation_id)]
            prepared = _prepare(events)
            vectors = self.cache.embed([p.fingerprint for p in prepared],
                                       [p.masked for p in prepared])
            with self.store.transaction():
                added = self.store.add_incidents(
                    [_new_incident(p, "escalation", decision_id=escalation_id)
                     for p in prepared])
                self.desk.finish(escalation_id, resolution.model_dump(), by or actor.actor)
                self.store.audit(actor.actor, actor.role, action, escalation_id,
                                 {"resolution": resolution.action, "outcome": outcome,
                                  "incidents": sum(1 for _, c in added if c)})
            fresh = [i for i, (_, created) in enumerate(added) if created]
            self._learn([(added[i][0], prepared[i]) for i in fresh], vectors[fresh])
        self.desk.announce_resolved(escalation_id)
        return self.escalation(escalation_id)

    def approve(self, escalation_id: str, *, outcome: str = "resolved",
                by: str | None = None, actor: Principal = SYSTEM) -> EscalationOut:
        """A reviewer approved the suggested resolution and the caller executed it."""
        rec = self.desk.check_open(escalation_id, kind="review")
        if rec.suggested_resolution is None:
            raise InvalidState(f"review {escalation_id} has no suggested resolution to approve; "
                               "reject it with the right one")
        return self.resolve(escalation_id, ResolutionIn.model_validate(rec.suggested_resolution),
                            outcome=outcome, by=by, kind="review", actor=actor,
                            action="review.approve")

    def reject(self, escalation_id: str, resolution: ResolutionIn, *,
               outcome: str = "resolved", by: str | None = None,
               actor: Principal = SYSTEM) -> EscalationOut:
        """A reviewer rejected the suggestion and says what is right."""
        return self.resolve(escalation_id, resolution, outcome=outcome, by=by, kind="review",
                            actor=actor, action="review.reject")

    def add_change(self, change: ChangeIn, *, actor: Principal = SYSTEM) -> str:
        with self.store.transaction():
            change_id = self.store.add_change(change.service, change.summary,
                                              change.at or datetime.now(UTC), change.author,
                                              change.ref)
            self.store.audit(actor.actor, actor.role, "change", change_id,
                             {"service": change.service, "summary": change.summary[:200]})
        return change_id

    def record_outcome(self, decision_id: str, body: OutcomeIn, *, actor: Principal = SYSTEM
                       ) -> OutcomeOut:
        """What automation did with a verdict; a replayed resolution's track record learns it
        (a rollback counts as a failure)."""
        record = self.store.get_decision(decision_id)
        if record is None:
            raise DecisionNotFound(decision_id)
        key = resolution_key(record.resolution["action"]) if record.resolution else None
        with self._mutate:
            with self.store.transaction():
                self.store.add_decision_outcome(decision_id, body.outcome, key, body.note)
                self.store.audit(actor.actor, actor.role, "decision.outcome", decision_id,
                                 {"outcome": body.outcome})
            if key is not None:
                self._count_outcome(key, "resolved" if body.outcome == "resolved" else "failed")
        rec = self._records.get(key) if key else None
        return OutcomeOut(
            decision_id=decision_id, outcome=body.outcome,
            resolution=Resolution(**record.resolution) if record.resolution else None,
            track_record=TrackRecordOut(
                successes=rec.successes, failures=rec.failures,
                lower_bound=rec.lower_bound(self.policy.credibility)) if rec else None)

    # -- reading --------------------------------------------------------------------------------
    def checked_event_ids(self, ids: Sequence[str]) -> set[str]:
        """Which of these client event ids already have an audited verdict."""
        if not ids:
            return set()
        rows = self.store.sql(
            "SELECT DISTINCT event->>'id' FROM decisions WHERE event->>'id' IN "
            "(SELECT unnest(?))", [list(ids)])
        return {r[0] for r in rows}

    def decisions(self, limit: int = 50, decision: str | None = None) -> list[DecisionOut]:
        return [_decision_out(r) for r in self.store.list_decisions(limit, decision)]

    def stats(self) -> Stats:
        refs = self.scorer.references_
        return Stats(
            incidents=self.store.count_incidents(), indexed=self.scorer.incidents,
            decisions=self.store.count_decisions(),
            open_escalations=self.store.count_active_escalations(),
            policy_version=self.policy.version, model=self.model_id,
            # The build record (kind, nlist, nprobe, recall@10 measured at build, memory, ...)
            # plus this service's view of it; "vectors" and "kind" come from the serving index.
            index={**self.index.build_info(), "status": self.index_status,
                   "last_kb_id": self._last_kb_id,
                   "memory_budget_bytes": self.index.memory_budget},
            calibration={"lexical_weight": round(1 - self.scorer.weight_, 3),
                         "density_exponent": self.scorer.beta_,
                         "separation_auroc": self.scorer.separation_,
                         "references": {k: len(v) for k, v in refs.items()},
                         "fitted_groups": self.scorer.fitted_groups_,
                         # The KB grew past the fit: the next check (or a pause) refits.
                         "refit_pending": self._refit_due is not None},
            cache=self.cache.stats.as_dict())


def _memory_budget(settings: Settings) -> int | None:
    return settings.index_memory_mib * 2**20 if settings.index_memory_mib > 0 else None


def _policy_body(policy: Policy) -> dict[str, Any]:
    body = policy.as_dict()
    body.pop("version", None)
    return body


def _item(row: tuple[int, str, str, str | None, str | None]) -> Item:
    return Item(kb_id=row[0], fingerprint=row[1], masked=row[2], service=row[3],
                resolution_key=row[4])


def _new_incident(p: _Prepared, origin: str, *, decision_id: str | None = None) -> NewIncident:
    e = p.event
    return NewIncident(
        title=e.title, masked=p.masked, fingerprint=p.fingerprint, origin=origin,
        client_id=e.id, text=e.text, service=e.service, severity=e.severity, source=e.source,
        labels=dict(e.labels), occurred_at=e.occurred_at or datetime.now(UTC),
        resolution=e.resolution.model_dump() if e.resolution else None,
        resolution_key=resolution_key(e.resolution.action) if e.resolution else None,
        outcome=e.outcome, decision_id=decision_id)


def _representative(n: ScoredNeighbour) -> int:
    return n.kb_ids[-1]


def _neighbour(inc: Incident, n: ScoredNeighbour) -> Neighbour:
    return Neighbour(
        id=inc.ref, kb_id=kb_ref(inc.kb_id), title=inc.title, service=inc.service,
        similarity=round(n.similarity, 6),
        resolution=Resolution(**inc.resolution) if inc.resolution else None,
        outcome=inc.outcome, occurred_at=inc.occurred_at, occurrences=len(n.kb_ids))


def _novelty(res: NoveltyResult) -> Novelty:
    return Novelty(score=res.score, is_novel=res.is_novel, threshold=res.threshold,
                   nearest_similarity=res.nearest_similarity,
                   components={k: float(v) for k, v in res.components.items()})


def _decision_out(r: DecisionRecord) -> DecisionOut:
    return DecisionOut(
        decision_id=r.decision_id, created_at=r.created_at, decision=r.decision,  # type: ignore[arg-type]
        event=r.event, score=r.score, is_novel=r.is_novel, threshold=r.threshold,
        confidence=r.confidence, components=r.components,
        neighbor_ids=[kb_ref(i) for i in r.neighbor_ids],
        neighbor_similarities=r.neighbor_similarities, reasons=r.reasons,
        resolution=Resolution(**r.resolution) if r.resolution else None,
        policy_version=r.policy_version, model=r.model_id)


def _json(value: Any) -> dict[str, Any]:
    import json

    out = json.loads(value) if isinstance(value, str) else value
    return dict(out) if out else {}
