"""`make gpu-check`: GPU tests, kernel benchmark and 1B throughput / step numbers in one report.

    python benchmarks/gpu_check.py --out gpu-results        # what `make gpu-check` runs (< 8 minutes)
    python benchmarks/gpu_check.py --out /tmp/g --smoke     # tiny shapes, to check the wiring

Same implementation as tokenmill/bench/gpu_check.py.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

from tokenmill.bench.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
