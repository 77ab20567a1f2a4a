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

Quantized loads (`quantize="int8"/"int4"`) are cached too, in <sha256>-<int8|int4>-<activations dtype>-
<kernel tag>/ (model.pt: see _write_quantized). Quantizing reads the fp32 weights and makes fp32
temporaries (SmolLM2 int4: ~0.85 s and ~1.25 GB peak at every load); the cached int4 model is 201 MB on
disk and loads in 0.46 s within 321 MB. The tag names picochat's quantizer version (QUANT_VERSION), the
PyTorch version and the int4 kernel's packed layout: a change to any of them makes another folder, and
the folders of other tags for the same file, method and dtype are removed once it is written.
"""
from __future__ import annotations

import functools
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


def load_cached_quantized(src: Path, method: str, dtype: Optional[torch.dtype]):
    """(GPT quantized to `method` with activations in `dtype` (fp32 for None), Tokenizer) of GGUF file
    `src`: from the quantized cache, or quantized from the fp32 conversion and then cached."""
    from ..model.quant import QUANTIZE_CHOICES, quantize_model
    dtype = dtype or torch.float32
    if method not in QUANTIZE_CHOICES:
        raise PicochatError(f"unknown quantization {method!r}; use one of: {', '.join(QUANTIZE_CHOICES)}")
    if dtype not in DTYPE_NAMES:
        raise PicochatError(f"cannot cache weights in {dtype}; use fp32, bf16 or fp16")
    if os.environ.get("PICOCHAT_NO_CACHE"):
        model, tokenizer = load_cached(src, torch.float32)
        return quantize_model(model, method, dtype, tokenizer), tokenizer
    folder = cache_root() / f"{file_key(src)}-{method}-{DTYPE_NAMES[dtype]}-{kernel_tag()}"
    if (folder / "config.json").is_file():
        try:
            return _read_quantized(folder, method, dtype)
        except Exception as e:
            warnings.warn(f"the quantized weights in {folder} are unreadable ({e}); quantizing {src} again")
    model, tokenizer = load_cached(src, torch.float32)
    model = quantize_model(model, method, dtype, tokenizer)
    try:
        _write_quantized(model, folder, tokenizer, method)
    except (OSError, RuntimeError) as e:  # (torch.save reports a full disk as a RuntimeError)
        warnings.warn(f"could not cache the quantized weights in {folder} ({e}); the next load quantizes again")
    else:
        _drop_stale(folder)
    return model, tokenizer


def _drop_stale(folder: Path) -> None:
    """Remove the quantized copies of the same file, method and dtype made under another tag (an older
    quantizer or PyTorch: ~200-300 MB each, which this version never reads again), and what a kill
    left of their writing (.tmp folders). The current tag's own .tmp may be another process's write."""
    import shutil
    prefix = folder.name[:folder.name.index(f"-{kernel_tag()}")] + "-"
    for p in folder.parent.iterdir():
        name = p.name[1:] if p.name.startswith(".") else p.name
        if p.is_dir() and name.startswith(prefix) and not name.startswith(folder.name):
            shutil.rmtree(p, ignore_errors=True)


@functools.cache
def kernel_tag() -> str:
    """picochat's quantizer version, PyTorch's, and a digest of how its CPU int4 kernel packs a fixed matrix;
    "-vnni" where the layers take model/vnni.py's layouts instead (a CPU with AVX-512 VNNI)."""
    from ..model import vnni
    from ..model.quant import QUANT_VERSION
    q = torch.randint(0, 16, (64, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    digest = hashlib.sha256(packed.contiguous().numpy().tobytes()).hexdigest()[:8]
    kernels = f"-vnni{vnni.LAYOUT_VERSION}" if vnni.available() else ""
    return f"q{QUANT_VERSION}-torch{torch.__version__.replace('+', '_')}-{digest}{kernels}"


def _write_quantized(model, folder: Path, tokenizer, method: str) -> None:
    from ..fsutil import atomic_dir
    from .io import FORMAT, VERSION

    def fill(tmp: Path) -> None:
        # "quantized" marks it: only _read_quantized reads it back (load_model would refuse its buffers)
        (tmp / "config.json").write_text(json.dumps({"format": FORMAT, "version": VERSION, "quantized": method,
                                                     "model": model.config.to_dict()}, indent=2))
        # torch's format, not safetensors: the int8/int4 kernels segfault on weights that are not 64-byte
        # aligned, and safetensors' loader hands tensors out at 8-byte offsets;
        # torch.save aligns every tensor to 64 bytes, and torch.load maps the file (no copy). Read back with
        # weights_only=True: no pickled code runs. The kernels' weights are views of one block in 2 MB pages
        # (hostmem.py): each is saved as a tensor of its own, or the file would hold the block, padding
        # included, and give the views of one storage back
        def own(v):
            v = v.detach().contiguous()
            return v if v.untyped_storage().nbytes() == v.nbytes else v.clone()
        torch.save({k: own(v) for k, v in model.state_dict().items()}, tmp / "model.pt")
        tokenizer.save(tmp / "tokenizer.json")
    atomic_dir(folder, fill)


def _read_quantized(folder: Path, method: str, dtype: torch.dtype):
    from ..model.gpt import GPT
    from ..model.quant import finish_quantized, quantized_skeleton
    from .io import read_config, read_tokenizer
    if json.loads((folder / "config.json").read_text()).get("quantized") != method:
        raise PicochatError(f"is not {method} weights")
    config = read_config(folder)
    state = torch.load(folder / "model.pt", map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict) or any(not isinstance(v, torch.Tensor) or v.data_ptr() % 64
                                          for v in state.values()):
        raise PicochatError("holds something other than 64-byte aligned tensors")
    frame = {}

    def skeleton(model):  # the integer buffers must come back as they were made (a float file is no int4)
        quantized_skeleton(model, method)
        frame.update({k: v.dtype for k, v in model.state_dict().items() if not v.is_floating_point()})
    model = GPT.from_state(config, state, frame=skeleton)
    wrong = [k for k, dt in frame.items() if state[k].dtype != dt]
    if wrong:
        raise PicochatError(f"{wrong[0]} is {state[wrong[0]].dtype}, not {frame[wrong[0]]}")
    tokenizer = read_tokenizer(folder)
    if tokenizer is None:
        raise PicochatError("has no tokenizer.json")
    return finish_quantized(model, dtype), tokenizer
