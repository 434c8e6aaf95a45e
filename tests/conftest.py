"""Shared fixtures: an in-memory KB, the deterministic fake encoder, a Deja on a temp dir and its
HTTP client, and (once per session) the real packaged sentence-transformers model."""

from __future__ import annotations

import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import settings
from hypothesis.configuration import set_hypothesis_home_dir

from api.app import create_app
from api.deja import Deja
from api.settings import Settings
from embeddings import HashingEncoder, SentenceTransformerEncoder
from kb import Store

# Reproducible property tests, and nothing of Hypothesis's left in the working tree.
set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "deja-hypothesis")
settings.register_profile("deja", derandomize=True, database=None, deadline=None)
settings.load_profile("deja")


@pytest.fixture
def store() -> Iterator[Store]:
    s = Store(":memory:")
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def fake_encoder() -> HashingEncoder:
    return HashingEncoder(64)


@pytest.fixture
def deja(tmp_path: Path, fake_encoder: HashingEncoder) -> Iterator[Deja]:
    # No background SLA sweep: tests that need one call ``deja.desk.sweep()`` themselves.
    d = Deja.open(tmp_path, encoder=fake_encoder, settings=Settings(sweep_seconds=0))
    try:
        yield d
    finally:
        d.close()


@pytest.fixture
def client(deja: Deja) -> Iterator[TestClient]:
    """A client holding the data dir's first-start admin key."""
    assert deja.bootstrap_key is not None
    with TestClient(create_app(deja),
                    headers={"Authorization": f"Bearer {deja.bootstrap_key}"}) as c:
        yield c


@pytest.fixture
def anonymous(deja: Deja) -> Iterator[TestClient]:
    """A client without any key."""
    with TestClient(create_app(deja)) as c:
        yield c


@pytest.fixture(scope="session")
def real_encoder_loaded() -> tuple[SentenceTransformerEncoder, list[warnings.WarningMessage]]:
    """The real model and the warnings its loading raised.

    The warnings are recorded here instead of failing every real-model test at set-up;
    ``test_quality_real.test_real_model_loads_without_warnings`` holds the loader to the project's
    warnings-are-errors policy.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        encoder = SentenceTransformerEncoder()
    return encoder, list(caught)


@pytest.fixture(scope="session")
def real_encoder(
    real_encoder_loaded: tuple[SentenceTransformerEncoder, list[warnings.WarningMessage]],
) -> SentenceTransformerEncoder:
    return real_encoder_loaded[0]
