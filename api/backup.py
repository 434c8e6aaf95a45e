"""Consistent backups of a data dir, and their restore.

A backup holds the DuckDB file checkpointed under the KB's write lock (so no write is half in it),
plus the index file and its manifest saved at the same moment. Restoring copies them into an empty
data dir; on start the index is verified against its manifest and caught up or rebuilt if needed.
"""

from __future__ import annotations

import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from api.deja import Deja

__all__ = ["backup", "restore"]

_FILES = ("deja.duckdb", "index.faiss", "index.faiss.manifest.json")


def backup(deja: Deja, out: Path) -> dict[str, Any]:
    """Snapshot an open Deja into ``out`` (created; must be empty). Writes wait meanwhile."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out} is not empty")
    if deja.data_dir is None:
        raise ValueError("an in-memory Deja has nothing on disk to back up")
    with deja._mutate, deja.store.transaction_lock():
        deja.store.checkpoint()
        deja.save_index()
        for name in _FILES:
            src = deja.data_dir / name
            if src.exists():
                shutil.copy2(src, out / name)
        info = {"created_at": datetime.now(UTC).isoformat(), "model": deja.model_id,
                "incidents": deja.store.count_incidents(),
                "decisions": deja.store.count_decisions(),
                "policy_version": deja.policy.version}
    (out / "backup.json").write_text(json.dumps(info, indent=2))
    return info


def restore(backup_dir: Path, data_dir: Path) -> dict[str, Any]:
    """Copy a backup into ``data_dir`` (created; must hold no KB yet)."""
    if not (backup_dir / "deja.duckdb").exists():
        raise FileNotFoundError(f"{backup_dir} holds no deja.duckdb")
    data_dir.mkdir(parents=True, exist_ok=True)
    if (data_dir / "deja.duckdb").exists():
        raise FileExistsError(f"{data_dir} already holds a knowledge base")
    # A check journal left without its KB belongs to no backup: never replay it into this one.
    (data_dir / "deja.duckdb.journal").unlink(missing_ok=True)
    for name in _FILES:
        if (backup_dir / name).exists():
            shutil.copy2(backup_dir / name, data_dir / name)
    info: dict[str, Any] = json.loads((backup_dir / "backup.json").read_text()) \
        if (backup_dir / "backup.json").exists() else {}
    return info
