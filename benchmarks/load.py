"""Loading SmolLM2-135M-Instruct's GGUF: picochat's converted-weights cache against converting the GGUF every time
(the path before the cache, still there as PICOCHAT_NO_CACHE=1), in the same run.

Each load runs in a fresh process (so its peak RSS is its own: VmHWM, which execve resets, unlike ru_maxrss)
with an empty $PICOCHAT_HOME made for this run: `convert` is the plain path, `first` the first cached load
(converts and writes the cache), `cached` every load after it. Times are load_model() alone (the process's
python and torch imports are left out) and the median over --reps; the modes alternate within each rep.

    python benchmarks/load.py                 # ~1 min, one JSON line on stdout
    python benchmarks/load.py --dtypes bf16 --reps 5
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from _common import emit, loadavg, log, machine, median

CHILD = """
import sys, time, torch
from picochat.checkpoints.io import load_model
t = time.perf_counter()
kind = sys.argv[2]  # fp32, bf16, or int8/int4 (quantized from fp32 at first, then their own cache)
quantized = kind in ("int8", "int4")
load_model(sys.argv[1], dtype=None if quantized else {"fp32": torch.float32, "bf16": torch.bfloat16}[kind],
           quantize=kind if quantized else None)
dt = time.perf_counter() - t
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
print(dt, int(hwm.split()[1]) // 1024)
"""


def one(model: str, dtype: str, home: str, cache: bool) -> tuple[float, int]:
    env = dict(os.environ, PICOCHAT_HOME=home)
    env.pop("PICOCHAT_NO_CACHE", None)
    if not cache:
        env["PICOCHAT_NO_CACHE"] = "1"
    out = subprocess.run([sys.executable, "-c", CHILD, model, dtype], env=env, capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    seconds, mb = out.stdout.split()[-2:]
    return float(seconds), int(mb)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    load0, result = loadavg(), {}
    for dtype in args.dtypes.split(","):
        runs = {"convert": [], "first": [], "cached": []}
        for rep in range(args.reps):
            with tempfile.TemporaryDirectory() as home:  # (an empty cache each rep: `first` converts)
                order = ["convert", "first", "cached"] if rep % 2 == 0 else ["first", "cached", "convert"]
                for mode in order:
                    runs[mode].append(one(args.model, dtype, home, cache=mode != "convert"))
            log(f"{dtype} rep {rep}: " + ", ".join(f"{m} {v[-1][0]:.2f} s {v[-1][1]} MB" for m, v in runs.items()))
        stats = {m: {"seconds": round(median([s for s, _ in v]), 3), "peak_rss_mb": max(mb for _, mb in v)}
                 for m, v in runs.items()}
        result[dtype] = stats | {"cached_speedup_vs_convert": round(stats["convert"]["seconds"] /
                                                                    stats["cached"]["seconds"], 1)}
    emit({"benchmark": "load", "model": args.model, "reps": args.reps, **result,
          "load_before": load0, "load_after": loadavg(), **machine()})


if __name__ == "__main__":
    main()
