"""Next tokens for the non-beam rows of a step: processors -> warpers/filters -> draw (kernels).

Greedy rows take an argmax; sampled rows go through the sampling kernel (the torch path on the CPU).
`logits` is the step's own tensor: when the rows are all of it, in order, it is processed in place.
A batch that mixes both runs each kind once, and the ids and log-probs come to the host in one copy,
started without waiting: the host waits for it only when it reads the ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.device_copy import HostCopy, to_device, to_device_rows
from tokenmill.engine.logits_processors import RowInput, apply_processors, apply_warpers
from tokenmill.kernels.sampling import greedy_argmax, sample

_SEED_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, sample index) over 63 bits


def row_seed(request_seed: int, sample_index: int) -> int:
    """The Philox seed of one sample of a request (n samples of one request draw independently)."""
    return (request_seed + sample_index * _SEED_MIX) % (2**63)


@dataclass
class SampleRow:
    row: RowInput
    logits_index: int  # row of the step's logits
    seed: int
    offset: int  # Philox counter: the position of the token being drawn

    @property
    def needs_extra_warpers(self) -> bool:
        p = self.row.params
        return p.do_sample and (p.typical_p < 1.0 or p.epsilon_cutoff > 0 or p.eta_cutoff > 0)


class SamplerOutput:
    """One step's draws. The ids stay on the device (`token_tensor`, what the next overlapped step
    reads); their host copy is started at once and waited for only when `token_ids` / `logprobs`
    are first read."""

    def __init__(self, token_tensor: torch.Tensor, logprob_tensor: torch.Tensor,
                 top_logprobs: list[dict[int, float] | None]) -> None:
        self.token_tensor = token_tensor  # [num_rows] int64 on the logits' device
        self.top_logprobs = top_logprobs
        # One device-to-host copy for ids and log-probs (ids are exact in float64).
        self._host = HostCopy(torch.stack([token_tensor.to(torch.float64), logprob_tensor.to(torch.float64)]))
        self._lists: tuple[list[int], list[float]] | None = None

    def _read(self) -> tuple[list[int], list[float]]:
        if self._lists is None:
            host = self._host.get()  # [2, num_rows]
            self._lists = ([int(t) for t in host[0].tolist()], host[1].tolist())
        return self._lists

    @property
    def token_ids(self) -> list[int]:
        return self._read()[0]

    @property
    def logprobs(self) -> list[float]:
        return self._read()[1]


def _rows_index(row_ids: list[int], num_rows: int, device) -> torch.Tensor | None:
    """Index of a sub-batch, or None when it is the whole batch (no gather needed)."""
    if len(row_ids) == num_rows:
        return None
    return to_device(row_ids, torch.int64, device)


class Sampler:
    @torch.inference_mode()  # the runner's logits are inference tensors: processed in place here
    def __call__(self, logits: torch.Tensor, rows: list[SampleRow]) -> SamplerOutput:
        device = logits.device
        num_rows = len(rows)
        if num_rows == logits.shape[0] and all(r.logits_index == i for i, r in enumerate(rows)):
            # Every row in order (the common step): the processors work on the step's own logits
            # in place, which the runner made for this step alone; no [rows, vocab] copy.
            x = logits
        else:
            index = to_device([r.logits_index for r in rows], torch.int64, device)
            x = logits.index_select(0, index)  # [num_rows, vocab], a copy the processors may change in place
        x = apply_processors(x, [r.row for r in rows])

        greedy_ids = [i for i, r in enumerate(rows) if not r.row.params.do_sample]
        sampled_ids = [i for i, r in enumerate(rows) if r.row.params.do_sample]
        token_ids = torch.empty(num_rows, dtype=torch.int64, device=device)  # [num_rows]
        logprobs = torch.empty(num_rows, dtype=torch.float32, device=device)  # [num_rows]
        for ids, draw in ((greedy_ids, self._greedy), (sampled_ids, self._sampled)):
            if not ids:
                continue
            sub = _rows_index(ids, num_rows, device)
            tokens, lps = draw(x if sub is None else x.index_select(0, sub), [rows[i] for i in ids])
            if sub is None:
                token_ids, logprobs = tokens, lps
            else:
                token_ids.index_copy_(0, sub, tokens)
                logprobs.index_copy_(0, sub, lps)

        top = self._top_logprobs(x, rows, token_ids)  # a host sync, only for rows that ask for logprobs
        return SamplerOutput(token_ids, logprobs, top)

    @staticmethod
    def _greedy(x: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
        return greedy_argmax(x)

    @staticmethod
    def _sampled(x: torch.Tensor, rows: list[SampleRow]) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [n, vocab] processed logits of do_sample rows (not modified)."""
        device = x.device
        params = [r.row.params for r in rows]
        temperature = [p.temperature for p in params]
        top_k = [p.top_k for p in params]
        top_p = [p.top_p for p in params]
        min_p = [p.min_p or 0.0 for p in params]
        extra = [i for i, r in enumerate(rows) if r.needs_extra_warpers]
        if extra:
            # typical/epsilon/eta follow top-p/min-p in HF's order: filter those rows fully first,
            # then let the kernel only draw from them.
            sel = to_device(extra, torch.int64, device)
            x = x.clone()
            x[sel] = apply_warpers(x[sel], [rows[i].row for i in extra])
            for i in extra:
                temperature[i], top_k[i], top_p[i], min_p[i] = 1.0, 0, 1.0, 0.0

        # Two packed copies (floats, int64s) instead of one per parameter; the kernel casts top_k.
        temperature_t, top_p_t, min_p_t = to_device_rows((temperature, top_p, min_p), torch.float32, device)
        top_k_t, seeds_t, offsets_t = to_device_rows(
            (top_k, [r.seed for r in rows], [r.offset for r in rows]), torch.int64, device
        )
        return sample(
            x, temperature_t, top_k_t, top_p_t, min_p_t, seeds_t, offsets_t,
            torch.zeros(len(rows), dtype=torch.bool, device=device),
            filters=(any(k > 0 for k in top_k), any(p < 1.0 for p in top_p)),
        )

    def _top_logprobs(
        self, x: torch.Tensor, rows: list[SampleRow], token_ids: torch.Tensor
    ) -> list[dict[int, float] | None]:
        """The chosen token's and the top-k log-probabilities of the processed distribution, where asked.

        x: the processed logits before any warper; sampled rows are warped here as they were drawn.
        """
        out: list[dict[int, float] | None] = [None] * len(rows)
        asked = [i for i, r in enumerate(rows) if r.row.params.logprobs is not None]
        if not asked:
            return out
        sel = torch.tensor(asked, device=x.device)
        inputs = [rows[i].row for i in asked]
        warped = apply_warpers(x[sel].clone(), inputs)
        greedy = torch.tensor([not r.params.do_sample for r in inputs], device=x.device)
        dist = torch.where(greedy[:, None], x[sel], warped).log_softmax(-1)  # [num_asked, vocab]
        k = max(rows[i].row.params.logprobs for i in asked)
        top_vals, top_ids = dist.topk(max(k, 1), dim=-1)
        chosen = dist.gather(1, token_ids[sel].unsqueeze(1)).squeeze(1)
        top_vals, top_ids, chosen, chosen_ids = (
            top_vals.tolist(),
            top_ids.tolist(),
            chosen.tolist(),
            token_ids[sel].tolist(),
        )
        for j, i in enumerate(asked):
            n = rows[i].row.params.logprobs
            entry = {chosen_ids[j]: chosen[j]}
            for tok, val in zip(top_ids[j][:n], top_vals[j][:n]):
                entry.setdefault(tok, val)
            out[i] = entry
        return out
