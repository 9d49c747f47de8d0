"""LLM: the offline entry point (`LLM().generate(prompts, params)`)."""

from __future__ import annotations

import itertools
import time
from typing import Any, Sequence

from tqdm.auto import tqdm

from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.outputs import RequestOutput
from tokenmill.engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    """Generate for many prompts at once through the continuous-batching engine.

    `LLM()` loads the default model (SmolLM2-135M-Instruct); `LLM(model=PATH)` a local HF folder
    or a .gguf file. Keyword arguments go to `LLMEngine.from_args` (max_num_seqs, num_kv_blocks, ...).
    """

    def __init__(self, model: str | None = None, **engine_args: Any) -> None:
        self.llm_engine = LLMEngine.from_args(model, **engine_args)
        self._request_counter = itertools.count()

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`. Default parameters: the model's generation_config."""
        prompt_list = self._as_prompt_list(prompts)
        if sampling_params is None:
            params_list = [self.llm_engine.default_sampling_params()] * len(prompt_list)
        elif isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params] * len(prompt_list)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompt_list):
                raise ValueError(
                    f"sampling_params has {len(params_list)} entries: allowed one, or one per prompt ({len(prompt_list)})"
                )
        # Only the final outputs are read: the engine builds one output per request, at its end, and
        # decodes the text once then (unless stop strings need it earlier).
        finals: dict[int, SamplingParams] = {}
        for p in params_list:
            if id(p) not in finals:
                finals[id(p)] = _final(p)
        params_list = [finals[id(p)] for p in params_list]
        engine = self.llm_engine
        ids = [f"llm-{next(self._request_counter)}" for _ in prompt_list]
        try:
            for rid, prompt, params in zip(ids, prompt_list, params_list):
                engine.add_request(rid, prompt, params)
        except Exception:
            engine.abort_request(ids)  # all or nothing: no request of a rejected call is left running
            raise
        return self._run(ids, use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        bar = tqdm(total=len(ids), desc="requests", unit="req", disable=not use_tqdm)
        start = time.perf_counter()
        num_output_tokens = 0
        try:
            while len(finished) < len(ids):
                for out in engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        num_output_tokens += sum(len(c.token_ids) for c in out.outputs)
                        bar.update(1)
                        bar.set_postfix(out_tok_s=f"{num_output_tokens / (time.perf_counter() - start):.1f}")
                if not engine.has_unfinished_requests() and len(finished) < len(ids):
                    missing = [i for i in ids if i not in finished]
                    raise RuntimeError(f"requests {missing} ended without a final output")
        except BaseException:
            engine.abort_request([i for i in ids if i not in finished])
            raise
        finally:
            bar.close()
        return [finished[i] for i in ids]

    @staticmethod
    def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        prompts = list(prompts)
        if prompts and all(isinstance(t, int) for t in prompts):
            return [prompts]  # one prompt given as token ids
        for i, p in enumerate(prompts):
            if not isinstance(p, (str, list)):
                raise ValueError(f"prompts[{i}] is a {type(p).__name__}: allowed a string or a list of token ids")
        return prompts


def _final(params: SamplingParams) -> SamplingParams:
    if not isinstance(params, SamplingParams):
        raise ValueError(f"sampling_params holds a {type(params).__name__}: allowed SamplingParams")
    return params if params.output_kind == "final" else params.replace(output_kind="final")
