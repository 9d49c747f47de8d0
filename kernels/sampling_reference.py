"""The torch path of `kernels.sampling`: HF's warpers and the draw, on the CPU (production) or any device.

Filtering costs only what a row asks for: no filter -> no sort and no top-k; top-k -> one `topk`
over the rows that use it; top-k + top-p -> top-p among those top-k values, exact without sorting the
row; top-p alone -> a sort of the row; min-p -> a softmax of those rows.
The draw is the integer inverse CDF of `kernels._philox` (one Philox word per row), the same
arithmetic the Triton kernel does, so both pick the identical token.
"""

import threading

import torch

from tokenmill.kernels._philox import (
    MAX_VOCAB,
    draw_target_torch,
    draw_weight_torch,
    philox_word_torch,
)

_DRAW_CHUNK = 2048  # weights per chunk of the two-level inverse CDF
_WORKSPACE = threading.local()


def _scratch(name: str, shape: tuple[int, int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A [B, V] temporary of the filters or the draw. On the CPU a per-thread buffer reused across
    steps: a fresh multi-megabyte allocation costs its page faults again on every step. Valid until
    the next call that takes the same name."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = shape[0] * shape[1]
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    # One buffer per inference-mode state: a buffer made under inference_mode (the engine's sampler)
    # may not be written outside it.
    key = (name, torch.is_inference_mode_enabled())
    buffer = buffers.get(key)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel].view(shape)


def check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy):
    if logits.dim() != 2:
        raise ValueError(f"logits must be 2-D [batch, vocab], got shape {tuple(logits.shape)}")
    batch, vocab = logits.shape
    if vocab >= MAX_VOCAB:
        raise ValueError(f"logits has vocab {vocab}: allowed vocabularies below {MAX_VOCAB}")
    for name, tensor in (
        ("temperature", temperature), ("top_k", top_k), ("top_p", top_p), ("min_p", min_p),
        ("seeds", seeds), ("offsets", offsets), ("greedy", greedy),
    ):
        if tensor.shape != (batch,):
            raise ValueError(f"{name} must have shape ({batch},), got {tuple(tensor.shape)}")


def _on_rows(scores: torch.Tensor, rows: torch.Tensor, fn) -> torch.Tensor:
    """scores with fn applied to the rows where `rows` [B] is True (all rows: no copy)."""
    if bool(rows.all()):
        return fn(scores, slice(None))
    index = rows.nonzero().flatten()
    scores[index] = fn(scores[index], index)
    return scores


def _top_p_threshold(
    largest: torch.Tensor, kth: torch.Tensor, vocab: int, limit: torch.Tensor, min_tokens_to_keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's top-p on rows already through top-k, from their largest values alone (no sort of the row).

    largest: [n, w] each row's largest values, descending, covering all its survivors (values >= kth);
    kth: [n, 1]; limit: [n] = 1 - top_p. After top-k a row's ascending sort is -inf up to its
    survivors, then the survivors ascending: rebuilt here from `largest`, it goes through the same
    softmax and cumsum as in the full sort, so every survivor gets the bit-identical cumulative
    probability. Returns the threshold [n, 1] (keep scores >= it) and whether the row is decided [n].
    Where the boundary falls between equal values, which of them the (unstable) sort put first decides
    the kept set: such a row gets kth as its threshold and is left to the full sort."""
    n, width = largest.shape
    neg_inf = float("-inf")
    survivors = ((largest >= kth) & (largest > neg_inf)).sum(-1, keepdim=True)  # [n, 1]
    ascending = largest.masked_fill(
        torch.arange(width, device=largest.device) >= survivors, neg_inf
    ).flip(-1)  # [n, w]
    sorted_row = _scratch("sorted", (n, vocab), torch.float32, largest.device).fill_(neg_inf)  # [n, V]
    sorted_row[:, vocab - width :] = ascending
    probs = sorted_row.softmax(dim=-1)  # over the full width: the float sum's order is the sort's
    if probs.device.type == "cpu":  # a running sum in order: the zeros before the survivors add nothing
        cum = probs[:, vocab - width :].cumsum(dim=-1)  # [n, w]
    else:
        cum = probs.cumsum(dim=-1)[:, vocab - width :]
    remove = cum <= limit[:, None]
    remove[..., -min_tokens_to_keep:] = False
    first_kept = remove.sum(-1, keepdim=True)  # [n, 1]: cum is nondecreasing, so removal is a prefix
    kept = ascending.gather(-1, first_kept.clamp(max=width - 1))
    below = ascending.gather(-1, (first_kept - 1).clamp(min=0))
    boundary_tie = (first_kept > 0) & (first_kept < width) & (below == kept) & (kept > neg_inf)
    threshold = torch.where(first_kept < width, torch.maximum(kept, kth), float("inf"))
    return torch.where(boundary_tie, kth, threshold), ~boundary_tie.squeeze(-1)


def _survivors_covered(sub: torch.Tensor, rows, largest: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """`largest` (of sub[rows]) widened, where needed, to every value >= kth: HF keeps all ties at
    the k-th value, so a row can keep more than k."""
    width = largest.shape[1]
    if width == sub.shape[1]:
        return largest
    spills = (largest[:, -1:] >= kth) & (kth > float("-inf"))  # [n, 1]: the last column ties the k-th value
    if not bool(spills.any()):
        return largest
    sub = sub[rows]
    count = int(((sub >= kth) & spills).sum(-1).max())
    return torch.topk(sub, max(count, width), dim=-1).values


def _top_p_among_top_k(sub, both, largest, kth, limit, min_tokens_to_keep):
    """Top-k + top-p thresholds [n, 1] of the rows of sub [n, V] where `both` [n] is True (kth
    elsewhere), from their top-k values `largest` [n, w]; returns them and which rows are decided [n]
    (an undecided row keeps kth and goes through the full sort)."""
    rows = slice(None) if bool(both.all()) else both.nonzero().flatten()
    threshold, decided = kth.clone(), torch.zeros_like(both)
    threshold[rows], decided[rows] = _top_p_threshold(
        _survivors_covered(sub, rows, largest[rows], kth[rows]), kth[rows], sub.shape[1], limit[rows],
        min_tokens_to_keep,
    )
    return threshold, decided


def apply_sampling_filters(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    min_tokens_to_keep: int = 1,
    full_sort_top_p: bool = False,
) -> torch.Tensor:
    """HF's Temperature -> TopK -> TopP -> MinP warpers with per-row parameters
    (top_k 0, top_p 1.0, min_p 0.0 = off). Returns float32 [B, V]; removed = -inf.

    A row with both top-k and top-p takes top-p among its top-k values (no sort of the row);
    full_sort_top_p=True sorts every top-p row instead, as HF does (the comparison path of the tests
    and benchmarks: both give the same scores)."""
    scores = logits.to(torch.float32) / temperature.to(torch.float32)[:, None]  # [B, V]
    vocab = scores.shape[-1]
    neg_inf = float("-inf")

    k = top_k.to(torch.int64)
    k_on = (k > 0) & (k < vocab)
    p_on = top_p < 1.0
    limit_all = (1.0 - top_p.to(torch.float64)).to(torch.float32)  # [B]
    p_left = p_on.clone()  # top-p rows still to sort
    if bool(k_on.any()):
        def top_k_filter(sub, index):
            k_eff = torch.clamp(k[index], min=min_tokens_to_keep, max=vocab)  # [n]
            # Host sync for the largest k: fine here, this is the CPU / reference path. One value
            # more than k shows whether the k-th value is tied beyond the window.
            largest = torch.topk(sub, min(int(k_eff.max()) + 1, vocab), dim=-1).values  # [n, max k + 1]
            kth = largest.gather(-1, (k_eff - 1)[:, None])  # [n, 1]
            threshold = kth
            both = p_on[index] & (not full_sort_top_p)  # [n]: top-p among these top-k values, no sort
            if bool(both.any()):
                threshold, decided = _top_p_among_top_k(
                    sub, both, largest, kth, limit_all[index], min_tokens_to_keep
                )
                p_left[index] = both & ~decided
            return sub.masked_fill(sub < threshold, neg_inf)

        scores = _on_rows(scores, k_on, top_k_filter)

    if bool(p_left.any()):
        def top_p_filter(sub, index):
            asc, asc_idx = torch.sort(sub, dim=-1, descending=False)  # [n, V]
            cum = asc.softmax(dim=-1).cumsum(dim=-1)
            sorted_remove = cum <= limit_all[index][:, None]
            sorted_remove[..., -min_tokens_to_keep:] = False
            remove = sorted_remove.scatter(1, asc_idx, sorted_remove)
            return sub.masked_fill(remove, neg_inf)

        scores = _on_rows(scores, p_left, top_p_filter)

    m_on = min_p > 0.0
    if bool(m_on.any()):
        min_p_all = min_p.to(torch.float32)

        def min_p_filter(sub, index):
            probs = torch.softmax(sub, dim=-1)  # [n, V]
            top_probs = probs.amax(dim=-1, keepdim=True)
            remove = probs < min_p_all[index][:, None] * top_probs
            keep_idx = torch.topk(probs, min(min_tokens_to_keep, vocab), dim=-1).indices
            return sub.masked_fill(remove.scatter(-1, keep_idx, False), neg_inf)

        scores = _on_rows(scores, m_on, min_p_filter)
    return scores


def greedy_reference(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax (first of ties) and its log_softmax, per row: ids [B] int64, log-probs [B] float32."""
    x = logits.to(torch.float32)  # [B, V]
    tokens = x.argmax(dim=-1)  # [B]
    logprobs = x.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(x, dim=-1)
    return tokens, logprobs


def draw_reference(
    scores: torch.Tensor, seeds: torch.Tensor, offsets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of filtered, temperature-scaled scores [B, V] (-inf = removed): the integer
    inverse CDF of `kernels._philox`. Returns ids [B] int64 and their log-probs [B] float32."""
    batch, vocab = scores.shape
    row_max = scores.amax(dim=-1, keepdim=True)  # [B, 1]
    row_max = torch.where(torch.isfinite(row_max), row_max, 0.0)
    weights = _scratch("weights", (batch, vocab), torch.int64, scores.device)  # [B, V]
    kept_norm = draw_weight_torch(
        scores, row_max, _scratch("exp", (batch, vocab), torch.float32, scores.device), weights
    )  # [B]
    # Integer totals per chunk, then the chunk holding the target, then prefix sums inside that
    # chunk only (a vectorised sum instead of a [B, V] cumulative sum).
    chunk = _DRAW_CHUNK
    num_full = vocab // chunk
    parts = [weights[:, : num_full * chunk].view(batch, num_full, chunk).sum(-1)]
    if vocab % chunk:
        parts.append(weights[:, num_full * chunk :].sum(-1, keepdim=True))
    chunk_cum = torch.cat(parts, dim=1).cumsum_(dim=1)  # [B, num_chunks] int64
    total = chunk_cum[:, -1]  # [B]
    word = philox_word_torch(torch.zeros_like(offsets, dtype=torch.int64), offsets, seeds)  # [B]
    target = draw_target_torch(total, word)  # [B]
    which = torch.searchsorted(chunk_cum, target[:, None], right=True).clamp_(max=chunk_cum.shape[1] - 1)  # [B, 1]
    before = torch.where(which > 0, chunk_cum.gather(1, (which - 1).clamp(min=0)), 0)  # [B, 1]
    columns = which * chunk + torch.arange(chunk, device=scores.device)  # [B, chunk]
    inside = torch.where(columns < vocab, weights.gather(1, columns.clamp(max=vocab - 1)), 0)
    inside_cum = inside.cumsum_(dim=1) + before  # [B, chunk]
    position = torch.searchsorted(inside_cum, target[:, None], right=True)  # first cum > target
    tokens = (which * chunk + position.clamp(max=chunk - 1)).squeeze(-1)  # [B]
    tokens = torch.where(total > 0, tokens, 0)  # a row with nothing kept (all -inf): token 0
    logprobs = (scores.gather(-1, tokens[:, None]).squeeze(-1) - row_max.squeeze(-1)) - torch.log(kept_norm)
    return tokens, logprobs


def sample_reference(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_k: torch.Tensor,
    top_p: torch.Tensor,
    min_p: torch.Tensor,
    seeds: torch.Tensor,
    offsets: torch.Tensor,
    greedy: torch.Tensor,
    full_sort_top_p: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's warpers (a sort only for top-p rows without top-k), then the integer inverse-CDF draw;
    greedy rows: argmax of the unscaled logits. Each kind of row runs once. full_sort_top_p: see
    `apply_sampling_filters`."""
    check_shapes(logits, temperature, top_k, top_p, min_p, seeds, offsets, greedy)
    greedy = greedy.to(torch.bool)
    batch = logits.shape[0]
    tokens = torch.zeros(batch, dtype=torch.int64, device=logits.device)  # [B]
    logprobs = torch.zeros(batch, dtype=torch.float32, device=logits.device)  # [B]
    if bool(greedy.any()):
        rows = greedy.nonzero().flatten()
        tokens[rows], logprobs[rows] = greedy_reference(logits[rows])
    if not bool(greedy.all()):
        rows = (~greedy).nonzero().flatten()
        whole = rows.numel() == batch
        pick = (lambda t: t) if whole else (lambda t: t[rows])
        top_k_rows, top_p_rows, min_p_rows = pick(top_k), pick(top_p), pick(min_p)
        vocab = logits.shape[1]
        filtering = ((top_k_rows > 0) & (top_k_rows < vocab)) | (top_p_rows < 1.0) | (min_p_rows > 0.0)
        if bool(filtering.any()):
            filtered = apply_sampling_filters(
                pick(logits), pick(temperature), top_k_rows, top_p_rows, min_p_rows,
                full_sort_top_p=full_sort_top_p,
            )  # [n, V]
        else:  # pure sampling (the API default): temperature only, no sort, no top-k
            x = pick(logits)
            filtered = torch.div(
                x.to(torch.float32), pick(temperature).to(torch.float32)[:, None],
                out=_scratch("scores", tuple(x.shape), torch.float32, x.device),
            )  # [n, V]
        drawn = draw_reference(filtered, pick(seeds), pick(offsets))
        if whole:
            return drawn
        tokens[rows], logprobs[rows] = drawn
    return tokens, logprobs
