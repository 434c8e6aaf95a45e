"""The ``deja`` command: serve, ingest, backfill, check, similar, reindex, demo."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from api.schemas import EventIn
from api.settings import Settings
from kb import DataDirLocked, DejaError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Deja: have we seen this before? Novelty checks for operations events.")

DataDir = Annotated[Path, typer.Option("--data-dir", "-d", envvar="DEJA_DATA_DIR",
                                       help="Data directory (created if missing).")]


def _open(data_dir: Path) -> Any:
    # Fail fast on a data dir another process holds, before the model and torch load.
    from kb import Store

    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        Store(data_dir / "deja.duckdb").close()
    except DataDirLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc

    from api.deja import Deja

    try:
        return Deja.open(data_dir, settings=Settings(data_dir=data_dir))
    except DataDirLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(data_dir: DataDir = Path("data/demo"),
          host: Annotated[str, typer.Option(envvar="DEJA_HOST")] = "127.0.0.1",
          port: Annotated[int, typer.Option(envvar="DEJA_PORT")] = 8000) -> None:
    """Serve the HTTP API and the dashboard."""
    import uvicorn

    from api.app import create_app

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # Opened before uvicorn starts, so a data dir held by another process fails at once.
    deja = _open(data_dir)
    uvicorn.run(create_app(deja, close_on_shutdown=True), host=host, port=port, log_level="info",
                # One log line per request costs ~1% of a check; errors are still logged.
                access_log=False)


def _read_events(path: Path) -> Iterator[tuple[int, EventIn]]:
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield lineno, EventIn.model_validate_json(line)
            except ValidationError as exc:
                err = exc.errors()[0]
                field = ".".join(str(p) for p in err.get("loc", ()))
                typer.echo(f"error: {path}:{lineno}: {field or 'line'}: {err['msg']}", err=True)
                raise typer.Exit(1) from exc


@app.command()
def ingest(file: Annotated[Path, typer.Argument(exists=True, dir_okay=False,
                                                help="JSON Lines, one Event per line.")],
           data_dir: DataDir = Path("data/demo"),
           batch: Annotated[int, typer.Option(min=1, max=1000)] = 500) -> None:
    """Add past incidents from a JSONL file (validated in full before anything is written)."""
    from tqdm import tqdm

    events = [e for _, e in _read_events(file)]
    deja = _open(data_dir)
    created = 0
    try:
        with tqdm(total=len(events), desc="ingest", unit="event") as bar:
            for start in range(0, len(events), batch):
                part = events[start:start + batch]
                created += sum(1 for _, c in deja.ingest(part) if c)
                bar.update(len(part))
    finally:
        deja.close()
    typer.echo(f"{created} new incidents ({len(events) - created} already known)")


@app.command()
def backfill(path: Annotated[Path, typer.Argument(
                 exists=True, help="A JSONL file (one Event per line) or a directory of them.")],
             data_dir: DataDir = Path("data/demo"),
             engine: Annotated[str, typer.Option(
                 help="ray: Ray Data on a cluster (pip install 'deja[ray]'); local: one process."
             )] = "ray",
             address: Annotated[str | None, typer.Option(
                 envvar="RAY_ADDRESS", help="Ray cluster to join (default: start a local one).")
             ] = None,
             workers: Annotated[int | None, typer.Option(
                 min=1, help="Embedding actors (default: the cluster's CPUs).")] = None,
             staging: Annotated[Path | None, typer.Option(
                 help="Parquet staging parent dir (default: the data dir; on a multi-node "
                      "cluster, storage every node sees).")] = None,
             keep_staging: Annotated[bool, typer.Option("--keep-staging")] = False) -> None:
    """Embed a large history in bulk and load it in one transaction (all or nothing)."""
    from api.backfill import BackfillError, ray_env
    from api.backfill import backfill as run

    if engine not in ("ray", "local"):
        typer.echo(f"error: --engine must be ray or local, not {engine}", err=True)
        raise typer.Exit(1)
    started = False
    if engine == "ray":
        ray_env()
        try:
            import ray
        except ImportError as exc:
            typer.echo("error: --engine ray needs the ray extra: pip install 'deja[ray]' "
                       "(or use --engine local)", err=True)
            raise typer.Exit(1) from exc
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False)
            started = True
    try:
        report = run(path, data_dir, engine=engine,  # type: ignore[arg-type]
                     settings=Settings(data_dir=data_dir), workers=workers, staging=staging,
                     keep_staging=keep_staging)
    except BackfillError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        if started:
            ray.shutdown()
    secs = ", ".join(f"{k} {v:.1f} s" for k, v in report.seconds.items())
    rate = report.events / report.total_seconds if report.total_seconds else 0.0
    typer.echo(f"{report.created} new incidents ({report.skipped} already known) from "
               f"{report.events} events in {report.files} files; {report.embedded} texts "
               f"embedded ({report.distinct_fingerprints} fingerprints); {report.engine}: "
               f"{secs} ({rate:.0f} events/s)")
    typer.echo(f"index {report.index_status}: {report.indexed} incidents")
    if report.bootstrap_key:
        typer.echo(f"admin key (also in {data_dir / 'admin.key'}): {report.bootstrap_key}")


@app.command()
def check(text: str, data_dir: DataDir = Path("data/demo"),
          service: Annotated[str | None, typer.Option()] = None,
          severity: Annotated[str | None, typer.Option()] = None,
          dry_run: Annotated[bool, typer.Option("--dry-run")] = False) -> None:
    """Check one event and print its verdict as JSON."""
    try:
        event = EventIn.model_validate({"title": text, "service": service, "severity": severity})
    except ValidationError as exc:
        typer.echo(f"error: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(1) from exc
    deja = _open(data_dir)
    try:
        verdict = deja.check([event], dry_run=dry_run)[0]
    finally:
        deja.close()
    typer.echo(verdict.model_dump_json(indent=2))


@app.command()
def similar(text: str, data_dir: DataDir = Path("data/demo"),
            k: Annotated[int, typer.Option(min=1, max=100)] = 5) -> None:
    """Have we seen this before? Print the k nearest past incidents."""
    deja = _open(data_dir)
    try:
        for n in deja.similar(text, k):
            action = n.resolution.action if n.resolution else "-"
            typer.echo(f"{n.similarity:.3f}  {n.id}  [{n.service or '-'}]  {n.title}  => {action}")
    finally:
        deja.close()


@app.command()
def reindex(data_dir: DataDir = Path("data/demo")) -> None:
    """Rebuild the index from stored vectors (never re-embeds what the cache holds)."""
    deja = _open(data_dir)
    try:
        n = deja.reindex()
    finally:
        deja.close()
    typer.echo(f"index rebuilt: {n} vectors")


@app.command()
def demo(data_dir: DataDir = Path("data/demo"),
         if_empty: Annotated[bool, typer.Option(
             "--if-empty", help="Do nothing if the KB has incidents.")] = False,
         seed: int = 0) -> None:
    """Load the demo knowledge base (alerts rendered from the Prometheus rule catalogue)."""
    from api.scenarios import demo_kb

    deja = _open(data_dir)
    try:
        if if_empty and deja.store.count_incidents() > 0:
            typer.echo(f"{data_dir} already holds {deja.store.count_incidents()} incidents")
            return
        events = [EventIn.model_validate(e) for e in demo_kb(seed)]
        created = sum(1 for _, c in deja.ingest(events) if c)
        typer.echo(f"demo knowledge base: {created} incidents in {data_dir}")
        if deja.bootstrap_key:
            typer.echo(f"admin key (also in {data_dir / 'admin.key'}): {deja.bootstrap_key}")
    finally:
        deja.close()


keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@keys_app.command("create")
def keys_create(name: Annotated[str, typer.Option(help="Who or what uses the key.")],
                role: Annotated[str, typer.Option(
                    help="viewer | operator | approver | admin")] = "operator",
                data_dir: DataDir = Path("data/demo")) -> None:
    """Create a key and print it (only its hash is stored: this is the one time it is shown)."""
    deja = _open(data_dir)
    try:
        key_id, key = deja.create_key(name, role)
    except DejaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        deja.close()
    typer.echo(f"{key_id} {role} {name}\n{key}")


@keys_app.command("list")
def keys_list(data_dir: DataDir = Path("data/demo")) -> None:
    """List keys (never the keys themselves)."""
    deja = _open(data_dir)
    try:
        for k in deja.list_keys():
            state = f"revoked {k.revoked_at:%Y-%m-%d}" if k.revoked_at else "active"
            typer.echo(f"{k.key_id}  {k.role:<8}  {state:<18}  {k.name}")
    finally:
        deja.close()


@keys_app.command("revoke")
def keys_revoke(key_id: str, data_dir: DataDir = Path("data/demo")) -> None:
    """Revoke a key at once."""
    deja = _open(data_dir)
    try:
        done = deja.revoke_key(key_id)
    finally:
        deja.close()
    if not done:
        typer.echo(f"error: no active key {key_id}", err=True)
        raise typer.Exit(1)
    typer.echo(f"revoked {key_id}")


@app.command()
def backtest(version: Annotated[int, typer.Option(help="Policy version to try.")],
             data_dir: DataDir = Path("data/demo")) -> None:
    """Replay stored verdicts under a policy version, beside the active one (JSON)."""
    deja = _open(data_dir)
    try:
        report = deja.backtest(version)
    except DejaError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        deja.close()
    typer.echo(json.dumps(report, indent=2, default=str))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def bench(ctx: typer.Context,
          quality: Annotated[bool, typer.Option(
              "--quality", help="The quality benchmark (LogHub + alert scenarios) instead of "
                                "the speed one.")] = False) -> None:
    """Run the speed benchmark (bench/perf.py; --json prints its JSON document, --quick a smoke
    run), or with --quality the quality benchmark; other options go to the benchmark."""
    try:
        from bench import perf as speed
        from bench import quality as accuracy
    except ModuleNotFoundError as exc:  # an installed wheel without the repository's bench/
        typer.echo(f"error: the benchmarks run from a Deja checkout ({exc})", err=True)
        raise typer.Exit(2) from exc
    raise typer.Exit((accuracy.main if quality else speed.main)(list(ctx.args)))


@app.command("backup")
def backup_cmd(data_dir: Annotated[Path, typer.Argument(help="Data dir to back up.")],
               out: Annotated[Path, typer.Argument(help="Empty directory for the backup.")]
               ) -> None:
    """Consistent snapshot of a data dir (the server must be stopped, or use the API)."""
    from api.backup import backup

    deja = _open(data_dir)
    try:
        info = backup(deja, out)
    except (FileExistsError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    finally:
        deja.close()
    typer.echo(f"backed up {info['incidents']} incidents, {info['decisions']} decisions to {out}")


@app.command("restore")
def restore_cmd(backup_dir: Annotated[Path, typer.Argument(help="A backup directory.")],
                data_dir: Annotated[Path, typer.Argument(help="New, empty data dir.")]) -> None:
    """Restore a backup into a new data dir."""
    from api.backup import restore

    try:
        info = restore(backup_dir, data_dir)
    except (FileExistsError, FileNotFoundError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    typer.echo(f"restored into {data_dir}: {info.get('incidents', '?')} incidents")


def main() -> None:
    try:
        app()
    except DataDirLocked as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)



