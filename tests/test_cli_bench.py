"""``deja bench``: the speed benchmark behind the README's table, from the CLI, as JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DEJA = [sys.executable, "-c", "import sys; from api.cli import main; sys.exit(main())"]


def test_deja_bench_json_reports_measured_index_recall(tmp_path: Path) -> None:
    run = subprocess.run(
        [*DEJA, "bench", "--quick", "--json", "--sections", "faiss", "--faiss-sizes", "3000",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 0, run.stderr[-2000:]
    doc = json.loads(run.stdout)
    assert doc["errors"] == {}
    rows = {r["kind"]: r for r in doc["faiss"]}
    assert {"flat", "ivf-flat"} <= rows.keys()
    assert rows["flat"]["recall_at_10_fresh"] == 1.0
    assert rows["ivf-flat"]["recall_at_10_build"] >= 0.98
    assert all(r["vectors"] == 3000 and r["p99_ms"]["value"] > 0 for r in rows.values())
    # The same run is written for the README's table.
    assert json.loads((tmp_path / "perf.json").read_text())["faiss"] == doc["faiss"]
    assert "| vectors | kind |" in (tmp_path / "perf.md").read_text()


def test_deja_bench_passes_bad_options_back_as_an_error(tmp_path: Path) -> None:
    run = subprocess.run([*DEJA, "bench", "--sections", "nonsense", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert run.returncode == 2
    assert "--sections" in run.stderr
