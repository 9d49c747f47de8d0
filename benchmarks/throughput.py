"""Offline throughput: tokenmill LLM.generate vs transformers generate / generate_batch.

    python benchmarks/throughput.py                         # default model, greedy workload
    python benchmarks/throughput.py --workload all --json out.json
    python benchmarks/throughput.py --random-model 135m --device cuda

Same implementation as `tokenmill bench throughput` (tokenmill.bench.throughput).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

from tokenmill.bench.commands import throughput_main

if __name__ == "__main__":
    sys.exit(throughput_main())
