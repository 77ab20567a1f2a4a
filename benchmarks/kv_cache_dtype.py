"""What storing K/V in bf16 gains a quantized model's compiled decode step (engine/kv_cache.py's cache_dtype):
the same compiled step (engine/compiled.py's DecodeStep) on a bf16 cache and on an fp32 one (the peer, the
cache these models kept before), in one process, called alternately, SmolLM2 int4 at batch 1 and batch 8.
Each row is a window of Brown corpus text: its first --keys tokens are prefilled into an fp32 cache (the
bf16 one is that cache rounded), then both caches decode the window's next tokens teacher-forced, and
`same_argmax` counts the steps where the two picked the same next token (the prompt was read once, with
fp32 K/V; in the engine the bf16 path's prefill reads rounded ones).

    python benchmarks/kv_cache_dtype.py              # ~1-3 min (TorchInductor's disk cache helps), one JSON line
    python benchmarks/kv_cache_dtype.py --plain      # the eager step instead (why it keeps fp32)
    python benchmarks/kv_cache_dtype.py --profile 10 # + torch.profiler's table per batch and cache dtype
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit, loadavg, log, machine, text_windows

from picochat.checkpoints.io import load_model
from picochat.engine.compiled import DecodeStep, decode_step
from picochat.data.corpus import brown_documents
from picochat.engine.kv_cache import cache_dtype


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantize", default="int4", choices=("int4", "int8"), help="fp32 activations")
    p.add_argument("--keys", type=int, default=512, help="cached keys at the first timed step")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=128, help="timed steps per cache dtype and batch")
    p.add_argument("--plain", action="store_true", help="time the eager decode step (compiled.decode_step)")
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over N more steps per batch and dtype")
    args = p.parse_args()
    load0 = loadavg()
    model, tok, _ = load_model("smollm2", quantize=args.quantize)
    text = " ".join(d["text"] for d in brown_documents()[:60])
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    assert cache_dtype(model, compiled=True) == torch.bfloat16
    t0 = time.perf_counter()
    if args.plain:  # the same function, eager: attention casts a bf16 cache to fp32 (a copy) every layer
        def step(*a):
            return decode_step(model, *a)
    else:
        step = DecodeStep(model).start(wait=True)  # warms batch 1 and batch > 1 on bf16 caches
        log(f"compiled in {time.perf_counter() - t0:.1f} s")
    span = args.keys + args.steps + 1
    result = {}
    for B in [int(b) for b in args.batches.split(",")]:
        rows, prompt = text_windows(model, ids, B, args.keys, span)  # one window a row, its K/V kept in fp32
        caches = {"bf16": ([t.to(torch.bfloat16) for t in prompt.k], [t.to(torch.bfloat16) for t in prompt.v]),
                  "fp32": (prompt.k, prompt.v)}
        for t in caches["fp32"][0] + caches["fp32"][1]:  # symbolic as in DecodeStep._warm_up, so the fp32
            torch._dynamo.mark_dynamic(t, [0, 2] if B > 1 else [2])  # graph is the same program as the bf16 one

        def call(kv, s):  # step s: token keys + s of each row, written at column keys + s
            cols = torch.full((B,), args.keys + s, dtype=torch.long)
            mask = torch.ones(B, 1, 1, args.keys + s + 1, dtype=torch.bool)
            torch._dynamo.mark_dynamic(mask, [0, 3] if B > 1 else [3])
            idx = rows[:, args.keys + s:args.keys + s + 1].clone()
            positions = cols.clone().view(B, 1)
            if B > 1:
                for t in (idx, positions, cols):
                    torch._dynamo.mark_dynamic(t, 0)
            return step(idx, positions, mask, *kv, cols)

        for name, kv in caches.items():  # the fp32 cache's graphs compile here (dtype is guarded)
            call(kv, 0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        times = {name: [] for name in caches}
        outs = {name: [] for name in caches}
        for s in range(args.steps):
            order = list(caches.items()) if s % 2 else list(caches.items())[::-1]
            for name, kv in order:
                t0 = time.perf_counter()
                out = call(kv, s)
                times[name].append(time.perf_counter() - t0)
                outs[name].append(out[:, -1].argmax(-1))
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
            raise SystemExit("the step compiled again while timed: the figures would include a compile")
        ms = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
        if args.profile:  # steps 0..N-1 again: their columns rewritten with the same tokens
            from torch.profiler import profile
            for name, kv in caches.items():
                with profile() as prof:
                    for s in range(args.profile):
                        call(kv, s)
                log(f"batch {B}, {name} cache, {args.profile} steps:\n"
                    + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8))
        same = sum(int((a == b).sum()) for a, b in zip(outs["bf16"], outs["fp32"]))
        result[f"batch_{B}"] = {"median_ms_per_step": ms, "fp32_over_bf16": round(ms["fp32"] / ms["bf16"], 3),
                                "same_argmax": f"{same}/{B * args.steps}"}
        log(f"batch {B}: {result[f'batch_{B}']}")
    emit({"benchmark": "kv_cache_dtype", "quantize": args.quantize, "step": "plain" if args.plain else "compiled", "keys": [args.keys + 1, args.keys + args.steps],
          "steps": args.steps, **result, "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
