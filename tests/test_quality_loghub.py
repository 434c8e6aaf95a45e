"""A seeded quality floor on the shared LogHub samples, with the real model.

Per system: KB = half the lines of 70% of the templates, queries = the other half (known) and
every line of the remaining 30% (novel). Floors sit below what `make bench` measures (see the
README) so that they catch regressions, not noise.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from api.deja import Deja
from api.schemas import EventIn
from bench import loghub
from bench.metrics import template_balanced_auroc
from embeddings import Encoder

SEED = 7


@pytest.fixture(scope="module")
def results(real_encoder: Encoder, tmp_path_factory: pytest.TempPathFactory
            ) -> Iterator[dict[str, dict[str, float]]]:
    deja = Deja.open(Path(tmp_path_factory.mktemp("loghub")), encoder=real_encoder)
    splits = {s: loghub.split(loghub.load_system(s), SEED) for s in loghub.SYSTEMS}
    truth: dict[str, str] = {}
    for system, sp in splits.items():
        events = [EventIn.model_validate(loghub.to_event(x, system, idx=i, with_resolution=True))
                  for i, x in enumerate(sp.kb)]
        for e, x in zip(events, sp.kb, strict=True):
            truth[e.id or ""] = x.event_id
        deja.ingest(events)
    out: dict[str, dict[str, float]] = {}
    for system, sp in splits.items():
        queries = sp.known + sp.novel
        verdicts = deja.check([EventIn(title=x.content[:2000], service=system) for x in queries],
                              dry_run=True)
        labels = [False] * len(sp.known) + [True] * len(sp.novel)
        top = [truth.get(v.neighbors[0].id) for v in verdicts[: len(sp.known)]]
        out[system] = {
            "recall1": sum(t == x.event_id for t, x in zip(top, sp.known, strict=True))
            / max(1, len(sp.known)),
            "tauroc": template_balanced_auroc([v.novelty.score for v in verdicts], labels,
                                              [x.event_id for x in queries]),
            "fe": sum(v.novelty.is_novel for v in verdicts[: len(sp.known)]) / len(sp.known),
            "mn": sum(not v.novelty.is_novel for v in verdicts[len(sp.known):])
            / max(1, len(sp.novel)),
            "n_known": len(sp.known), "n_novel": len(sp.novel),
            "wrong_replays": sum(v.decision == "replay" for v in verdicts[len(sp.known):]),
        }
    deja.close()
    yield out


@pytest.mark.slow
@pytest.mark.parametrize("system", loghub.SYSTEMS)
def test_loghub_floor_per_system(results: dict[str, dict[str, float]], system: str) -> None:
    r = results[system]
    assert r["recall1"] >= 0.97, r
    assert r["tauroc"] >= 0.93, r
    assert r["wrong_replays"] == 0, r


@pytest.mark.slow
def test_loghub_pooled_error_rates(results: dict[str, dict[str, float]]) -> None:
    known = sum(r["n_known"] for r in results.values())
    novel = sum(r["n_novel"] for r in results.values())
    fe = sum(r["fe"] * r["n_known"] for r in results.values()) / known
    mn = sum(r["mn"] * r["n_novel"] for r in results.values()) / novel
    assert fe <= 0.10, results
    assert mn <= 0.10, results
