"""LogHub 2k samples: loading, seeded known/novel splits and conversion to API events.

A *template* (``EventId``) is one kind of event. A split picks a seeded ``known_fraction`` of a
system's templates as known: half the lines of each known template go to the knowledge base, the
rest become *known* queries; every line of the remaining templates is a *novel* query.
"""

from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DEFAULT_LOGHUB_DIR = Path(__file__).resolve().parents[1].parent / "shared/data/loghub-2k"

Event = dict[str, Any]


def loghub_dir() -> Path:
    """The LogHub 2k directory: ``$DEJA_LOGHUB_DIR`` if set, else ``../shared/data/loghub-2k``."""
    env = os.environ.get("DEJA_LOGHUB_DIR")
    return Path(env) if env else DEFAULT_LOGHUB_DIR


def discover_systems(root: Path | None = None) -> list[str]:
    """Names of the systems under ``root`` that have a ``<Sys>_2k.log_structured.csv``."""
    base = root if root is not None else loghub_dir()
    if not base.is_dir():
        return []
    return sorted(
        p.name for p in base.iterdir() if p.is_dir() and _csv_path(p.name, base).is_file()
    )


def _csv_path(name: str, root: Path) -> Path:
    return root / name / f"{name}_2k.log_structured.csv"


SYSTEMS: list[str] = discover_systems()


@dataclass(frozen=True)
class LogLine:
    """One log line with its ground-truth template."""

    content: str
    event_id: str
    template: str
    line_no: int = 0


@dataclass
class Split:
    """A seeded known/novel split of one system's lines."""

    kb: list[LogLine] = field(default_factory=list)
    known: list[LogLine] = field(default_factory=list)
    novel: list[LogLine] = field(default_factory=list)
    known_templates: list[str] = field(default_factory=list)
    novel_templates: list[str] = field(default_factory=list)


def load_system(name: str, root: Path | None = None) -> list[LogLine]:
    """All lines of ``<root>/<name>/<name>_2k.log_structured.csv`` in file order.

    A kind of event is its template: EventIds that share one template string (Linux E17, E18
    and E19 differ only in the user name a line carries) are merged under the smallest id.
    """
    path = _csv_path(name, root if root is not None else loghub_dir())
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    canonical: dict[str, str] = {}
    for row in rows:
        tid = canonical.get(row["EventTemplate"])
        if tid is None or _id_key(row["EventId"]) < _id_key(tid):
            canonical[row["EventTemplate"]] = row["EventId"]
    return [LogLine(content=row["Content"], event_id=canonical[row["EventTemplate"]],
                    template=row["EventTemplate"], line_no=i) for i, row in enumerate(rows)]


def _id_key(event_id: str) -> tuple[int, str]:
    digits = "".join(c for c in event_id if c.isdigit())
    return (int(digits) if digits else 0, event_id)


def split(
    lines: list[LogLine],
    seed: int,
    known_fraction: float = 0.7,
    kb_fraction: float = 0.5,
    max_per_template: int | None = None,
) -> Split:
    """Seeded split by template (``event_id``).

    ``round(known_fraction * n_templates)`` templates are known (at least one, and at least one
    novel, when there are two or more templates and the fraction is strictly inside (0, 1)).
    Of each known template, ``floor(kb_fraction * n)`` lines (at least one) go to the KB and the
    rest are known queries, so a single-line template gives no known query.
    ``max_per_template`` first subsamples each template to at most that many lines.
    """
    if not 0.0 <= known_fraction <= 1.0 or not 0.0 <= kb_fraction <= 1.0:
        raise ValueError("fractions must be in [0, 1]")
    rng = random.Random(seed)
    by_template: dict[str, list[LogLine]] = defaultdict(list)
    for line in lines:
        by_template[line.event_id].append(line)
    templates = sorted(by_template)
    rng.shuffle(templates)
    n = len(templates)
    n_known = round(known_fraction * n)
    if n >= 2 and 0.0 < known_fraction < 1.0:
        n_known = min(max(n_known, 1), n - 1)
    known_t = sorted(templates[:n_known])
    novel_t = sorted(templates[n_known:])

    novel_set = set(novel_t)
    out = Split(known_templates=known_t, novel_templates=novel_t)
    for t in sorted(templates):
        group = list(by_template[t])
        rng.shuffle(group)
        if max_per_template is not None:
            group = group[:max_per_template]
        if t in novel_set:
            out.novel.extend(group)
            continue
        n_kb = max(1, int(kb_fraction * len(group)))
        out.kb.extend(group[:n_kb])
        out.known.extend(group[n_kb:])
    return out


def resolution_action(system: str, event_id: str) -> str:
    """The per-template runbook action given to KB events (and expected on a right replay)."""
    return f"apply runbook for {system} {event_id}"


def to_event(line: LogLine, system: str, *, idx: int, with_resolution: bool) -> Event:
    """An API Event for ``line``; KB events carry the template's resolution and outcome."""
    event: Event = {
        "id": f"{system}-{idx}",
        "title": line.content[:2000],
        "service": system,
        "source": "loghub",
    }
    if with_resolution:
        event["resolution"] = {
            "action": resolution_action(system, line.event_id),
            "automatable": True,
        }
        event["outcome"] = "resolved"
    return event
