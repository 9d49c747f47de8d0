"""Host overhead per engine step: schedule, run, update (sampler apart) with many running decodes.

    PYTHONPATH=$PWD python benchmarks/host_overhead.py                  # 256 decodes, every output kind
    PYTHONPATH=$PWD python benchmarks/host_overhead.py --profile 20     # cProfile's top functions too

A tiny random-weight Llama (2 layers, hidden 64, vocabulary 384) and a byte-level BPE trained here
keep the forward small, so what is left is the engine's own Python. Every request is greedy, ignores
EOS and is admitted in the first steps; only steady steps where all `--num-seqs` requests decode
together are timed. Each phase is timed in CPU time (`time.process_time`, one torch thread: a shared
machine's load does not count) around the engine's own calls:

- schedule: `Scheduler.schedule()`
- run:      `ModelRunner.run(batch)` (input preparation + the tiny forward; not host work of this part)
- sample:   `Sampler.__call__` inside the update
- update:   `StepUpdater.update` less the sampler: appends, stop checks, block commits, outputs
- host:     schedule + update (the per-step work outside the forward and the sampler)
- message:  `--core-message`: what the serving engine core adds per step, turning the step's outputs
            into its client's msgpack message (`EngineCore._route` + `pack`; needs pyzmq)

Kinds: cumulative, delta, delta-nodetok (delta, no text), core (delta-nodetok with the engine core's
`compact_deltas`: token-only outputs in one TokenDeltas per step), final, legacy.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
import cProfile
import io
import pstats
import resource
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from tokenmill.engine.attention_backend import register_attention
from tokenmill.engine.llm_engine import LLMEngine
from tokenmill.engine.model_loader import LoadedModel
from tokenmill.engine.sampling_params import SamplingParams

VOCAB = 384
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you today? I'm fine, thanks.",
    "def main():\n    return [x * 2 for x in range(10)]\n",
] * 8


def tiny_loaded() -> LoadedModel:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tk.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|endoftext|>")
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=register_attention()).eval()
    model.generation_config.eos_token_id = None
    return LoadedModel(model=model, tokenizer=tokenizer, generation_config=model.generation_config,
                       model_path="", max_model_len=1024)


class PhaseTimer:
    """Wraps the engine's schedule / run / update / sampler calls and adds up their CPU time."""

    def __init__(self, engine: LLMEngine) -> None:
        self.totals = {"schedule": 0.0, "run": 0.0, "update": 0.0, "sample": 0.0}
        self.recording = False
        for name, owner, attr in (
            ("schedule", engine.scheduler, "schedule"),
            ("run", engine.runner, "run"),
            ("update", engine.updater, "update"),
            ("sample", engine.updater, "sampler"),
        ):
            setattr(owner, attr, self._wrap(name, getattr(owner, attr)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.process_time()
            try:
                return fn(*args, **kwargs)
            finally:
                if self.recording:
                    self.totals[name] += time.process_time() - start

        return timed


def core_message_timer(engine: LLMEngine, request_ids: list[str]):
    """A function timing (CPU s) what the engine core does with one step's outputs: route + pack."""
    from tokenmill.serve.engine_core import EngineCore, _Reply
    from tokenmill.serve.engine_core_messages import pack

    compact = engine.compact_deltas
    core = EngineCore(engine, bind=f"inproc://tokenmill-host-overhead-{id(engine)}")  # not started: no loop
    engine.compact_deltas = compact  # the core turns it on; the kind decides here
    core.socket.close()  # never started: only its routing is timed
    for rid in request_ids:
        core._owner[rid], core._num_sent[rid] = b"client", {}

    def timed(outputs) -> float:
        start = time.process_time()
        replies = defaultdict(_Reply)
        core._route(outputs, replies)
        reply = replies[b"client"]
        pack(["step", reply.outputs, reply.accepted, reply.rejected, {}, reply.deltas])
        return time.process_time() - start

    return timed


def run_kind(loaded: LoadedModel, args, kind: str | None, detokenize: bool, profile: int,
             compact: bool = False) -> dict[str, float]:
    engine = LLMEngine.from_args(
        loaded=loaded, max_num_seqs=args.num_seqs, max_num_batched_tokens=max(2048, args.num_seqs * args.prompt_len),
        num_kv_blocks=args.num_seqs * (-(-(args.prompt_len + args.max_tokens) // 16)) + 16, max_model_len=1024,
        num_threads=1,  # the engine sets torch's threads (default: the usable cores); CPU time needs one
        **({"async_scheduling": True} if args.async_scheduling else {}),
    )
    timer = PhaseTimer(engine)
    engine.compact_deltas = compact
    extra = {} if kind is None else {"output_kind": kind, "detokenize": detokenize}
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True, **extra)
    g = torch.Generator().manual_seed(0)
    for i in range(args.num_seqs):
        engine.add_request(f"r{i}", torch.randint(1, VOCAB, (args.prompt_len,), generator=g).tolist(), params)
    message = core_message_timer(engine, list(engine.requests)) if args.core_message else None
    message_s = 0.0
    while engine.scheduler.waiting or any(s.num_uncomputed_tokens > 1 for grp in engine.scheduler.running for s in grp.seqs):
        engine.step()  # prefill
    for _ in range(args.warmup):
        engine.step()
    profiler = cProfile.Profile() if profile else None
    timer.recording = True
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for step in range(args.steps):
        if profiler is not None and step < profile:
            profiler.enable()
        outputs = engine.step()
        if message is not None:
            message_s += message(outputs)
        if profiler is not None and step < profile:
            profiler.disable()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    timer.recording = False
    assert len(engine.scheduler.running) == args.num_seqs, "a request finished inside the timed steps"
    engine.abort_request(list(engine.requests))
    t = timer.totals
    per = {k: 1e3 * v / args.steps for k, v in t.items()}
    per["update"] -= per["sample"]
    per["host"] = per["schedule"] + per["update"]
    per["wall_step"] = 1e3 * wall / args.steps
    per["cpu_step"] = 1e3 * cpu / args.steps
    per["message"] = 1e3 * message_s / args.steps
    if profiler is not None:
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return per


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=128, help="per request; must outlast warm-up + timed steps")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kinds", default="cumulative,delta,delta-nodetok,core,final",
                   help="output kinds to run; 'legacy' = SamplingParams without output_kind/detokenize")
    p.add_argument("--async-scheduling", action="store_true", help="overlapped steps (same work on the CPU)")
    p.add_argument("--profile", type=int, default=0, help="cProfile the first N timed steps of each kind")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--core-message", action="store_true", help="also time the engine core's step message")
    args = p.parse_args()
    if args.warmup + args.steps >= args.max_tokens:
        p.error("--max-tokens must exceed --warmup + --steps")
    torch.set_num_threads(1)
    loaded = tiny_loaded()
    print(f"{args.num_seqs} running decodes, prompt {args.prompt_len}, {args.steps} timed steps"
          f"{', async scheduling' if args.async_scheduling else ''}; CPU ms per step "
          "(wall: wall-clock ms per step)")
    header = (f"{'kind':<16}{'schedule':>9}{'update':>9}{'host':>9}{'sample':>9}{'run':>9}{'cpu step':>9}{'wall':>9}"
              + (f"{'message':>9}" if args.core_message else ""))
    print(header)
    for name in args.kinds.split(","):
        kind, detok = {"legacy": (None, True), "delta-nodetok": ("delta", False), "core": ("delta", False)}.get(
            name, (name, True))
        r = run_kind(loaded, args, kind, detok, args.profile, compact=name == "core")
        columns = ("schedule", "update", "host", "sample", "run", "cpu_step", "wall_step")
        print(f"{name:<16}" + "".join(f"{r[k]:>9.2f}" for k in columns + (("message",) if args.core_message else ())))
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
