from setuptools import setup

SERVE_REQUIRES = [
    "ray[serve]>=2.40", "fastapi", "uvicorn", "pydantic>=2", "prometheus_client", "httpx", "aiohttp", "xgrammar>=0.2.9",
    "pyzmq", "msgpack", "psutil",
]
BENCH_REQUIRES = ["matplotlib"]
LLAMACPP_REQUIRES = ["llama-cpp-python>=0.3"]  # the llama.cpp benchmark backend; builds from source (cmake, C++)

setup(
    name="tokenmill",
    version="0.1.0",
    description="High-throughput batched text generation: continuous batching, paged KV cache, Triton kernels, Ray Serve.",
    python_requires=">=3.10",
    packages=["tokenmill", "tokenmill.bench", "tokenmill.kernels", "tokenmill.engine", "tokenmill.serve"],
    package_dir={
        "tokenmill": "tokenmill",
        "tokenmill.kernels": "kernels",
        "tokenmill.engine": "engine",
        "tokenmill.serve": "serve",
    },
    install_requires=[
        "torch==2.13.0",
        "transformers>=5.17,<6",
        "tokenizers",
        "safetensors",
        "gguf>=0.10",
        "accelerate",
        "numpy",
        "tqdm",
        "triton>=3.4",  # tl.histogram(..., mask=)
    ],
    extras_require={
        "serve": SERVE_REQUIRES,
        "bench": BENCH_REQUIRES,
        "llamacpp": LLAMACPP_REQUIRES,
        "test": SERVE_REQUIRES + BENCH_REQUIRES + ["pytest", "pytest-timeout", "hypothesis", "scipy", "openai", "schemathesis", "lm_eval[api]>=0.4.13", "jsonschema"],
    },
    entry_points={"console_scripts": ["tokenmill=tokenmill.serve.cli:main"]},
)
