"""When the scorer is refitted as the KB grows: once a bulk load pauses, not in the middle of it;
under continuous ingest at a bounded share of the time; and always before a check is scored."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import api.deja
from api.deja import Deja
from api.schemas import EventIn
from api.settings import Settings
from embeddings import HashingEncoder
from embeddings.encoder import Vectors
from novelty import NoveltyScorer


class SlowEncoder(HashingEncoder):
    """Embeds like the hashing encoder, but each call takes as long as a model's batch."""

    def __init__(self, seconds: float) -> None:
        super().__init__(64)
        self.seconds = seconds

    def encode(self, texts: list[str]) -> Vectors:
        time.sleep(self.seconds)
        return super().encode(texts)


def _word(i: int) -> str:
    # Letters, not digits: masking would fold numbered words into one fingerprint.
    return "".join(chr(ord("a") + int(d)) for d in str(i))


def _events(start: int, n: int) -> list[EventIn]:
    # Distinct words, so every event is its own fingerprint group and the KB keeps growing.
    return [EventIn(title=f"service {_word(i)}x {_word(i)}y {_word(i)}z failed",
                    service=f"s{i % 7}") for i in range(start, start + n)]


@pytest.fixture
def slow(tmp_path: Path) -> Iterator[Deja]:
    d = Deja.open(tmp_path, encoder=SlowEncoder(0.15), settings=Settings(sweep_seconds=0))
    try:
        yield d
    finally:
        d.close()


def _count_fits(deja: Deja) -> list[float]:
    """Times (monotonic) at which the scorer was fitted from now on."""
    fits: list[float] = []
    scorer = deja.scorer
    fit = scorer.fit

    def counted() -> NoveltyScorer:
        fitted = fit()
        fits.append(time.monotonic())
        return fitted

    scorer.fit = counted  # type: ignore[method-assign]
    return fits


def test_a_bulk_load_is_fitted_once_when_it_pauses(
        slow: Deja, monkeypatch: pytest.MonkeyPatch) -> None:
    # Each batch spends longer embedding than the quiet period: the gaps between the KB's
    # growth are not a pause, the ingest is still running.
    monkeypatch.setattr(api.deja, "REFIT_QUIET", 0.1)
    fits = _count_fits(slow)
    for b in range(8):
        slow.ingest(_events(b * 10, 10))
    ended = time.monotonic()
    assert fits == [], "refitted in the middle of a bulk load"
    deadline = time.monotonic() + 10
    while not fits and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(fits) == 1 and fits[0] >= ended + 0.1
    assert slow.scorer.fitted_groups_ == slow.scorer.groups == 80
    assert slow.stats().calibration["refit_pending"] is False


def test_a_check_never_scores_against_a_stale_fit(
        slow: Deja, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api.deja, "REFIT_QUIET", 60.0)  # the background refit never runs
    slow.ingest(_events(0, 40))
    slow.ingest(_events(40, 40))
    assert slow.stats().calibration["refit_pending"] is True
    slow.check(_events(3, 1), dry_run=True)
    assert slow.scorer.fitted_groups_ == 80
    assert slow.stats().calibration["refit_pending"] is False


@pytest.mark.parametrize("last_fit_seconds, expect_fit", [(0.0, True), (5.0, False)])
def test_continuous_ingest_refits_at_a_bounded_share_of_the_time(
        slow: Deja, monkeypatch: pytest.MonkeyPatch, last_fit_seconds: float,
        expect_fit: bool) -> None:
    # Never a pause; a due refit is forced after REFIT_MAX_DELAY, or after the last fit's
    # duration / REFIT_MAX_SHARE when that is longer (5 s / 0.05 = 100 s: not during this load).
    monkeypatch.setattr(api.deja, "REFIT_QUIET", 60.0)
    monkeypatch.setattr(api.deja, "REFIT_MAX_DELAY", 0.3)
    fits = _count_fits(slow)
    slow._fit_seconds = last_fit_seconds
    slow.ingest(_events(0, 20))
    stop = threading.Event()
    during: list[float] = []

    def load() -> None:
        start = 20
        while not stop.is_set():
            slow.ingest(_events(start, 5))
            start += 5

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(2.0)
        during = list(fits)
    finally:
        stop.set()
        loader.join()
    assert bool(during) is expect_fit
