"""Fuzz every operation of the OpenAPI schema: no input may cause a 5xx or a response that
breaks the documented schema. Bounded: a few examples per operation."""

from __future__ import annotations

import atexit
import tempfile
from pathlib import Path

import hypothesis
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from api.app import create_app
from api.deja import Deja
from api.settings import Settings
from embeddings import HashingEncoder

_DIR = Path(tempfile.mkdtemp(prefix="deja-fuzz-"))
_DEJA = Deja.open(_DIR, encoder=HashingEncoder(64), settings=Settings(sweep_seconds=0))
atexit.register(_DEJA.close)
_APP = create_app(_DEJA)
_AUTH = {"Authorization": f"Bearer {_DEJA.bootstrap_key}"}

schema = schemathesis.openapi.from_asgi("/openapi.json", _APP)


@schema.parametrize()
@hypothesis.settings(max_examples=12, deadline=None,
                     suppress_health_check=list(hypothesis.HealthCheck))
def test_no_5xx_and_responses_match_the_schema(case: schemathesis.Case) -> None:
    if case.path == "/v1/backup":
        # Writes files where the fuzzer says; covered by its own test.
        return
    case.call_and_validate(headers=_AUTH,
                           checks=[not_a_server_error, response_schema_conformance])
