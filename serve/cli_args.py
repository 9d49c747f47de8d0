"""Engine options shared by the CLI subcommands (flags -> LLMEngine.from_args keywords)."""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.engine_flags import add_async_scheduling_flags


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    group.add_argument("--max-num-seqs", type=int, default=64, help="Sequences in a batch at most (default 64).")
    group.add_argument("--max-num-batched-tokens", type=int, default=2048, help="Token budget per step (default 2048).")
    group.add_argument("--max-model-len", type=int, default=None,
                       help="Context length (default: the model's, capped at 4096).")
    group.add_argument("--num-kv-blocks", type=int, default=None, help="KV cache blocks (default: sized from memory).")
    group.add_argument("--block-size", type=int, default=16, help="Tokens per KV block (default 16).")
    group.add_argument("--kv-cache-memory-gb", type=float, default=None,
                       help="KV cache budget on CPU in GiB (default 0.5).")
    group.add_argument("--max-waiting-requests", type=int, default=None,
                       help="Bound on the waiting queue; more requests get HTTP 429 (default: unbounded).")
    group.add_argument("--no-prefix-caching", action="store_true", help="Disable prefix caching.")
    group.add_argument("--no-chunked-prefill", action="store_true", help="Disable chunked prefill.")
    group.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    group.add_argument("--device", default="auto", help="auto, cpu or cuda (default auto).")
    group.add_argument("--cache-dir", default=None, help="Converted-weights cache (default ~/.cache/tokenmill).")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--quantization", default=None, choices=("int8", "int4"),
                       help="Quantized linear layers on CPU: int8 (fast) or int4 (small); default: exact float32.")
    group.add_argument("--num-threads", type=int, default=None,
                       help="torch CPU threads (default: OMP_NUM_THREADS, else the cores this process may use).")
    eager = group.add_mutually_exclusive_group()
    eager.add_argument("--enforce-eager", action="store_true", default=None,
                       help="Run every step eager: no compiled forward, no CUDA graphs "
                            "(default: compiled with CUDA graphs on CUDA, eager on the CPU).")
    eager.add_argument("--compile", dest="enforce_eager", action="store_false",
                       help="Decode steps through the compiled forward on every device, the CPU included "
                            "(inductor; each decode bucket compiles on first use).")
    add_async_scheduling_flags(group)
    group.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                       help="Shard the model over N ranks (Ray actors, one GPU each) (default 1).")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    kwargs: dict[str, Any] = {
        "max_num_seqs": args.max_num_seqs,
        "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len,
        "num_kv_blocks": args.num_kv_blocks,
        "block_size": args.block_size,
        "max_waiting_requests": args.max_waiting_requests,
        "enable_prefix_caching": not args.no_prefix_caching,
        "enable_chunked_prefill": not args.no_chunked_prefill,
        "dtype": args.dtype,
        "device": args.device,
        "cache_dir": args.cache_dir,
        "seed": args.seed,
        "quantization": args.quantization,
        "num_threads": args.num_threads,
        "enforce_eager": args.enforce_eager,
        "async_scheduling": args.async_scheduling,
        "tensor_parallel_size": args.tensor_parallel_size,
    }
    if args.kv_cache_memory_gb is not None:
        kwargs["kv_cache_memory_bytes"] = int(args.kv_cache_memory_gb * 1024**3)
    return kwargs
