"""Where one decode step's time goes, at a steady batch: the step, the forward inside it, and the
host time around the forward (schedule, input preparation, sampling, update, outputs).

    python -m tokenmill.bench.step_profile                                  # random 1B Llama, 256 requests
    M=tiny D=cpu DT=float32 N=16 python -m tokenmill.bench.step_profile     # the same, small, on the CPU
    python -m tokenmill.bench.step_profile --cprofile                       # + cProfile of the timed steps

`tokenmill bench throughput` runs `profile_steps` after tokenmill's greedy run (--no-step-profile
turns it off). Only `StepTimer` knows how the engine is built: it reads the engine through
`LLMEngine.step()` and `engine.runner.run(batch)` (wrapped on the instance while profiling, so the
engine runs exactly as usual), plus the runner's input preparation when it has a separate call
for it (RUNNER_PREPARE_METHODS), which counts as host time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from tokenmill.engine_flags import add_async_scheduling_flags

# Runner methods that build the forward's input tensors (timed as host work when present).
RUNNER_PREPARE_METHODS = ("prepare_inputs",)
MAX_PREFILL_STEPS = 10_000
WARMUP_STEPS = 3
GPU_PROFILE_STEPS = 5
TOP_KERNELS = 12


@dataclass(frozen=True)
class StepProfile:
    device: str
    batch_size: int  # sequences decoding in every timed step
    num_steps: int
    prefill_steps: int  # steps before every request was decoding
    step_ms: float  # median LLMEngine.step() wall time
    step_ms_min: float
    run_ms: float  # median engine.runner.run(batch): input preparation + forward + logits
    prepare_ms: float | None  # median input preparation inside run (None: no separate call to time)
    forward_ms: float  # median run - prepare: the model forward alone
    host_ms: float  # median step - forward: schedule + prepare + sample + update + outputs
    cpu_ms_per_step: float  # mean process CPU time per step, all threads
    forward_cpu_ms: float  # median process CPU time in runner.run less input preparation
    host_cpu_ms: float  # median CPU time of the step outside the forward (robust on a busy machine)
    gpu_kernel_ms: float | None = None  # CUDA kernel time per step (torch.profiler), CUDA only
    gpu_note: str | None = None  # why gpu_kernel_ms is missing
    # The CUDA kernels that take the most time: (name, ms per step, launches per step), CUDA only.
    gpu_top_kernels: list[tuple[str, float, float]] | None = None
    # Wall time per step over num_steps steps run back to back with no sync between them: what a
    # serving loop gets, and where overlapped steps (async_scheduling) show on a GPU.
    pipelined_step_ms: float | None = None
    async_scheduling: bool = False
    outputs: str = "core"  # the requests' output mode (OUTPUT_MODES)

    @property
    def host_fraction(self) -> float:
        return self.host_ms / self.step_ms if self.step_ms > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "host_fraction": self.host_fraction}

    def format(self) -> str:
        prepare = "n/a" if self.prepare_ms is None else f"{self.prepare_ms:.2f} ms"
        lines = [
            f"step profile ({self.device}): {self.num_steps} decode steps at batch {self.batch_size} "
            f"(after {self.prefill_steps} prefill steps; outputs as '{self.outputs}')",
            f"  decode step      median {self.step_ms:8.2f} ms   min {self.step_ms_min:.2f} ms   "
            f"CPU {self.cpu_ms_per_step:.2f} ms/step",
            f"  forward alone    median {self.forward_ms:8.2f} ms   (runner.run {self.run_ms:.2f} ms, "
            f"input preparation {prepare})",
            f"  host outside the forward {self.host_ms:8.2f} ms   ({100 * self.host_fraction:.0f}% of the step: "
            "schedule + prepare + sample + update)",
            f"  CPU time per step: forward {self.forward_cpu_ms:.2f} ms, outside the forward {self.host_cpu_ms:.2f} ms",
        ]
        if self.pipelined_step_ms is not None:
            mode = "overlapped steps" if self.async_scheduling else "synchronous steps"
            lines.append(f"  back to back     {self.pipelined_step_ms:8.2f} ms per step ({mode}, no sync between steps)")
        if self.gpu_kernel_ms is not None:
            busy = self.gpu_kernel_ms / self.step_ms if self.step_ms > 0 else 0.0
            line = f"  GPU kernels      {self.gpu_kernel_ms:8.2f} ms per step ({100 * busy:.0f}% busy"
            if self.pipelined_step_ms:
                line += f"; {100 * self.gpu_kernel_ms / self.pipelined_step_ms:.0f}% of back-to-back steps"
            lines.append(line + ")")
            for name, ms, launches in self.gpu_top_kernels or []:
                lines.append(f"    {ms:7.3f} ms  {launches:6.1f} launches  {name[:90]}")
        elif self.gpu_note:
            lines.append(f"  GPU kernels      n/a ({self.gpu_note})")
        return "\n".join(lines)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Times `engine.step()` and, inside it, the runner's `run` (and input preparation, if separate).

    Inside `with StepTimer(engine) as timer:` the runner's methods are wrapped on the instance
    (timing with a device sync on each side); on exit the wrappers are removed.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.runner = engine.runner
        self.device = torch.device(getattr(self.runner, "device", "cpu"))
        self._patched: list[str] = []
        self.num_runs = 0
        self._run_s = 0.0
        self._prepare_s: float | None = None
        self._forward_cpu_s = 0.0
        self.last_batch_shape: tuple[int, int] = (0, 0)  # (sequences, most new tokens of one) of the last run

    def _wrap(self, name: str, record: Callable[[float, float, tuple], None]) -> None:
        original = getattr(self.runner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            _sync(self.device)
            start, cpu_start = time.perf_counter(), time.process_time()
            out = original(*args, **kwargs)
            _sync(self.device)
            record(time.perf_counter() - start, time.process_time() - cpu_start, args)
            return out

        setattr(self.runner, name, timed)
        self._patched.append(name)

    def _record_run(self, seconds: float, cpu_seconds: float, args: tuple) -> None:
        self.num_runs += 1
        self._run_s += seconds
        self._forward_cpu_s += cpu_seconds
        batch = args[0] if args else None
        num_new = list(getattr(batch, "num_new_tokens", []) or [])
        self.last_batch_shape = (len(num_new), max(num_new, default=0))

    def _record_prepare(self, seconds: float, cpu_seconds: float, args: tuple) -> None:
        self._prepare_s = (self._prepare_s or 0.0) + seconds
        self._forward_cpu_s -= cpu_seconds  # input preparation is host work

    def __enter__(self) -> "StepTimer":
        self._wrap("run", self._record_run)
        for name in RUNNER_PREPARE_METHODS:
            if callable(getattr(self.runner, name, None)):
                self._wrap(name, self._record_prepare)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name in self._patched:
            delattr(self.runner, name)  # the class's method shows through again
        self._patched.clear()

    def step(self) -> tuple[float, float, float | None, float, float]:
        """One engine step: (step s, run s, prepare s or None, step CPU s, forward CPU s)."""
        self._run_s, self._prepare_s, self._forward_cpu_s = 0.0, None, 0.0
        _sync(self.device)
        start, cpu_start = time.perf_counter(), time.process_time()
        self.engine.step()
        _sync(self.device)
        step_s, step_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        return step_s, self._run_s, self._prepare_s, step_cpu_s, self._forward_cpu_s


def top_kernels(events: Any, num_steps: int, keep: int = TOP_KERNELS) -> tuple[float, list[tuple[str, float, float]]]:
    """Kernel time per step and the `keep` costliest kernels (name, ms per step, launches per step)
    of torch.profiler's key averages (events with key, device_type, self_device_time_total, count)."""
    kernels = [e for e in events if e.device_type.name == "CUDA"]
    total_ms = sum(e.self_device_time_total for e in kernels) / 1e3 / num_steps
    kernels.sort(key=lambda e: e.self_device_time_total, reverse=True)
    return total_ms, [(e.key, e.self_device_time_total / 1e3 / num_steps, e.count / num_steps) for e in kernels[:keep]]


def _gpu_kernel_ms_per_step(engine: Any, num_steps: int) -> tuple[float | None, str | None, list | None]:
    from torch.profiler import ProfilerActivity, profile

    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(num_steps):
                engine.step()
            torch.cuda.synchronize()
        total_ms, top = top_kernels(prof.key_averages(), num_steps)
        return total_ms, None, top
    except Exception as error:  # the profiler is a diagnostic: its failure must not lose the timings
        return None, f"torch.profiler failed: {type(error).__name__}: {error}", None


# What the profiled requests ask the engine for, as each front end runs them:
# "core": token deltas, no text (the serving engine core: the API side detokenizes);
# "stream": every step's whole output with its text (in-process streaming, AsyncLLMEngine);
# "final": one output at the end (LLM.generate).
OUTPUT_MODES = {
    "core": {"output_kind": "delta", "detokenize": False},
    "stream": {"output_kind": "cumulative", "detokenize": True},
    "final": {"output_kind": "final", "detokenize": True},
}


def profile_steps(
    engine: Any, prompts: list[list[int]], num_steps: int = 30, gpu_kernels: bool = True, outputs: str = "core"
) -> StepProfile:
    """Run `prompts` (one request each, greedy, EOS ignored, outputs as OUTPUT_MODES[outputs]) until
    all decode, then time `num_steps`."""
    from tokenmill.engine.sampling_params import SamplingParams

    if not prompts or num_steps < 1:
        raise ValueError(f"need prompts and num_steps >= 1 (got {len(prompts)} prompts, num_steps={num_steps})")
    n = len(prompts)
    extra = WARMUP_STEPS + 2 * num_steps + GPU_PROFILE_STEPS + 4
    ids = [f"step-profile-{i}" for i in range(n)]
    budget = engine.scheduler_config.max_num_batched_tokens
    prefill_bound = math.ceil(sum(map(len, prompts)) / max(1, budget - n)) + 4
    for rid, prompt in zip(ids, prompts):
        max_new = min(prefill_bound + extra, engine.max_model_len - len(prompt))
        engine.add_request(rid, prompt, SamplingParams(max_new_tokens=max_new, ignore_eos=True, do_sample=False,
                                                       **OUTPUT_MODES[outputs]))
    try:
        with StepTimer(engine) as timer:
            prefill_steps = 0
            while timer.last_batch_shape != (n, 1):  # until every request decodes one token a step
                if prefill_steps >= MAX_PREFILL_STEPS or not engine.has_unfinished_requests():
                    raise RuntimeError(f"the {n} requests never all decoded together (batch {timer.last_batch_shape})")
                timer.step()
                prefill_steps += 1
                if timer.num_runs == 0:
                    raise RuntimeError("engine.step() did not call engine.runner.run: adapt StepTimer to the engine")
            for _ in range(WARMUP_STEPS):
                timer.step()
            samples = []
            for _ in range(num_steps):
                sample = timer.step()
                if timer.last_batch_shape != (n, 1):
                    raise RuntimeError(f"batch changed to {timer.last_batch_shape} while timing; give more tokens")
                samples.append(sample)
        pipelined_ms = _pipelined_step_ms(engine, timer.device, num_steps)
        gpu_ms, gpu_note, gpu_top = None, None, None
        device = timer.device
        if device.type == "cuda" and gpu_kernels:
            gpu_ms, gpu_note, gpu_top = _gpu_kernel_ms_per_step(engine, GPU_PROFILE_STEPS)
        elif device.type != "cuda":
            gpu_note = "not a CUDA device"
    finally:
        engine.abort_request(ids)
    steps = [s[0] for s in samples]
    runs = [s[1] for s in samples]
    prepares = [s[2] for s in samples]
    forwards = [r - (p or 0.0) for r, p in zip(runs, prepares)]
    ms = lambda values: 1e3 * statistics.median(values)  # noqa: E731
    return StepProfile(
        device=str(device),
        batch_size=n,
        num_steps=num_steps,
        prefill_steps=prefill_steps,
        step_ms=ms(steps),
        step_ms_min=1e3 * min(steps),
        run_ms=ms(runs),
        prepare_ms=None if any(p is None for p in prepares) else ms(prepares),
        forward_ms=ms(forwards),
        host_ms=ms([s - f for s, f in zip(steps, forwards)]),
        cpu_ms_per_step=1e3 * statistics.fmean(s[3] for s in samples),
        forward_cpu_ms=ms([s[4] for s in samples]),
        host_cpu_ms=ms([s[3] - s[4] for s in samples]),
        gpu_kernel_ms=gpu_ms,
        gpu_note=gpu_note,
        gpu_top_kernels=gpu_top,
        pipelined_step_ms=pipelined_ms,
        async_scheduling=bool(getattr(engine.scheduler_config, "async_scheduling", False)),
        outputs=outputs,
    )


def _pipelined_step_ms(engine: Any, device: torch.device, num_steps: int) -> float:
    """Wall ms per step of `num_steps` engine steps with one sync at the end (the requests were
    given tokens for them: the batch stays whole)."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(num_steps):
        engine.step()
    _sync(device)
    return 1e3 * (time.perf_counter() - start) / num_steps


def profile_kv_blocks(prompts: list[list[int]], num_steps: int, block_size: int, budget: int) -> int:
    """KV blocks for `profile_steps` on these prompts (every request at its longest at once)."""
    n = len(prompts)
    longest = max(map(len, prompts)) + math.ceil(sum(map(len, prompts)) / max(1, budget - n)) + 4
    longest += WARMUP_STEPS + 2 * num_steps + GPU_PROFILE_STEPS + 4
    return n * (math.ceil(longest / block_size) + 1) + 16


# ------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    env = os.environ  # the entry point's defaults only: M, D, DT, N as in the original tool
    p = argparse.ArgumentParser(prog="step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--random-model", default=env.get("M", "1b"), choices=("135m", "1b", "tiny"))
    p.add_argument("--model", default=None, help="A local model instead of --random-model (default model: 'default').")
    p.add_argument("--device", default=env.get("D", "auto"))
    p.add_argument("--dtype", default=env.get("DT", "auto"))
    p.add_argument("--num-requests", type=int, default=int(env.get("N", "256")))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    add_async_scheduling_flags(p)
    p.add_argument("--enforce-eager", action="store_true", help="No compiled forward / CUDA graphs.")
    p.add_argument("--outputs", default="core", choices=sorted(OUTPUT_MODES),
                   help="The requests' outputs: core (token deltas, no text: the serving engine core; default), "
                        "stream (whole output and text every step), final (LLM.generate).")
    p.add_argument("--cprofile", action="store_true", help="Also print cProfile of the timed steps.")
    p.add_argument("--json", default=None, metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    from tokenmill.bench.models import load_bench_model, vocab_size_of
    from tokenmill.bench.workload import LengthRange, random_token_workload
    from tokenmill.engine.llm_engine import LLMEngine

    args = _parser().parse_args(argv)
    model = None if args.model == "default" else args.model
    random_model = None if args.model else args.random_model
    loaded = load_bench_model(model, random_model, args.device, args.dtype, args.seed)
    requests = random_token_workload(
        args.num_requests, LengthRange(32, 256), LengthRange(64, 256), vocab_size_of(loaded.model), args.seed
    )
    prompts = [list(r.prompt_ids) for r in requests]
    engine = LLMEngine.from_args(
        loaded=loaded, max_num_seqs=len(prompts), max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, device=args.device, dtype=args.dtype, seed=args.seed,
        num_kv_blocks=profile_kv_blocks(prompts, args.steps, args.block_size, args.max_num_batched_tokens),
        async_scheduling=args.async_scheduling, enforce_eager=True if args.enforce_eager else None,
    )
    result = profile_steps(engine, prompts, args.steps, outputs=args.outputs)
    print(result.format(), flush=True)
    if args.cprofile:
        _print_cprofile(engine, prompts, args.steps, args.outputs)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result.as_dict(), f, indent=2)
    return 0


def _print_cprofile(engine: Any, prompts: list[list[int]], num_steps: int, outputs: str) -> None:
    import cProfile
    import io
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    profile_steps(engine, prompts, num_steps, gpu_kernels=False, outputs=outputs)
    profiler.disable()
    for key, rows in (("cumulative", 45), ("tottime", 30)):
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(rows)
        print(text.getvalue()[:9000])


if __name__ == "__main__":
    sys.exit(main())
