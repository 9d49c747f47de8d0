"""Serving load: streamed /v1/completions against an OpenAI-compatible server (tokenmill, vLLM, ...).

    tokenmill serve &                                    # or any OpenAI-compatible server
    python benchmarks/serve_load.py --num-prompts 32 --max-concurrency 1,4,16 --plot serve.png

Same implementation as `tokenmill bench serve` (tokenmill.bench.serve).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # a plain checkout: the root first

from tokenmill.bench.commands import serve_main

if __name__ == "__main__":
    sys.exit(serve_main())
