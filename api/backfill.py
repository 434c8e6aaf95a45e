"""Backfill: embed a large event history in bulk and load it into the KB in one transaction.

``deja ingest`` embeds and commits batch by batch in one process. A backfill of months of history
instead runs as stages that write Parquet to a staging directory, so the expensive ones can be
spread over a Ray cluster (``engine="ray"``) or run in a plain loop (``engine="local"``, no Ray):

1. **plan** (driver): the JSONL files are split into line-aligned byte ranges.
2. **prepare** (Ray tasks / loop): each line is validated as an Event, masked and fingerprinted by
   the same code ``Deja.ingest`` uses → ``events/*.parquet``. A bad record is recorded, not raised,
   so the error can name it (file and line) before anything is written.
3. **distinct** (DuckDB): one masked text per fingerprint that has no stored vector for the model,
   the first occurrence's, as ingest's cache would embed it → ``texts.parquet``.
4. **embed** (``map_batches(EmbedBatch)`` on an actor pool / loop): the model is loaded once per
   actor → ``vectors/*.parquet``.
5. **load** (DuckDB): incidents in input order, the vectors keyed as the embedding cache keys
   them (fingerprint, model id) and an audit row, in ONE transaction: all or nothing.
6. **index**: :meth:`Deja.open` catches the index up from the stored vectors, with an encoder
   that refuses to embed, so nothing is embedded twice.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import ValidationError

from api.auth import SYSTEM, Principal
from api.deja import DB_FILE, Deja, _new_incident, _prepare
from api.schemas import EventIn
from api.settings import Settings
from embeddings.encoder import Encoder, Vectors
from kb import DejaError, Store

if TYPE_CHECKING:
    import pyarrow as pa

__all__ = ["BackfillError", "BackfillReport", "EmbedBatch", "backfill", "input_files"]

Engine = Literal["ray", "local"]

#: Bytes of JSONL per prepare task: big enough to amortise a task, small enough to spread.
CHUNK_BYTES = 8 << 20
#: Texts per embedding call: sentence-transformers sorts a call by length, so larger calls pad
#: less; texts also arrive sorted by length.
EMBED_BATCH = 256
#: Incidents per INSERT inside the load transaction (a progress step, not a commit).
LOAD_STEP = 50_000
_LINE_BITS = 40


class BackfillError(DejaError):
    """The backfill did not run, or ran and rolled back: the KB is as it was."""


@dataclass(frozen=True)
class Chunk:
    """A line-aligned byte range of one input file; ``first_line`` is 1-based."""

    path: str
    file_no: int
    offset: int
    length: int
    first_line: int


@dataclass
class BackfillReport:
    engine: str
    files: int
    events: int
    created: int
    skipped: int
    embedded: int
    distinct_fingerprints: int
    seconds: dict[str, float] = field(default_factory=dict)
    index_status: str = ""
    indexed: int = 0
    bootstrap_key: str | None = None

    @property
    def total_seconds(self) -> float:
        return sum(self.seconds.values())


# -- stage 1: plan --------------------------------------------------------------------------------
def input_files(path: Path) -> list[Path]:
    """A JSONL file, or every ``*.jsonl`` under a directory, in a stable (sorted) order."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.jsonl") if p.is_file())
        if not files:
            raise BackfillError(f"{path}: no *.jsonl files")
        return files
    if not path.is_file():
        raise BackfillError(f"{path}: no such file or directory")
    return [path]


def plan_chunks(files: Sequence[Path], chunk_bytes: int = CHUNK_BYTES) -> list[Chunk]:
    chunks: list[Chunk] = []
    for file_no, path in enumerate(files):
        size = path.stat().st_size
        offset, line = 0, 1
        with path.open("rb") as fh:
            while offset < size:
                fh.seek(offset)
                data = fh.read(chunk_bytes)
                # A range ends after a newline, so no line is split between two tasks.
                while offset + len(data) < size and b"\n" not in data[-chunk_bytes:]:
                    data += fh.read(chunk_bytes)
                cut = len(data) if offset + len(data) >= size else data.rfind(b"\n") + 1
                chunks.append(Chunk(str(path), file_no, offset, cut, line))
                line += data.count(b"\n", 0, cut)
                offset += cut
    return chunks


# -- stage 2: prepare -----------------------------------------------------------------------------
def _event_schema() -> pa.Schema:
    import pyarrow as pa

    s = pa.string()
    return pa.schema([("seq", pa.int64()), ("path", s), ("line", pa.int64()), ("error", s),
                      ("client_id", s), ("title", s), ("text", s), ("service", s),
                      ("severity", s), ("source", s), ("labels", s), ("occurred_at", s),
                      ("masked", s), ("fingerprint", s), ("resolution", s),
                      ("resolution_key", s), ("outcome", s)])


def prepare_chunk(chunk: Chunk) -> pa.Table:
    """Validate, mask and fingerprint every line of a chunk: one row per non-blank line."""
    import pyarrow as pa

    schema = _event_schema()
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    with open(chunk.path, "rb") as fh:
        fh.seek(chunk.offset)
        data = fh.read(chunk.length)
    for i, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        line = chunk.first_line + i
        row: dict[str, Any] = dict.fromkeys(schema.names)
        row.update(seq=(chunk.file_no << _LINE_BITS) | line, path=chunk.path, line=line)
        try:
            event = EventIn.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(p) for p in err.get("loc", ()))
            row["error"] = f"{where or 'line'}: {err['msg']}"
        else:
            row.update(_incident_row(event))
        for name, value in row.items():
            cols[name].append(value)
    return pa.Table.from_pydict(cols, schema=schema)


def _incident_row(event: EventIn) -> dict[str, Any]:
    # Ingest's own preparation, so masked text, fingerprint and resolution key cannot drift.
    p = _prepare([event])[0]
    inc = _new_incident(p, "backfill")
    return {
        "client_id": inc.client_id, "title": inc.title, "text": inc.text,
        "service": inc.service, "severity": inc.severity, "source": inc.source,
        "labels": json.dumps(inc.labels),
        # Events without a time get the load's time (ingest: the time of the call).
        "occurred_at": event.occurred_at.isoformat() if event.occurred_at else None,
        "masked": inc.masked, "fingerprint": inc.fingerprint,
        "resolution": json.dumps(inc.resolution) if inc.resolution is not None else None,
        "resolution_key": inc.resolution_key, "outcome": inc.outcome,
    }


def _prepare_batch(batch: pa.Table) -> pa.Table:
    import pyarrow as pa

    tables = [prepare_chunk(Chunk(**row)) for row in batch.to_pylist()]
    return pa.concat_tables(tables) if tables else _event_schema().empty_table()


# -- stage 4: embed -------------------------------------------------------------------------------
def make_encoder(settings: Settings) -> Encoder:
    """The encoder :meth:`Deja.open` builds for these settings (``DEJA_MODEL``,
    ``DEJA_EMBEDDER``)."""
    from embeddings import create_encoder

    return create_encoder(settings.model, settings.embedder, cache_dir=settings.model_cache_dir)


class EmbedBatch:
    """Ray Data callable class: one encoder per actor, loaded once, embedding batches of texts.

    Built by the service's own encoder factory and settings, so a backfilled vector is the one a
    later check would have computed; every output row carries the model id, and the driver
    refuses vectors of any other.
    """

    def __init__(self, settings: Settings, encoder: Encoder | None = None) -> None:
        self.encoder = encoder or make_encoder(settings)

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow as pa

        texts = [str(t) for t in batch.column("masked").to_pylist()]
        vectors = self.encoder.encode(texts)
        return pa.table({
            "fingerprint": batch.column("fingerprint"),
            "vector": _list_column(vectors),
            "model_id": pa.array([self.encoder.model_id] * len(texts), pa.string()),
        })


def _list_column(vectors: Vectors) -> pa.Array:
    import pyarrow as pa

    n, dim = vectors.shape
    offsets = pa.array(np.arange(0, (n + 1) * dim, dim, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(vectors.reshape(-1), pa.float32()))


class _StoredVectorsOnly:
    """An encoder for the post-load catch-up: every vector is in the KB, so embedding would be a
    bug (and, for a large KB, hours of CPU)."""

    def __init__(self, model_id: str, dim: int) -> None:
        self._model_id, self._dim = model_id, dim

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def dim(self) -> int:
        return self._dim

    def encode(self, texts: list[str]) -> Vectors:
        raise BackfillError(f"{len(texts)} incidents have no stored vector for {self._model_id}")


# -- the two engines ------------------------------------------------------------------------------
class _Local:
    """A plain loop in this process: the same stages and files, no Ray."""

    name = "local"

    def __init__(self, settings: Settings, encoder: Encoder) -> None:
        self.settings, self.encoder = settings, encoder

    @staticmethod
    def prepare(chunks: Sequence[Chunk], out: Path) -> None:
        import pyarrow.parquet as pq
        from tqdm import tqdm

        out.mkdir(parents=True)
        with pq.ParquetWriter(out / "part-0.parquet", _event_schema()) as writer:
            for chunk in tqdm(chunks, desc="prepare", unit="chunk"):
                writer.write_table(prepare_chunk(chunk))

    def embed(self, texts: Path, out: Path, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        embed = EmbedBatch(self.settings, self.encoder)
        _write_vectors((embed(pa.Table.from_batches([b]))
                        for b in pq.ParquetFile(texts).iter_batches(batch_size=EMBED_BATCH)),
                       out, n)


class _Ray:
    """Ray Data on the cluster this process joined: tasks prepare, an actor pool embeds."""

    name = "ray"

    def __init__(self, settings: Settings, workers: int | None) -> None:
        import ray

        if not ray.is_initialized():
            raise BackfillError("Ray is not initialised (call ray.init() first)")
        cpus = ray.cluster_resources().get("CPU", 1)  # type: ignore[no-untyped-call]
        self.settings = settings
        self.workers = workers or max(1, int(cpus))

    @staticmethod
    def prepare(chunks: Sequence[Chunk], out: Path) -> None:
        import ray.data

        ds = ray.data.from_items([asdict(c) for c in chunks],
                                 override_num_blocks=max(1, len(chunks)))
        ds.map_batches(_prepare_batch, batch_size=1, batch_format="pyarrow").write_parquet(
            str(out))

    def embed(self, texts: Path, out: Path, n: int) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        import ray.data

        # The driver hands the texts over as blocks and writes the vectors as they stream
        # back: a read or write task would need a CPU that the actor pool already holds (on a
        # small cluster they wait for each other for ever), and the driver needs none.
        table = pq.read_table(texts)
        blocks = max(self.workers, min(4 * self.workers, -(-n // EMBED_BATCH)))
        step = -(-n // blocks)
        ds = ray.data.from_arrow([table.slice(i, step) for i in range(0, n, step)])
        vectors = ds.map_batches(
            EmbedBatch, fn_constructor_kwargs={"settings": self.settings},
            compute=ray.data.ActorPoolStrategy(size=self.workers), num_cpus=1,
            batch_size=EMBED_BATCH, batch_format="pyarrow")
        _write_vectors((b for b in vectors.iter_batches(batch_size=None, batch_format="pyarrow")
                        if isinstance(b, pa.Table)), out, n)


def _write_vectors(tables: Iterator[pa.Table], out: Path, n: int) -> None:
    import pyarrow.parquet as pq
    from tqdm import tqdm

    out.mkdir(parents=True)
    writer: pq.ParquetWriter | None = None
    try:
        with tqdm(total=n, desc="embed", unit="text") as bar:
            for table in tables:
                if writer is None:
                    writer = pq.ParquetWriter(out / "part-0.parquet", table.schema)
                writer.write_table(table)
                bar.update(len(table))
    finally:
        if writer is not None:
            writer.close()


def _parquet(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.glob("*.parquet"))


# -- the backfill ---------------------------------------------------------------------------------
def backfill(path: Path, data_dir: Path, *, engine: Engine = "ray",
             settings: Settings | None = None, workers: int | None = None,
             staging: Path | None = None, keep_staging: bool = False,
             chunk_bytes: int = CHUNK_BYTES, actor: Principal = SYSTEM) -> BackfillReport:
    """Backfill ``path`` (a JSONL file or a directory of them) into the KB at ``data_dir``.

    With ``engine="ray"`` the caller has connected to a cluster (``ray.init()``); the staging
    directory must then be on storage every node sees. Raises :class:`BackfillError` (KB
    unchanged) on a bad record, naming its file and line.
    """
    settings = settings or Settings(data_dir=data_dir)
    ray_runner = _Ray(settings, workers) if engine == "ray" else None
    files = input_files(path)
    data_dir.mkdir(parents=True, exist_ok=True)
    # Held for the whole run: nobody else writes the KB between the cache look-up and the load.
    store = Store(data_dir / DB_FILE)
    stage = Path(tempfile.mkdtemp(prefix=".backfill-", dir=staging or data_dir))
    seconds: dict[str, float] = {}
    try:
        with _timed(seconds, "plan"):
            chunks = plan_chunks(files, chunk_bytes)
        with _timed(seconds, "prepare"):
            (ray_runner or _Local).prepare(chunks, stage / "events")
        events = _parquet(stage / "events")
        _refuse_bad_records(store, events)
        with _timed(seconds, "model"):
            # The driver's encoder names the vector space (model id, dimension) before anything
            # is embedded; the local engine also embeds with it.
            encoder = make_encoder(settings)
            model_id, dim = encoder.model_id, encoder.dim
        runner = ray_runner or _Local(settings, encoder)
        if ray_runner is not None:
            del encoder
        n_events, n_distinct, n_texts = _distinct(store, events, model_id, stage / "texts.parquet")
        if n_texts:
            with _timed(seconds, "embed"):
                runner.embed(stage / "texts.parquet", stage / "vectors", n_texts)
        vectors = _parquet(stage / "vectors") if n_texts else []
        with _timed(seconds, "load"):
            created = _load(store, events, vectors, model_id, n_events, n_texts, actor=actor,
                            detail={"engine": runner.name, "files": len(files)})
    except BaseException:
        store.close()
        raise
    finally:
        if not keep_staging:
            shutil.rmtree(stage, ignore_errors=True)
    store.close()
    report = BackfillReport(engine=runner.name, files=len(files), events=n_events,
                            created=created, skipped=n_events - created, embedded=n_texts,
                            distinct_fingerprints=n_distinct, seconds=seconds)
    with _timed(seconds, "index"):
        deja = Deja.open(data_dir, settings=settings, encoder=_StoredVectorsOnly(model_id, dim))
        try:
            report.index_status, report.indexed = deja.index_status, deja.scorer.incidents
            report.bootstrap_key = deja.bootstrap_key
        finally:
            deja.close()
    return report


class _timed:
    def __init__(self, into: dict[str, float], name: str) -> None:
        self.into, self.name = into, name

    def __enter__(self) -> None:
        self.start = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.into[self.name] = time.perf_counter() - self.start


def _refuse_bad_records(store: Store, events: list[str]) -> None:
    """Stop at the first bad record, before the model loads and before anything is written."""
    if not events:
        return
    bad = store.sql("SELECT path, line, error, count(*) OVER () FROM read_parquet($1) "
                    "WHERE error IS NOT NULL ORDER BY seq LIMIT 1", [events])
    if bad:
        path, line, error, count = bad[0]
        more = f" (and {count - 1} more bad records)" if count > 1 else ""
        raise BackfillError(f"{path}:{line}: {error}{more}; nothing was written")


def _distinct(store: Store, events: list[str], model_id: str, out: Path
              ) -> tuple[int, int, int]:
    """Write the texts to embed; returns (events, distinct fingerprints, texts to embed)."""
    if not events:
        return 0, 0, 0
    n_events, n_distinct = store.sql(
        "SELECT count(*), count(DISTINCT fingerprint) FROM read_parquet($1)", [events])[0]
    # One text per fingerprint, the first occurrence's (what ingest's cache embeds), shortest
    # first so an embedding batch holds texts of similar length and pads little.
    store.sql(
        "COPY (SELECT fingerprint, arg_min(masked, seq) AS masked FROM read_parquet($1) e "
        "WHERE NOT EXISTS (SELECT 1 FROM embeddings m WHERE m.model_id = $2 "
        "AND m.fingerprint = e.fingerprint) GROUP BY fingerprint "
        "ORDER BY length(arg_min(masked, seq)), fingerprint) TO '" + _quote(out) +
        "' (FORMAT parquet)", [events, model_id])
    n_texts = store.sql("SELECT count(*) FROM read_parquet($1)", [str(out)])[0][0]
    return int(n_events), int(n_distinct), int(n_texts)


def _quote(path: Path) -> str:
    # COPY takes its target as a literal, not a parameter.
    return str(path).replace("'", "''")


_INSERT = (
    "INSERT INTO incidents (kb_id, client_id, title, text, service, severity, source, labels, "
    "occurred_at, masked, fingerprint, resolution, resolution_key, outcome, origin, decision_id) "
    "SELECT i.kb_id, k.client_id, k.title, k.text, k.service, k.severity, k.source, "
    "k.labels::JSON, coalesce(k.occurred_at::TIMESTAMPTZ, $3), k.masked, k.fingerprint, "
    "k.resolution::JSON, k.resolution_key, k.outcome, 'backfill', NULL "
    "FROM backfill_keep k JOIN backfill_ids i USING (rn) WHERE rn BETWEEN $1 AND $2 ORDER BY rn")


def _load(store: Store, events: list[str], vectors: list[str], model_id: str, n_events: int,
          n_texts: int, *, actor: Principal, detail: dict[str, Any]) -> int:
    """The one transaction; returns the number of incidents created."""
    from tqdm import tqdm

    if not events:
        return 0
    now = datetime.now(UTC)
    with store.transaction() as cur:
        if vectors:
            ids = {r[0] for r in cur.execute("SELECT DISTINCT model_id FROM read_parquet($1)",
                                             [vectors]).fetchall()}
            if ids != {model_id}:
                raise BackfillError(f"workers embedded with {sorted(ids)}, expected {model_id}")
        # Ingest's rule for client ids: one already in the KB, or earlier in the input, is
        # skipped; kb_ids then follow input order.
        cur.execute(
            "CREATE OR REPLACE TEMP TABLE backfill_keep AS "
            "SELECT row_number() OVER (ORDER BY seq) AS rn, * FROM ("
            "SELECT * EXCLUDE (error) FROM read_parquet($1) e WHERE error IS NULL AND "
            "(client_id IS NULL OR client_id NOT IN "
            "(SELECT client_id FROM incidents WHERE client_id IS NOT NULL)) "
            "QUALIFY client_id IS NULL OR "
            "row_number() OVER (PARTITION BY client_id ORDER BY seq) = 1)", [events])
        n = int(cur.execute("SELECT count(*) FROM backfill_keep").fetchone()[0])  # type: ignore[index]
        cur.execute("CREATE OR REPLACE TEMP TABLE backfill_ids AS SELECT row_number() OVER "
                    "(ORDER BY kb_id) AS rn, kb_id FROM (SELECT nextval('incident_seq') AS kb_id "
                    "FROM range($1))", [n])
        with tqdm(total=n + n_texts, desc="load", unit="row") as bar:
            for start in range(1, n + 1, LOAD_STEP):
                end = min(n, start + LOAD_STEP - 1)
                cur.execute(_INSERT, [start, end, now])
                bar.update(end - start + 1)
            if vectors:
                cur.execute("INSERT INTO embeddings (fingerprint, model_id, vector) "
                            "SELECT fingerprint, $2, vector::FLOAT[] FROM read_parquet($1) "
                            "ON CONFLICT DO NOTHING", [vectors, model_id])
                bar.update(n_texts)
        # The catch-up after commit must find a vector for every new incident.
        missing = cur.execute(
            "SELECT count(*) FROM backfill_keep k ANTI JOIN embeddings m "
            "ON m.fingerprint = k.fingerprint AND m.model_id = $1", [model_id]).fetchone()
        if missing and missing[0]:
            raise BackfillError(f"{missing[0]} incidents have no vector for {model_id}")
        store.audit(actor.actor, actor.role, "backfill", None,
                    {**detail, "events": n_events, "created": n})
        cur.execute("DROP TABLE backfill_keep")
        cur.execute("DROP TABLE backfill_ids")
        # Vectors loaded in bulk bypass the store's record of stored keys; it reloads.
        store.after_commit(store.forget_stored_keys)
    return n


def iter_events(path: Path) -> Iterator[EventIn]:
    """The events of a backfill input, in load order (for tests and small inputs)."""
    for file in input_files(path):
        with file.open(encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    yield EventIn.model_validate_json(line)


def ray_env() -> None:
    """Environment for a Ray cluster this process starts: no usage reporting (Deja never reaches
    the internet), tokenizers quiet in forked workers."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
