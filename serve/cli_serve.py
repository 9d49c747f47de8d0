"""`tokenmill serve [MODEL]`: the OpenAI-compatible server on Ray Serve."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import urllib.request

from tokenmill.serve.cli_args import add_engine_args, engine_kwargs

logger = logging.getLogger("tokenmill.serve")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("serve", help="Serve a model over an OpenAI-compatible HTTP API (Ray Serve).",
                                   description="Serve MODEL (default: SmolLM2-135M-Instruct) over HTTP.")
    parser.add_argument("model", nargs="?", default=None,
                        help="Local HF folder or .gguf file (default model if omitted).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", default=None, help="Model id clients send (default: the model's name).")
    parser.add_argument("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1/* routes.")
    parser.add_argument("--request-timeout-s", type=float, default=None,
                        help="Abort requests running longer than this (default: no limit).")
    parser.add_argument("--max-request-bytes", type=int, default=1024**2,
                        help="Largest request body accepted; larger ones get HTTP 413 (default 1 MiB).")
    parser.add_argument("--stream-interval", type=int, default=1,
                        help="Tokens per SSE chunk at most; under load more are coalesced (default 1).")
    group = parser.add_argument_group("replicas")
    group.add_argument("--num-replicas", type=int, default=1,
                       help="Engine cores, each holding a device and running the step loop (default 1).")
    group.add_argument("--api-replicas", type=int, default=1,
                       help="API replicas (HTTP, tokenization, SSE; no GPU) sharing the engine cores (default 1).")
    group.add_argument("--min-replicas", type=int, default=None,
                       help="Autoscale the API replicas: lower bound (with --max-replicas).")
    group.add_argument("--max-replicas", type=int, default=None,
                       help="Autoscale the API replicas: upper bound (with --min-replicas).")
    group.add_argument("--num-gpus-per-replica", type=float, default=None,
                       help="GPUs per engine core (default: 1 with CUDA, else 0).")
    group.add_argument("--num-cpus-per-replica", type=float, default=1.0,
                       help="CPUs per engine core; Ray sets its torch threads from it (default 1).")
    group.add_argument("--num-cpus-per-api-replica", type=float, default=0.5)
    group.add_argument("--ray-num-cpus", type=int, default=None, help="CPUs for the local Ray instance (default: all).")
    group.add_argument("--address", default=None,
                       help="Join this Ray cluster ('auto': the one `ray start --head` started) instead of a local one.")
    group.add_argument("--prefix-routing", action="store_true",
                       help="Route requests sharing a prompt prefix to where it is cached: engine cores by the "
                            "prompt's tokens; API replicas by deployment-handle prompt or x-session-id header.")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tokenmill.serve.deployment import ServeConfig, run_server

    config = ServeConfig(
        model=args.model, host=args.host, port=args.port, num_replicas=args.num_replicas,
        api_replicas=args.api_replicas, num_cpus_per_api_replica=args.num_cpus_per_api_replica,
        max_request_bytes=args.max_request_bytes, stream_interval=args.stream_interval,
        min_replicas=args.min_replicas, max_replicas=args.max_replicas,
        num_gpus_per_replica=args.num_gpus_per_replica, num_cpus_per_replica=args.num_cpus_per_replica,
        ray_num_cpus=args.ray_num_cpus, api_key=args.api_key, served_model_name=args.served_model_name,
        request_timeout_s=args.request_timeout_s, engine_kwargs=engine_kwargs(args),
        ray_address=args.address, prefix_routing=args.prefix_routing,
    )
    api = (f"{config.min_replicas}..{config.max_replicas} (autoscaling)" if config.min_replicas is not None
           else str(config.api_replicas))
    logger.info("starting: model=%s engine cores=%d (gpus each: %s) api replicas=%s",
                args.model or "default (SmolLM2-135M-Instruct)", config.num_replicas, config.gpus_per_replica(), api)
    run_server(config, on_ready=lambda url: announce(url, args.api_key))
    return 0


def announce(url: str, api_key: str | None) -> None:
    """Log what the server holds and a ready-to-paste curl line."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    request = urllib.request.Request(f"{url}/v1/models", headers=headers)
    with urllib.request.urlopen(request, timeout=60) as response:
        card = json.load(response)["data"][0]
    capacity = card.get("kv_cache_capacity_tokens")
    max_len = card["max_model_len"]
    logger.info("model: %s (max_model_len %d)", card["id"], max_len)
    if capacity:
        logger.info("KV cache per replica: %d tokens = %.1f full-length sequences; max concurrency per replica: %s "
                    "sequences", capacity, capacity / max_len, card.get("max_num_seqs"))
    body = json.dumps({"model": card["id"], "prompt": "Once upon a time", "max_tokens": 32})
    auth = f" -H {shlex.quote('Authorization: Bearer ' + api_key)}" if api_key else ""
    curl = f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"
    logger.info("ready at %s (Ctrl-C to stop)", url)
    print(f"\nReady at {url}. Try:\n  {curl}\n", flush=True)
