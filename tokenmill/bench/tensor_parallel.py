"""Tensor parallel N vs 1, side by side in one run: output tok/s, ms per step, and what the executor adds.

The added time per step is measured by the executor itself: the driver's wall time of `run(batch)`
(pack, one message to every rank, wait, logits back) minus rank 0's own forward time. Each TP > 1
runs twice: the step message over a Ray compiled graph (the executor's default on GPU ranks) and as
one Ray task per rank (its default on CPU ranks); `--step-messages` picks.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tokenmill.bench.tensor_parallel --models tiny default
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any


def tiny_llama_loaded() -> Any:
    """A 4-layer random Llama (hidden 256, 8 heads, 4 KV heads) with the default model's tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from tokenmill.engine.attention_backend import register_attention
    from tokenmill.engine.model_loader import LoadedModel, load_model

    default = load_model(attn_implementation=register_attention())
    config = LlamaConfig(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=default.model.config.vocab_size,
                         max_position_embeddings=1024, eos_token_id=None, bos_token_id=None)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention()).eval()
    return LoadedModel(model=model, tokenizer=default.tokenizer, generation_config=default.generation_config,
                       model_path="", max_model_len=1024)


def run_one(model_name: str, tp: int, args: argparse.Namespace, step_messages: str = "graph") -> dict[str, Any]:
    import psutil
    import torch

    from tokenmill.engine.llm import LLM
    from tokenmill.engine.sampling_params import SamplingParams

    loaded = tiny_llama_loaded() if model_name == "tiny" else None
    llm = LLM(None, loaded=loaded, tensor_parallel_size=tp, max_num_seqs=args.num_requests, seed=0)
    engine = llm.llm_engine
    try:
        if tp > 1:
            step_messages = engine.runner.set_step_messages(step_messages)
        g = torch.Generator().manual_seed(0)
        vocab = engine.vocab_size
        prompts = [torch.randint(100, vocab, (args.prompt_len,), generator=g).tolist() for _ in range(args.num_requests)]
        params = SamplingParams(max_new_tokens=args.output_len, ignore_eos=True)
        llm.generate(prompts[:1], SamplingParams(max_new_tokens=2, ignore_eos=True), use_tqdm=False)  # warm-up
        runner = engine.runner
        steps = [0]
        run = runner.run

        def counted_run(batch: Any) -> Any:
            steps[0] += 1
            return run(batch)

        runner.run = counted_run  # instance attribute: counts this benchmark's steps only
        overhead_before = getattr(runner, "total_overhead_s", 0.0)
        procs = [psutil.Process()] + [psutil.Process(p) for p in getattr(runner, "worker_pids", [])]
        cpu_before = sum(sum(p.cpu_times()[:2]) for p in procs)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
        cpu = sum(sum(p.cpu_times()[:2]) for p in procs) - cpu_before
        tokens = sum(len(o.outputs[0].token_ids) for o in outputs)
        steps = steps[0]
        return {
            "model": model_name, "tensor_parallel_size": tp, "step_messages": step_messages if tp > 1 else "-",
            "output_tokens": tokens, "wall_s": wall, "cpu_s": cpu,
            "output_tok_s": tokens / wall, "steps": steps,
            "ms_per_step": wall / steps * 1000,
            "added_ms_per_step": (getattr(runner, "total_overhead_s", 0.0) - overhead_before) / steps * 1000,
        }
    finally:
        engine.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "default"], choices=("tiny", "default"))
    parser.add_argument("--tensor-parallel-sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--step-messages", nargs="+", default=["graph", "tasks"], choices=("graph", "tasks"),
                        help="how TP > 1 sends each step: the compiled graph, a Ray task per rank, or both")
    parser.add_argument("--json", default=None, metavar="PATH")
    args = parser.parse_args(argv)

    import ray

    ray.init(address="local", num_cpus=max(args.tensor_parallel_sizes), include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        for model_name in args.models:
            for tp in args.tensor_parallel_sizes:
                for step_messages in (args.step_messages if tp > 1 else ["-"]):
                    row = run_one(model_name, tp, args, step_messages)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    print(f"\n{'model':>8} {'TP':>3} {'messages':>8} {'out tok/s':>10} {'vs TP1':>7} {'ms/step':>8} "
          f"{'added ms/step':>14} {'wall s':>7} {'CPU s':>7}")
    base = {r["model"]: r["output_tok_s"] for r in rows if r["tensor_parallel_size"] == 1}
    for r in rows:
        ratio = r["output_tok_s"] / base[r["model"]] if r["model"] in base else float("nan")
        ms = f"{r['ms_per_step']:.1f}"
        print(f"{r['model']:>8} {r['tensor_parallel_size']:>3} {r['step_messages']:>8} {r['output_tok_s']:>10.1f} "
              f"{ratio:>6.2f}x {ms:>8} "
              f"{r['added_ms_per_step']:>14.2f} {r['wall_s']:>7.1f} {r['cpu_s']:>7.1f}")
    print(f"threads per process: OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "runs": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
