"""Ray Serve layout: two engine cores and two API replicas (each connected to both cores) behind one endpoint."""

from __future__ import annotations

import asyncio
from collections import Counter

import httpx
import pytest

from tests.serve.conftest import free_port
from tokenmill.serve.api import REPLICA_HEADER

NUM_REQUESTS = 12


@pytest.fixture(scope="module")
def ray_server():
    from tokenmill.serve.deployment import ServeConfig, start, stop

    config = ServeConfig(
        port=free_port(), num_replicas=2, api_replicas=2, num_gpus_per_replica=0, num_cpus_per_replica=0.5,
        num_cpus_per_api_replica=0.25, ray_num_cpus=2,
        engine_kwargs={"max_model_len": 128, "max_num_seqs": 4, "device": "cpu"},
    )
    try:
        yield config, start(config)
    finally:
        stop()


def core_stats(name: str) -> dict:
    from ray import serve

    from tokenmill.serve.deployment import APP_NAME

    return serve.get_deployment_handle(name, APP_NAME).stats.remote().result(timeout_s=30)


def test_two_api_replicas_and_two_cores_share_the_load_and_all_requests_complete(ray_server):
    config, url = ray_server
    assert url == f"http://127.0.0.1:{config.port}"
    model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]

    async def burst():
        async with httpx.AsyncClient(base_url=url, timeout=180) as client:
            async def one(i):
                body = {"model": model, "prompt": f"Fact {i}:", "max_tokens": 4, "temperature": 0}
                r = await client.post("/v1/completions", json=body)
                assert r.status_code == 200, r.text
                assert r.json()["choices"][0]["finish_reason"] in ("length", "stop")
                return r.headers[REPLICA_HEADER]

            return await asyncio.gather(*(one(i) for i in range(NUM_REQUESTS)))

    before = [core_stats(name)["prompt_tokens_total"] for name in ("EngineCore", "EngineCore1")]
    replicas = Counter(asyncio.run(burst()))
    assert len(replicas) == 2, replicas
    after = [core_stats(name)["prompt_tokens_total"] for name in ("EngineCore", "EngineCore1")]
    assert all(a > b for a, b in zip(after, before)), (before, after)  # both cores served
    assert sum(replicas.values()) == NUM_REQUESTS
    models = {httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["replica_id"] for _ in range(10)}
    assert models <= set(replicas)


def test_streaming_and_health_through_serve(ray_server):
    _, url = ray_server
    assert httpx.get(url + "/health", timeout=30).status_code == 200
    body = {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and lines[-1] == "data: [DONE]" and len(lines) >= 2
    assert httpx.post(url + "/v1/completions", json={"prompt": "Hi", "bogus": 1}, timeout=30).status_code == 400


def test_engine_cores_run_at_normal_priority(ray_server):
    import psutil

    ours = psutil.Process().children(recursive=True)  # this test's Ray instance (not another one on the machine)
    cores = [p for p in ours if any("ServeReplica:tokenmill:EngineCore" in part for part in p.cmdline())]
    assert len(cores) == 2, [p.cmdline()[0] for p in ours]
    mine = psutil.Process().nice()
    assert [p.nice() for p in cores] == [mine, mine]  # the driver's priority, not Ray's worker default of 15


def test_announce_prints_a_curl_line(ray_server, capsys):
    from tokenmill.serve.cli_serve import announce

    _, url = ray_server
    announce(url, None)
    out = capsys.readouterr().out
    assert f"curl {url}/v1/completions" in out and '"prompt"' in out


def test_serve_config_validation_and_replica_options():
    from tokenmill.serve.deployment import ServeConfig, build_application

    with pytest.raises(ValueError, match="min_replicas"):
        ServeConfig(min_replicas=1)
    with pytest.raises(ValueError, match="num_replicas"):
        ServeConfig(num_replicas=0)
    with pytest.raises(ValueError, match="api_replicas"):
        ServeConfig(api_replicas=0)
    with pytest.raises(ValueError, match="stream_interval"):
        ServeConfig(stream_interval=0)
    auto = build_application(ServeConfig(min_replicas=1, max_replicas=3, num_gpus_per_replica=0,
                                         engine_kwargs={"max_num_seqs": 16}))._bound_deployment
    scaling = auto._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.max_replicas) == (1, 3)
    assert auto.max_ongoing_requests >= 16 and auto.ray_actor_options["num_gpus"] == 0
    app = build_application(ServeConfig(num_replicas=2, api_replicas=3, num_gpus_per_replica=1))
    api = app._bound_deployment
    assert api.num_replicas == 3 and api.ray_actor_options["num_gpus"] == 0  # API replicas hold no GPU
    cores = [arg._bound_deployment for arg in api.init_args[1]]
    assert [c.name for c in cores] == ["EngineCore", "EngineCore1"]
    assert all(c.num_replicas == 1 and c.ray_actor_options["num_gpus"] == 1 for c in cores)
    assert api.max_ongoing_requests >= 2 * 64  # a full batch of each core (default max_num_seqs 64)
