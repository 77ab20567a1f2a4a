"""What 2 MB pages gain the compiled decode step (hostmem.py): under the K/V cache (engine/kv_cache.py's
new_stores), or under the quantized weights (model/quant.py's finish_quantized). The same compiled step
(engine/compiled.py's DecodeStep), in one process, called alternately with the same values in memory asked
to be backed by transparent huge pages (madvise) and in ordinary 4 KB pages (what picochat used before),
SmolLM2 int4 at batch 1 and batch 8:
- `--what kv`: two bf16 caches, one in each kind of page (the weights in 2 MB pages for both);
- `--what weights`: the quantized weights as loaded (2 MB pages) and a copy of them in 4 KB pages, swapped
  in before each call (`Tensor.set_`: the same tensors, other memory); one cache.
Each row is a window of Brown corpus text, its first --keys tokens prefilled once; the step then decodes
the next tokens teacher-forced, and both sides' logits must be identical (the same program on the same values).

    python benchmarks/hugepages.py                  # --what kv; ~1-3 min (TorchInductor's disk cache helps)
    python benchmarks/hugepages.py --what weights   # one JSON line each
"""
from __future__ import annotations

import argparse
import re
import statistics
import time

import torch
from _common import emit, loadavg, log, machine, text_windows

from picochat.checkpoints.io import load_model
from picochat.data.corpus import brown_documents
from picochat.engine.compiled import DecodeStep
from picochat.engine.kv_cache import new_stores
from picochat.hostmem import huge_pages_available


def anon_huge_kb() -> int:
    """This process's memory in transparent huge pages (kB)."""
    with open("/proc/self/smaps_rollup") as f:
        return int(re.search(r"AnonHugePages:\s+(\d+)", f.read()).group(1))


def huge_kb_under(tensors) -> int:
    """kB in transparent huge pages of the mappings holding these tensors (/proc/self/smaps)."""
    ptrs, total, inside = [t.data_ptr() for t in tensors], 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
            if head:
                lo, hi = int(head.group(1), 16), int(head.group(2), 16)
                inside = any(lo <= p < hi for p in ptrs)
            elif inside and line.startswith("AnonHugePages:"):
                total += int(line.split()[1])
    return total


def alias(t: torch.Tensor) -> torch.Tensor:
    """Another tensor on t's memory (to set_ t back to it)."""
    return torch.empty(0, dtype=t.dtype).set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


@torch.no_grad()
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--what", default="kv", choices=("kv", "weights"), help="the K/V cache's pages or the weights'")
    p.add_argument("--quantize", default="int4", choices=("int4", "int8"))
    p.add_argument("--keys", type=int, default=512, help="cached keys at the first timed step")
    p.add_argument("--batches", default="1,8", help="batch sizes, comma-separated")
    p.add_argument("--steps", type=int, default=128, help="timed steps per cache and batch")
    args = p.parse_args()
    if not huge_pages_available():
        raise SystemExit("no transparent huge pages to be had (they need Linux, "
                         "/sys/kernel/mm/transparent_hugepage/enabled not [never], and PICOCHAT_HUGE_PAGES not 0): "
                         "nothing to compare")
    if args.what == "weights" and "[always]" in open("/sys/kernel/mm/transparent_hugepage/enabled").read():
        raise SystemExit("transparent huge pages are [always] here: the 4 KB side's copy could get huge pages too")
    load0 = loadavg()
    model, tok, _ = load_model("smollm2", quantize=args.quantize)
    c = model.config
    packed = [b for n, b in model.named_buffers() if n.endswith(("weight_q4", "weight_q8"))]
    ids = torch.tensor(tok.encode(" ".join(d["text"] for d in brown_documents()[:60])), dtype=torch.long)
    t0 = time.perf_counter()
    step = DecodeStep(model).start(wait=True)
    log(f"compiled in {time.perf_counter() - t0:.1f} s")
    span = args.keys + args.steps + 1
    result = {}
    for B in [int(b) for b in args.batches.split(",")]:
        rows, prompt = text_windows(model, ids, B, args.keys, span)
        before = anon_huge_kb()
        caches, shape = {}, (B, c.n_kv_head, span, c.head_dim)
        for name, huge in (("huge_pages", True), ("4k_pages", False)):
            if args.what == "weights" and caches:  # one cache (in 2 MB pages) for both
                caches[name] = caches["huge_pages"]
                continue
            k, v = (new_stores(c.n_layer, shape, torch.bfloat16, huge=huge) for _ in range(2))
            for dst, src in zip(k + v, prompt.k + prompt.v):
                dst.copy_(src)
            caches[name] = (k, v)
        huge_kb = anon_huge_kb() - before
        weights = {}
        if args.what == "weights":
            if len({b.untyped_storage().data_ptr() for b in packed}) != 1:
                raise SystemExit("the loaded weights are not in one block of 2 MB pages: nothing to compare")
            weights = {"huge_pages": [alias(b) for b in packed], "4k_pages": [b.clone() for b in packed]}
            huge_kb = {name: huge_kb_under(ts) for name, ts in weights.items()}  # (the weights', not the cache's)

        def place(name):  # the weights' memory for the next call
            if args.what == "weights":
                for b, src in zip(packed, weights[name]):
                    b.set_(src.untyped_storage(), src.storage_offset(), src.shape, src.stride())

        def call(kv, s):  # step s: token keys + s of each row, written at column keys + s
            cols = torch.full((B,), args.keys + s, dtype=torch.long)
            mask = torch.ones(B, 1, 1, args.keys + s + 1, dtype=torch.bool)
            return step(rows[:, args.keys + s:args.keys + s + 1].clone(), cols.view(B, 1), mask, *kv, cols)

        for name, kv in caches.items():
            place(name)
            call(kv, 0)
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        times = {name: [] for name in caches}
        outs = {name: [] for name in caches}
        for s in range(args.steps):
            for name, kv in (list(caches.items()) if s % 2 else list(caches.items())[::-1]):
                place(name)
                t0 = time.perf_counter()
                out = call(kv, s)
                times[name].append(time.perf_counter() - t0)
                outs[name].append(out)
        if torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
            raise SystemExit("the step compiled again while timed: the figures would include a compile")
        same = all(torch.equal(a, b) for a, b in zip(outs["huge_pages"], outs["4k_pages"]))
        ms = {name: round(statistics.median(t) * 1e3, 3) for name, t in times.items()}
        result[f"batch_{B}"] = {"median_ms_per_step": ms, "4k_over_huge": round(ms["4k_pages"] / ms["huge_pages"], 3),
                                "same_logits": same, "huge_pages_kb": huge_kb}
        log(f"batch {B}: {result[f'batch_{B}']}")
        place("huge_pages")
        weights.clear()
        del caches, outs
    emit({"benchmark": "hugepages", "what": args.what, "quantize": args.quantize,
          "keys": [args.keys + 1, args.keys + args.steps], "steps": args.steps, **result,
          "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
