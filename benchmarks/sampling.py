"""Drawing the next token from a 49,152-word vocabulary (SmolLM2's), as a serving step does for every running
row: picochat's sampler (engine/sampling.py: top-p from the 128 likeliest tokens first, inverse transform
draws) beside the naive peer in the same run (sort the whole vocabulary for top-p, torch.multinomial), on
the same logits. Also counts how often the two keep the same nucleus (they should, always, up to ties).

    python benchmarks/sampling.py          # ~15 s, one JSON line
"""
from __future__ import annotations

import time

import torch
from _common import emit, loadavg, machine

from picochat.engine.sampling import draw, filter_logits

V = 49152


def naive(z: torch.Tensor, top_p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook sampler: sort everything, cut at top_p, multinomial."""
    ranked, order = torch.sort(z, descending=True, dim=-1)
    probs = torch.softmax(ranked, dim=-1)
    drop = probs.cumsum(-1) - probs >= top_p
    drop[..., 0] = False
    kept = torch.full_like(z, float("-inf")).scatter(-1, order, ranked.masked_fill(drop, float("-inf")))
    return kept, torch.multinomial(torch.softmax(kept, -1), 1, generator=gen).squeeze(-1)


def ours(z: torch.Tensor, top_p: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    kept = filter_logits(z, top_p=top_p)
    return kept, draw(kept, 1.0, gen)


def per_call_ms(fn, n: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    load0, g = loadavg(), torch.Generator().manual_seed(0)
    out = {}
    for rows in (1, 16):
        # logits shaped like a model's: a few dozen plausible tokens well above a long tail (a nucleus of
        # tens); and flat rows, whose nucleus is larger than the 128 candidates (the sort fallback)
        peaked = torch.randn(rows, V, generator=g) * 2
        likely = torch.randint(0, V, (rows, 40), generator=g)
        peaked.scatter_add_(-1, likely, 12 + 2 * torch.randn(rows, 40, generator=g))
        flat = torch.randn(rows, V, generator=g) * 0.3
        for kind, z in (("peaked", peaked), ("flat", flat)):
            kept = torch.isfinite(naive(z, 0.9, g)[0])
            same = torch.equal(kept, torch.isfinite(ours(z, 0.9, g)[0]))
            t_naive, t_ours = [], []
            for _ in range(3):  # interleaved
                t_naive.append(per_call_ms(lambda: naive(z, 0.9, g), 10))
                t_ours.append(per_call_ms(lambda: ours(z, 0.9, g), 10))
            a, b = sorted(t_naive)[1], sorted(t_ours)[1]
            out[f"{kind}_rows_{rows}"] = {"naive_ms": round(a, 3), "picochat_ms": round(b, 3),
                                          "speedup": round(a / b, 1), "same_nucleus": same,
                                          "nucleus_median": int(kept.sum(-1).median())}
    emit({"benchmark": "sampling", "vocab": V, "top_p": 0.9, **out, "load_before": load0,
          "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
