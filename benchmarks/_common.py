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

# run from a checkout without installing: make the repository root importable (an installed or
# PYTHONPATH picochat wins, so a patched copy can be benchmarked with PYTHONPATH=/path/to/copy)
try:
    import picochat  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def emit(result: dict) -> None:
    """The benchmark's one line of stdout."""
    print(json.dumps(result, separators=(", ", ": ")), flush=True)


def text_windows(model, ids: torch.Tensor, batch: int, keys: int, span: int):
    """`batch` windows of `span` tokens of `ids`, one per row (batch, span), and an fp32 KVCache holding
    each row's first `keys` tokens (an eager prefill): the K/V cache benchmarks' starting point."""
    from picochat.engine.kv_cache import KVCache
    if batch * span > len(ids):
        raise SystemExit(f"batch {batch} x {span} tokens is more than the text's {len(ids)}: lower --keys or --steps")
    rows = ids[:batch * span].view(batch, span)
    c = model.config
    prompt = KVCache(c.n_layer, batch, c.n_kv_head, c.head_dim, span, dtype=torch.float32)
    with torch.no_grad():
        model(rows[:, :keys], kv_cache=prompt)
    return rows, prompt


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


def parse_dtypes(parser, text: str) -> list[str]:
    """"fp32,bf16" -> ["fp32", "bf16"], with a usage error for anything else."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    for d in dtypes:
        if d not in DTYPES:
            parser.error(f"unknown dtype {d!r}; use fp32 and/or bf16")
    return dtypes


def _onednn_linear():
    """oneDNN's dense linear (x W^T + b), or None when this PyTorch build has none."""
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


def matmul_gflops(dtype: torch.dtype, n: int = 4096, reps: int = 4, kernel: str = "matmul") -> float:
    """Best-of-``reps`` GFLOP/s of one (n x n) @ (n x n) product in ``dtype``.

    kernel "matmul" is torch.matmul (fp32: MKL, which takes its AVX2 path on AMD CPUs; bf16: oneDNN);
    "onednn" calls oneDNN directly (fp32 with AVX-512 on any x86 CPU).
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    if kernel == "onednn":
        op = _onednn_linear()
        if op is None:
            return 0.0
        fn = lambda: op(a, b, None, "none", [], "")  # a @ b^T: same FLOPs
    else:
        fn = lambda: torch.matmul(a, b)
    fn()  # first call: thread pool start, kernel selection, page faults on the output
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def matmul_peak(dtypes, n: int = 4096) -> dict:
    """The machine's practical matmul peak per dtype: the best big square GEMM any of PyTorch's CPU
    kernels reaches (MFU's denominator), with the per-kernel figures."""
    detail = {}
    for d in dtypes:
        detail[f"{d}_matmul"] = matmul_gflops(DTYPES[d], n)
        if d == "fp32":
            detail["fp32_onednn"] = matmul_gflops(DTYPES[d], n, kernel="onednn")
    return detail


def tune_malloc() -> bool:
    """picochat's Trainer allocator policy (see picochat.device.tune_cpu_allocator); process-wide."""
    from picochat.device import tune_cpu_allocator
    return tune_cpu_allocator()
