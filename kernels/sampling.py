"""Fused filtering + sampling: temperature, top-k, top-p, min-p, then one Philox draw per row.

Semantics are those of HF's TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper ->
MinPLogitsWarper followed by sampling from the softmax, with per-row parameters. The kept set of a
row is an upper set of its temperature-scaled logits s, so the kernel finds one threshold per row,
without sorting, by radix selects on the order-preserving 32-bit key of s (RADIX_BITS per level,
32 / RADIX_BITS passes per select):

* top-k: t_k = the largest value v with count(s >= v) >= k (ties at the boundary are all kept);
* top-p: t_p = the largest value v >= t_k with mass(v <= s, s >= t_k) >= top_p * mass(s >= t_k)
  (a token is kept iff the mass strictly above it is below top_p, as in HF);
* min-p: t_m = max(s) + log(min_p).

The row keeps s >= max(t_k, t_p, t_m) and draws by the integer inverse CDF of `kernels._philox`
(one Philox word per row, order-free int64 sums), which the torch reference repeats exactly.

Passes over a row (one program per row): 1 (max, softmax normaliser, argmax), 32 / RADIX_BITS
for a top-k row, as many for a top-p row, 1 for the kept total, and on average half of one for the
pick (it stops at the chosen token). A greedy row reads its logits once. The kernel reports the
elements it read per row (`return_passes`), so the pass count is measured, not assumed.
"""

import torch
import triton
import triton.language as tl

from tokenmill.kernels._philox import draw_target, draw_weight, philox_word
from tokenmill.kernels.sampling_reference import (
    apply_sampling_filters,
    check_shapes,
    greedy_reference,
    sample_reference,
)

_MAX_BLOCK = 4096  # streaming passes
_MAX_RADIX_BLOCK = 1024  # radix passes hold a [block, 2**RADIX_BITS] one-hot for the mass histogram
RADIX_BITS = 4


@triton.jit
def _scaled(row_ptr, offs, V, temp):
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf"))
    s = x.to(tl.float32) / temp
    return tl.where(s == 0.0, 0.0, s)  # -0.0 -> +0.0: one key per float value


@triton.jit
def _order_key(s):
    """Order-preserving key of float32 s as int64 in [0, 2**32)."""
    bits = s.to(tl.int32, bitcast=True).to(tl.int64)
    return tl.where(bits >= 0, bits + 2147483648, -1 - bits)


@triton.jit
def _key_to_float(key):
    bits = tl.where(key >= 2147483648, key - 2147483648, -1 - key).to(tl.int32)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _radix_select(
    row_ptr, V, n_sweep, temp, row_max, floor, target,
    USE_MASS: tl.constexpr, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Largest key K among the eligible entries (s >= floor, finite) with G(K) >= goal, where
    G(K) = count (USE_MASS False, goal = target) or mass exp(s - max) (goal = target * the mass of
    all eligible entries) of the eligible entries with key >= K. Reads the row 32 / RADIX_BITS times
    (none when n_sweep is 0). Returns (K as a float, -inf when no key qualifies; elements read)."""
    NUM_BINS: tl.constexpr = 1 << RADIX_BITS
    bins = tl.arange(0, NUM_BINS)
    zero = n_sweep * 0
    lo = zero.to(tl.int64)  # the current key range is [lo, lo + 2**(32 - level * RADIX_BITS))
    above_count = zero
    above_mass = zero.to(tl.float32)
    found = n_sweep > 0
    goal = target + above_mass
    read = zero
    for level in tl.static_range(32 // RADIX_BITS):
        SHIFT: tl.constexpr = 32 - RADIX_BITS * (level + 1)
        hist_count = tl.zeros([NUM_BINS], dtype=tl.int32)
        hist_mass = tl.zeros([NUM_BINS], dtype=tl.float32)
        start = zero
        while start < n_sweep:
            offs = start + tl.arange(0, BLOCK)
            s = _scaled(row_ptr, offs, V, temp)
            key = _order_key(s)
            digit = (key - lo) >> SHIFT
            eligible = (offs < V) & (s >= floor) & (s > float("-inf"))
            in_range = eligible & (key >= lo) & (digit < NUM_BINS)
            digit = tl.where(in_range, digit, 0).to(tl.int32)
            if USE_MASS:
                onehot = (digit[:, None] == bins[None, :]) & in_range[:, None]  # [BLOCK, NUM_BINS]
                weight = tl.exp(s - row_max)
                hist_mass += tl.sum(tl.where(onehot, weight[:, None], 0.0), axis=0)
            else:
                hist_count += tl.histogram(digit, NUM_BINS, mask=in_range)
            read += tl.minimum(V - start, BLOCK)
            start += BLOCK
        if USE_MASS:
            if level == 0:
                goal = target * tl.sum(hist_mass, axis=0)  # top_p * the mass of the eligible set
            suffix = above_mass + tl.sum(hist_mass, axis=0) - tl.cumsum(hist_mass, axis=0) + hist_mass
        else:
            suffix = (above_count + tl.sum(hist_count, axis=0) - tl.cumsum(hist_count, axis=0) + hist_count)
            suffix = suffix.to(tl.float32)
        digit_star = tl.max(tl.where(suffix >= goal, bins, -1), axis=0)
        if level == 0:
            found = found & (digit_star >= 0)
        # Float round-off can leave no bin reaching the goal below level 0: keep the whole range.
        digit_star = tl.maximum(digit_star, 0)
        above_count += tl.sum(tl.where(bins > digit_star, hist_count, 0), axis=0)
        above_mass += tl.sum(tl.where(bins > digit_star, hist_mass, 0.0), axis=0)
        lo += digit_star.to(tl.int64) << SHIFT
    threshold = tl.where(found, _key_to_float(lo), float("-inf"))
    return threshold, read


@triton.jit
def _sample_kernel(
    logits_ptr, stride_row, temperature_ptr, top_k_ptr, top_p_ptr, min_p_ptr,
    seeds_ptr, offsets_ptr, greedy_ptr, out_token_ptr, out_logprob_ptr, out_threshold_ptr, out_read_ptr,
    V, RADIX_BITS: tl.constexpr, BLOCK: tl.constexpr, RADIX_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    greedy = tl.load(greedy_ptr + row) != 0
    temp = tl.where(greedy, 1.0, tl.load(temperature_ptr + row).to(tl.float32))
    top_k = tl.load(top_k_ptr + row).to(tl.int32)
    top_p = tl.load(top_p_ptr + row).to(tl.float32)
    min_p = tl.load(min_p_ptr + row).to(tl.float32)

    # Pass 1: row max, softmax normaliser (online, per lane), first index of the max.
    lane_max = tl.full([BLOCK], float("-inf"), dtype=tl.float32)
    lane_norm = tl.zeros([BLOCK], dtype=tl.float32)
    lane_arg = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(row_ptr, offs, V, temp)
        lane_arg = tl.where(s > lane_max, offs, lane_arg)
        new_max = tl.maximum(lane_max, s)
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        lane_norm = lane_norm * tl.exp(lane_max - safe_max) + tl.exp(s - safe_max)
        lane_max = new_max
    row_max = tl.max(lane_max, axis=0)
    safe_row_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    norm = tl.sum(lane_norm * tl.exp(lane_max - safe_row_max), axis=0)
    argmax = tl.min(tl.where(lane_max == row_max, lane_arg, V), axis=0)
    argmax = tl.where(argmax == V, 0, argmax)
    read = V + top_k * 0

    # Thresholds (no pass at all for greedy rows or filters that are off).
    n_top_k = tl.where((~greedy) & (top_k > 0) & (top_k < V), V, 0)
    t_k, read_k = _radix_select(
        row_ptr, V, n_top_k, temp, safe_row_max, float("-inf"), top_k.to(tl.float32),
        False, RADIX_BITS, RADIX_BLOCK,
    )
    n_top_p = tl.where((~greedy) & (top_p < 1.0), V, 0)
    t_p, read_p = _radix_select(
        row_ptr, V, n_top_p, temp, safe_row_max, t_k, top_p, True, RADIX_BITS, RADIX_BLOCK,
    )
    t_m = tl.where((~greedy) & (min_p > 0.0), row_max + tl.log(tl.maximum(min_p, 1e-30)), float("-inf"))
    threshold = tl.maximum(tl.maximum(t_k, t_p), t_m)
    read += read_k + read_p

    # Draw: the integer total of the kept weights, then the first index whose running sum passes
    # the target (stops there).
    n_draw = tl.where(greedy, 0, V)
    total = tl.zeros([BLOCK], dtype=tl.int64).sum(axis=0)
    kept_norm = norm * 0.0
    start = n_draw * 0
    while start < n_draw:
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(row_ptr, offs, V, temp)
        kept = (offs < V) & (s >= threshold) & (s > float("-inf"))
        total += tl.sum(draw_weight(s, safe_row_max, kept), axis=0)
        kept_norm += tl.sum(tl.where(kept, tl.exp(s - safe_row_max), 0.0), axis=0)
        read += tl.minimum(V - start, BLOCK)
        start += BLOCK
    offset = tl.load(offsets_ptr + row).to(tl.uint64)
    seed = tl.load(seeds_ptr + row).to(tl.uint64)
    offset_lo = (offset & 0xFFFFFFFF).to(tl.uint32)
    seed_lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    word = philox_word(
        offset_lo * 0, offset_lo, (offset >> 32).to(tl.uint32), seed_lo, (seed >> 32).to(tl.uint32)
    )
    target = draw_target(total, word.to(tl.int64))
    token = V + top_k * 0
    running = total * 0
    start = n_draw * 0
    while (start < n_draw) & (token == V):
        offs = start + tl.arange(0, BLOCK)
        s = _scaled(row_ptr, offs, V, temp)
        kept = (offs < V) & (s >= threshold) & (s > float("-inf"))
        w = draw_weight(s, safe_row_max, kept)
        passed = (running + tl.cumsum(w, axis=0)) > target
        token = tl.minimum(token, tl.min(tl.where(passed & (offs < V), offs, V), axis=0))
        running += tl.sum(w, axis=0)
        read += tl.minimum(V - start, BLOCK)
        start += BLOCK
    token = tl.where(greedy, argmax, tl.where(token == V, 0, token))
    s_token = tl.load(row_ptr + token).to(tl.float32) / temp
    logprob = (s_token - row_max) - tl.log(tl.where(greedy, norm, kept_norm))
    tl.store(out_token_ptr + row, token.to(tl.int64))
    tl.store(out_logprob_ptr + row, logprob)
    tl.store(out_threshold_ptr + row, threshold)
    tl.store(out_read_ptr + row, read)


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
    return_passes: bool = False,
):
    """The fused kernel: ids [B] int64 and log-probs [B] float32. With `return_threshold`, also the
    per-row logit threshold ([B] float32, temperature-scaled; kept = logits / T >= threshold); with
    `return_passes`, also the passes over each row the kernel made ([B] float32, elements read / V)."""
    check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    batch, vocab = logits.shape
    device = logits.device
    tokens = torch.empty(batch, dtype=torch.int64, device=device)  # [B]
    logprobs = torch.empty(batch, dtype=torch.float32, device=device)  # [B]
    thresholds = torch.empty(batch, dtype=torch.float32, device=device)  # [B]
    read = torch.empty(batch, dtype=torch.int32, device=device)  # [B] elements read per row
    if batch > 0:
        block = min(_MAX_BLOCK, triton.next_power_of_2(vocab))
        _sample_kernel[(batch,)](
            logits, logits.stride(0), temperature, top_k, top_p, min_p,
            seeds, offsets, greedy.to(torch.int8), tokens, logprobs, thresholds, read,
            vocab, RADIX_BITS=RADIX_BITS, BLOCK=block, RADIX_BLOCK=min(block, _MAX_RADIX_BLOCK),
            num_warps=8,
            enable_fp_fusion=False,  # same float32 rounding as the torch reference
        )
    out = (tokens, logprobs)
    if return_threshold:
        out += (thresholds,)
    if return_passes:
        out += (read.float() / max(vocab, 1),)
    return out


def greedy_argmax(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy rows: argmax (first of ties) and its log_softmax: ids [B] int64, log-probs [B] float32.
    torch's argmax and logsumexp on every device (one read each, no sampling kernel)."""
    return greedy_reference(logits)


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
    """Filter and sample one token per row: ids [B] int64 and their log-probs [B] float32 under the
    row's filtered distribution (greedy rows: argmax of the unscaled logits, log_softmax of the
    unscaled logits). Triton on CUDA, torch otherwise; no host synchronisation on CUDA."""
    if logits.is_cuda:
        return sample_triton(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    return sample_reference(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)


__all__ = [
    "RADIX_BITS",
    "apply_sampling_filters",
    "greedy_argmax",
    "sample",
    "sample_reference",
    "sample_triton",
]
