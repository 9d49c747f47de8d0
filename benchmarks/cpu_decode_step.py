"""CPU time of one decode step of the default model (transformers forward, KV cache) per quantization mode.

    PYTHONPATH=$PWD python benchmarks/cpu_decode_step.py [--threads 1] [--batch 1 32]

float32, int8 and int4 (with and without the output head quantized), each on a copy of the same
weights, interleaved twice so that machine noise hits every mode alike.
"""

import argparse
import copy
import time

import torch

from tokenmill.engine.model_loader import load_model
from tokenmill.engine.quantization import quantize_model

PROMPT = [1, 504, 3458, 282, 4649, 314, 253, 2569]


def step_ms(model, batch: int, steps: int = 6) -> tuple[float, float]:
    ids = torch.tensor([PROMPT]).repeat(batch, 1)  # [batch, 8]
    with torch.inference_mode():
        out = model(ids, use_cache=True)
        cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(steps):
            out = model(token, past_key_values=cache, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1:].argmax(-1)
        return (time.process_time() - cpu) / steps * 1e3, (time.perf_counter() - wall) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = load_model(None, attn_implementation="sdpa").model
    models = {
        "float32": base,
        "int8": quantize_model(copy.deepcopy(base), "int8"),
        "int8, float head": quantize_model(copy.deepcopy(base), "int8", quantize_lm_head=False),
        "int4": quantize_model(copy.deepcopy(base), "int4"),
        "int4, int4 head": quantize_model(copy.deepcopy(base), "int4", quantize_lm_head=True),
    }
    for batch in args.batch:
        for _ in range(2):
            for name, model in models.items():
                cpu, wall = step_ms(model, batch)
                print(f"batch {batch:3d} {name:18s} cpu {cpu:8.1f} ms  wall {wall:8.1f} ms per step", flush=True)


if __name__ == "__main__":
    main()
