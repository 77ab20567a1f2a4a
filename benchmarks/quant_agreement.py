"""How close the quantized SmolLM2 stays to fp32: next-token agreement and KL(fp32 || quantized) over the
positions of eight texts none of which the quantizer saw (decode.py's paragraph, the tests' paragraph and
six Brown documents that are neither in the calibration excerpts nor among the 20 that chose alpha), for
int8 with plain per-row scales (the peer, in the same run) and with activation-aware scales (picochat's
default, model/quant.py), and for int4 (its int8 LM head keeps plain rows).

Each model reads each text in chunks of 32 tokens through a KV cache (teacher forcing): fewer rows than
PREFILL_ROWS, so the quantized layers run the matrix-vector kernels decoding runs, not the prefill GEMM.

    python benchmarks/quant_agreement.py                   # ~2 min, one JSON line
    python benchmarks/quant_agreement.py --compiled-cache  # K/V kept as the compiled step keeps them (bf16)
"""
from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F
from _common import emit, loadavg, log, machine
from decode import TEXT

from picochat.checkpoints.gguf import load_gguf
from picochat.data.corpus import brown_documents
from picochat.engine.kv_cache import KVCache
from picochat.model.quant import calibration_ids, quantize_int4, quantize_int8

PARAGRAPH = ("The history of the river valley is long and uneven. Farmers arrived first, clearing the lower "
             "terraces and planting barley, beans and flax; later came traders who followed the water down to "
             "the coast, and with them the first small towns, built of river stone and roofed with reeds.")
HELD_OUT = (20, 150, 250, 330, 420, 480)  # Brown documents; the calibration reads 25, 75, 125, ..., alpha
# was chosen on 10, 35, 60, ... (model/quant.py)


CHUNK = 32


def logits(model, ids: list[int], compiled_cache: bool = False) -> torch.Tensor:
    """(T, V) fp32 next-token logits of `ids`, read CHUNK tokens at a time."""
    cache = KVCache.for_model(model, 1, capacity=len(ids), compiled=compiled_cache)
    return torch.cat([model(torch.tensor([ids[i:i + CHUNK]]), start_pos=i, kv_cache=cache)[0][0]
                      for i in range(0, len(ids), CHUNK)]).float()


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compiled-cache", action="store_true",
                   help="the quantized models' K/V in the compiled step's dtype (engine/kv_cache.py: bf16)")
    args = p.parse_args()
    load0 = loadavg()
    model, tok, _ = load_gguf("smollm2")
    docs = brown_documents()
    texts = {"decode.py's paragraph": tok.encode(TEXT), "tests' paragraph": tok.encode(PARAGRAPH)}
    texts |= {f"brown {i} ({docs[i]['genre']})": tok.encode(docs[i]["text"][:2500])[:300] for i in HELD_OUT}
    refs = {k: logits(model, ids) for k, ids in texts.items()}
    calib = calibration_ids(tok)
    variants = {"int8, plain rows": lambda m: quantize_int8(m),
                "int8, activation-aware": lambda m: quantize_int8(m, calibration=calib),
                "int4": lambda m: quantize_int4(m, calibration=calib)}
    out = {}
    for name, make in variants.items():
        log(f"quantizing: {name}")
        q = make(copy.deepcopy(model))
        per_text, agree_sum, kl_sum, n = {}, 0.0, 0.0, 0
        for k, ids in texts.items():
            o, r = logits(q, ids, args.compiled_cache), refs[k]
            agree = (o.argmax(-1) == r.argmax(-1)).float()
            kl = F.kl_div(o.log_softmax(-1), r.log_softmax(-1), log_target=True, reduction="none").sum(-1)
            per_text[k] = {"agree": round(float(agree.mean()), 3), "kl": round(float(kl.mean()), 4)}
            agree_sum, kl_sum, n = agree_sum + float(agree.sum()), kl_sum + float(kl.sum()), n + len(ids)
        out[name] = {"agree": round(agree_sum / n, 4), "kl_nats": round(kl_sum / n, 5), "texts": per_text}
    emit({"benchmark": "quant_agreement", "kv_cache": str(KVCache.for_model(q, 1, 1, args.compiled_cache).k[0].dtype),
          "positions": sum(len(v) for v in texts.values()),
          "calibration_tokens": calib.size(1), **out, "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
