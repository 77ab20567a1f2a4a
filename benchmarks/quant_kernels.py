"""The matmul kernels behind `--quantize int8|int4`, one SmolLM2-135M layer shape at a time, at 1 row (a
batch-1 decode step) and 8 rows (batch 8): PyTorch's weight-only kernels (bf16 activations), picochat's
VNNI kernels (int8 activations, model/vnni.py) where the CPU has them, and a plain bf16 F.linear as the
peer, in the same run.

Why it exists: a decode step is the sum of these (4 per layer x 30 layers + the LM head), so how their
time grows from 1 row to 8 bounds what batching can give: if 8 rows cost 3x one row, batch 8 cannot
reach 4x batch 1's tokens/s, whatever happens around the matmuls.

    python benchmarks/quant_kernels.py          # ~20 s, one JSON line
"""
from __future__ import annotations

import time

import torch
from _common import emit, loadavg, machine

from picochat.model import vnni
from picochat.model.quant import Int4Linear, Int8Linear

SHAPES = {"qkv": (960, 576), "o_proj": (576, 576), "gate_up": (3072, 576), "down": (576, 1536),
          "lm_head": (49152, 576)}  # (N out, K in)


def per_call_us(fn, n: int = 200) -> float:
    for _ in range(10):
        fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return round((time.perf_counter() - t0) / n * 1e6, 1)


@torch.no_grad()
def main() -> None:
    torch.manual_seed(0)
    load0, out = loadavg(), {}
    kinds = ("int4", "int8", "bf16") + (("int4_vnni", "int8_vnni") if vnni.available() else ())
    totals = {k: {1: 0.0, 8: 0.0} for k in kinds}
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K) * 0.05
        q4, q8, wb = Int4Linear(w, None, kernel="torch").eval(), Int8Linear(w, None, kernel="torch").eval(), w.to(torch.bfloat16)
        v4, v8 = (Int4Linear(w, None).eval(), Int8Linear(w, None).eval()) if vnni.available() else (None, None)
        row = {}
        for M in (1, 8):
            x = torch.randn(M, K, dtype=torch.bfloat16)
            xf = x.float()
            t = {"int4": per_call_us(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, q4.weight_int4, q4.group,
                                                                                        q4.scale_zero)),
                 "int8": per_call_us(lambda: torch.ops.aten._weight_int8pack_mm(x, q8.weight_int8, q8.scale)),
                 "bf16": per_call_us(lambda: torch.nn.functional.linear(x, wb))}
            if v4 is not None:
                t["int4_vnni"] = per_call_us(lambda: vnni.int4_linear(xf, v4.weight_q4, N))
                t["int8_vnni"] = per_call_us(lambda: vnni.int8_linear(xf, v8.weight_q8, v8.scale))
            row[f"rows_{M}_us"] = t
            per_step = 1 if name == "lm_head" else 30  # the layer's matmuls in one decode step
            for k, v in t.items():
                totals[k][M] += v * per_step / 1e3
        out[name] = row
    step = {k: {"rows_1_ms": round(v[1], 2), "rows_8_ms": round(v[8], 2),
                "batch8_tokens_over_batch1": round(8 * v[1] / v[8], 2)} for k, v in totals.items()}
    emit({"benchmark": "quant_kernels", "shapes": out, "matmuls_per_decode_step": step,
          "threads": torch.get_num_threads(), "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
