"""Device and precision choices, made once so every stage agrees."""
from __future__ import annotations

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


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """Autocast dtype: 'auto' takes bf16 where the hardware runs it fast, else fp32."""
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
             "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
    if name != "auto":
        if name not in table:
            from .errors import PicochatError
            raise PicochatError(f"unknown dtype {name!r}; use one of auto, fp32, bf16, fp16")
        return table[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32
