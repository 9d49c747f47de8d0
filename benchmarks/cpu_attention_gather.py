"""CPU decode attention: the K/V gather by cache[tables] against index_select (the kept path).

    PYTHONPATH=$PWD python benchmarks/cpu_attention_gather.py

SmolLM2-135M's attention shape (9 query heads, 3 kv heads, head_dim 64, block 16), batch 32 and 64,
contexts 128-1024, random block tables; best of two runs, process CPU time and wall time per call.
"""
import torch, time
torch.set_num_threads(1)
from tokenmill.kernels import attention_reference as A
def old_gather(cache, block_ids, num_seqs):
    S, H, D = num_seqs, cache.shape[2], cache.shape[3]
    return cache[block_ids.view(S, -1)].view(S, -1, H, D).transpose(1, 2)
new_gather = A._gather
def bench(f, n=4):
    f(); c = time.process_time(); w = time.perf_counter()
    for _ in range(n): f()
    return (time.process_time() - c) / n * 1e3, (time.perf_counter() - w) / n * 1e3
Hq, Hkv, D, bs = 9, 3, 64, 16
for S in (32, 64):
    for L in (128, 512, 1024):
        nb = L // bs; num_blocks = S * nb + 8
        kc = torch.randn(num_blocks, bs, Hkv, D); vc = torch.randn(num_blocks, bs, Hkv, D)
        perm = torch.randperm(num_blocks)[:S*nb].view(S, nb).to(torch.int32)
        lens = torch.randint(L - bs + 1, L + 1, (S,), dtype=torch.int32); q = torch.randn(S, Hq, D); qsl = torch.arange(S + 1, dtype=torch.int32)
        run = lambda: A.paged_attention_reference(q, kc, vc, perm, lens, qsl, 0.125, 1, L)
        r = {}
        for rep in range(2):
            for name, g in (("cache[tables]", old_gather), ("index_select", new_gather)):
                A._gather = g
                r.setdefault(name, []).append(bench(run))
        a = A.paged_attention_reference(q, kc, vc, perm, lens, qsl, 0.125, 1, L); A._gather = old_gather
        b = A.paged_attention_reference(q, kc, vc, perm, lens, qsl, 0.125, 1, L); A._gather = new_gather
        assert torch.equal(a, b)
        best = {k: min(v) for k, v in r.items()}
        print(f"S={S} L={L} " + " ".join(f"{k}: cpu {c:.1f} ms wall {w:.1f} ms" for k, (c, w) in best.items())
              + f" ratio cpu {best['cache[tables]'][0]/best['index_select'][0]:.2f}x", flush=True)
