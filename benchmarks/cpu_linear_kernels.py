"""CPU time of torch's quantized matmul kernels against float32, on SmolLM2-135M's linear shapes.

    PYTHONPATH=$PWD python benchmarks/cpu_linear_kernels.py [--threads 1]

float32 F.linear; weight-only int8 (aten._weight_int8pack_mm); weight-only int4 in groups of 32
(aten._weight_int4pack_mm_for_cpu); fbgemm dynamic int8 (quantized::linear_dynamic); fbgemm fp16
weights (quantized::linear_dynamic_fp16). Microseconds of process CPU time per call. The same weight
is reused, so small matrices sit in cache: the whole-model decode step is the deciding measure.

`--whole-model`: instead, every linear layer of the model at once (30 layers x 7 and the output
head, each its own weight, so they stream from memory as in a decode step) for float32, fbgemm
int8 and fbgemm fp16 (and float32 as the engine runs a decode step's rows: `W @ x.T` split over
the threads; and MKL's packed sgemm, packed for each batch size), beside the machine's memory read
bandwidth: the floor these kernels put under one decode step, and so the ceiling on single-stream tokens per second before attention, norms and
the rest of the step.
"""

import argparse
import time
import warnings

import torch

from tokenmill.engine.cpu_linear import chunks_for, small_rows_linear

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, gate/up, down, head
# One decoder layer's projections (q, k, v, o, gate, up, down) of SmolLM2-135M, 30 layers, the tied head.
LAYER_SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
MODEL_SHAPES = LAYER_SHAPES * 30 + [(49152, 576)]


def cpu_us(fn, n: int = 20) -> float:
    fn()
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def read_bandwidth_gbs(num_bytes: int = 512 << 20) -> float:
    """Memory read bandwidth: best of five sums over a float32 buffer far larger than the caches."""
    buffer = torch.ones(num_bytes // 4)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return num_bytes / best / 1e9


def whole_model(batches: list[int]) -> None:
    weights = [torch.randn(n, k) * 0.02 for n, k in MODEL_SHAPES]
    num_bytes = sum(w.numel() for w in weights) * 4
    gbs = read_bandwidth_gbs()
    print(f"memory read bandwidth {gbs:.1f} GB/s; float32 weights {num_bytes / 1e6:.0f} MB: "
          f"{num_bytes / gbs / 1e6:.1f} ms to read once")
    kernels = {
        "float32": (weights, lambda x, w: torch.nn.functional.linear(x, w)),
        # What the engine runs for 1-8 rows (engine/cpu_linear.py): W @ x.T, one chunk per thread.
        "float32 W @ x.T split": (weights, lambda x, w: small_rows_linear(
            x, w, None, chunks_for(w.shape[0], torch.get_num_threads()))),
        "fbgemm int8": ([torch.ops.quantized.linear_prepack(torch.quantize_per_channel(
            w, (w.abs().amax(1) / 127).double(), torch.zeros(w.shape[0], dtype=torch.long), 0, torch.qint8), None)
            for w in weights], lambda x, p: torch.ops.quantized.linear_dynamic(x, p, True)),
        "fbgemm fp16": ([torch.ops.quantized.linear_prepack_fp16(w, None) for w in weights],
                        lambda x, p: torch.ops.quantized.linear_dynamic_fp16(x, p)),
    }
    print("| batch | kernel | all linear layers: wall ms / CPU ms per step | ceiling tok/s per sequence (wall) |")
    print("|---|---|---|---|")
    for m in batches:
        inputs = {k: torch.randn(m, k) for k in {k for _, k in MODEL_SHAPES}}
        if torch.backends.mkl.is_available():  # MKL's packed sgemm (what inductor's freezing uses), packed for m rows
            kernels["float32 MKL packed"] = (
                [(torch.ops.mkl._mkl_reorder_linear_weight(w, m), w) for w in weights],
                lambda x, p: torch.ops.mkl._mkl_linear(x, p[0], p[1], None, x.shape[0]))
        for name, (packed, call) in kernels.items():
            def step():
                for (_, k), weight in zip(MODEL_SHAPES, packed):
                    call(inputs[k], weight)
            step()
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(5):
                step()
            wall, cpu = (time.perf_counter() - wall) / 5 * 1e3, (time.process_time() - cpu) / 5 * 1e3
            print(f"| {m} | {name} | {wall:.1f} / {cpu:.1f} | {1e3 / wall:.1f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--whole-model", action="store_true", help="every linear layer of the model per step")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "fbgemm"
    if args.whole_model:
        whole_model(args.batch)
        return
    print(f"capability {torch.backends.cpu.get_cpu_capability()}, threads {args.threads}; CPU us per call")
    for n, k in SHAPES:
        w = torch.randn(n, k)
        scales = w.abs().amax(1) / 127
        w8 = (w / scales[:, None]).round().clamp(-128, 127).to(torch.int8)
        w4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (n, k), dtype=torch.int32), 1)
        sz = torch.rand(k // 32, n, 2)
        qw = torch.quantize_per_channel(w, scales.double(), torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        packed8 = torch.ops.quantized.linear_prepack(qw, None)
        packed16 = torch.ops.quantized.linear_prepack_fp16(w, None)
        for m in args.batch:
            x = torch.randn(m, k)
            row = {
                "float32": cpu_us(lambda: torch.nn.functional.linear(x, w)),
                "int8pack (weight-only)": cpu_us(lambda: torch.ops.aten._weight_int8pack_mm(x, w8, scales)),
                "int4pack (weight-only)": cpu_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w4, 32, sz)),
                "fbgemm dynamic int8": cpu_us(lambda: torch.ops.quantized.linear_dynamic(x, packed8, True)),
                "fbgemm fp16": cpu_us(lambda: torch.ops.quantized.linear_dynamic_fp16(x, packed16)),
            }
            print(f"[{m} x {k}] @ [{k} x {n}]: " + ", ".join(f"{name} {us:.0f}" for name, us in row.items()), flush=True)


if __name__ == "__main__":
    main()
