"""Offline throughput: tokenmill LLM.generate vs transformers generate / generate_batch.

    python benchmarks/throughput.py                         # default model, greedy workload
    python benchmarks/throughput.py --workload all --json out.json
    python benchmarks/throughput.py --random-model 135m --device cuda

Same implementation as `tokenmill bench throughput` (tokenmill.bench.throughput).
"""

import sys

from tokenmill.bench.commands import throughput_main

if __name__ == "__main__":
    sys.exit(throughput_main())
