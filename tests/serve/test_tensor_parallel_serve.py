"""Tensor parallelism under Ray Serve: one engine core whose model is sharded over 3 Ray worker
ranks (gloo on the CPU; a placement group of 1 + 3 bundles) serves over HTTP the greedy tokens of the
unsharded offline engine, and stopping Serve leaves no rank process behind."""

from __future__ import annotations

import httpx
import psutil
import pytest

from tests.serve.conftest import free_port, wait_for

PROMPTS = ["The capital of France is", "def fibonacci(n):"]


def rank_processes() -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any("TPWorker" in part for part in process.info["cmdline"] or ()):
            found.append(process)
    return found


@pytest.fixture(scope="module")
def tp_server():
    from tokenmill.serve.deployment import ServeConfig, start, stop

    # SmolLM2-135M: 9 query and 3 kv heads, so 3 ranks. Ray counts logical CPUs: 0.5 for the
    # core's driver, 1 per rank, 0.25 for the API replica.
    config = ServeConfig(
        port=free_port(), num_replicas=1, api_replicas=1, num_gpus_per_replica=0, num_cpus_per_replica=0.5,
        num_cpus_per_api_replica=0.25, ray_num_cpus=4,
        engine_kwargs={"max_model_len": 128, "max_num_seqs": 4, "device": "cpu", "tensor_parallel_size": 3},
    )
    try:
        url = start(config)
        assert wait_for(lambda: _healthy(url), 180), "the tensor-parallel server never became healthy"
        yield url
    finally:
        stop()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=10).status_code == 200
    except httpx.HTTPError:
        return False


def test_served_tensor_parallel_gives_the_offline_greedy_tokens_and_stops_clean(tp_server):
    from tokenmill import LLM, SamplingParams

    assert len(rank_processes()) == 3  # the core's three ranks, one process each
    served = []
    for prompt in PROMPTS:
        r = httpx.post(tp_server + "/v1/completions", timeout=120,
                       json={"prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert r.status_code == 200, r.text
        served.append(r.json()["choices"][0]["text"])
    offline = LLM(max_model_len=128).generate(PROMPTS, SamplingParams(max_new_tokens=12, ignore_eos=True))
    assert served == [out.outputs[0].text for out in offline]

    from tokenmill.serve.deployment import stop

    stop()
    assert wait_for(lambda: not rank_processes(), 15), [p.pid for p in rank_processes()]
