"""The `tokenmill` console script: subcommand structure, flag mapping, `generate` end to end."""

from __future__ import annotations

import pytest

from tokenmill.serve import cli
from tokenmill.serve.cli_args import engine_kwargs
from tokenmill.serve.cli_generate import sampling_overrides


def test_subcommands_are_registered_from_their_modules():
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    assert {"serve", "generate", "bench"} <= set(subparsers.choices)
    with pytest.raises(SystemExit):
        parser.parse_args([])  # a subcommand is required


def test_serve_flags():
    args = cli.build_parser().parse_args(
        ["serve", "/models/x", "--port", "9000", "--num-replicas", "2", "--num-gpus-per-replica", "0.5",
         "--max-num-seqs", "16", "--max-model-len", "512", "--num-kv-blocks", "100", "--api-key", "k",
         "--no-prefix-caching"])
    assert (args.model, args.port, args.num_replicas, args.num_gpus_per_replica, args.api_key) == (
        "/models/x", 9000, 2, 0.5, "k")
    kwargs = engine_kwargs(args)
    assert (kwargs["max_num_seqs"], kwargs["max_model_len"], kwargs["num_kv_blocks"]) == (16, 512, 100)
    assert kwargs["enable_prefix_caching"] is False and kwargs["enable_chunked_prefill"] is True
    defaults = cli.build_parser().parse_args(["serve"])
    assert (defaults.model, defaults.host, defaults.port) == (None, "127.0.0.1", 8000)
    # Overlapped steps: the engine's device default unless a flag says otherwise.
    assert engine_kwargs(defaults)["async_scheduling"] is None
    for flag, value in (("--async-scheduling", True), ("--no-async-scheduling", False)):
        assert engine_kwargs(cli.build_parser().parse_args(["serve", flag]))["async_scheduling"] is value
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["serve", "--async-scheduling", "--no-async-scheduling"])


def test_generate_flags_map_to_sampling_params():
    args = cli.build_parser().parse_args(
        ["generate", "hi", "--num-beams", "4", "--num-return-sequences", "2", "--no-repeat-ngram-size", "3",
         "--greedy", "--stop", "\n", "--early-stopping", "never"])
    overrides = sampling_overrides(args)
    assert overrides["num_beams"] == 4 and overrides["num_return_sequences"] == 2
    assert overrides["no_repeat_ngram_size"] == 3 and overrides["do_sample"] is False
    assert overrides["stop"] == ("\n",) and overrides["early_stopping"] == "never"
    assert overrides["max_new_tokens"] == 128 and overrides["max_length"] is None
    sampled = sampling_overrides(cli.build_parser().parse_args(["generate", "hi", "--do-sample", "--top-k", "5"]))
    assert sampled["do_sample"] is True and sampled["top_k"] == 5
    assert "do_sample" not in sampling_overrides(cli.build_parser().parse_args(["generate", "hi"]))


def test_generate_prints_the_completion(capsys):
    code = cli.main(["generate", "The capital of France is", "--max-new-tokens", "4", "--greedy",
                     "--max-model-len", "64", "--device", "cpu"])
    out = capsys.readouterr().out
    prompt = "The capital of France is"
    assert code == 0 and out.startswith(prompt) and len(out.strip()) > len(prompt)
