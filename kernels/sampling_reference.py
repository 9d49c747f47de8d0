"""The torch path of `kernels.sampling`: HF's warpers and the draw, on the CPU (production) or any device.

Filtering costs only what a row asks for: no filter -> no sort and no top-k; top-k -> one `topk`
over the rows that use it; top-p -> a sort of the rows that use it; min-p -> a softmax of those rows.
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
    """A [B, V] temporary of the draw. On the CPU a per-thread buffer reused across steps: a fresh
    multi-megabyte allocation costs its page faults again on every step. Valid until the next draw."""
    if device.type != "cpu":
        return torch.empty(shape, dtype=dtype, device=device)
    numel = shape[0] * shape[1]
    buffers = getattr(_WORKSPACE, "buffers", None)
    if buffers is None:
        buffers = _WORKSPACE.buffers = {}
    buffer = buffers.get(name)
    if buffer is None or buffer.dtype != dtype or buffer.numel() < numel:
        buffer = buffers[name] = torch.empty(numel, dtype=dtype)
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
    neg_inf = float("-inf")

    k = top_k.to(torch.int64)
    k_on = (k > 0) & (k < vocab)
    if bool(k_on.any()):
        def top_k_filter(sub, index):
            k_eff = torch.clamp(k[index], min=min_tokens_to_keep, max=vocab)  # [n]
            # Host sync for the largest k: fine here, this is the CPU / reference path.
            largest = torch.topk(sub, int(k_eff.max()), dim=-1).values  # [n, max k]
            kth = largest.gather(-1, (k_eff - 1)[:, None])  # [n, 1]
            return sub.masked_fill(sub < kth, neg_inf)

        scores = _on_rows(scores, k_on, top_k_filter)

    p_on = top_p < 1.0
    if bool(p_on.any()):
        limit_all = (1.0 - top_p.to(torch.float64)).to(torch.float32)  # [B]

        def top_p_filter(sub, index):
            asc, asc_idx = torch.sort(sub, dim=-1, descending=False)  # [n, V]
            cum = asc.softmax(dim=-1).cumsum(dim=-1)
            sorted_remove = cum <= limit_all[index][:, None]
            sorted_remove[..., -min_tokens_to_keep:] = False
            remove = sorted_remove.scatter(1, asc_idx, sorted_remove)
            return sub.masked_fill(remove, neg_inf)

        scores = _on_rows(scores, p_on, top_p_filter)

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
) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's warpers (sort only where top-p asks for it), then the integer inverse-CDF draw;
    greedy rows: argmax of the unscaled logits. Each kind of row runs once."""
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
                pick(logits), pick(temperature), top_k_rows, top_p_rows, min_p_rows
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
