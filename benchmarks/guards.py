"""What dynamo's guards on the model cost a compiled decode step: picochat's step (engine/compiled.py, guards
kept only on its inputs and global state) beside the same step compiled with every guard (the peer), in
one process, the two called alternately on caches of the same contents, SmolLM2 int4 at batch 1.

    python benchmarks/guards.py          # ~1-3 min (two compiles; TorchInductor's disk cache helps), one JSON line
"""
from __future__ import annotations

import argparse
import statistics
import time
import types

import torch
from _common import emit, loadavg, log, machine

from picochat.checkpoints.io import load_model
from picochat.engine import compiled
from picochat.engine.kv_cache import cache_dtype


def step_with(guard_filter) -> object:
    """decode_step compiled as DecodeStep compiles it, with or without the guard filter."""
    options = {"emulate_precision_casts": True} | ({"guard_filter_fn": guard_filter} if guard_filter else {})
    code = compiled.decode_step.__code__.replace(co_name=f"decode_step_{'filtered' if guard_filter else 'all'}")
    return torch.compile(types.FunctionType(code, compiled.decode_step.__globals__), fullgraph=True, options=options)


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantize", default="int4", help="int4, int8, or none (bf16)")
    p.add_argument("--keys", type=int, default=512, help="cached keys at the first timed step")
    p.add_argument("--steps", type=int, default=384, help="timed steps per variant")
    args = p.parse_args()
    load0 = loadavg()
    q = None if args.quantize == "none" else args.quantize
    model, _, _ = load_model("smollm2", dtype=None if q else torch.bfloat16, quantize=q)
    c, dt = model.config, cache_dtype(model, compiled=True)  # (bf16 for int8/int4 since the fifth session)
    cap = args.keys + 130
    variants = {"filtered": step_with(compiled._outside_the_model), "all_guards": step_with(None)}

    def cache():
        gen = torch.Generator().manual_seed(1)
        shape = (1, c.n_kv_head, cap, c.head_dim)
        k = [torch.randn(shape, generator=gen).to(dt) for _ in range(c.n_layer)]
        v = [torch.randn(shape, generator=gen).to(dt) for _ in range(c.n_layer)]
        for t in k + v:
            torch._dynamo.mark_dynamic(t, [2])
        return k, v

    def call(f, kv, t_k):
        cols = torch.full((1,), t_k - 1, dtype=torch.long)
        mask = torch.ones(1, 1, 1, t_k, dtype=torch.bool)
        torch._dynamo.mark_dynamic(mask, [3])
        return f(model, torch.zeros(1, 1, dtype=torch.long), cols.view(1, 1), mask, *kv, cols)

    caches = {name: cache() for name in variants}
    for name, f in variants.items():  # compile (batch 1, symbolic length), then a few warm steps
        t0 = time.perf_counter()
        for t_k in (8, 9, args.keys):
            call(f, caches[name], t_k)
        log(f"{name}: compiled in {time.perf_counter() - t0:.1f} s")
    times = {name: [] for name in variants}
    outs = {name: [] for name in variants}
    for s in range(args.steps):
        t_k = args.keys + s % 128 + 1
        order = list(variants.items()) if s % 2 else list(variants.items())[::-1]
        for name, f in order:
            t0 = time.perf_counter()
            out = call(f, caches[name], t_k)
            times[name].append(time.perf_counter() - t0)
            outs[name].append(out[0, -1].argmax().item())
    ms = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
    emit({"benchmark": "guards", "quantize": args.quantize, "keys": [args.keys + 1, args.keys + 128],
          "steps": args.steps, "median_ms_per_step": ms,
          "mean_ms_per_step": {n: round(statistics.mean(t) * 1e3, 3) for n, t in times.items()},
          "all_guards_over_filtered": round(ms["all_guards"] / ms["filtered"], 3),
          "same_argmax": sum(a == b for a, b in zip(outs["filtered"], outs["all_guards"])),
          "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
