"""Hypothesis over request bodies: wrong types, out-of-range numbers, unknown fields.

Every body is answered; a rejected one is a 400 that names the offending field (in `param` or
in the message), never a 5xx, and the server still serves afterwards with a clean engine.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.serve.conftest import make_engine, serve_app, wait_for
from tests.serve.test_reliability import engine_is_clean
from tokenmill.serve.api import build_app
from tokenmill.serve.protocol import ChatCompletionRequest, CompletionRequest

MAX_EXAMPLES = 120  # per endpoint
ANSWERED = {200, 400, 408, 429}  # 408: a valid body that asked for more than the test's time limit

JSON_JUNK = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(-1e30, 1e30),
              st.sampled_from([0, 1, 2, -1, 0.5, 1e9, 2**31, 2**63]), st.text(max_size=6)),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=4), children,
                                                                                max_size=2)),
    max_leaves=5,
)
ENDPOINTS = {
    "/v1/completions": (CompletionRequest, {"prompt": "Hi", "max_tokens": 2}),
    "/v1/chat/completions": (ChatCompletionRequest, {"messages": [{"role": "user", "content": "Hi"}],
                                                     "max_tokens": 2}),
}


@pytest.fixture(scope="module")
def fuzz_server(loaded_model):
    engine = make_engine(loaded_model, request_timeout_s=2.0, max_model_len=64, max_waiting_requests=8)
    with serve_app(build_app(engine)) as live:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            yield engine, live, client
    engine.shutdown()


def mutations(model: type) -> st.SearchStrategy[tuple[str, Any]]:
    """(field, value): a known field set to junk, or an unknown field."""
    known = sorted(model.model_fields)
    unknown = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=10).filter(
        lambda name: name not in model.model_fields)
    return st.one_of(st.tuples(st.sampled_from(known), JSON_JUNK), st.tuples(unknown, JSON_JUNK))


def check_answer(r: httpx.Response, fields: set[str], body: dict[str, Any]) -> None:
    """Answered; a 400 names one of the changed fields (in `param` or quoted in the message)."""
    assert r.status_code in ANSWERED, (body, r.status_code, r.text)
    if r.status_code != 400:
        return
    error = r.json()["error"]
    param = (error.get("param") or "").split(".")[0]
    named = param in fields or any(f"'{f}'" in error["message"] for f in fields)
    assert named, (body, error)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", list(ENDPOINTS))
def test_mutated_bodies_are_400_naming_the_field_never_5xx(fuzz_server, path):
    engine, live, client = fuzz_server
    model, base = ENDPOINTS[path]
    seen = {"400": 0}

    @settings(max_examples=MAX_EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(changes=st.lists(mutations(model), min_size=1, max_size=3))
    def check(changes):
        body = {**base, **dict(changes)}
        if not any(f in ("max_tokens", "max_completion_tokens", "timeout_s") for f, _ in changes):
            body["max_tokens"] = 2  # keep accepted bodies short
        r = client.post(path, json=body)
        check_answer(r, {f for f, _ in changes}, body)
        seen["400"] += r.status_code == 400

    check()
    assert seen["400"] > MAX_EXAMPLES // 3  # the fuzzer did reach the validation paths
    assert live.get("/health").status_code == 200
    ok = client.post(path, json=base)
    assert ok.status_code == 200, ok.text
    assert wait_for(lambda: engine_is_clean(engine), 15), engine.get_stats()


def test_bodies_that_are_not_objects_are_400(fuzz_server):
    _, _, client = fuzz_server
    for raw in (b"", b"[]", b"null", b"42", b'"text"', b"{", b'{"prompt": "Hi", "max_tokens": NaN}',
                b'{"prompt": "Hi", "max_tokens": 1e400}', b"\xff\xfe"):
        r = client.post("/v1/completions", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (raw, r.status_code, r.text)
        assert r.json()["error"]["type"] == "invalid_request_error"
