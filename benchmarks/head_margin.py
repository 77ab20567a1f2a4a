"""What the LM head's `margin` saves (model/quant.py's HEAD_MARGIN, vnni.int8_linear): SmolLM2's int8 head
on its real inputs (the final hidden states of Brown text, read by the int4 model), at 1, 8 and 16 rows,
three ways in one process, alternating: inputs rounded once (the floor), rounded twice for every logit
(the peer: the head before the margin), and rounded twice only in the tiles within HEAD_MARGIN nats of
each row's top logit (picochat's default). Between calls a 64 MB buffer is read so that the head's 28 MB
come from memory, as inside a decode step, not from the L3 cache. Also reported over all the positions:
the share of tiles rounded twice, and how far the margin's logits are from rounding twice everywhere
(same top token, KL).

    python benchmarks/head_margin.py     # ~1 min, one JSON line (needs the VNNI kernels)
"""
from __future__ import annotations

import statistics
import time

import torch
from _common import emit, loadavg, machine

from picochat.checkpoints.io import load_model
from picochat.data.corpus import brown_documents
from picochat.model import vnni
from picochat.model.quant import HEAD_MARGIN


@torch.no_grad()
def main() -> None:
    if not vnni.available():
        raise SystemExit("head_margin.py needs the VNNI kernels (an x86 CPU with AVX-512 VNNI and a C++ compiler)")
    load0 = loadavg()
    model, tok, _ = load_model("smollm2", quantize="int4")
    head = model.lm_head
    seen = []
    hook = head.register_forward_hook(lambda m, i, o: seen.append(i[0].reshape(-1, i[0].size(-1)).float()))
    ids = tok.encode(" ".join(d["text"] for d in brown_documents()[100:110]))[:1024]
    model(torch.tensor([ids]))
    hook.remove()
    x = (seen[0] * head.in_scale).contiguous()  # what the head's kernel gets
    w, s = head.weight_q8, head.scale.float()
    ways = {"once": lambda xm: vnni.int8_linear(xm, w, s),
            "twice_everywhere": lambda xm: vnni.int8_linear(xm, w, s, True),
            "twice_within_margin": lambda xm: vnni.int8_linear(xm, w, s, True, HEAD_MARGIN)}
    evict = torch.ones(16 << 20)  # 64 MB, twice the L3 cache
    out = {}
    for rows in (1, 8, 16):
        times = {k: [] for k in ways}
        for rep in range(40):
            xm = x[(rep * 16) % (len(x) - rows):][:rows].contiguous()
            for name, fn in ways.items():
                evict.sum()
                t0 = time.perf_counter()
                fn(xm)
                times[name].append(time.perf_counter() - t0)
        ms = {k: round(statistics.median(v) * 1e3, 3) for k, v in times.items()}
        out[f"rows_{rows}_ms"] = ms | {"everywhere_over_margin": round(ms["twice_everywhere"] / ms["twice_within_margin"], 2)}
    once, twice, near = (fn(x) for fn in ways.values())
    top = once.view(len(x), -1, 16).amax(-1)
    tiles = (top >= once.amax(-1, keepdim=True) - HEAD_MARGIN).float()
    p_twice, p_near = twice.log_softmax(-1), near.log_softmax(-1)
    kl = (p_twice.exp() * (p_twice - p_near)).sum(-1)
    emit({"benchmark": "head_margin", "margin_nats": HEAD_MARGIN, "positions": len(x), **out,
          "tiles_rounded_twice": {"mean": round(tiles.mean().item(), 4), "max_row": round(tiles.mean(-1).max().item(), 4)},
          "same_top_token_as_everywhere": round((near.argmax(-1) == twice.argmax(-1)).float().mean().item(), 4),
          "kl_everywhere_to_margin": {"mean": float(f"{kl.mean().item():.2e}"), "max": float(f"{kl.max().item():.2e}")},
          "max_abs_logit_diff_outside": round((near - twice).abs().max().item(), 3),
          "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
