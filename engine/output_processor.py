"""After a step: append tokens, check stop conditions, build RequestOutputs."""

from __future__ import annotations

from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.prompt_logprobs import finished_prompt_logprobs
from tokenmill.engine.sequence import Sequence, SequenceGroup


def append_token(
    group: SequenceGroup,
    seq: Sequence,
    token_id: int,
    logprob: float,
    top_logprobs: dict[int, float] | None,
    max_model_len: int,
) -> None:
    """Add one generated token to `seq` and set its finish reason if it ends here."""
    seq.token_ids.append(token_id)
    seq.cumulative_logprob += logprob
    if top_logprobs is not None:
        seq.logprobs.append(top_logprobs)
    params = group.params
    stop_str = seq.detokenizer.append(token_id) if seq.detokenizer is not None else None
    if stop_str is not None:
        seq.finish_reason, seq.stop_reason = "stop", stop_str
    elif seq.num_output_tokens >= group.min_new_tokens and (
        token_id in group.eos_token_ids or token_id in params.stop_token_ids
    ):
        seq.finish_reason, seq.stop_reason = "stop", token_id
    elif seq.num_output_tokens >= group.max_new_tokens or seq.num_tokens >= max_model_len:
        seq.finish_reason = "length"


def completion_output(seq: Sequence, group: SequenceGroup, finished: bool) -> CompletionOutput:
    det = seq.detokenizer
    if det is not None:
        seq.streamed_text += det.take_delta(finished or seq.is_finished)
    return CompletionOutput(
        index=seq.index,
        text=seq.streamed_text,
        token_ids=seq.output_token_ids,
        cumulative_logprob=seq.cumulative_logprob,
        logprobs=list(seq.logprobs) if group.params.logprobs is not None else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )


def request_output(group: SequenceGroup, finished: bool) -> RequestOutput:
    if group.final_outputs is not None:
        outputs = group.final_outputs
    else:
        outputs = [completion_output(s, group, finished) for s in group.all_seqs()]
    return RequestOutput(
        request_id=group.request_id,
        prompt=group.prompt,
        prompt_token_ids=group.prompt_token_ids,
        outputs=outputs,
        finished=finished,
        num_cached_tokens=group.num_cached_tokens,
        error=group.error,
        prompt_logprobs=finished_prompt_logprobs(group),
    )
