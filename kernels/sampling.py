"""Fused filtering + sampling: temperature, top-k, top-p, min-p, then a Philox draw.

Semantics are those of HF's TemperatureLogitsWarper -> TopKLogitsWarper ->
TopPLogitsWarper -> MinPLogitsWarper followed by sampling from the softmax, with
per-row parameters. The kept set of each row is an upper set of the (temperature
scaled) logits, so the kernel only has to find one threshold per row; it does so
without sorting, by a bisection over logit values that snaps to data values:

* top-k: t_k = largest value v with count(s >= v) >= k;
* top-p: t_p = largest value v with mass(s >= v) >= top_p * mass(s >= t_k)
  (a token is kept iff the mass strictly above it is below top_p, as in HF);
* min-p: t_m = max(s) + log(min_p).

The row keeps s >= max(t_k, t_p, t_m) and draws by an exponential race:
token = argmax over kept i of (s_i - max s) - log(E_i), E_i ~ Exp(1) from
Philox(seed, offset, i), which picks i with probability softmax(kept)_i.
The torch reference filters by sorting (exactly HF's warpers) and races with the
same Philox draws, so both pick the same token.
"""

import torch
import triton
import triton.language as tl

from tokenmill.kernels._philox import (
    exponential_from_word,
    exponential_from_word_torch,
    philox_word,
    philox_word_torch,
)

_MAX_SEARCH_ITERS = 96
_MAX_BLOCK = 4096


@triton.jit
def _scan_at(row_ptr, V, temp, row_max, mid, BLOCK: tl.constexpr):
    """One pass over a row: count and mass of {s >= mid}, min of that set (and its
    multiplicity), max of {s < mid}. Accumulates per lane, reduces once at the end."""
    count = tl.zeros([BLOCK], dtype=tl.int32)
    mass = tl.zeros([BLOCK], dtype=tl.float32)
    up = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    n_up = tl.zeros([BLOCK], dtype=tl.int32)
    dn = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        s = x.to(tl.float32) / temp
        ge = s >= mid
        count += ge.to(tl.int32)
        mass += tl.where(ge, tl.exp(s - row_max), 0.0)
        cand = tl.where(ge, s, float("inf"))
        n_up = tl.where(cand < up, 1, tl.where(ge & (cand == up), n_up + 1, n_up))
        up = tl.minimum(up, cand)
        dn = tl.maximum(dn, tl.where(ge, float("-inf"), s))
    v_up = tl.min(up, axis=0)
    return (
        tl.sum(count, axis=0),
        tl.sum(mass, axis=0),
        v_up,
        tl.sum(tl.where(up == v_up, n_up, 0), axis=0),
        tl.max(dn, axis=0),
    )


@triton.jit
def _threshold_search(
    row_ptr, V, temp, row_max, lo, hi, mid, floor, target, active,
    USE_MASS: tl.constexpr, MAX_ITERS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Largest data value v >= floor with g(v) >= target, g(v) = count (or mass) of
    {s >= v}; -inf when it lies below `floor` (or every value qualifies).
    Invariant: the answer is in (lo, hi]. Returns (threshold, mass(s >= threshold))."""
    result = row_max * 0.0 + float("-inf")
    result_mass = row_max * 0.0
    status = active.to(tl.int32) * 0 + tl.where(active, 0, 2)  # 0 searching, 1 found, 2 below floor
    num_iters = status * 0
    while (status == 0) & (num_iters < MAX_ITERS):
        count, mass, v_up, n_up, v_dn = _scan_at(row_ptr, V, temp, row_max, mid, BLOCK)
        if USE_MASS:
            g = mass
            g_above = mass - n_up.to(tl.float32) * tl.exp(v_up - row_max)
        else:
            g = count.to(tl.float32)
            g_above = (count - n_up).to(tl.float32)
        reached = g >= target
        hit = reached & (g_above < target)
        result = tl.where(hit, v_up, result)
        result_mass = tl.where(hit, mass, result_mass)
        lo = tl.where(reached & (g_above >= target), v_up, lo)
        hi = tl.where(reached, hi, v_dn)
        fell = (~reached) & ((v_dn < floor) | (v_dn == float("-inf")))
        status = tl.where(hit, 1, tl.where(fell, 2, status))
        mid = lo * 0.5 + hi * 0.5
        mid = tl.where(mid <= lo, hi, mid)
        num_iters += 1
    # Out of iterations (float round-off in mass mode): keep the safe side.
    result = tl.where(status == 0, hi, result)
    return result, result_mass


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    seeds_ptr, offsets_ptr, greedy_ptr, out_token_ptr, out_logprob_ptr, out_threshold_ptr,
    V, MAX_ITERS: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    greedy = tl.load(greedy_ptr + row) != 0
    temp = tl.where(greedy, 1.0, tl.load(temperature_ptr + row).to(tl.float32))
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)

    # Pass 1: row max, softmax normaliser (online, per lane), smallest finite value.
    lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_norm = tl.zeros([BLOCK], dtype=tl.float32)
    lane_min = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        s = x.to(tl.float32) / temp
        new_max = tl.maximum(lane_max, s)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_norm = lane_norm * tl.exp(lane_max - safe_max) + tl.exp(s - safe_max)
        lane_max = new_max
        lane_min = tl.minimum(lane_min, tl.where(s > float("-inf"), s, float("inf")))
    row_max = tl.max(lane_max, axis=0)
    safe_row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    norm = tl.sum(lane_norm * tl.exp(lane_max - safe_row_max), axis=0)
    finite_min = tl.min(lane_min, axis=0)
    zero_f = norm * 0.0

    # Top-k threshold and the mass it keeps (bisection on counts).
    k_on = (~greedy) & (top_k > 0) & (top_k < V)
    t_k, mass_k = _threshold_search(
        row_ptr, V, temp, row_max, finite_min - 1.0, row_max, finite_min * 0.5 + row_max * 0.5,
        zero_f - float("inf"), top_k.to(tl.float32), k_on, False, MAX_ITERS, BLOCK,
    )
    mass_k = tl.where(t_k > float("-inf"), mass_k, norm)  # top-k off or keeping everything
    t_m = tl.where((~greedy) & (min_p > 0.0), row_max + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    t_km = tl.maximum(t_k, t_m)

    # Top-p threshold, searched only above what top-k / min-p already remove.
    # Tokens lighter than (1 - top_p) * mass_k / V sum to less than the removed mass,
    # so the threshold is at least that heavy.
    p_on = (~greedy) & (top_p < 1.0)
    target_p = top_p * mass_k
    floor_p = tl.maximum(t_km, row_max + tl.log(tl.maximum(1.0 - top_p, 1e-30) * mass_k / V))
    floor_p = tl.minimum(floor_p, row_max)
    t_p, _ = _threshold_search(
        row_ptr, V, temp, row_max, floor_p - 1.0, row_max, floor_p,
        floor_p, target_p, p_on, True, MAX_ITERS, BLOCK,
    )
    threshold = tl.maximum(t_km, t_p)

    # Last pass: exponential race over the kept set (plain argmax on greedy rows).
    offset = tl.load(offsets_ptr + row).to(tl.uint64)
    seed = tl.load(seeds_ptr + row).to(tl.uint64)
    offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    offset_hi = (offset >> 32).to(tl.uint32)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    seed_hi = (seed >> 32).to(tl.uint32)
    lane_best = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_index = tl.zeros([BLOCK], dtype=tl.int32)
    lane_s = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_kept_norm = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
        s = x.to(tl.float32) / temp
        keep = (offs < V) & (s >= threshold)
        word = philox_word(offs.to(tl.uint32), offset_lo, offset_hi, seed_lo, seed_hi)
        noise = tl.log(exponential_from_word(word))
        score = tl.where(greedy, s, (s - row_max) - noise)
        score = tl.where(keep, score, float("-inf"))
        better = score > lane_best
        lane_index = tl.where(better, offs, lane_index)
        lane_s = tl.where(better, s, lane_s)
        lane_best = tl.where(better, score, lane_best)
        lane_kept_norm += tl.where(keep, tl.exp(s - row_max), 0.0)
    # First index among the best (lanes hold increasing indices; ties keep the first).
    best_score = tl.max(lane_best, axis=0)
    is_best = lane_best == best_score
    best_index = tl.min(tl.where(is_best, lane_index, V), axis=0)
    best_s = tl.max(tl.where(is_best & (lane_index == best_index), lane_s, float("-inf")), axis=0)
    best_index = tl.where(best_index == V, 0, best_index)
    kept_norm = tl.sum(lane_kept_norm, axis=0)
    tl.store(out_token_ptr + row, best_index.to(tl.int64))
    tl.store(out_logprob_ptr + row, (best_s - row_max) - tl.log(kept_norm))
    tl.store(out_threshold_ptr + row, threshold)


def _check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy):
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    for name, tensor in (
        ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
        ("seeds", seeds), ("offsets", offsets), ("greedy", greedy),
    ):
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(tensor.shape)}")


def sample_triton(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
    return_threshold: bool = False,
):
    """The fused kernel. With `return_threshold`, also the per-row logit threshold
    ([B] float32, temperature-scaled; kept = logits / T >= threshold)."""
    _check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)  # [B]
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)  # [B]
    thresholds = torch.empty(batch, dtype=torch.float32, device=device)  # [B]
    if batch > 0:
        block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
        _sample_kernel[(batch,)](
            logits, logits.stride(0), temperature, top_k, top_p, min_p,
            seeds, offsets, greedy.to(torch.int8), tokens, logprobs, thresholds,
            vocab, MAX_ITERS=_MAX_SEARCH_ITERS, BLOCK=block, num_warps=8,
            enable_fp_fusion=False,  # same float32 rounding as the torch reference
        )
    if return_threshold:
        return tokens, logprobs, thresholds
    return tokens, logprobs


def apply_sampling_filters(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_tokens_to_keep: int = 1,
) -> torch.Tensor:
    """HF's Temperature -> TopK -> TopP -> MinP warpers with per-row parameters
    (top_k 0, top_p 1.0, min_p 0.0 = off). Returns float32 [B, V]; removed = -inf."""
    scores = logits.to(torch.float32) / temperature.to(torch.float32)[:, None]  # [B, V]
    vocab = scores.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=scores.dtype, device=scores.device)

    k = top_k.to(torch.int64)
    k_on = k > 0
    if bool(k_on.any()):
        k_eff = torch.clamp(torch.clamp(k, min=min_tokens_to_keep), max=vocab)
        # Host sync for the largest k: fine here, this is the CPU / reference path.
        largest = torch.topk(scores, int(k_eff.max()), dim=-1).values  # [B, max k]
        kth = largest.gather(-1, (k_eff - 1).clamp(min=0)[:, None])  # [B, 1]
        remove = (scores < kth) & k_on[:, None]
        scores = torch.where(remove, neg_inf, scores)

    p_on = top_p < 1.0
    if bool(p_on.any()):
        asc, asc_idx = torch.sort(scores, dim=-1, descending=False)
        cum = asc.softmax(dim=-1).cumsum(dim=-1)
        limit = (1.0 - top_p.to(torch.float64)).to(torch.float32)[:, None]
        sorted_remove = cum <= limit
        sorted_remove[..., -min_tokens_to_keep:] = False
        remove = sorted_remove.scatter(1, asc_idx, sorted_remove) & p_on[:, None]
        scores = torch.where(remove, neg_inf, scores)

    m_on = min_p > 0.0
    if bool(m_on.any()):
        probs = torch.softmax(scores, dim=-1)
        top_probs = probs.amax(dim=-1, keepdim=True)
        remove = probs < min_p.to(torch.float32)[:, None] * top_probs
        keep_idx = torch.topk(probs, min(min_tokens_to_keep, vocab), dim=-1).indices
        remove = remove.scatter(-1, keep_idx, False) & m_on[:, None]
        scores = torch.where(remove, neg_inf, scores)
    return scores


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort-based filtering (HF's warpers) then the same Philox exponential race."""
    _check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    greedy = greedy.to(torch.bool)
    temp = torch.where(greedy, torch.ones_like(temperature, dtype=torch.float32), temperature.float())
    filtered = apply_sampling_filters(
        logits, temp,
        torch.where(greedy, torch.zeros_like(top_k), top_k),
        torch.where(greedy, torch.ones_like(top_p), top_p),
        torch.where(greedy, torch.zeros_like(min_p), min_p),
    )  # [B, V]
    row_max = filtered.amax(dim=-1, keepdim=True)  # [B, 1]
    kept = filtered > float("-inf")  # [B, V]
    sampled = kept & ~greedy[:, None]
    rows, cols = sampled.nonzero(as_tuple=True)
    noise = torch.zeros_like(filtered)  # [B, V]
    if rows.numel() > 0:
        word = philox_word_torch(cols, offsets.to(torch.int64)[rows], seeds.to(torch.int64)[rows])
        noise[rows, cols] = torch.log(exponential_from_word_torch(word))
    race = (filtered - row_max) - noise
    score = torch.where(greedy[:, None], filtered, race)
    score = torch.where(kept, score, float("-inf"))
    tokens = score.argmax(dim=-1)  # [B]
    logprobs = torch.log_softmax(filtered, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, logprobs


def sample(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filter and sample one token per row: ids [B] int64 and their log-probs [B]
    float32 under the row's filtered distribution (greedy rows: argmax of the
    unscaled logits, log_softmax of the unscaled logits). Triton on CUDA, torch
    otherwise; no host synchronisation on CUDA."""
    if logits.is_cuda:
        return sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    return sample_reference(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
