"""A prompt chunk through the scheduler's compiled prefill (engine/compiled.py's prefill_step, what `picochat
serve` runs) against the eager model it replaced, the peer, in one process, alternating: SmolLM2 (int4 by
default) writing T new tokens into one slot of the scheduler's SlotCache after `--cached` tokens already
there (a chat's system prompt, kept from an earlier request). Also the last position's next token of both.

    python benchmarks/prefill_chunk.py                  # T = 16, 40, 128, 512; ~1-3 min, one JSON line
    python benchmarks/prefill_chunk.py --quantize none --dtype bf16
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import emit, loadavg, log, machine

from picochat.checkpoints.io import load_model
from picochat.data.corpus import brown_documents
from picochat.engine.compiled import decoder_for
from picochat.engine.slot_cache import SlotCache


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quantize", default="int4", choices=("int4", "int8", "none"))
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="activations (with --quantize none)")
    p.add_argument("--lengths", default="16,40,128,512", help="new tokens per chunk, comma-separated")
    p.add_argument("--cached", type=int, default=24, help="tokens already in the slot before the chunk")
    p.add_argument("--reps", type=int, default=9)
    args = p.parse_args()
    load0 = loadavg()
    q = None if args.quantize == "none" else args.quantize
    model, tok, _ = load_model("smollm2", quantize=q, dtype=torch.bfloat16 if args.dtype == "bf16" else None)
    ids = tok.encode(" ".join(d["text"] for d in brown_documents()[:20]))
    t0 = time.perf_counter()
    step = decoder_for(model, "compile").start_prefill(wait=True)
    if not step.prefill_ready():
        raise SystemExit(f"the prefill step did not compile: {step.prefill_error}")
    log(f"compiled in {time.perf_counter() - t0:.1f} s")
    lengths = [int(x) for x in args.lengths.split(",")]
    cache = SlotCache.for_model(model, 4, args.cached + max(lengths) + 1, compiled=True)
    start = args.cached
    if start:  # the cached prefix itself, once: both paths then rewrite the columns after it
        model(torch.tensor([ids[:start]]), kv_cache=cache.prefill_view(1, 0), last_logits_only=True)
    result = {}
    for T in lengths:
        idx = torch.tensor([ids[start:start + T]])
        times, nxt = {"eager": [], "compiled": []}, {}
        for rep in range(args.reps + 1):
            for name in (("eager", "compiled") if rep % 2 else ("compiled", "eager")):
                t0 = time.perf_counter()
                if name == "eager":
                    out = model(idx, start_pos=start, kv_cache=cache.prefill_view(1, start), last_logits_only=True)[0]
                else:
                    cols, mask, k, v = cache.chunk_inputs(1, start, T)
                    out = step.prefill(idx, cols, mask, k, v, cols)
                if rep:  # the first round warms each path up
                    times[name].append(time.perf_counter() - t0)
                nxt[name] = int(out[0, -1].argmax())
        ms = {n: round(statistics.median(t) * 1e3, 2) for n, t in times.items()}
        result[f"T_{T}"] = {"median_ms": ms, "eager_over_compiled": round(ms["eager"] / ms["compiled"], 2),
                            "tokens_per_s": {n: round(T / m * 1e3) for n, m in ms.items()},
                            "same_next_token": nxt["eager"] == nxt["compiled"]}
        log(f"T={T}: {result[f'T_{T}']}")
    emit({"benchmark": "prefill_chunk", "quantize": args.quantize, "dtype": args.dtype, "cached": args.cached,
          "reps": args.reps, **result, "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
