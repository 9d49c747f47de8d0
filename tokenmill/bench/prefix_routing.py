"""Prefix-cache hit rate over engine cores: least-loaded vs prefix routing, side by side in one Ray instance.

Workload: S system prompts x Q questions (shuffled), sent at once through the deployment handle
(LLMServer.generate_tokens) of `tokenmill serve`'s layout: R engine cores behind the API
replica(s), which choose the core per request (serve/core_routing.py), by load or with
`prefix_routing` by prompt prefix; the Serve router in front of the API replicas follows the same
switch. The hit rate is prefix_cache_hit_blocks_total x block_size over prompt_tokens_total,
summed over the cores.

    PYTHONPATH=$PWD python -m tokenmill.bench.prefix_routing --num-kv-blocks 48 96
"""

from __future__ import annotations

import argparse
import json
import random
import time
from typing import Any

WORDS = ("time river stone light green window market ocean paper garden silver music winter forest engine "
         "number story summer mountain letter table bridge yellow simple quiet little bright answer circle "
         "animal travel friend morning island question history picture machine village").split()


def shared_prefix_workload(num_systems: int, num_questions: int, system_words: int, seed: int) -> list[tuple[int, str]]:
    """(system index, prompt) pairs: each prompt is one of the system prompts followed by a question, shuffled."""
    rng = random.Random(seed)
    systems = [f"System {s}: " + " ".join(rng.choice(WORDS) for _ in range(system_words)) + "\n"
               for s in range(num_systems)]
    prompts = [(s, systems[s] + f"Question {q}: " + " ".join(rng.choice(WORDS) for _ in range(8)) + "?")
               for s in range(num_systems) for q in range(num_questions)]
    rng.shuffle(prompts)
    return prompts


def run_once(prompts: list[tuple[int, str]], *, prefix_routing: bool, num_replicas: int, engine_kwargs: dict,
             max_tokens: int, name: str) -> dict[str, Any]:
    from ray import serve

    from tokenmill.serve.deployment import ServeConfig, build_application
    from tokenmill.serve.router import PromptRequest

    config = ServeConfig(num_replicas=num_replicas, prefix_routing=prefix_routing, engine_kwargs=engine_kwargs)
    handle = serve.run(build_application(config), name=name, route_prefix=None)
    start = time.perf_counter()
    responses = [(s, handle.generate_tokens.remote(PromptRequest(prompt=p, max_tokens=max_tokens))) for s, p in prompts]
    results = [(s, r.result(timeout_s=1800)) for s, r in responses]
    wall = time.perf_counter() - start
    serve.delete(name)
    errors = [r["error"] for _, r in results if r["error"]]
    per_core: dict[str, dict[str, int]] = {}  # cumulative counters: the latest (largest) value of each core
    requests_on: dict[str, int] = {}
    systems_on: dict[str, set[int]] = {}
    for s, r in results:
        for core_id, counters in r["cores"].items():
            seen = per_core.setdefault(core_id, {"hit_blocks": 0, "prompt_tokens": 0})
            seen["hit_blocks"] = max(seen["hit_blocks"], counters["prefix_cache_hit_blocks_total"])
            seen["prompt_tokens"] = max(seen["prompt_tokens"], counters["prompt_tokens_total"])
        requests_on[r["core_id"]] = requests_on.get(r["core_id"], 0) + 1
        systems_on.setdefault(r["core_id"], set()).add(s)
    block_size = engine_kwargs.get("block_size", 16)
    hit_blocks = sum(v["hit_blocks"] for v in per_core.values())
    prompt_tokens = sum(v["prompt_tokens"] for v in per_core.values())
    return {
        "routing": "prefix" if prefix_routing else "least-loaded",
        "num_kv_blocks": engine_kwargs.get("num_kv_blocks"),
        "hit_rate": hit_blocks * block_size / prompt_tokens if prompt_tokens else 0.0,
        "hit_blocks": hit_blocks,
        "prompt_tokens": prompt_tokens,
        "wall_s": wall,
        "errors": len(errors),
        "requests_per_core": sorted(requests_on.values()),
        "systems_per_core": sorted(len(v) for v in systems_on.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--num-replicas", type=int, default=2)
    parser.add_argument("--num-systems", type=int, default=8)
    parser.add_argument("--num-questions", type=int, default=32)
    parser.add_argument("--system-words", type=int, default=100, help="Words per system prompt (default 100).")
    parser.add_argument("--max-tokens", type=int, default=2)
    parser.add_argument("--num-kv-blocks", type=int, nargs="+", default=[48, 256],
                        help="KV blocks per replica; one pair of runs per value (default 48 256).")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--ray-num-cpus", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    prompts = shared_prefix_workload(args.num_systems, args.num_questions, args.system_words, args.seed)
    ray.init(address="local", num_cpus=args.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    runs = []
    cpu_start = _cpu_s()
    try:
        serve.start()
        for blocks in args.num_kv_blocks:
            for prefix_routing in (False, True):
                kwargs = {"num_kv_blocks": blocks, "max_num_seqs": args.max_num_seqs, "max_model_len": 512}
                run = run_once(prompts, prefix_routing=prefix_routing, num_replicas=args.num_replicas,
                               engine_kwargs=kwargs, max_tokens=args.max_tokens,
                               name=f"prefix_{blocks}_{int(prefix_routing)}")
                runs.append(run)
                print(json.dumps(run), flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()
    print(f"\n{'KV blocks/core':>15} {'routing':>13} {'hit rate':>9} {'wall s':>7} {'systems/core':>13} "
          f"{'requests/core':>14}")
    for r in runs:
        print(f"{r['num_kv_blocks']:>15} {r['routing']:>13} {r['hit_rate']:>9.1%} {r['wall_s']:>7.1f} "
              f"{str(r['systems_per_core']):>13} {str(r['requests_per_core']):>14}")
    print(f"driver CPU s: {_cpu_s() - cpu_start:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    return 0


def _cpu_s() -> float:
    import os

    t = os.times()
    return t.user + t.system


if __name__ == "__main__":
    raise SystemExit(main())
