"""Time to first token of a conversation's next turn, with and without the scheduler's prefix reuse.

SmolLM2-135M-Instruct on the continuous-batching scheduler (the engine behind `picochat serve`), bf16.
Turn 1 asks a question about a long document (~1,500 tokens with the chat template); turn 2 repeats
the conversation with the answer and a follow-up question, as any chat client does. The peer is the
same scheduler with reuse switched off (every prompt prefilled from scratch), measured in the same run,
alternating, median over reps. Prints one JSON line.

    python benchmarks/prefix_cache.py            # ~1 min
    python benchmarks/prefix_cache.py --reps 5 --doc-repeats 40
"""
from __future__ import annotations

import argparse
import threading
import time

import torch
from _common import emit, loadavg, log, machine, median


def ask(sched, ids, stop_ids) -> tuple[float, str, int]:
    """-> (seconds to the first token, answer text, prompt tokens reused)."""
    from picochat.engine.engine import SamplingParams
    from picochat.engine.scheduler import Request
    done, out = threading.Event(), {"t": None, "text": "", "cached": 0}
    t0 = time.perf_counter()

    def on_event(ev):
        if out["t"] is None and ev.token_ids:
            out["t"] = time.perf_counter() - t0
        out["text"] += ev.text
        if ev.finish_reason:
            out["cached"] = ev.cached_tokens
            done.set()
    sched.submit(Request(ids, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=stop_ids), on_event))
    done.wait()
    return out["t"], out["text"], out["cached"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--doc-repeats", type=int, default=90, help="sentences in the document (~17 tokens each)")
    args = ap.parse_args()
    from picochat.chat_template import render_conversation, stop_token_ids
    from picochat.checkpoints.io import load_model
    from picochat.engine.model_thread import ModelThread
    from picochat.engine.scheduler import Scheduler
    worker = ModelThread()  # the model is loaded and run on one thread, as in the server
    model, tok, _ = worker.call(lambda: load_model("smollm2", dtype=torch.bfloat16))
    stops = stop_token_ids(tok, "chatml")
    sched = worker.call(lambda: Scheduler(model, tok, max_batch=4, worker=worker)).start()
    reuse_from = sched.cache.MIN_REUSE
    # the peer is the same scheduler with reuse off (no shared prefix is ever long enough)
    min_reuse = {"reuse": reuse_from, "no_reuse": 1 << 30}
    results = {k: {"turn1_ttft_s": [], "turn2_ttft_s": [], "turn2_cached_tokens": []} for k in min_reuse}
    for rep in range(args.reps):
        for name in (("reuse", "no_reuse") if rep % 2 == 0 else ("no_reuse", "reuse")):
            sched.cache.MIN_REUSE = min_reuse[name]  # set while the scheduler is idle
            # a document of its own per run: nothing is shared between runs
            doc = f"Document {rep} {name}. " + \
                "The history of the Roman Empire is long and complex, spanning centuries. " * args.doc_repeats
            msgs = [{"role": "user", "content": doc + "\nSummarise this in one sentence."}]
            ids1, _ = render_conversation(msgs, tok, "chatml", add_generation_prompt=True)
            t1, answer, _ = ask(sched, ids1, stops)
            msgs += [{"role": "assistant", "content": answer}, {"role": "user", "content": "Now in French."}]
            ids2, _ = render_conversation(msgs, tok, "chatml", add_generation_prompt=True)
            t2, _, cached = ask(sched, ids2, stops)
            r = results[name]
            r["turn1_ttft_s"].append(t1)
            r["turn2_ttft_s"].append(t2)
            r["turn2_cached_tokens"].append(cached)
            log(f"rep {rep} {name:8s} prompt {len(ids1)} -> {len(ids2)} tokens  TTFT turn 1 {t1:.3f} s  "
                f"turn 2 {t2:.3f} s  reused {cached}  load {loadavg()}")
    sched.stop()
    summary = {k: {"turn1_ttft_s": round(median(v["turn1_ttft_s"]), 3),
                   "turn2_ttft_s": round(median(v["turn2_ttft_s"]), 3),
                   "turn2_cached_tokens": int(median(v["turn2_cached_tokens"]))} for k, v in results.items()}
    emit({"benchmark": "prefix_cache", "model": "SmolLM2-135M-Instruct", "dtype": "bf16",
          "turn2_prompt_tokens": len(ids2), **summary,
          "turn2_ttft_speedup": round(summary["no_reuse"]["turn2_ttft_s"] / summary["reuse"]["turn2_ttft_s"], 1),
          "reps": args.reps, "loadavg": loadavg(), **machine()})


if __name__ == "__main__":
    main()
