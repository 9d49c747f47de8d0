"""`tokenmill generate "prompt"`: offline generation with LLM, printing the completion(s)."""

from __future__ import annotations

import argparse
from typing import Any

from tokenmill.serve.cli_args import add_engine_args, engine_kwargs

# flag dest -> SamplingParams field, for flags whose default None means "the model's generation_config".
_SAMPLING_FLAGS = {
    "max_new_tokens": "max_new_tokens", "min_new_tokens": "min_new_tokens", "num_beams": "num_beams",
    "num_return_sequences": "num_return_sequences", "length_penalty": "length_penalty",
    "temperature": "temperature", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p", "typical_p": "typical_p",
    "repetition_penalty": "repetition_penalty", "no_repeat_ngram_size": "no_repeat_ngram_size",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty", "sample_seed": "seed",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="Generate a completion offline and print it.",
                                   description="Unset sampling flags take the model's generation_config values.")
    parser.add_argument("prompt", help="The prompt text.")
    parser.add_argument("--model", default=None, help="Local HF folder or .gguf file (default model if omitted).")
    parser.add_argument("--chat", action="store_true", help="Wrap the prompt in the model's chat template.")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="Default 128.")
    parser.add_argument("--min-new-tokens", type=int, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--num-return-sequences", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--early-stopping", choices=("true", "false", "never"), default=None)
    parser.add_argument("--do-sample", action="store_true", default=None, help="Sample (default: the model's choice).")
    parser.add_argument("--greedy", dest="do_sample", action="store_false", default=None,
                        help="Greedy / plain beam search.")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--typical-p", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None)
    parser.add_argument("--presence-penalty", type=float, default=None)
    parser.add_argument("--frequency-penalty", type=float, default=None)
    parser.add_argument("--stop", action="append", default=None, help="A stop string (repeatable).")
    parser.add_argument("--sample-seed", type=int, default=None, help="Seed of this request's sampling.")
    add_engine_args(parser)
    parser.set_defaults(func=run)


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    overrides = {
        field: getattr(args, dest) for dest, field in _SAMPLING_FLAGS.items() if getattr(args, dest) is not None
    }
    if args.do_sample is not None:
        overrides["do_sample"] = args.do_sample
    if args.early_stopping is not None:
        overrides["early_stopping"] = {"true": True, "false": False}.get(args.early_stopping, "never")
    if args.stop:
        overrides["stop"] = tuple(args.stop)
    if "max_new_tokens" in overrides:
        overrides["max_length"] = None
    return overrides


def run(args: argparse.Namespace) -> int:
    from tokenmill.engine.llm import LLM

    llm = LLM(args.model, **engine_kwargs(args))
    params = llm.llm_engine.default_sampling_params().replace(**sampling_overrides(args))
    prompt: str | list[int] = args.prompt
    if args.chat:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False,
                                                 add_generation_prompt=True)
        prompt = list(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    if output.error:
        print(f"error: {output.error}")
        return 1
    many = len(output.outputs) > 1
    for completion in output.outputs:
        if many:
            print(f"--- [{completion.index}] finish_reason={completion.finish_reason}")
        print(completion.text if args.chat else args.prompt + completion.text)
    return 0
