"""vLLM's OpenAI-API extensions that tokenmill accepts, in one table (rendered into the README).

Any request field not in the OpenAI API, tokenmill's own parameters or this table is a 400 naming it
(protocol.py forbids unknown fields).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Extension:
    vllm: str  # the request field as vLLM names it
    tokenmill: str  # what it becomes here (SamplingParams field or API behaviour)
    where: str  # "completions", "chat" or "both"
    meaning: str


VLLM_EXTENSIONS: tuple[Extension, ...] = (
    Extension("stream_options.continuous_usage_stats", "usage in every chunk", "both",
              "with `stream_options.include_usage`: every chunk carries `usage` so far (prompt tokens, tokens "
              "generated up to that chunk); the final usage chunk still comes last"),
    Extension("min_tokens", "`min_new_tokens`", "both", "EOS and stop_token_ids are banned before this many tokens"),
    Extension("ignore_eos", "`ignore_eos`", "both", "generate past EOS up to max_tokens"),
    Extension("skip_special_tokens", "`skip_special_tokens`", "both", "drop special tokens from the text (default true)"),
    Extension("spaces_between_special_tokens", "detokenizer option", "both",
              "accepted; with the fast (Rust) tokenizers tokenmill loads, both values decode the same, as in vLLM"),
    Extension("include_stop_str_in_output", "`include_stop_str_in_output`", "both",
              "keep the matched stop string at the end of the text"),
    Extension("prompt_logprobs", "`prompt_logprobs`", "both",
              "top-k log-probabilities of every prompt token under the raw model (first entry null); "
              "returned as `prompt_logprobs` ({token id: {logprob, rank, decoded_token}}); not with `stream`"),
    Extension("echo + logprobs", "`prompt_logprobs` = logprobs", "completions",
              "the prompt's tokens lead `logprobs` in OpenAI's legacy shape (first token's logprob null)"),
    Extension("max_tokens: 0 (with echo)", "prompt scoring only", "completions",
              "returns the prompt and its log-probabilities, generates nothing (usage: 0 completion tokens)"),
    Extension("add_generation_prompt", "chat template argument", "chat", "default true"),
    Extension("continue_final_message", "chat template argument", "chat",
              "the last (assistant) message is left open for the model to continue; needs "
              "add_generation_prompt=false"),
    Extension("chat_template_kwargs", "chat template variables", "chat",
              "extra variables for the template (names that the call itself sets are rejected)"),
    Extension("return_tokens_as_token_ids", "token strings `token_id:N`", "both",
              "with logprobs: every token (and top-logprob key) is written `token_id:<id>`"),
    Extension("priority", "none (no priority scheduling)", "both",
              "0 (the default) is accepted; any other value is a 400"),
    Extension("structured_outputs {json | regex | choice | grammar | json_object}", "`structured_outputs`", "both",
              "constrained decoding with xgrammar (grammar: xgrammar EBNF with a `root` rule)"),
    Extension("guided_json, guided_regex, guided_choice, guided_grammar", "`structured_outputs`", "both",
              "vLLM's older names for the same constraints"),
    Extension("response_format {json_object | json_schema}", "`structured_outputs`", "both",
              "OpenAI's structured outputs; `text` means no constraint"),
)


def extensions_markdown() -> str:
    """The table as it appears in the README."""
    lines = ["| vLLM request field | tokenmill | endpoint | meaning |", "|---|---|---|---|"]
    for e in VLLM_EXTENSIONS:
        lines.append(f"| `{e.vllm}` | {e.tokenmill} | {e.where} | {e.meaning} |")
    return "\n".join(lines)
