"""Property-based fuzzing of the app's OpenAPI schema: no input may produce a 5xx."""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error

from tests.serve.conftest import make_engine
from tokenmill.serve.api import build_app

MAX_EXAMPLES = 20  # per operation


@pytest.fixture(scope="module")
def api_schema(loaded_model):
    # A short context and a per-request time limit bound the cost of whatever the fuzzer asks for
    # (a request that runs too long ends as a 408, which is not a server error).
    engine = make_engine(loaded_model, request_timeout_s=1.5, max_model_len=64, max_num_seqs=8)
    yield schemathesis.openapi.from_asgi("/openapi.json", build_app(engine))
    assert engine.is_healthy
    engine.shutdown()


def test_no_server_errors(api_schema):
    operations = [result.ok() for result in api_schema.get_all_operations()]
    paths = {op.path for op in operations}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"} <= paths
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck),
                  phases=[Phase.explicit, Phase.generate], database=None)
        def check(case):
            case.call_and_validate(checks=[not_a_server_error])

        check()
