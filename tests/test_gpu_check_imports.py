"""`make gpu-check`'s import path, checked on the CPU: a plain checkout (nothing installed, the
repository root first on sys.path) without ray or gguf imports everything the target runs, its
scripts start, and its GPU test files collect. A broken import is caught here, without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tokenmill.bench.gpu_check import GPU_TESTS

ROOT = Path(__file__).resolve().parents[1]
# Not on a bare CUDA machine (torch, transformers, triton, pytest): ray and gguf above all, and the
# serving / benchmark-plot / property-test extras.
UNAVAILABLE = ("ray", "gguf", "fastapi", "uvicorn", "prometheus_client", "aiohttp", "matplotlib", "hypothesis",
               "schemathesis", "openai", "scipy")
MODULES = (
    "tokenmill.kernels.attention", "tokenmill.kernels.sampling", "tokenmill.kernels.penalties",
    "tokenmill.kernels.ngram", "tokenmill.engine.llm", "tokenmill.engine.model_loader",
    "tokenmill.bench.throughput", "tokenmill.bench.backends", "tokenmill.bench.step_profile",
    "tokenmill.bench.gpu_check",
)
SCRIPTS = ("benchmarks/gpu_check.py", "benchmarks/kernels.py", "benchmarks/throughput.py")

# Runs in a fresh interpreter whose working directory is not the checkout.
CHILD = r"""
import importlib, io, json, os, runpy, sys, contextlib
root, unavailable, modules, scripts, gpu_tests = json.loads(sys.argv[1])

# These packages absent: `import ray` raises ModuleNotFoundError, importlib.util.find_spec("ray") is None.
for name in unavailable:
    sys.modules[name] = None
# A plain checkout: no installed tokenmill (an editable install's finder goes).
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in getattr(f, "__module__", "").lower()
                    and "editable" not in type(f).__module__.lower()]
sys.path[:] = [p for p in sys.path if p not in ("", root) and "__editable__" not in p]
report = {"scripts": {}, "modules": {}}

def forget_tokenmill():
    for name in [n for n in sys.modules if n == "tokenmill" or n.startswith("tokenmill.")]:
        del sys.modules[name]

# 1. Each script as `python benchmarks/x.py --help` starts it: its own folder first on sys.path, and
#    it must put the repository root there itself.
for script in scripts:
    path = os.path.join(root, script)
    forget_tokenmill()
    sys.path[:] = [p for p in sys.path if p != root]
    sys.path.insert(0, os.path.dirname(path))
    sys.argv = [path, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            runpy.run_path(path, run_name="__main__")
        code = "returned without --help exiting"
    except SystemExit as exit:
        code = exit.code
    sys.path.pop(0)
    report["scripts"][script] = {"exit": code, "usage": "usage:" in out.getvalue()}

# 2. The modules gpu-check runs, with the root first on sys.path.
forget_tokenmill()
sys.path.insert(0, root)
for name in modules:
    report["modules"][name] = importlib.import_module(name).__file__

# 3. The GPU test files collect (their tests skip without CUDA; here only collected).
if gpu_tests:
    os.chdir(root)
    import pytest
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = pytest.main(["--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_tests])
    report["collect"] = {"exit": int(code), "output": out.getvalue()}
report["loaded_tokenmill"] = {n: getattr(m, "__file__", None) for n, m in sys.modules.items()
                              if n == "tokenmill" or n.startswith("tokenmill.")}
report["loaded_unavailable"] = sorted(n for n, m in sys.modules.items() if m is not None and n.partition(".")[0] in unavailable)
print("REPORT " + json.dumps(report))
"""


def _expected_folder(module: str) -> Path:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in ("kernels", "engine", "serve"):
        return ROOT / parts[1]  # tokenmill.kernels.* is the root's kernels/ folder, and so on
    return ROOT / "tokenmill"


def _run_child(cwd: Path, unavailable, modules, scripts=(), gpu_tests=()) -> dict:
    env = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1", "PYTHONPATH": ""}
    env.setdefault("TRITON_INTERPRET", "1")
    payload = json.dumps([str(ROOT), list(unavailable), list(modules), list(scripts), list(gpu_tests)])
    done = subprocess.run([sys.executable, "-c", CHILD, payload], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)
    reports = [line for line in done.stdout.splitlines() if line.startswith("REPORT ")]
    assert done.returncode == 0 and reports, f"child failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(reports[-1][len("REPORT "):])


def test_nothing_outside_serve_needs_ray_or_gguf(tmp_path):
    folders = {"engine": "tokenmill.engine", "kernels": "tokenmill.kernels", "tokenmill/bench": "tokenmill.bench"}
    modules = [f"{package}.{path.stem}" for folder, package in folders.items()
               for path in sorted((ROOT / folder).glob("*.py")) if path.stem != "__init__"]
    report = _run_child(tmp_path, ("ray", "gguf"), modules, scripts=("benchmarks/serve_load.py",))
    assert report["scripts"] == {"benchmarks/serve_load.py": {"exit": 0, "usage": True}}
    assert sorted(report["modules"]) == sorted(modules)
    assert report["loaded_unavailable"] == []


def test_gpu_check_imports_from_a_plain_checkout_without_ray_or_gguf(tmp_path):
    report = _run_child(tmp_path, UNAVAILABLE, MODULES, SCRIPTS, GPU_TESTS)

    for script, result in report["scripts"].items():
        assert result == {"exit": 0, "usage": True}, (script, result)
    for name, path in report["modules"].items():
        assert Path(path).resolve().is_relative_to(_expected_folder(name)), (name, path)
    for name, path in report["loaded_tokenmill"].items():
        if path is not None:
            assert Path(path).resolve().is_relative_to(ROOT), (name, path)
            assert not Path(path).resolve().is_relative_to(ROOT / "serve"), f"{name}: gpu-check needs no serve/"
    assert report["loaded_unavailable"] == []

    collect = report["collect"]
    assert collect["exit"] == 0, collect["output"][-4000:]
    collected = [ln for ln in collect["output"].splitlines() if "::" in ln]
    assert any("test_greedy_parity.py::test_greedy_matches_hf_on_cuda[gpt2-prefix_caching-float32]" in ln
               for ln in collected), collect["output"][-4000:]
    assert {ln.split("::")[0].split("/")[1] for ln in collected} >= {"kernels", "engine"}
