"""CPU paged attention of a whole decode step: one plan per layer against one plan per step.

    PYTHONPATH=$PWD python benchmarks/cpu_attention_plan.py [--layers 30] [--threads 1]

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head_dim 64, block 16, 30 layers). For
each batch and context: the KV write and the attention of every layer, with the layer-independent
work (write rows, length groups, block lists, masks) redone in every layer (`per layer`, as before
StepPlans) or made once and shared (`per step`, the engine's path). Process CPU ms per step, best of
three interleaved runs; the outputs are checked identical.
"""

import argparse
import time

import torch

from tokenmill.kernels import attention_reference as ref

HQ, HKV, D, BS = 9, 3, 64, 16


def make_step(batch: int, context: int, layers: int, gen: torch.Generator, shortest: int | None = None):
    """One decode step's tables, lengths (drawn from [shortest, context]; default: the context's
    last block), slots, per-layer caches and per-layer q, k, v."""
    blocks = -(-context // BS)
    num_blocks = batch * blocks + 4
    tables = torch.randperm(num_blocks, generator=gen)[: batch * blocks].view(batch, blocks).to(torch.int32)
    low = max(1, context - BS + 1 if shortest is None else shortest)
    lens = torch.randint(low, context + 1, (batch,), generator=gen, dtype=torch.int32)
    pos = lens.long() - 1
    slots = tables.long().gather(1, (pos // BS)[:, None]).view(-1) * BS + pos % BS  # [batch]
    caches = [(torch.randn(num_blocks, BS, HKV, D, generator=gen), torch.randn(num_blocks, BS, HKV, D, generator=gen))
              for _ in range(layers)]
    qkv = [(torch.randn(batch, HQ, D, generator=gen), torch.randn(batch, HKV, D, generator=gen),
            torch.randn(batch, HKV, D, generator=gen)) for _ in range(layers)]
    return tables, lens, torch.arange(batch + 1, dtype=torch.int32), slots, caches, qkv


def run_step(step, shared: bool) -> list[torch.Tensor]:
    tables, lens, qsl, slots, caches, qkv = step
    plans = ref.StepPlans() if shared else None
    outs = []
    for (k_cache, v_cache), (q, k, v) in zip(caches, qkv):
        write = plans.write(slots) if plans else None
        ref.write_kv_cache_reference(k, v, k_cache, v_cache, slots, write)
        plan = plans.attention(tables, lens, qsl, BS, None, q.dtype) if plans else None
        outs.append(ref.paged_attention_reference(q, k_cache, v_cache, tables, lens, qsl, D**-0.5, 1,
                                                  int(lens.max()), plan=plan))
    return outs


def cpu_ms(fn, reps: int = 3) -> float:
    fn()
    start = time.process_time()
    for _ in range(reps):
        fn()
    return (time.process_time() - start) / reps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 64])
    parser.add_argument("--contexts", type=int, nargs="+", default=[64, 512])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    print("| batch | context | per layer (CPU ms / step) | per step (CPU ms / step) | ratio |")
    print("|---|---|---|---|---|")
    for batch in args.batches:
        for context in args.contexts:
            step = make_step(batch, context, args.layers, gen)
            assert all(torch.equal(a, b) for a, b in zip(run_step(step, False), run_step(step, True)))
            times = {False: [], True: []}
            for _ in range(3):
                for shared in (False, True):
                    times[shared].append(cpu_ms(lambda: run_step(step, shared)))
            old, new = min(times[False]), min(times[True])
            print(f"| {batch} | {context} | {old:.2f} | {new:.2f} | {old / new:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
