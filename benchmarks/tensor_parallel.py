"""Tensor parallel N vs 1 (tok/s, ms per step, executor ms added per step), one run, one Ray instance.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/tensor_parallel.py --models tiny default

Same implementation as `python -m tokenmill.bench.tensor_parallel`.
"""

import sys

from tokenmill.bench.tensor_parallel import main

if __name__ == "__main__":
    sys.exit(main())
