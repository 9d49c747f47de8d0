"""Scheduler.update's half of a step: turn logits into tokens and move every request forward."""

from __future__ import annotations

import torch

from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.logits_processors import RowInput
from tokenmill.engine.output_processor import append_token, request_output
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.prompt_logprobs import take_prompt_logprobs
from tokenmill.engine.sampler import SampleRow, Sampler, row_seed
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import Sequence, SequenceGroup
from tokenmill.engine.structured_output import advance_grammars, mask_constrained_rows


class StepUpdater:
    def __init__(self, block_manager: BlockManager, tokenizer, max_model_len: int) -> None:
        self.block_manager = block_manager
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self._num_new_tokens = 0

    def prepare_group(self, group: SequenceGroup) -> None:
        """Attach what a new request needs: detokenizers (samples) or a beam search state (beams)."""
        if group.params.use_beam_search:
            generator = torch.Generator().manual_seed(group.seed) if group.params.do_sample else None
            group.beam_search = BeamSearch(
                group.params, group.prompt_token_ids, group.eos_token_ids, group.max_new_tokens, generator
            )
        else:
            for seq in group.seqs:
                self._attach_detokenizer(group, seq)

    def _attach_detokenizer(self, group: SequenceGroup, seq: Sequence) -> None:
        p = group.params
        seq.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            group.prompt_token_ids,
            skip_special_tokens=p.skip_special_tokens,
            stop=p.stop,
            include_stop_str_in_output=p.include_stop_str_in_output,
        )

    def take_num_new_tokens(self) -> int:
        n, self._num_new_tokens = self._num_new_tokens, 0
        return n

    # ------------------------------------------------------------------ update
    def update(self, batch: ScheduledBatch, logits: torch.Tensor) -> list[RequestOutput]:
        """logits: [num_sampled, vocab], one row per sequence of `batch` that reached its last token.

        Rows past num_sampled hold prompt positions of requests with prompt_logprobs."""
        take_prompt_logprobs(batch, logits)  # before num_computed_tokens moves
        logits_row: dict[int, int] = {}
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if batch.samples(i):
                logits_row[seq.seq_id] = len(logits_row)
            seq.num_computed_tokens += num_new
            self.block_manager.commit_full_blocks(seq)

        rows: list[SampleRow] = []
        targets: list[tuple[SequenceGroup, Sequence]] = []  # the sequence each row's token goes to
        beam_groups: list[SequenceGroup] = []
        for group in batch.groups:
            sampled = [s for s in group.seqs if s.seq_id in logits_row]
            if not sampled:
                continue
            if group.beam_search is not None:
                beam_groups.append(group)
                continue
            for seq in sampled:
                draws = [seq]
                if not group.has_forked:  # n samples share the prompt's blocks from here on
                    for k in range(1, group.params.num_return_sequences):
                        draws.append(self._fork(group, seq, group.new_seq(list(seq.token_ids), index=k)))
                    group.has_forked = True
                for target in draws:
                    row = RowInput(group.params, target.token_ids, target.num_prompt_tokens, group.eos_token_ids)
                    seed = row_seed(group.seed, target.index)
                    rows.append(SampleRow(row, logits_row[seq.seq_id], seed, target.num_tokens))
                    targets.append((group, target))

        progressed: dict[str, SequenceGroup] = {}  # by request id, in batch order
        if rows:
            mask_constrained_rows(logits, ((r.logits_index, g, s) for r, (g, s) in zip(rows, targets)))
            out = self.sampler(logits, rows)
            for (group, seq), tok, lp, top in zip(targets, out.token_ids, out.logprobs, out.top_logprobs):
                append_token(group, seq, tok, lp, top, self.max_model_len)
                progressed[group.request_id] = group
            advance_grammars(targets, out.token_ids)
            self._num_new_tokens += len(rows)
            for group in progressed.values():
                self._retire_finished(group)

        for group in beam_groups:
            self._beam_step(group, logits, logits_row)
            if group.is_finished:  # beams report once, at the end
                progressed[group.request_id] = group

        return [request_output(g, finished=g.is_finished) for g in progressed.values()]

    def _fork(self, group: SequenceGroup, parent: Sequence, child: Sequence) -> Sequence:
        self.block_manager.fork(parent, child)
        self._attach_detokenizer(group, child)
        group.seqs.append(child)
        return child

    def _retire_finished(self, group: SequenceGroup) -> None:
        for seq in [s for s in group.seqs if s.is_finished]:
            self.block_manager.free(seq)
            group.seqs.remove(seq)
            group.finished_seqs.append(seq)

    # ------------------------------------------------------------------ beams
    def _beam_step(self, group: SequenceGroup, logits: torch.Tensor, logits_row: dict[int, int]) -> None:
        live = group.seqs
        index = torch.tensor([logits_row[s.seq_id] for s in live], device=logits.device)
        step = group.beam_search.step(logits.index_select(0, index))  # [num_live, vocab]
        if step.done:
            self._finish_beams(group)
            return
        new_seqs: list[Sequence] = []
        used: set[int] = set()
        for i, parent_idx in enumerate(step.parent_indices):
            parent = live[parent_idx]
            if parent_idx not in used:
                used.add(parent_idx)
                seq = parent
            else:
                seq = group.new_seq(list(parent.token_ids), index=i)
                self.block_manager.fork(parent, seq)
            new_seqs.append(seq)
        for i, (seq, tok) in enumerate(zip(new_seqs, step.next_token_ids)):
            seq.index = i
            seq.token_ids.append(tok)
        for j, seq in enumerate(live):
            if j not in used:
                self.block_manager.free(seq)
        group.seqs = new_seqs
        self._num_new_tokens += len(new_seqs)

    def _finish_beams(self, group: SequenceGroup) -> None:
        hyps = group.beam_search.finalize()
        skip = group.params.skip_special_tokens
        group.final_outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(h.token_ids, skip_special_tokens=skip),
                token_ids=list(h.token_ids),
                cumulative_logprob=h.cumulative_logprob,
                finish_reason="stop" if h.token_ids and h.token_ids[-1] in group.eos_token_ids else "length",
                stop_reason=h.token_ids[-1] if h.token_ids and h.token_ids[-1] in group.eos_token_ids else None,
                score=h.score,
            )
            for i, h in enumerate(hyps)
        ]
        for seq in group.seqs:
            self.block_manager.free(seq)
        group.seqs = []
