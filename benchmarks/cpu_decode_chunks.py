"""CPU paged decode attention: one gathered copy of the whole batch against chunks of sequences.

    PYTHONPATH=$PWD python benchmarks/cpu_decode_chunks.py [--layers 30] [--threads 1]
    PYTHONPATH=$PWD python benchmarks/cpu_decode_chunks.py --engine [--threads 1] [--rounds 2]

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head_dim 64, block 16). Each step: the
KV write and the decode attention of every layer through one StepPlans, as the engine runs it.
`one copy` gathers every sequence's blocks into one copy per layer and cache (the budget set
beyond any batch); `chunks` is the engine's default (kernels/attention_reference.py,
DECODE_GATHER_BYTES). Sequence lengths are drawn from [context / 2, context]. glibc's thresholds
are set as the engine sets them (engine/host_memory.py) unless --glibc-default. Wall and CPU ms
per step, best of three interleaved runs; the outputs are compared.

--engine: the default model in one offline engine, `benchmarks/throughput.py`'s default workload
(64 requests, prompts 32..256 tokens, outputs 64..256, greedy, ignore_eos), run with one copy and
with chunks in alternating rounds; output tok/s (wall and per CPU s) and whether the tokens match.
"""

import argparse
import time

import torch

from cpu_attention_plan import BS, D, make_step  # this folder is on sys.path when run as a script
from tokenmill.engine.host_memory import keep_freed_memory
from tokenmill.kernels import attention_reference as ref

CHUNK_BUDGET = ref.DECODE_GATHER_BYTES


def run_step(step, budget: int) -> list[torch.Tensor]:
    ref.DECODE_GATHER_BYTES = budget
    tables, lens, qsl, slots, caches, qkv = step
    plans = ref.StepPlans()
    outs = []
    for (k_cache, v_cache), (q, k, v) in zip(caches, qkv):
        ref.write_kv_cache_reference(k, v, k_cache, v_cache, slots, plans.write(slots))
        plan = plans.attention(tables, lens, qsl, BS, None, q.dtype, k_cache[0].nbytes)
        outs.append(ref.paged_attention_reference(q, k_cache, v_cache, tables, lens, qsl, D**-0.5, 1,
                                                  int(lens.max()), plan=plan))
    return outs


def timed(fn, reps: int = 3) -> tuple[float, float]:
    fn()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - wall) / reps * 1e3, (time.process_time() - cpu) / reps * 1e3


def engine_rounds(threads: int, rounds: int) -> None:
    from tokenmill.bench.workload import LengthRange, random_token_workload
    from tokenmill.engine.llm import LLM
    from tokenmill.engine.model_loader import load_model
    from tokenmill.engine.sampling_params import SamplingParams

    loaded = load_model(None)
    llm = LLM(loaded=loaded, num_threads=threads, max_num_seqs=64)
    requests = random_token_workload(64, LengthRange(32, 256), LengthRange(64, 256),
                                     loaded.model.get_output_embeddings().weight.shape[0], seed=0)
    prompts = [list(r.prompt_ids) for r in requests]
    params = [SamplingParams(max_new_tokens=r.output_len, ignore_eos=True, do_sample=False) for r in requests]
    llm.generate(prompts[:4], params[:4], use_tqdm=False)  # warm-up
    tokens, results = {}, {budget: [] for budget in ("one copy", "chunks")}
    for _ in range(rounds):
        for name in results:
            ref.DECODE_GATHER_BYTES = 1 << 62 if name == "one copy" else CHUNK_BUDGET
            wall, cpu = time.perf_counter(), time.process_time()
            outputs = llm.generate(prompts, params, use_tqdm=False)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            tokens[name] = [o.outputs[0].token_ids for o in outputs]
            n = sum(map(len, tokens[name]))
            results[name].append((n / wall, n / cpu))
            print(f"{name}: {n} tokens, {n / wall:.1f} tok/s, {n / cpu:.1f} tok per CPU s", flush=True)
    (old_wall, old_cpu), (new_wall, new_cpu) = (max(results[name]) for name in ("one copy", "chunks"))
    print(f"best of {rounds}: chunks / one copy = {new_wall / old_wall:.2f}x (wall), {new_cpu / old_cpu:.2f}x (per CPU s); "
          f"tokens identical: {tokens['one copy'] == tokens['chunks']}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", action="store_true", help="end to end: the default model in one engine")
    parser.add_argument("--rounds", type=int, default=2, help="--engine: rounds of each mode")
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc thresholds alone")
    args = parser.parse_args()
    if args.engine:
        return engine_rounds(args.threads, args.rounds)
    if not args.glibc_default:
        keep_freed_memory()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    one_copy = 1 << 62
    print(f"threads {args.threads}, layers {args.layers}, glibc {'default' if args.glibc_default else 'as the engine'}")
    print("| batch | context | chunks | one copy: wall / CPU ms per step | chunks: wall / CPU ms per step | ratio (wall) |")
    print("|---|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            step = make_step(batch, context, args.layers, gen, shortest=context // 2)
            for a, b in zip(run_step(step, one_copy), run_step(step, CHUNK_BUDGET)):
                torch.testing.assert_close(a, b)
            chunks = len(ref.StepPlans().attention(step[0], step[1], step[2], BS, None, torch.float32,
                                                   step[4][0][0][0].nbytes).decode)
            times = {one_copy: [], CHUNK_BUDGET: []}
            for _ in range(3):
                for budget in times:
                    times[budget].append(timed(lambda: run_step(step, budget)))
            old, new = min(times[one_copy]), min(times[CHUNK_BUDGET])
            print(f"| {batch} | {context} | {chunks} | {old[0]:.1f} / {old[1]:.1f} | {new[0]:.1f} / {new[1]:.1f} | "
                  f"{old[0] / new[0]:.2f}x |", flush=True)
            del step


if __name__ == "__main__":
    main()
