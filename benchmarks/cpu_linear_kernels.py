"""CPU time of torch's quantized matmul kernels against float32, on SmolLM2-135M's linear shapes.

    PYTHONPATH=$PWD python benchmarks/cpu_linear_kernels.py [--threads 1]

float32 F.linear; weight-only int8 (aten._weight_int8pack_mm); weight-only int4 in groups of 32
(aten._weight_int4pack_mm_for_cpu); fbgemm dynamic int8 (quantized::linear_dynamic); fbgemm fp16
weights (quantized::linear_dynamic_fp16). Microseconds of process CPU time per call. The same weight
is reused, so small matrices sit in cache: the whole-model decode step is the deciding measure.
"""

import argparse
import time
import warnings

import torch

SHAPES = [(576, 576), (1536, 576), (576, 1536), (49152, 576)]  # (out, in): q/o, gate/up, down, head


def cpu_us(fn, n: int = 20) -> float:
    fn()
    fn()
    start = time.process_time()
    for _ in range(n):
        fn()
    return (time.process_time() - start) / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    torch.backends.quantized.engine = "fbgemm"
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
