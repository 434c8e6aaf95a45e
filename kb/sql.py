"""Statement helpers shared by the KB's tables."""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import duckdb

__all__ = ["insert_rows"]


def insert_rows(cur: duckdb.DuckDBPyConnection, insert: str, rows: Sequence[Sequence[Any]],
                json_columns: Collection[int]) -> None:
    """``insert`` (``INSERT INTO t (cols) ``) of ``rows`` in one statement, the columns at
    ``json_columns`` (serialised JSON text) cast to JSON. One row is a plain VALUES plan (~20%
    cheaper than unnesting every column); more are passed column by column and unnested."""
    if not rows:
        return
    width = len(rows[0])
    if len(rows) == 1:
        cur.execute(insert + "VALUES (" + ", ".join(
            "?::JSON" if i in json_columns else "?" for i in range(width)) + ")", list(rows[0]))
        return
    cur.execute(insert + "SELECT " + ", ".join(
        f"unnest(${i + 1})" + ("::JSON" if i in json_columns else "") for i in range(width)),
        [list(col) for col in zip(*rows, strict=True)])
