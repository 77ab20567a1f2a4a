"""Converted GGUF weights, cached in picochat's own format: a GGUF model loads in about a second after the
first run, within a few hundred MB.

The first load of a GGUF file dequantises every tensor to fp32 (checkpoints/gguf.py: ~7 s and ~1.7 GB peak
for SmolLM2-135M). The result is then written, in the dtype the model will run in, as an ordinary
checkpoint directory (config.json, model.safetensors, tokenizer.json) under
$PICOCHAT_HOME/converted/<sha256 of the GGUF file>-<dtype>/, atomically (a kill leaves no half of one).
Later loads read that: the tensors go straight into a GPT built on the meta device (GPT.from_state: no
random initialisation, no second copy), so memory holds the weights once, in their final dtype.

Keyed by the file's hash, a changed or replaced GGUF file never meets stale weights; a cache directory
that cannot be read is converted again (with a warning), never trusted.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import torch

from ..errors import PicochatError

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cache_root() -> Path:
    from ..data.prepare import picochat_home
    return picochat_home() / "converted"


def file_key(path: Path) -> str:
    """sha256 of the file (~0.1 s for 100 MB), remembered beside the cache by (size, mtime) so an unchanged
    file is not read again."""
    st = path.stat()
    memo = cache_root() / "hashes.json"
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(stamp), str):
        return known[stamp]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 23), b""):
            h.update(chunk)
    digest = h.hexdigest()
    try:
        from ..fsutil import atomic_write
        atomic_write(memo, json.dumps({**(known if isinstance(known, dict) else {}), stamp: digest}))
    except OSError:
        pass  # a read-only home: hash again next time
    return digest


def load_cached(src: Path, dtype: Optional[torch.dtype]):
    """(GPT in `dtype` (fp32 for None), Tokenizer) of GGUF file `src`, from the cache (converted first if
    missing). Set PICOCHAT_NO_CACHE=1 to convert every time and write nothing."""
    from .gguf import load_gguf
    dtype = dtype or torch.float32
    if dtype not in DTYPE_NAMES:
        raise PicochatError(f"cannot cache weights in {dtype}; use fp32, bf16 or fp16")
    if os.environ.get("PICOCHAT_NO_CACHE"):
        model, tokenizer, _ = load_gguf(src)
        return model.to(dtype), tokenizer
    folder = cache_root() / f"{file_key(src)}-{DTYPE_NAMES[dtype]}"
    if (folder / "config.json").is_file():
        try:
            return _read(folder, dtype)
        except Exception as e:  # (whatever a damaged file raises: safetensors has its own error type)
            warnings.warn(f"the converted weights in {folder} are unreadable ({e}); converting {src} again")
    model, tokenizer, _ = load_gguf(src)
    model = model.to(dtype)
    try:
        from .io import save_model
        save_model(model, folder, tokenizer=tokenizer)
    except OSError as e:  # a full or read-only disk: run without the cache
        warnings.warn(f"could not cache the converted weights in {folder} ({e}); the next load converts again")
    return model, tokenizer


def _read(folder: Path, dtype: torch.dtype):
    from safetensors.torch import load_file

    from ..model.gpt import GPT
    from .io import read_config, read_tokenizer
    config = read_config(folder)
    state = load_file(str(folder / "model.safetensors"))
    if any(t.dtype != dtype for t in state.values()):
        raise PicochatError(f"holds {sorted({str(t.dtype) for t in state.values()})}, not {dtype}")
    model = GPT.from_state(config, state).to(dtype)  # (the tables too, as .to(dtype) casts them on a fresh load)
    tokenizer = read_tokenizer(folder)
    if tokenizer is None:
        raise PicochatError("has no tokenizer.json")
    return model.eval(), tokenizer
