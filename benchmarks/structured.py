"""The cost of structured outputs: SmolLM2-135M-Instruct decoding under a JSON schema (grammar-constrained, the
mask computed by llguidance every step) against the same model unconstrained, on the same prompts, in one run.

Batch 1, picochat's Engine, the chat template's prompts. Decode tokens/s is measured from the first generated
token to the last (the prompt's prefill is left out: it is the same work in both modes), over every token of
every prompt, and the two modes alternate prompt by prompt so that the machine's load falls on both. The
mask's own cost is timed inside the engine: Constraint.mask (llguidance's bitmask, unpacked and applied)
and Constraint.advance per token.

    python benchmarks/structured.py                  # ~1-2 min, one JSON line on stdout
    python benchmarks/structured.py --dtype fp32 --reps 3 --max-tokens 96
"""
from __future__ import annotations

import argparse
import time

import torch
from _common import DTYPES, emit, loadavg, log, machine, median

from picochat.chat_template import render_conversation, stop_token_ids
from picochat.checkpoints.io import load_model
from picochat.engine import grammar as G
from picochat.engine.engine import Engine, SamplingParams

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 60}, "summary": {"type": "string", "maxLength": 300},
    "facts": {"type": "array", "items": {"type": "string", "maxLength": 120}, "maxItems": 5},
    "score": {"type": "integer", "minimum": 0, "maximum": 10}},
    "required": ["name", "summary", "facts", "score"], "additionalProperties": False}
PROMPTS = ["Tell me about Paris.", "Describe the planet Mars.", "Who was Ada Lovelace?", "Explain photosynthesis.",
           "Describe a good breakfast.", "What is a violin?", "Tell me about the Nile river.", "What is chess?"]


def timed_tokens(engine: Engine, prompt: list[int], sp: SamplingParams) -> tuple[int, float]:
    """(tokens generated after the first, seconds from the first token to the last)."""
    stamps = []
    for _ in engine.generate_tokens(prompt, sp):
        stamps.append(time.perf_counter())
    return len(stamps) - 1, (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--reps", type=int, default=2)
    args = ap.parse_args()
    load0 = loadavg()
    model, tok, _ = load_model("smollm2", dtype=DTYPES[args.dtype])
    from picochat.chat_template import pick_template
    template = pick_template(tok)
    stops = stop_token_ids(tok, template)
    engine = Engine(model, tok)
    grammar = G.json_schema_grammar(SCHEMA)
    mask_s, steps = [0.0], [0]
    mask, advance = G.Constraint.mask, G.Constraint.advance

    def timed_mask(self, logits):
        t = time.perf_counter()
        out = mask(self, logits)
        mask_s[0] += time.perf_counter() - t
        steps[0] += 1
        return out

    def timed_advance(self, token):
        t = time.perf_counter()
        advance(self, token)
        mask_s[0] += time.perf_counter() - t
    G.Constraint.mask, G.Constraint.advance = timed_mask, timed_advance
    totals = {"json_schema": [0, 0.0], "unconstrained": [0, 0.0]}
    per_rep = {k: [] for k in totals}
    for rep in range(args.reps):
        rep_tot = {k: [0, 0.0] for k in totals}
        for i, q in enumerate(PROMPTS):
            prompt = render_conversation([{"role": "user", "content": q}], tok, template, add_generation_prompt=True)[0]
            order = ["json_schema", "unconstrained"] if (i + rep) % 2 == 0 else ["unconstrained", "json_schema"]
            for mode in order:
                engine.reset()  # the same prefill either way
                sp = SamplingParams(max_tokens=args.max_tokens, temperature=0, stop_token_ids=stops,
                                    grammar=grammar if mode == "json_schema" else None)
                n, s = timed_tokens(engine, prompt, sp)
                rep_tot[mode][0] += n
                rep_tot[mode][1] += s
        for k in totals:
            per_rep[k].append(rep_tot[k][0] / rep_tot[k][1])
            totals[k][0] += rep_tot[k][0]
            totals[k][1] += rep_tot[k][1]
        log(f"rep {rep}: " + ", ".join(f"{k} {per_rep[k][-1]:.1f} tok/s" for k in per_rep))
    tps = {k: round(median(v), 2) for k, v in per_rep.items()}
    emit({"benchmark": "structured_outputs", "model": "smollm2-135m-instruct", "dtype": args.dtype, "batch": 1,
          "prompts": len(PROMPTS), "reps": args.reps, "max_tokens": args.max_tokens,
          "decode_tokens_per_s": tps, "ratio_json_schema_vs_unconstrained": round(tps["json_schema"] / tps["unconstrained"], 3),
          "slowdown_percent": round(100 * (1 - tps["json_schema"] / tps["unconstrained"]), 1),
          "tokens": {k: v[0] for k, v in totals.items()},
          "mask_ms_per_token": round(1000 * mask_s[0] / max(steps[0], 1), 3), "masked_steps": steps[0],
          "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
