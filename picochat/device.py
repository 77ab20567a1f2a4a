"""Device and precision choices, made once so every stage agrees."""
from __future__ import annotations

import ctypes
import os
import sys
from typing import Optional

import torch


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu unless the user names one."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_fast_bf16() -> bool:
    """True when this CPU has native bf16 dot products (AVX512-BF16 or AMX), the 2-4x fast path."""
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtype(name: str, device: torch.device, quantize: Optional[str] = None) -> torch.dtype:
    """Autocast dtype: 'auto' takes bf16 where the hardware runs it fast, else fp32. quantize (int8/int4
    weights): the activations' dtype, and 'auto' is fp32 where picochat's VNNI kernels run (model/vnni.py:
    a CPU with AVX-512 VNNI, the kernels built and PICOCHAT_VNNI not 0), which take fp32 inputs and round them
    to int8 themselves; with bf16 activations every quantized layer casts in and out (and until the
    decode-attention kernel took bf16 queries, the compiled step missed it). `serve_load.py --clients 16
    --serve-args "--quantize int4 --dtype bf16|fp32"`, servers alternating: 415 against 493 tokens/s on the
    means of three pairs (benchmarks/README.md, "tenth session"). Where the kernels do not run, PyTorch's
    take bf16 (as before)."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name != "auto":
        if name not in table:
            from .errors import PicochatError
            raise PicochatError(f"unknown dtype {name!r}; use one of auto, fp32, bf16, fp16")
        return table[name]
    if quantize not in (None, "", "none") and device.type == "cpu":
        from .model import vnni
        if vnni.available():  # (the quantized layers ask the same when they are made)
            return torch.float32
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def tune_cpu_allocator() -> bool:
    """glibc: keep big tensors on the heap instead of one mmap/munmap per tensor. True if applied.

    By default glibc serves every allocation above 32 MB (the (B*T, vocab) logits, their gradient, ...)
    with a fresh mmap and unmaps it on free, so every training step page-faults and zeroes all of
    their pages again: a quarter to a third of a CPU training step on the project's machine.
    Process-wide; memory PyTorch frees stays with the process (the peak is not given back to the OS).
    PICOCHAT_MALLOC=default leaves glibc alone.
    """
    if os.environ.get("PICOCHAT_MALLOC") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
