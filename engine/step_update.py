"""Scheduler.update's half of a step: turn logits into tokens and move every request forward.

A sampled token first lands as a placeholder at the end of its sequence and is applied (appended,
stop-checked, reported) after the draw: at once in a synchronous step, or at the start of the next
update when steps overlap (the next step is scheduled and run meanwhile, its input id for that
sequence taken from the sampled-id tensor by `fill_pending_input_ids`).
"""

from __future__ import annotations

import torch

from tokenmill.engine.beam_search import BeamSearch
from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.detokenizer import IncrementalDetokenizer, make_decoder
from tokenmill.engine.logits_processors import RowInput
from tokenmill.engine.output_processor import append_token, request_output, take_token_delta, wants_output
from tokenmill.engine.outputs import CompletionOutput, RequestOutput, TokenDeltas
from tokenmill.engine.prompt_logprobs import take_prompt_logprobs
from tokenmill.engine.sampler import SampleRow, Sampler, SamplerOutput, row_seed
from tokenmill.engine.scheduler import ScheduledBatch
from tokenmill.engine.sequence import PLACEHOLDER_TOKEN_ID, Sequence, SequenceGroup
from tokenmill.engine.structured_output import advance_grammars, mask_constrained_rows


class StepUpdater:
    def __init__(
        self, block_manager: BlockManager, tokenizer, max_model_len: int, *, async_scheduling: bool = False
    ) -> None:
        self.block_manager = block_manager
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.async_scheduling = async_scheduling
        self.sampler = Sampler()
        # Outputs of requests that need only their new token ids go out as one TokenDeltas per step
        # (the serving engine core turns this on).
        self.compact_deltas = False
        self._num_new_tokens = 0
        # Sampled tokens not applied yet: (the sequence of each row, the sampler's output).
        self._in_flight: tuple[list[Sequence], SamplerOutput] | None = None

    def prepare_group(self, group: SequenceGroup) -> None:
        """Attach what a new request needs: text decoding (samples) or a beam search state (beams)."""
        p = group.params
        if p.use_beam_search:
            generator = torch.Generator().manual_seed(group.seed) if p.do_sample else None
            group.beam_search = BeamSearch(p, group.prompt_token_ids, group.eos_token_ids, group.max_new_tokens, generator)
        elif p.detokenize and p.output_kind == "final" and not p.stop:
            group.decode_text = make_decoder(self.tokenizer, p.skip_special_tokens)  # nobody reads text before the end
        else:
            for seq in group.seqs:
                self._attach_detokenizer(group, seq)

    def _attach_detokenizer(self, group: SequenceGroup, seq: Sequence) -> None:
        """Incremental text, for streams and stop strings (none when the request wants no text)."""
        p = group.params
        if not p.detokenize or group.decode_text is not None:
            return
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
    @property
    def has_in_flight(self) -> bool:
        """Whether sampled tokens wait to be applied (overlapped steps)."""
        return self._in_flight is not None

    def drop_in_flight(self) -> list[SequenceGroup]:
        """Forget the sampled tokens not applied yet (a failed step); returns their requests, to be failed."""
        if self._in_flight is None:
            return []
        targets, _ = self._in_flight
        self._in_flight = None
        groups: dict[int, SequenceGroup] = {}
        for seq in targets:
            seq.pending_ids, seq.pending_row = None, -1
            if seq.token_ids and seq.token_ids[-1] == PLACEHOLDER_TOKEN_ID:
                seq.token_ids.pop()
            groups.setdefault(id(seq.group), seq.group)
        return list(groups.values())

    def update(self, batch: ScheduledBatch, logits: torch.Tensor | None) -> list[RequestOutput | TokenDeltas]:
        """logits: [num_sampled, vocab], one row per sequence of `batch` that reached its last token.

        Synchronous: this step's tokens are sampled and applied. Overlapped (async_scheduling): first
        the previous step's sampled tokens are applied (appends, stop checks, outputs), so the
        history is complete before this step's tokens are sampled; those are applied next step.
        """
        if logits is not None:
            take_prompt_logprobs(batch, logits)  # rows past the sampled ones; before num_computed_tokens moves
        outputs = self._apply_in_flight()  # overlapped: the previous step's tokens (before new placeholders)
        sampled = self._advance(batch)
        beam_groups = self._sample(sampled, logits)
        if not self.async_scheduling:
            outputs = self._apply_in_flight()
        for group in beam_groups:
            self._beam_step(group, logits)  # beams need the host between steps: always synchronous
            if group.is_finished:  # beams report once, at the end
                outputs.append(request_output(group, finished=True))
        return outputs

    def _sample(self, sampled: list[Sequence], logits: torch.Tensor | None) -> list[SequenceGroup]:
        """Draw the next token of every sampled non-beam sequence; each gets a placeholder token until
        its draw is applied. Returns the beam requests to step."""
        rows: list[SampleRow] = []
        targets: list[Sequence] = []  # the sequence each row's token goes to
        beam_groups: dict[str, SequenceGroup] = {}
        for seq in sampled:
            group = seq.group
            if group.beam_search is not None:
                beam_groups[group.request_id] = group
                continue
            if not group.has_forked:  # n samples share the prompt's blocks from here on
                draws = [seq] + [
                    self._fork(group, seq, group.new_seq(list(seq.token_ids), index=k))
                    for k in range(1, group.params.num_return_sequences)
                ]
                group.has_forked = True
            else:
                draws = (seq,)
            for target in draws:
                rows.append(self._sample_row(target, seq.logits_row))
                targets.append(target)
        if rows:
            mask_constrained_rows(logits, ((r.logits_index, t.group, t) for r, t in zip(rows, targets)))
            out = self.sampler(logits, rows)
            # Overlapped: the next step's input ids for these sequences come from the sampler's device
            # tensor (ModelRunner's fill); the host reads the ids only when it applies them.
            sampled_ids = out.token_tensor if self.async_scheduling else None  # [num_rows]
            for row, seq in enumerate(targets):
                seq.token_ids.append(PLACEHOLDER_TOKEN_ID)
                seq.pending_ids, seq.pending_row = sampled_ids, row
            self._in_flight = (targets, out)
        return list(beam_groups.values())

    def _apply_in_flight(self) -> list[RequestOutput | TokenDeltas]:
        """Replace each placeholder by its sampled token: append, stop checks, finished samples retired;
        returns the outputs of the requests that moved. Requests aborted meanwhile are skipped (their
        blocks are already free)."""
        if self._in_flight is None:
            return []
        targets, out = self._in_flight
        self._in_flight = None
        progressed: dict[str, SequenceGroup] = {}  # by request id, in batch order
        finished: list[SequenceGroup] = []
        max_model_len = self.max_model_len
        num_applied = 0
        for seq, tok, lp, top in zip(targets, out.token_ids, out.logprobs, out.top_logprobs):
            seq.pending_ids, seq.pending_row = None, -1
            group = seq.group
            if group.released:
                continue
            seq.token_ids.pop()  # the placeholder
            done = append_token(group, seq, tok, lp, top, max_model_len)
            if group.params.structured_outputs is not None:
                advance_grammars(((group, seq),), (tok,))  # a finished grammar ends the sequence
                done = done or seq.finish_reason is not None
            if done:
                finished.append(group)
            progressed[group.request_id] = group
            num_applied += 1
        self._num_new_tokens += num_applied
        for group in finished:
            self._retire_finished(group)
        return self._outputs(progressed.values())

    def _outputs(self, groups) -> list[RequestOutput | TokenDeltas]:
        """The outputs of the requests that moved; with `compact_deltas`, those that need only their
        new token ids gathered in one TokenDeltas."""
        outputs: list[RequestOutput | TokenDeltas] = []
        deltas = TokenDeltas([], [], [])
        for group in groups:
            new_ids = take_token_delta(group) if self.compact_deltas else None
            if new_ids is not None:
                deltas.request_ids.append(group.request_id)
                deltas.token_ids.append(new_ids)
                deltas.cumulative_logprobs.append(group.seqs[0].cumulative_logprob)
            elif wants_output(group):
                outputs.append(request_output(group, finished=group.is_finished))
        if deltas.request_ids:
            outputs.append(deltas)
        return outputs

    def _advance(self, batch: ScheduledBatch) -> list[Sequence]:
        """Count the step's tokens as computed and commit blocks that filled; returns the sequences that
        reached their last token, each with its logits row set."""
        bm = self.block_manager
        caching = bm.enable_prefix_caching
        block_size = bm.block_size
        sampled: list[Sequence] = []
        num_rows = 0  # rows of the step's logits: one per sequence that reached its last token
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens):
            computed = seq.num_computed_tokens + num_new
            if computed == len(seq.token_ids):
                if seq.finish_reason is None:
                    seq.logits_row = num_rows
                    sampled.append(seq)
                num_rows += 1
            if seq.finish_reason is not None:
                continue  # finished by the token applied just before (overlap): this step's work is void
            seq.num_computed_tokens = computed
            if caching and computed // block_size > seq.num_hashed_blocks:
                bm.commit_full_blocks(seq)
        return sampled

    @staticmethod
    def _sample_row(seq: Sequence, logits_index: int) -> SampleRow:
        """The sequence's sampler row, built once: its history is `seq.token_ids` itself."""
        row = seq.sample_row
        if row is None:
            group = seq.group
            history = RowInput(group.params, seq.token_ids, seq.num_prompt_tokens, group.eos_token_ids)
            row = seq.sample_row = SampleRow(history, logits_index, row_seed(group.seed, seq.index), seq.num_tokens)
        else:
            row.logits_index = logits_index
            row.offset = len(seq.token_ids)
        return row

    def _fork(self, group: SequenceGroup, parent: Sequence, child: Sequence) -> Sequence:
        self.block_manager.fork(parent, child)
        self._attach_detokenizer(group, child)
        group.seqs.append(child)
        return child

    def _retire_finished(self, group: SequenceGroup) -> None:
        for seq in [s for s in group.seqs if s.finish_reason is not None]:
            self.block_manager.free(seq)
            group.seqs.remove(seq)
            group.finished_seqs.append(seq)

    # ------------------------------------------------------------------ beams
    def _beam_step(self, group: SequenceGroup, logits: torch.Tensor) -> None:
        live = group.seqs
        index = torch.tensor([s.logits_row for s in live], device=logits.device)
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
        detokenize = group.params.detokenize
        group.final_outputs = [
            CompletionOutput(
                index=i,
                text=self.tokenizer.decode(h.token_ids, skip_special_tokens=skip) if detokenize else "",
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
