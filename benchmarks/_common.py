"""Helpers shared by the benchmark scripts: stderr logging, machine facts, the matmul peak, one JSON line.

Every benchmark prints exactly one JSON line on stdout; progress and notes go to stderr, so
``python benchmarks/x.py > result.json`` captures the figure and nothing else.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

# run from a checkout without installing: make the repository root importable
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The benchmark's one line of stdout."""
    print(json.dumps(result, separators=(", ", ": ")), flush=True)


def loadavg() -> float:
    """1-minute load average (the machine is shared: a load above the core count means noisy figures)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return -1.0


def machine() -> dict:
    return {"torch": torch.__version__.split("+")[0], "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(), "mkl_enable_instructions": os.environ.get("MKL_ENABLE_INSTRUCTIONS")}


def median(xs: list[float]) -> float:
    return statistics.median(xs)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_peak_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 4) -> float:
    """Best-of-``reps`` GFLOP/s of one (n x n) @ (n x n) torch.matmul in ``dtype``: the machine's
    practical matmul peak (what MKL / oneDNN reach on big square GEMMs), the denominator of MFU."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.matmul(a, b)  # first call: thread pool start, kernel selection, page faults on the output
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9
